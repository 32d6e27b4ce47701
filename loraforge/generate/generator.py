"""What every generator shares: its folder on disk, the zoo it learnt from, and writing what it samples.

    GEN/generator.json           GeneratorRecord: kind, zoo, base model, adapter tensors' keys and shapes,
                                 the zoo's adapter config (the template of every sampled adapter), the
                                 generator's own config, the zoo tasks it saw, its training log
    GEN/generator.safetensors    the network, the flat statistics, the condition statistics, ...

A sampled adapter is an ordinary PEFT-format LoRA folder for the recorded base model, and sampling
for another base model is refused.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from loraforge.core.config import AdapterConfig, read_adapter_config
from loraforge.core.errors import LoraforgeError
from loraforge.core.files import atomic_dir
from loraforge.generate.flat import FlatSpec, read_states, write_lora
from loraforge.generate.zoo import Zoo

RECORD_NAME = "generator.json"
WEIGHTS_NAME = "generator.safetensors"


@dataclass
class GeneratorRecord:
    kind: str
    zoo: str
    base_model: str
    keys: list[str]
    shapes: list[list[int]]
    adapter_config: dict[str, Any]
    targets: list[str]
    config: dict[str, Any]
    tasks: list[dict[str, str]] = field(default_factory=list)  # id, value, description of each zoo task
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class ZooData:
    """A zoo as a generator's training set: every checkpoint's tensors, per task."""

    zoo: Zoo
    states: list[list[dict[str, torch.Tensor]]]  # [task][checkpoint] -> tensors keyed by model path
    spec: FlatSpec  # fitted on every checkpoint of every task
    config: AdapterConfig
    targets: list[str]

    @classmethod
    def read(cls, zoo: Zoo) -> "ZooData":
        states = [read_states(t.adapters) for t in zoo.tasks]
        spec = FlatSpec.fit([s for task in states for s in task])
        for task, task_states in zip(zoo.tasks, states):
            for adapter, state in zip(task.adapters, task_states):
                spec.check(state, adapter)
        config, peft_json = read_adapter_config(zoo.tasks[0].final)
        return cls(zoo, states, spec, config, list(peft_json["target_modules"]))

    def record(self, kind: str, config: Any, history: list[dict]) -> GeneratorRecord:
        return GeneratorRecord(
            kind=kind, zoo=str(self.zoo.root.resolve()), base_model=self.zoo.model, keys=self.spec.keys,
            shapes=[list(s) for s in self.spec.shapes], adapter_config=self.config.to_dict(), targets=self.targets,
            config=dataclasses.asdict(config), history=history,
            tasks=[{"id": t.id, "value": t.value, "description": t.description} for t in self.zoo.tasks])


def save_generator(out: str | Path, record: GeneratorRecord, tensors: dict[str, torch.Tensor]) -> Path:
    with atomic_dir(out) as tmp:
        save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS_NAME))
        (tmp / RECORD_NAME).write_text(json.dumps(dataclasses.asdict(record), indent=2) + "\n")
    return Path(out)


def load_generator(path: str | Path, model: str | None = None) -> tuple[GeneratorRecord, dict[str, torch.Tensor]]:
    """The record and tensors of GEN; `model`, when given, must be the base the generator was trained for."""
    path = Path(path)
    if not (path / RECORD_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
        raise LoraforgeError(f"{path}: not a generator folder (no {RECORD_NAME} / {WEIGHTS_NAME}; "
                             f"train one with `loraforge generator train`)")
    try:
        record = GeneratorRecord(**json.loads((path / RECORD_NAME).read_text()))
    except (json.JSONDecodeError, TypeError) as exc:
        raise LoraforgeError(f"{path / RECORD_NAME}: not a generator record ({exc})") from None
    if model is not None and model != record.base_model:
        raise LoraforgeError(f"{path}: this {record.kind} generator makes adapters for {record.base_model!r} (its zoo "
                             f"{record.zoo}), not for {model!r}: train one on a zoo of {model!r}")
    return record, load_file(str(path / WEIGHTS_NAME))


def flat_spec(record: GeneratorRecord, tensors: dict[str, torch.Tensor]) -> FlatSpec:
    return FlatSpec.from_tensors(record.keys, record.shapes, tensors)


def write_generated(out: str | Path, record: GeneratorRecord, state: dict[str, torch.Tensor],
                    provenance: dict[str, Any]) -> Path:
    config = AdapterConfig.from_dict(record.adapter_config)
    return write_lora(out, config, record.targets, state, {"generated": {"kind": record.kind, "zoo": record.zoo,
                                                                         **provenance}})


class Standardiser:
    """Conditions centred on the zoo tasks' mean and divided by their root-mean-square entry (one scalar,
    so a direction along which the zoo barely varies is not blown up): the networks see unit-size entries."""

    def __init__(self, mean: torch.Tensor, scale: torch.Tensor):
        self.mean, self.scale = mean, scale

    @classmethod
    def fit(cls, c: torch.Tensor) -> "Standardiser":
        mean = c.mean(0)
        scale = (c - mean).pow(2).mean().sqrt().clamp_min(1e-8) if len(c) > 1 else torch.tensor(1.0)
        return cls(mean, scale)

    def __call__(self, c: torch.Tensor) -> torch.Tensor:
        return (c - self.mean) / self.scale

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.mean": self.mean, f"{prefix}.scale": self.scale.reshape(1)}

    @classmethod
    def from_tensors(cls, prefix: str, tensors: dict[str, torch.Tensor]) -> "Standardiser":
        return cls(tensors[f"{prefix}.mean"], tensors[f"{prefix}.scale"][0])


def prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in tensors.items()}


def unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
