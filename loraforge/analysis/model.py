"""Whole-model analysis: per-module spectra, effective rank and intruders; mitigation into a new adapter.

Every module is handled alone in float32: SVDs of W0, W' = W0 + dW and dW (each O(m n min(m, n));
a 4096 x 4096 matrix takes seconds on a CPU), then its tensors are dropped. W0's SVD is redone for
each source compared: keeping U0 for a 7B model would cost ~14 GB.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from loraforge.adapters.io import save_adapter
from loraforge.analysis.intruder_dims import Intruders, find_intruders, low_rank_factors, mitigated_update
from loraforge.analysis.spectra import effective_rank, numerical_rank, subspace_similarity
from loraforge.analysis.weights import open_updates
from loraforge.core.config import read_adapter_config
from loraforge.core.errors import AdapterError, LoraforgeError

MAX_SUBSPACE_DIM = 64  # right singular vectors kept per update for adapter-vs-adapter similarity


@dataclass
class ModuleAnalysis:
    shape: tuple[int, int]  # (d_out, d_in)
    intruders: Intruders
    update_spectrum: torch.Tensor  # (min(m, n),) singular values of dW
    effective_rank: float  # Roy & Vetterli's, of dW
    update_norm: float  # ||dW||_F
    relative_norm: float  # ||dW||_F / ||W0||_F
    right_vectors: torch.Tensor | None  # (<= MAX_SUBSPACE_DIM, d_in) top right singular vectors of dW


def check_settings(k: int, epsilon: float, lam: float = 1.0) -> None:
    if not isinstance(k, int) or k < 1:
        raise LoraforgeError(f"k must be a positive integer, got {k!r}")
    if not 0.0 < epsilon <= 1.0:
        raise LoraforgeError(f"epsilon is a cosine threshold in (0, 1], got {epsilon!r}")
    if lam < 0:
        raise LoraforgeError(f"the mitigation lambda scales singular values and must be >= 0, got {lam!r}")


def analyze(model: nn.Module, source: str | Path | None = None, k: int = 10, epsilon: float = 0.5,
            keep_subspace: bool = False, label: str | None = None) -> dict[str, ModuleAnalysis]:
    """Analyse `source` (see weights.open_updates) against the base `model`, module by module.

    keep_subspace keeps the top right singular vectors of each dW, for `adapter_similarity`."""
    check_settings(k, epsilon)
    results = {}
    with open_updates(model, source) as updates:
        for name, load in tqdm(updates.items(), desc=f"analyse {label or source or 'adapter'}", unit="module"):
            w0, delta = load()  # (d_out, d_in) float32
            if keep_subspace:
                _, spectrum, vh = torch.linalg.svd(delta, full_matrices=False)
                right = vh[: min(numerical_rank(spectrum), MAX_SUBSPACE_DIM)].clone()
            else:
                spectrum, right = torch.linalg.svdvals(delta), None
            norm, base_norm = float(torch.linalg.matrix_norm(delta)), float(torch.linalg.matrix_norm(w0))
            results[name] = ModuleAnalysis(
                shape=tuple(w0.shape), intruders=find_intruders(w0, w0 + delta, k, epsilon),
                update_spectrum=spectrum, effective_rank=effective_rank(spectrum), update_norm=norm,
                relative_norm=norm / base_norm if base_norm > 0 else float("inf"), right_vectors=right,
            )
    return results


def intruders(model: nn.Module, source: str | Path | None = None, k: int = 10,
              epsilon: float = 0.5) -> dict[str, Intruders]:
    """Per adapted module: counts (`.count`), the c_i (`.max_cosine`) and |U'^T U0| (`.similarity`)."""
    return {name: result.intruders for name, result in analyze(model, source, k, epsilon).items()}


def adapter_similarity(first: dict[str, ModuleAnalysis], second: dict[str, ModuleAnalysis]) -> dict[str, float]:
    """phi(dW1, dW2, i, i) per module both sides share, i = the smaller numerical rank (capped at
    MAX_SUBSPACE_DIM): the shared dimension, so a full fine-tune (full rank) is measured on its top
    directions instead of trivially containing every subspace."""
    similarity = {}
    for name in (n for n in first if n in second):
        u, v = first[name].right_vectors, second[name].right_vectors
        if u is None or v is None:
            raise ValueError("analyse both sides with keep_subspace=True")
        i = min(u.shape[0], v.shape[0])
        similarity[name] = subspace_similarity(u[:i], v[:i], i, i)
    return similarity


def mitigate(model: nn.Module, adapter_dir: str | Path, out_dir: str | Path, lam: float = 0.75, k: int = 10,
             epsilon: float = 0.5) -> dict[str, list[int]]:
    """Write to `out_dir` the LoRA adapter of `adapter_dir` with its intruders scaled by `lam`.

    Same config, same rank per module; modules without intruders keep their A and B untouched
    (as PEFT does), the others get the rank-r factors of dW_mit / s. Returns the intruder indices
    found per module."""
    check_settings(k, epsilon, lam)
    config, _ = read_adapter_config(adapter_dir)
    if config.method != "lora":
        raise AdapterError(f"{adapter_dir}: mitigation re-factors plain LoRA adapters only, this one is {config.method!r}")
    found = {}
    with open_updates(model, adapter_dir) as updates:
        for name, load in tqdm(updates.items(), desc=f"mitigate {adapter_dir}", unit="module"):
            layer = model.get_submodule(name)
            state = {key.removeprefix(name + ".") for key in model.loraforge_adapter_keys if key.startswith(name + ".")}
            if state != {"lora_A.weight", "lora_B.weight"}:
                raise AdapterError(f"{adapter_dir}: {name} holds {sorted(state)}, not a plain LoRA pair A, B")
            w0, delta = load()
            new_delta, found[name] = mitigated_update(w0, delta, k, epsilon, lam)  # (d_out, d_in)
            if found[name]:
                lora_b, lora_a = low_rank_factors(new_delta / layer.scaling, layer.rank)  # (d_out, r), (r, d_in)
                with torch.no_grad():
                    layer.lora_B.weight.copy_(lora_b)
                    layer.lora_A.weight.copy_(lora_a)
        save_adapter(model, out_dir)
    return found
