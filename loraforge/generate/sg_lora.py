"""SG-LoRA: Semantic-guided LoRA Parameters Generation (arXiv 2509.10535).

A LoRA for a task no one has data for, from its description alone. Offline, each zoo task i (an expert)
has a description d_i embedded by a frozen text encoder, e_i = E(d_i) (MiniLM, L2-normalised), and the
CVAE (cvae.py) learns p(theta | z, c) on (theta_i, c_i = e_i) over every checkpoint. Online:

    s_i = cos(e_t, e_i)                      e_t = E(d_t), the new task's description
    w_i = softmax(s_i / T) over the top-k    (0 outside the top k)
    c_t = sum_i w_i e_i                      the semantic condition, built from the experts
    theta_t = Dec(z, c_t),  z ~ N(0, I) or z = 0;  no gradient step on the new task

The paper leaves k, T and whether e_t itself joins the condition unstated: here k = 3, T = 0.05 (cosines
of MiniLM embeddings of similar sentences differ by a few hundredths) and c_t is the experts' mix only.
Baseline: the same weights merging the experts' own adapters on delta W (flat.write_merged), exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loraforge.core.config import AdapterConfig
from loraforge.core.errors import LoraforgeError
from loraforge.generate.conditions import embed_texts, load_text_encoder
from loraforge.generate.cvae import CVAE, CVAEConfig, train_cvae
from loraforge.generate.flat import read_states, write_merged
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
from loraforge.generate.zoo import Zoo, load_zoo

KIND = "sg-lora"


@dataclass
class SGLoRAConfig:
    cvae: CVAEConfig = field(default_factory=CVAEConfig)
    top_k: int = 3
    temperature: float = 0.05
    encoder: str = "minilm-l6"
    seed: int = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SGLoRAConfig":
        return cls(**{**d, "cvae": CVAEConfig(**dict(d["cvae"], channels=tuple(d["cvae"]["channels"])))})


def expert_weights(similarities: torch.Tensor, top_k: int, temperature: float) -> torch.Tensor:
    """w (N,): softmax(s / T) over the k most similar experts, 0 elsewhere; T = 0 is the arg-max, one-hot."""
    k = min(top_k, len(similarities))
    top = torch.topk(similarities, k)
    weights = torch.zeros_like(similarities)
    if temperature == 0:
        weights[top.indices[0]] = 1.0
    else:
        weights[top.indices] = torch.softmax(top.values / temperature, dim=0)
    return weights


def semantic_condition(query: torch.Tensor, experts: torch.Tensor, top_k: int, temperature: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_t (d,), w (N,)) for a description embedding `query` (d,) and the experts' embeddings (N, d)."""
    weights = expert_weights(experts @ query, top_k, temperature)  # cosines: both sides L2-normalised
    return weights @ experts, weights


def train_sg_lora(zoo: Zoo, out: str | Path, config: SGLoRAConfig | None = None, encoder: Any = None,
                  progress: bool = True) -> Path:
    config = config or SGLoRAConfig()
    data = ZooData.read(zoo)
    experts = embed_texts([t.description for t in zoo.tasks], encoder or load_text_encoder(config.encoder))
    scaler = Standardiser.fit(experts)
    conditions = scaler(experts)
    x = torch.stack([data.spec.flatten(s) for task in data.states for s in task])  # (tasks x K, D)
    c = torch.cat([conditions[i].expand(len(task), -1) for i, task in enumerate(data.states)])
    cvae, history = train_cvae(x, c, config.cvae, progress=progress)
    tensors = {**prefixed("cvae", cvae.state_dict()), **data.spec.to_tensors(), **scaler.to_tensors("condition"),
               "experts.embeddings": experts}
    return save_generator(out, data.record(KIND, config, history), tensors)


class SGLoRA:
    """A trained SG-LoRA generator: `generate(description, seed)` -> (LoRA tensors, expert weights)."""

    def __init__(self, record: GeneratorRecord, tensors: dict[str, torch.Tensor], encoder: Any = None):
        if record.kind != KIND:
            raise LoraforgeError(f"a {record.kind} generator is not an {KIND} one")
        self.record, self.config = record, SGLoRAConfig.from_dict(record.config)
        self.spec = flat_spec(record, tensors)
        self.scaler = Standardiser.from_tensors("condition", tensors)
        self.experts = tensors["experts.embeddings"]  # (N, d)
        self.cvae = CVAE(self.spec.length, self.experts.shape[1], self.config.cvae)
        self.cvae.load_state_dict(unprefixed("cvae", tensors))
        self.cvae.eval()
        self.encoder = encoder

    @classmethod
    def load(cls, path: str | Path, model: str | None = None, encoder: Any = None) -> "SGLoRA":
        return cls(*load_generator(path, model), encoder=encoder)

    def embed(self, description: str) -> torch.Tensor:
        if self.encoder is None:
            self.encoder = load_text_encoder(self.config.encoder)
        return embed_texts([description], self.encoder)[0]

    def generate(self, description: str, seed: int | None = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        condition, weights = semantic_condition(self.embed(description), self.experts, self.config.top_k,
                                                self.config.temperature)
        x = self.cvae.sample(self.scaler(condition)[None], seed)[0]
        return self.spec.unflatten(x), weights

    def write_expert_merge(self, description: str, out: str | Path) -> Path:
        """The baseline: the top-k experts' final adapters merged on delta W with the same weights."""
        _, weights = semantic_condition(self.embed(description), self.experts, self.config.top_k,
                                        self.config.temperature)
        zoo = load_zoo(self.record.zoo)
        chosen = [i for i in range(len(weights)) if weights[i] > 0]
        ids = [self.record.tasks[i]["id"] for i in chosen]  # the generator's order, whatever the zoo's now
        states = read_states([zoo.task(task_id).final for task_id in ids])
        return write_merged(out, AdapterConfig.from_dict(self.record.adapter_config), self.record.targets, states,
                            [float(weights[i]) for i in chosen],
                            {"merged": {"experts": ids, "description": description}})
