"""LoRA and rsLoRA.

LoRA: Low-Rank Adaptation of Large Language Models, Hu et al. (arXiv 2106.09685), eq. (3):

         x ──┬──────────── W0 (frozen) ─────────────┐
             │                                      (+)──> h = W0 x + b + s · B A drop(x)
             └─ drop ─> A (r x d_in) ─> B (d_out x r) ┘

with s = alpha / r. rsLoRA (Kalajdzievski, arXiv 2312.03732) only changes the scale to
s = alpha / sqrt(r), which keeps the update's size stable as r grows.

Init (PEFT's default, which the paper's "A Gaussian, B zero" leaves open): A Kaiming-uniform with
a = sqrt(5), B = 0, so the adapted model equals the base at step 0. The tensors are drawn in PEFT's
order (nn.Linear's own init for A then B, then Kaiming on A), so one seed gives PEFT's adapter.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import AdapterConfig
from ..registry import register
from .base import AdapterLayer


@register(
    "lora",
    axis="rank",
    paper="LoRA: Low-Rank Adaptation of Large Language Models (arXiv 2106.09685); rsLoRA (arXiv 2312.03732)",
    peft_type="LORA",
)
class LoRALinear(AdapterLayer):
    def __init__(self, base_layer: nn.Module, config: AdapterConfig, name: str):
        super().__init__(base_layer, config, name)
        rank, alpha = config.rank_for(name), config.alpha_for(name)
        self.rank = rank
        self.scaling = alpha / math.sqrt(rank) if config.use_rslora else alpha / rank
        # No dropout kernel at all when p = 0: it would cost a copy of x per layer.
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        device = base_layer.weight.device
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=device)  # (r, d_in)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=device)  # (d_out, r)
        self._init_tensors(config.init)

    @torch.no_grad()
    def _init_tensors(self, init: str) -> None:
        if self.lora_A.weight.is_meta:
            return
        if init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1.0 / self.rank)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        if init != "random":  # "random" keeps nn.Linear's non-zero B: tests of merge and gradients
            nn.init.zeros_(self.lora_B.weight)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x.to(self.lora_A.weight.dtype))
        return self.lora_B(self.lora_A(x)) * self.scaling  # (..., r) -> (..., d_out)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling  # (d_out, d_in)
