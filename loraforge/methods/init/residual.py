"""The layer for non-zero LoRA starts that must not show in the output (PiSSA, LoRA-GA).

    x ──┬──────────── W0 (frozen, untouched) ─────────────────┐
        │                                                    (+)──> h = W0 x + b + s·(B A drop(x) − B0 A0 x)
        └─ LoRA branch s·B A drop(x), minus the frozen start s·B0 A0 x ┘

B0 = B and A0 = A when the initialiser runs, so the output equals the base model's exactly at
init. The papers instead overwrite the base weight with W_res = W0 − s·B0 A0; the two are the same
function (W_res x + s·B A x). Carrying the frozen start costs one more rank-r product per layer
(r·(d_in + d_out) multiply-adds per token, next to the base's d_in·d_out) and buys:
  * the base model is never modified: detach() gives W0 back bit for bit, one base serves many adapters;
  * the start's subtraction is exact (no rounding of W_res into the base dtype);
  * a checkpoint holds everything (A, B, A0, B0): resuming needs no W_res rebuilt from a re-run init;
  * the adapter is relative to W0 by construction: s·(B A − B0 A0) = s·[B, −B0][A; A0] is the
    rank-2r plain LoRA that `lora_factors` hands to save_adapter, exactly PEFT's
    `save_pretrained(path_initial_model_for_weight_conversion=...)` conversion (same layout, signs).
The start term takes x without dropout, as W_res x does in the papers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loraforge.core.config import AdapterConfig
from loraforge.methods.lora import LoRALinear


class ResidualLoRALinear(LoRALinear):
    def __init__(self, base_layer: nn.Module, config: AdapterConfig, name: str):
        super().__init__(base_layer, config, name)
        device = base_layer.weight.device
        self.register_buffer("lora_A0", torch.zeros(self.rank, self.in_features, device=device))  # (r, d_in)
        self.register_buffer("lora_B0", torch.zeros(self.out_features, self.rank, device=device))  # (d_out, r)

    @torch.no_grad()
    def start_at(self, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
        """Set A = A0 = lora_A (r, d_in) and B = B0 = lora_B (d_out, r)."""
        for target, value in ((self.lora_A.weight, lora_A), (self.lora_A0, lora_A),
                              (self.lora_B.weight, lora_B), (self.lora_B0, lora_B)):
            target.copy_(value)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        start = F.linear(F.linear(x.to(self.lora_A0.dtype), self.lora_A0), self.lora_B0)  # (..., r) -> (..., d_out)
        return super().delta(x) - start * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return super().delta_weight() - (self.lora_B0.float() @ self.lora_A0.float()) * self.scaling  # (d_out, d_in)

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A' (2r, d_in), B' (d_out, 2r)) with delta_weight() == s·B' A'."""
        return torch.cat([self.lora_A.weight, self.lora_A0]), torch.cat([self.lora_B.weight, -self.lora_B0], dim=1)
