"""A text hypernetwork: a task's description (or its examples' task vector) -> every LoRA A and B at once,
in one forward. The text analogue of "Finetuning-Free Personalization of Text to Image Generation via
Hypernetworks" (arXiv 2511.03156), as Text-to-LoRA (arXiv 2506.06105) does for LLMs:

    e = E(description)             frozen MiniLM (or the ICM-LoRA task vector of a few examples)
    u = H(standardise(e))          H: MLP, cond -> hidden -> hidden -> D  (trainable, the only thing that is)
    {A_l, B_l} = unflatten(u * std)    std_t: the zoo's per-tensor scale (flat.py), so H's outputs are O(1)

    loss = LM loss of the frozen model with {A_l, B_l}, on the task's own data
           + lambda * sum_l (||A_l||^2 + ||B_l||^2)       the paper's L2 on H's outputs, on the tensors

trained over the zoo's tasks (end to end through the frozen LM, no imitation of the zoo's adapters); a
step's batch holds rows of several tasks, each row through its own task's predicted adapter (per_row_adapters).
H's last layer starts with zero weights and the zoo's mean adapter as its bias: LoRA with A = B = 0 has
zero gradient in both, so a start at zero output could not learn; at the mean adapter every task starts
where the zoo's tasks are, on average. An all-zero H gives A = B = 0: the base model, exactly.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from loraforge.adapters.inject import attach, detach, tensors_replaced
from loraforge.core.config import AdapterConfig
from loraforge.core.errors import LoraforgeError
from loraforge.generate.conditions import embed_texts, examples_vector, load_text_encoder, task_vector
from loraforge.generate.flat import FlatSpec
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
from loraforge.methods.base import adapter_layers
from loraforge.training.data import collate, load_dataset, read_rows
from loraforge.training.loss import mean_batch_loss

KIND = "hypernet"
CONDITIONS = ("description", "examples")


@dataclass
class HypernetConfig:
    condition: str = "description"  # or "examples": the ICM-LoRA task vector of a few examples
    hidden: int = 64
    steps: int = 300
    lr: float = 1e-3
    tasks_per_step: int = 4
    batch_size: int = 8  # rows of each task per step
    l2: float = 1e-4  # lambda
    max_length: int = 256  # an SST-2 row and its answer fit whole
    encoder: str = "minilm-l6"
    prompts: int = 8  # task vectors (condition "examples")
    shots: int = 4
    seed: int = 0

    def validate(self) -> None:
        if self.condition not in CONDITIONS:
            raise LoraforgeError(f"hypernet: condition must be one of {', '.join(CONDITIONS)}, got {self.condition!r}")


class Hypernetwork(nn.Module):
    def __init__(self, condition_dim: int, spec: FlatSpec, hidden: int):
        super().__init__()
        self.spec = spec
        sizes = torch.tensor([torch.Size(s).numel() for s in spec.shapes])
        self.register_buffer("scale", spec.std.repeat_interleave(sizes))  # (D,)
        self.body = nn.Sequential(nn.Linear(condition_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        self.head = nn.Linear(hidden, spec.length)
        nn.init.zeros_(self.head.weight)

    def start_at(self, mean_adapter: torch.Tensor) -> None:
        with torch.no_grad():
            self.head.bias.copy_(mean_adapter / self.scale)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(c)) * self.scale  # (B, D): raw A/B values

    def adapter(self, c: torch.Tensor) -> dict[str, torch.Tensor]:
        """One condition (C,) -> LoRA tensors keyed by model path (differentiable in H)."""
        return self.spec.unflatten(self(c[None])[0], normalise=False)


@contextlib.contextmanager
def per_row_adapters(model: nn.Module, states: list[dict[str, torch.Tensor]]) -> Iterator[None]:
    """For the duration, row b of a batch runs through the attached LoRA layers with states[b]'s A and B
    (the hypernetwork's outputs for that row's task): several tasks in one forward."""
    hooks = []
    for name, layer in adapter_layers(model).items():
        a = torch.stack([s[f"{name}.lora_A.weight"] for s in states])  # (B, r, d_in)
        b = torch.stack([s[f"{name}.lora_B.weight"] for s in states])  # (B, d_out, r)

        def add_rows(module: nn.Module, inputs: tuple, output: torch.Tensor, a=a, b=b) -> torch.Tensor:
            x = inputs[0].to(a.dtype)  # (B, T, d_in)
            return output + module.scaling * (x @ a.transpose(1, 2)) @ b.transpose(1, 2)  # (B, T, d_out)

        hooks.append(layer.register_forward_hook(add_rows))
    try:  # the layers' own A and B are zero meanwhile: each row gets its own update only
        with tensors_replaced(model, {k: torch.zeros_like(v) for k, v in states[0].items()}):
            yield
    finally:
        for hook in hooks:
            hook.remove()


def l2_of(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """sum_l ||A_l||^2 + ||B_l||^2 over the predicted tensors."""
    return sum(t.pow(2).sum() for t in state.values())


def zoo_conditions(zoo: Zoo, config: HypernetConfig, model: Any, tokenizer: Any, encoder: Any) -> torch.Tensor:
    if config.condition == "description":
        return embed_texts([t.description for t in zoo.tasks], encoder or load_text_encoder(config.encoder))
    return torch.stack([task_vector(model, tokenizer, read_rows(t.train), config.prompts, config.shots, config.seed)
                        for t in zoo.tasks])


def train_hypernet(zoo: Zoo, out: str | Path, config: HypernetConfig | None = None, model: Any = None,
                   tokenizer: Any = None, encoder: Any = None, progress: bool = True) -> Path:
    """Train H through the frozen base model on the zoo tasks' training data; write the generator."""
    config = config or HypernetConfig()
    config.validate()
    data = ZooData.read(zoo)
    if model is None:
        from loraforge.core.models import default_device, load_model

        model, tokenizer = load_model(zoo.model, task="causal-lm")
        model.to(default_device())
    device = next(model.parameters()).device
    conditions = zoo_conditions(zoo, config, model, tokenizer, encoder)
    scaler = Standardiser.fit(conditions)
    torch.manual_seed(config.seed)
    hyper = Hypernetwork(conditions.shape[1], data.spec, config.hidden)
    hyper.start_at(torch.stack([data.spec.flatten(s, normalise=False) for task in data.states for s in task]).mean(0))
    hyper.to(device)
    conditions, scaler = conditions.to(device), Standardiser(scaler.mean.to(device), scaler.scale.to(device))
    attach(model, AdapterConfig.from_dict({**data.config.to_dict(), "target_modules": data.targets}))
    try:
        history = _fit(hyper, model, tokenizer, zoo, conditions, scaler, config, progress)
    finally:
        detach(model)  # the caller's model comes back as it was given
    tensors = {**prefixed("hyper", hyper.state_dict()), **data.spec.to_tensors(), **scaler.to_tensors("condition")}
    return save_generator(out, data.record(KIND, config, history), tensors)


def _fit(hyper: Hypernetwork, model: Any, tokenizer: Any, zoo: Zoo, conditions: torch.Tensor, scaler: Standardiser,
         config: HypernetConfig, progress: bool) -> list[dict[str, float]]:
    from tqdm.auto import tqdm

    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()  # no dropout: the frozen LM is a fixed function of the predicted tensors
    datasets = [load_dataset(t.train, tokenizer, max_length=config.max_length) for t in zoo.tasks]
    pad_id = tokenizer.pad_token_id or 0
    optimizer = torch.optim.AdamW(hyper.parameters(), lr=config.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.steps)
    rng = random.Random(config.seed)
    history = []
    bar = tqdm(range(config.steps), disable=not progress, desc="hypernet", unit="step")
    for step in bar:
        chosen = rng.sample(range(len(zoo.tasks)), min(config.tasks_per_step, len(zoo.tasks)))
        states = [hyper.adapter(scaler(conditions[i])) for i in chosen]
        rows, row_states = [], []
        for i, state in zip(chosen, states):  # every chosen task's rows in one batch, each with its own adapter
            picked = rng.sample(range(len(datasets[i])), min(config.batch_size, len(datasets[i])))
            rows += [datasets[i][j] for j in picked]
            row_states += [state] * len(picked)
        with per_row_adapters(model, row_states):
            lm = mean_batch_loss(model, collate(rows, pad_id), "causal-lm")
        l2 = sum(l2_of(state) for state in states) / len(states)
        (lm + config.l2 * l2).backward()
        lm_sum, l2_sum = lm.item(), l2.item()
        torch.nn.utils.clip_grad_norm_(hyper.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        if (step + 1) % 10 == 0 or step + 1 == config.steps:
            history.append({"step": step + 1, "lm_loss": lm_sum, "l2": l2_sum})
            bar.set_postfix(lm=f"{lm_sum:.4f}")
    return history


class Hypernet:
    """A trained hypernetwork: `generate(condition)` -> LoRA tensors, one forward."""

    def __init__(self, record: GeneratorRecord, tensors: dict[str, torch.Tensor], encoder: Any = None):
        if record.kind != KIND:
            raise LoraforgeError(f"a {record.kind} generator is not a {KIND} one")
        self.record, self.config = record, HypernetConfig(**record.config)
        self.scaler = Standardiser.from_tensors("condition", tensors)
        self.net = Hypernetwork(len(self.scaler.mean), flat_spec(record, tensors), self.config.hidden)
        self.net.load_state_dict(unprefixed("hyper", tensors))
        self.net.eval()
        self.encoder = encoder

    @classmethod
    def load(cls, path: str | Path, model: str | None = None, encoder: Any = None) -> "Hypernet":
        return cls(*load_generator(path, model), encoder=encoder)

    @torch.no_grad()
    def generate(self, condition: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.net.adapter(self.scaler(condition.float()))

    def condition_of(self, description: str | None = None, examples: str | None = None, model: Any = None,
                     tokenizer: Any = None) -> torch.Tensor:
        if self.config.condition == "description":
            if description is None:
                raise LoraforgeError("this hypernet generator reads a description: pass --description TEXT")
            if self.encoder is None:
                self.encoder = load_text_encoder(self.config.encoder)
            return embed_texts([description], self.encoder)[0]
        if examples is None:
            raise LoraforgeError("this hypernet generator reads examples (its condition is a task vector): "
                                 "pass --examples FILE")
        if model is None:
            from loraforge.core.models import load_model

            model, tokenizer = load_model(self.record.base_model, task="causal-lm")
        return examples_vector(model, tokenizer, examples, self.config.prompts, self.config.shots, self.config.seed)
