"""DiffoRA: a differentiable module-selection matrix decides which modules keep a low-rank adapter.

DiffoRA: Enabling Parameter-Efficient LLM Fine-Tuning via Differential Low-Rank Matrix Adaptation,
Jiang, Wang & Yuan (arXiv 2502.08905; v2 "... via Differential Module Selection"). The Differential
Adaptation Matrix (DAM) Gamma in {0,1}^M (layers x module types, flattened here to the M target
modules) is relaxed, learned by gradient descent, then discretised:

    h_m = W0_m x + gamma_m * s B_m A_m x,       gamma_m = sigmoid(beta_m),  beta = 0 at the start
    search: alternate adapter steps on training batches and beta steps on validation batches
    Gamma_m = 1 for the ceil(rho * M) modules with the largest beta_m (ties: module order), 0 otherwise
    weight sharing: the kept modules start fine-tuning from the A, B learnt during the search

Decisions (no reference code is public; the paper's parametrisation and defaults could not be read):
  - relaxation by a sigmoid per module (the spec's first option); beta starts at 0 (gamma = 1/2);
  - the search is Flexora's alternation (`select.gated_search`): Adam on beta at `--select-lr`,
    AdamW on the adapter at `--lr`, `--select-steps` steps; the beta gradient is first order by
    default, the one-step unrolled (DARTS) hyper-gradient with `--select-order 2`;
  - rho = `--diffora-ratio`, default 0.5;
  - weight sharing copies A, B bitwise and drops the gate (gamma -> 1), so the kept update starts as
    the searched one scaled by 1/gamma_m.
The decision goes into the adapter config: `target_modules` lists the kept paths and
`provenance["selection"]` the kept modules and every module's beta.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from loraforge.adapters.inject import adapter_state_dict, attach, detach
from loraforge.core.config import AdapterConfig
from loraforge.core.errors import LoraforgeError
from loraforge.methods.base import adapter_layers
from loraforge.select import SearchData, Selector, gated_search, register_selector


def top_modules(logits: dict[str, float], ratio: float) -> list[str]:
    """The ceil(ratio * M) paths with the largest logits, ties broken by the order given."""
    names = list(logits)
    order = sorted(range(len(names)), key=lambda i: (-logits[names[i]], i))
    return sorted(names[i] for i in order[:math.ceil(ratio * len(names))])


class DiffoRA(Selector):
    def __init__(self, diffora_ratio: float = 0.5, select_steps: int = 20, select_lr: float = 0.01, lr: float = 2e-4,
                 select_order: int = 1):
        if not 0 < diffora_ratio <= 1:
            raise LoraforgeError(f"--diffora-ratio must be in (0, 1], got {diffora_ratio}")
        self.ratio, self.steps, self.gate_lr, self.lr, self.order = diffora_ratio, select_steps, select_lr, lr, select_order

    def attach(self, model: nn.Module, config: AdapterConfig, search: SearchData | None) -> None:
        if search is None:
            raise LoraforgeError("diffora searches on data: pass training data")
        attach(model, config)
        paths = list(adapter_layers(model))
        if not paths:
            detach(model)
            raise LoraforgeError("diffora needs a method that wraps layers")
        beta = torch.zeros(len(paths), requires_grad=True)

        def gate(i: int):
            return lambda: torch.sigmoid(beta[i])

        gated_search(model, search, {path: gate(i) for i, path in enumerate(paths)}, [beta], self.steps, self.lr, self.gate_lr,
                     self.order)
        logits = dict(zip(paths, beta.detach().tolist()))
        kept = top_modules(logits, self.ratio)
        searched = {k: v.detach().clone() for k, v in adapter_state_dict(model).items()
                    if any(k.startswith(path + ".") for path in kept)}
        detach(model)
        chosen = dataclasses.replace(config, target_modules=kept, provenance={
            **config.provenance, "selection": {"method": "diffora", "modules": kept, "ratio": self.ratio, "logits": logits}})
        attach(model, chosen)
        with torch.no_grad():  # weight sharing: start from the searched adapter
            own = adapter_state_dict(model)
            for key, value in searched.items():
                own[key].copy_(value)


@register_selector("diffora")
def build_diffora(diffora_ratio: float = 0.5, select_steps: int = 20, select_lr: float = 0.01, lr: float = 2e-4,
                  select_order: int = 1) -> DiffoRA:
    return DiffoRA(diffora_ratio, select_steps, select_lr, lr, select_order)
