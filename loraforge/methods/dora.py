"""DoRA: a trainable magnitude per output unit times a LoRA-updated, renormalised direction.

DoRA: Weight-Decomposed Low-Rank Adaptation, Liu et al. (arXiv 2402.09353), eq. (5), with the
norm treated as a constant in backward (Sec. 4.3):

    V  = W0 + s B A                      (d_out x d_in)  the direction, updated by LoRA
    n  = ||V||_row, detached             (d_out)         the paper's "column" norm in its d x k layout
    W' = diag(m / n) V,  h = W' x + b    m (d_out) trainable, initialised to ||W0 + s B A||_row

The forward never forms V or W' (PEFT's form, x' = dropout(x)):

    h = W0 x + b + (m/n - 1) * W0 x' + (m/n) * s B A x'
    n^2 = ||W0||^2_row + 2 s rowsum((W0 A^T) * B) + s^2 rowsum((B (A A^T)) * B)

so the norm costs one (d_out x r) product instead of a d_out x d_in matrix. Without active dropout
W0 x is the base output less its bias (no second matmul with W0).

A, B, s, init and seeding are LoRA's (`lora.py`), drawn in PEFT's order, then m from A and B
(so m = ||W0||_row when B = 0): one seed gives PEFT's `LoraConfig(use_dora=True)` adapter; the
magnitude is saved as `<path>.lora_magnitude_vector`, PEFT's key. Trainable: r (d_in + d_out) + d_out.

Merge: W <- diag(m / n) (W0 + s B A). n cannot be recovered from the merged weight, so the norm used
at merge time is kept (a non-persistent buffer) and unmerge computes W0 = diag(n / m) W - s B A.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loraforge.core.config import AdapterConfig
from loraforge.core.registry import register
from loraforge.methods.base import wide
from loraforge.methods.lora import LoRALinear


@register(
    "dora",
    axis="rank",
    paper="DoRA: Weight-Decomposed Low-Rank Adaptation (arXiv 2402.09353)",
    peft_type="LORA",
)
class DoRALinear(LoRALinear):
    def __init__(self, base_layer: nn.Module, config: AdapterConfig, name: str):
        super().__init__(base_layer, config, name)
        magnitude = torch.empty(self.out_features, device=base_layer.weight.device)  # (d_out,)
        self.lora_magnitude_vector = nn.Parameter(magnitude)
        self.register_buffer("merge_norm", None, persistent=False)  # n at merge time, for unmerge
        if not magnitude.is_meta:
            with torch.no_grad():  # after A and B: a non-zero B (init="random") counts too
                self.lora_magnitude_vector.copy_(self._row_norm())

    @torch.no_grad()
    def _row_norm(self) -> torch.Tensor:
        w0, a, b = wide(self._w0()), wide(self.lora_A.weight), wide(self.lora_B.weight)
        s = self.scaling
        cross = ((w0 @ a.T) * b).sum(1)  # (d_out,): rowsum(W0 * BA) without BA
        square = ((b @ (a @ a.T)) * b).sum(1)  # (d_out,): ||BA||^2_row
        norm2 = torch.linalg.vector_norm(w0, dim=1).square() + 2 * s * cross + s * s * square
        return norm2.clamp_min(0).sqrt()  # (d_out,)

    def _update(self, x: torch.Tensor, w0x: torch.Tensor | None) -> torch.Tensor:
        x = self.dropout(x.to(self.lora_A.weight.dtype))
        if w0x is None:
            w0 = self._w0()
            w0x = F.linear(x.to(w0.dtype), w0)  # (..., d_out)
        scale = self.lora_magnitude_vector / self._row_norm()  # (d_out,); n is a constant
        return (scale - 1) * w0x.to(x.dtype) + scale * self.lora_B(self.lora_A(x)) * self.scaling

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return self._update(x, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged or self.disabled:
            return out
        w0x = None
        if isinstance(self.dropout, nn.Identity) or not self.training:  # x' = x: reuse W0 x + b
            bias = self.base_layer.bias
            w0x = out if bias is None else out - bias
        return out + self._update(x, w0x).to(out.dtype)

    def _merged_weight(self, norm: torch.Tensor) -> torch.Tensor:
        direction = wide(self._w0()) + super().delta_weight()  # (d_out, d_in): W0 + s B A
        return (wide(self.lora_magnitude_vector) / norm)[:, None] * direction

    def delta_weight(self) -> torch.Tensor:
        """W' - W0 (while unmerged): what merging adds."""
        return self._merged_weight(self._row_norm()) - wide(self._w0())

    def _add_to_weight(self, sign: float) -> None:
        if sign > 0:
            self.merge_norm = self._row_norm()
            new = self._merged_weight(self.merge_norm)
        else:
            ratio = self.merge_norm / wide(self.lora_magnitude_vector)  # (d_out,): n / m
            new = wide(self._w0()) * ratio[:, None] - super().delta_weight()
            self.merge_norm = None
        self._set_w0(new)
