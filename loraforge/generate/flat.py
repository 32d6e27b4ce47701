"""Adapters as vectors: flatten a LoRA's tensors into one vector and back, with a per-tensor z-score,
and the expert merge on delta W (SG-LoRA's baseline, the zoo average).

ICM-LoRA (arXiv 2501.17635, §3.2) z-scores each tensor t, x = concat_t (t - mean_t) / std_t, and keeps
(mean_t, std_t, shape_t) to invert. A generated adapter belongs to a task no checkpoint came from, so
the statistics here are the zoo's: mean_t and std_t over every value of tensor t in every zoo adapter.
They scale each tensor to unit size for the generator and invert exactly for any vector.

    keys   sorted state-dict keys (model paths: ...q_proj.lora_A.weight)
    x      (D,)  D = sum of the tensors' sizes; the CVAE pads and cuts its own padding
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from loraforge.adapters.io import PEFT_PREFIX, read_adapter
from loraforge.core.config import CONFIG_NAME, LORAFORGE_CONFIG_NAME, WEIGHTS_NAME, AdapterConfig
from loraforge.core.errors import AdapterError
from loraforge.core.files import atomic_dir

MIN_STD = 1e-8  # a tensor that is constant over the whole zoo (never the case for a trained B) keeps scale 1


@dataclass
class FlatSpec:
    keys: list[str]
    shapes: list[tuple[int, ...]]
    mean: torch.Tensor  # (T,) per tensor, over the zoo
    std: torch.Tensor  # (T,)

    @property
    def length(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    @classmethod
    def fit(cls, states: list[dict[str, torch.Tensor]]) -> "FlatSpec":
        keys = sorted(states[0])
        shapes = [tuple(states[0][k].shape) for k in keys]
        mean, std = [], []
        for key in keys:
            values = torch.stack([s[key].double() for s in states])
            mean.append(values.mean())
            std.append(values.std(correction=0).clamp_min(MIN_STD) if values.numel() > 1 else torch.tensor(1.0))
        return cls(keys, shapes, torch.stack(mean).float(), torch.stack(std).float())

    def check(self, state: dict[str, torch.Tensor], where: str) -> None:
        if sorted(state) != self.keys:
            extra, missing = sorted(set(state) - set(self.keys)), sorted(set(self.keys) - set(state))
            raise AdapterError(f"{where}: its tensors differ from the zoo's (extra {extra[:2]}, missing {missing[:2]})")
        for key, shape in zip(self.keys, self.shapes):
            if tuple(state[key].shape) != shape:
                raise AdapterError(f"{where}: {key} has shape {tuple(state[key].shape)}, the zoo's is {shape}")

    def flatten(self, state: dict[str, torch.Tensor], normalise: bool = True) -> torch.Tensor:
        parts = [state[k].float().reshape(-1) for k in self.keys]
        if normalise:
            parts = [(p - m) / s for p, m, s in zip(parts, self.mean, self.std)]
        return torch.cat(parts)  # (D,)

    def unflatten(self, x: torch.Tensor, normalise: bool = True) -> dict[str, torch.Tensor]:
        if x.shape != (self.length,):
            raise AdapterError(f"a flat adapter has {self.length} values, got shape {tuple(x.shape)}")
        out, start = {}, 0
        for i, (key, shape) in enumerate(zip(self.keys, self.shapes)):
            n = math.prod(shape)
            part = x[start:start + n]
            out[key] = (part * self.std[i] + self.mean[i] if normalise else part).reshape(shape).contiguous()
            start += n
        return out

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"flat.mean": self.mean, "flat.std": self.std}

    @classmethod
    def from_tensors(cls, keys: list[str], shapes: list[list[int]], tensors: dict[str, torch.Tensor]) -> "FlatSpec":
        return cls(list(keys), [tuple(s) for s in shapes], tensors["flat.mean"], tensors["flat.std"])


def read_states(adapter_dirs: list[str]) -> list[dict[str, torch.Tensor]]:
    """The adapters' tensors (keyed by model path), checked to share keys and shapes with the first."""
    states = [read_adapter(d)[2] for d in adapter_dirs]
    spec = FlatSpec.fit(states[:1])
    for d, state in zip(adapter_dirs, states):
        spec.check(state, d)
    return states


def write_lora(out: str | Path, config: AdapterConfig, targets: list[str], state: dict[str, torch.Tensor],
               provenance: dict | None = None, extra: Callable[[Path], None] | None = None) -> Path:
    """An ordinary PEFT-format LoRA folder from tensors keyed by model path (what `save_adapter` writes
    for an attached model, without needing the model); `extra(folder)` adds files of its own before the
    folder is renamed into place."""
    import json

    config = AdapterConfig.from_dict({**config.to_dict(), "provenance": {**config.provenance, **(provenance or {})}})
    with atomic_dir(out) as tmp:
        save_file({PEFT_PREFIX + k: v.detach().float().contiguous() for k, v in state.items()},
                  str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config.to_peft_dict(targets, "LORA"), indent=2) + "\n")
        (tmp / LORAFORGE_CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        if extra is not None:
            extra(tmp)
    return Path(out)


def merge_on_delta_w(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Sum_i w_i B_i A_i, exactly, as one LoRA of rank k*r: B = [sqrt(w_i) B_i] side by side, A = [sqrt(w_i)
    A_i] stacked, so B A = sum_i w_i B_i A_i with the same scale alpha / r per expert (the caller writes the
    merged rank with alpha scaled by k). Averaging A and B apart would give (sum w B)(sum w A), which is
    not the experts' average update (tests/test_generate_cvae.py pins the difference)."""
    if any(w < 0 for w in weights):
        raise AdapterError(f"merge weights must be non-negative, got {weights}")
    merged = {}
    for key in states[0]:
        root = [w ** 0.5 for w in weights]
        if key.endswith("lora_A.weight"):
            merged[key] = torch.cat([r * s[key] for r, s in zip(root, states)], dim=0)  # (k r, d_in)
        elif key.endswith("lora_B.weight"):
            merged[key] = torch.cat([r * s[key] for r, s in zip(root, states)], dim=1)  # (d_out, k r)
        else:
            raise AdapterError(f"cannot merge {key!r}: only plain LoRA A/B tensors merge on delta W")
    return merged


def write_merged(out: str | Path, config: AdapterConfig, targets: list[str], states: list[dict[str, torch.Tensor]],
                 weights: list[float], provenance: dict | None = None) -> Path:
    """Write sum_i w_i delta W_i as a plain LoRA of rank k*r, same scale (alpha * k over rank * k)."""
    if config.rank_pattern or config.alpha_pattern or config.use_rslora:
        raise AdapterError("the delta-W merge writes one rank and scale: adapters with rank/alpha patterns or rsLoRA "
                           "are not supported")
    k = len(states)
    merged_config = AdapterConfig.from_dict({**config.to_dict(), "rank": config.rank * k, "alpha": config.alpha * k})
    return write_lora(out, merged_config, targets, merge_on_delta_w(states, weights), provenance)
