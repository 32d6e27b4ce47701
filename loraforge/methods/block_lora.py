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

Options (`BlockLoRAOptions`, `--option n_blocks=N`): n_blocks (default 8: the title's "eight arms";
unverified), which must divide every target's d_in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from loraforge.core.config import AdapterConfig
from loraforge.core.errors import AdapterError
from loraforge.core.registry import option, read_options, register
from loraforge.methods.base import AdapterLayer, branch_dropout, rank_and_scale, wide
from loraforge.methods.lora import lora_init_


@dataclass(frozen=True)
class BlockLoRAOptions:
    n_blocks: int = option(8, "column blocks of W that share one down-projection A_s; must divide every target's "
                              "d_in (8: the title's 'eight arms', unverified)", check=lambda n: n >= 1,
                           want="a positive integer")


@register(
    "block-lora",
    axis="rank",
    paper="One Head Eight Arms: Block Matrix based Low Rank Adaptation for CLIP-based Few-Shot Learning (arXiv 2501.16720)",
    options=BlockLoRAOptions,
    verified=False,
)
class BlockLoRALinear(AdapterLayer):
    def __init__(self, base_layer: nn.Module, config: AdapterConfig, name: str):
        super().__init__(base_layer, config, name)
        self.n_blocks = read_options(BlockLoRAOptions, config).n_blocks
        if self.in_features % self.n_blocks:
            raise AdapterError(f"{name}: block-lora n_blocks = {self.n_blocks} does not divide d_in = {self.in_features}")
        self.rank, self.scaling = rank_and_scale(config, name)
        self.dropout = branch_dropout(config.dropout)
        device = base_layer.weight.device
        self.lora_A = nn.Linear(self.in_features // self.n_blocks, self.rank, bias=False, device=device)  # A_s (r, d_in/n)
        self.lora_B = nn.Linear(self.rank, self.out_features, bias=False, device=device)  # (d_out, r)
        lora_init_(self.lora_A.weight, self.lora_B.weight, config.init)  # LoRA's init, in LoRA's order

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x.to(self.lora_A.weight.dtype))
        x_sum = x.unflatten(-1, (self.n_blocks, -1)).sum(-2)  # (..., d_in/n): sum_j x_j
        return self.lora_B(self.lora_A(x_sum)) * self.scaling  # (..., r) -> (..., d_out)

    def delta_weight(self) -> torch.Tensor:
        block = (wide(self.lora_B.weight) @ wide(self.lora_A.weight)) * self.scaling  # (d_out, d_in/n)
        return block.repeat(1, self.n_blocks)  # (d_out, d_in)
