"""ICM-LoRA: In-Context Meta LoRA Generation (arXiv 2501.17635).

A CVAE (cvae.py) learns the distribution of a task's LoRA weights given the task's vector:

    train:  x = flat z-scored checkpoint of task tau (flat.py),  c_tau = task vector of tau (conditions.py)
            min  MSE(Dec(z, c), x) + 0.005 KL(q(z | x, c) || N(0, I))
    sample: c* = task vector of the new task's examples;  z ~ N(0, I) (seeded) or z = 0
            x_hat = Dec(z, c*)  -> un-normalise per tensor -> A, B  -> a PEFT-format LoRA folder

Every checkpoint of a task is a sample of that task's distribution (the zoo keeps K). The task vectors
are standardised over the zoo's tasks before conditioning (generator.Standardiser).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loraforge.core.errors import LoraforgeError
from loraforge.generate.conditions import examples_vector, task_vector
from loraforge.generate.cvae import CVAE, CVAEConfig, train_cvae
from loraforge.generate.generator import (
    GeneratorRecord,
    Standardiser,
    ZooData,
    flat_spec,
    load_generator,
    prefixed,
    save_generator,
    unprefixed,
)
from loraforge.generate.zoo import Zoo
from loraforge.training.data import read_rows

KIND = "icm-lora"


@dataclass
class ICMLoRAConfig:
    cvae: CVAEConfig = field(default_factory=CVAEConfig)
    prompts: int = 8  # in-context prompts averaged into a task vector
    shots: int = 4  # examples per prompt
    seed: int = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ICMLoRAConfig":
        cvae = dict(d["cvae"], channels=tuple(d["cvae"]["channels"]))
        return cls(**{**d, "cvae": CVAEConfig(**cvae)})


def train_icm_lora(zoo: Zoo, out: str | Path, config: ICMLoRAConfig | None = None, model: Any = None,
                   tokenizer: Any = None, progress: bool = True) -> Path:
    """Fit the CVAE on every checkpoint of every zoo task; write the generator to `out`."""
    config = config or ICMLoRAConfig()
    data = ZooData.read(zoo)
    if model is None:
        from loraforge.core.models import load_model

        model, tokenizer = load_model(zoo.model, task="causal-lm")
    vectors = torch.stack([task_vector(model, tokenizer, read_rows(t.train), config.prompts, config.shots, config.seed)
                           for t in zoo.tasks])  # (tasks, d_model)
    scaler = Standardiser.fit(vectors)
    conditions = scaler(vectors)
    x = torch.stack([data.spec.flatten(s) for task in data.states for s in task])  # (tasks x K, D)
    c = torch.cat([conditions[i].expand(len(task), -1) for i, task in enumerate(data.states)])  # (tasks x K, d_model)
    cvae, history = train_cvae(x, c, config.cvae, progress=progress)
    tensors = {**prefixed("cvae", cvae.state_dict()), **data.spec.to_tensors(), **scaler.to_tensors("condition"),
               "zoo.task_vectors": vectors}
    return save_generator(out, data.record(KIND, config, history), tensors)


class ICMLoRA:
    """A trained ICM-LoRA generator: `generate(task_vector, seed)` -> LoRA tensors keyed by model path."""

    def __init__(self, record: GeneratorRecord, tensors: dict[str, torch.Tensor]):
        if record.kind != KIND:
            raise LoraforgeError(f"a {record.kind} generator is not an {KIND} one")
        self.record, self.config = record, ICMLoRAConfig.from_dict(record.config)
        self.spec = flat_spec(record, tensors)
        self.scaler = Standardiser.from_tensors("condition", tensors)
        self.cvae = CVAE(self.spec.length, len(self.scaler.mean), self.config.cvae)
        self.cvae.load_state_dict(unprefixed("cvae", tensors))
        self.cvae.eval()

    @classmethod
    def load(cls, path: str | Path, model: str | None = None) -> "ICMLoRA":
        return cls(*load_generator(path, model))

    def generate(self, vector: torch.Tensor, seed: int | None = 0) -> dict[str, torch.Tensor]:
        """z ~ N(0, I) drawn from `seed`; seed None decodes z = 0."""
        x = self.cvae.sample(self.scaler(vector.float())[None], seed)[0]
        return self.spec.unflatten(x)

    def vector_of(self, examples: str, model: Any = None, tokenizer: Any = None) -> torch.Tensor:
        if model is None:
            from loraforge.core.models import load_model

            model, tokenizer = load_model(self.record.base_model, task="causal-lm")
        return examples_vector(model, tokenizer, examples, self.config.prompts, self.config.shots, self.config.seed)
