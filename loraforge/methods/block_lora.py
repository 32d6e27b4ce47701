"""Block-LoRA: LoRA whose down-projection is one block shared by the n column blocks of W.

One Head Eight Arms: Block Matrix based Low Rank Adaptation for CLIP-based Few-Shot Learning
(arXiv 2501.16720). LoRA in block form has A = [A_1, ..., A_n] (A_j: r x d_in/n); Block-LoRA
shares one A_s = A_1 = ... = A_n, so the products B A_j x_j become one product of a sum:

         x ──┬────────────────────────────── W0 (frozen) ───────────────────────────────┐
             │                                                                         (+)──> h
             └─ drop ─> sum_j x_j (d_in/n) ─> A_s (r x d_in/n) ─> B (d_out x r) ─> · s ─┘

    dW = s B [A_s, A_s, ..., A_s]        (d_out x d_in, rank <= r; every column block equal)

with s = alpha / r (alpha / sqrt(r) with use_rslora). Trainable: r d_out + r d_in / n (LoRA:
r d_out + r d_in), and the down-projection costs d_in / n instead of d_in multiplications per rank.

The paper's method section could not be read; this is the spec's reading (blocks along d_in, one
shared down-projection), not the alternative split along the rank. n = 1 is exactly LoRA.
Init as LoRA (A_s Kaiming-uniform a = sqrt 5, B = 0, the same draw order: with n = 1 one seed
gives LoRA's tensors), so the output equals the base at step 0.

extras: n_blocks (int, default 8: the title's "eight arms"; unverified), which must divide every
target's d_in.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from loraforge.core.config import AdapterConfig
from loraforge.core.errors import AdapterError
from loraforge.core.registry import register
from loraforge.methods.base import AdapterLayer, wide


def n_blocks(config: AdapterConfig) -> int:
    unknown = sorted(set(config.extras) - {"n_blocks"})
    if unknown:
        raise AdapterError(f"block-lora: unknown extras {unknown}; known: n_blocks")
    n = config.extras.get("n_blocks", 8)
    if type(n) is not int or n < 1:
        raise AdapterError(f"block-lora: extras['n_blocks'] must be a positive integer, got {n!r}")
    return n


@register(
    "block-lora",
    axis="rank",
    paper="One Head Eight Arms: Block Matrix based Low Rank Adaptation for CLIP-based Few-Shot Learning (arXiv 2501.16720)",
)
class BlockLoRALinear(AdapterLayer):
    def __init__(self, base_layer: nn.Module, config: AdapterConfig, name: str):
        super().__init__(base_layer, config, name)
        self.n_blocks = n_blocks(config)
        if self.in_features % self.n_blocks:
            raise AdapterError(f"{name}: block-lora n_blocks = {self.n_blocks} does not divide d_in = {self.in_features}")
        rank, alpha = config.rank_for(name), config.alpha_for(name)
        self.rank = rank
        self.scaling = alpha / math.sqrt(rank) if config.use_rslora else alpha / rank
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        device = base_layer.weight.device
        self.lora_A = nn.Linear(self.in_features // self.n_blocks, rank, bias=False, device=device)  # A_s (r, d_in/n)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=device)  # (d_out, r)
        if not self.lora_A.weight.is_meta:
            with torch.no_grad():  # LoRA's init, in LoRA's order
                if config.init == "gaussian":
                    nn.init.normal_(self.lora_A.weight, std=1.0 / rank)
                else:
                    nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
                if config.init != "random":
                    nn.init.zeros_(self.lora_B.weight)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x.to(self.lora_A.weight.dtype))
        x_sum = x.unflatten(-1, (self.n_blocks, -1)).sum(-2)  # (..., d_in/n): sum_j x_j
        return self.lora_B(self.lora_A(x_sum)) * self.scaling  # (..., r) -> (..., d_out)

    def delta_weight(self) -> torch.Tensor:
        block = (wide(self.lora_B.weight) @ wide(self.lora_A.weight)) * self.scaling  # (d_out, d_in/n)
        return block.repeat(1, self.n_blocks)  # (d_out, d_in)
