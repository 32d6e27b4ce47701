"""LoRA-XS and LoRA-SB: a trainable r x r matrix between two frozen factors.

LoRA-XS: Low-Rank Adaptation with Extremely Small Number of Parameters, Bałazy et al. (arXiv 2405.17604);
LoRA-SB: Initialization using Update Approximation is a Silver Bullet for Extremely Efficient
Low-Rank Fine-Tuning, Ponkshe et al. (arXiv 2411.19557).

    x ──┬──────────── W0 (frozen) ────────────────────────────┐
        │                                                    (+)──> h = W0 x + b + s · B R A drop(x)
        └─ drop ─> A (r x d_in) ─> R (r x r) ─> B (d_out x r) ┘
                   frozen          trained      frozen

Only R trains: r² numbers per layer whatever its width, s = α/r (α/√r with rsLoRA). A step on R
moves the weight by s·B ΔR A, and ∂L/∂R = s · B^T (∂L/∂W) A^T: full fine-tuning's gradient
projected onto span(B) x span(A).

The two methods share this layer and differ in where B, R, A start (loraforge/init/): LoRA-XS from
the truncated SVD of W0 (init/lora_xs.py), LoRA-SB from the SVD of full fine-tuning's first update
estimated from gradients (init/lora_sb.py); `attach` / `initialize` run them. Built alone, the layer
has random orthonormal B, A and R = 0 (R ~ N(0, 1) with init="random", for tests): a valid layer
whose output equals the base's.

B and A are persistent buffers: trainer checkpoints hold them and no optimizer sees them.
save_adapter writes the plain LoRA (A, B R) of the same rank and scale that `lora_factors` gives:
PEFT, vLLM and transformers load it, and nothing is lost for inference (loraforge reloads it as
method "lora", so training on from a saved adapter trains A and B R; resume from a checkpoint
to keep training R alone).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loraforge.core.config import AdapterConfig
from loraforge.core.errors import AdapterError
from loraforge.core.registry import register
from loraforge.methods.base import AdapterLayer, branch_dropout, rank_and_scale, wide

XS_PAPER = "LoRA-XS: Low-Rank Adaptation with Extremely Small Number of Parameters (arXiv 2405.17604)"
SB_PAPER = ("Initialization using Update Approximation is a Silver Bullet for Extremely Efficient Low-Rank "
            "Fine-Tuning (LoRA-SB, arXiv 2411.19557)")


@register("lora-sb", axis="init", paper=SB_PAPER, peft_type="LORA")
@register("lora-xs", axis="rank", paper=XS_PAPER, peft_type="LORA")
class LoRAXSLinear(AdapterLayer):
    def __init__(self, base_layer: nn.Module, config: AdapterConfig, name: str):
        super().__init__(base_layer, config, name)
        rank, self.scaling = rank_and_scale(config, name)
        if rank > min(self.in_features, self.out_features):
            raise AdapterError(f"{name}: {config.method} rank {rank} exceeds the layer's smaller side "
                               f"({self.out_features} x {self.in_features})")
        if config.init == "gaussian":
            raise AdapterError(f"{config.method} brings its own start: init must be 'default' (or 'random' in tests)")
        self.rank = rank
        self.dropout = branch_dropout(config.dropout)
        device = base_layer.weight.device
        self.register_buffer("lora_A", torch.zeros(rank, self.in_features, device=device))  # (r, d_in), frozen
        self.register_buffer("lora_B", torch.zeros(self.out_features, rank, device=device))  # (d_out, r), frozen
        self.lora_R = nn.Parameter(torch.zeros(rank, rank, device=device))  # (r, r), trained
        if not self.lora_R.is_meta:
            self._random_start(config.init == "random")

    @torch.no_grad()
    def _random_start(self, random_r: bool) -> None:
        self.lora_A.copy_(torch.linalg.qr(torch.randn(self.in_features, self.rank)).Q.T)  # orthonormal rows
        self.lora_B.copy_(torch.linalg.qr(torch.randn(self.out_features, self.rank)).Q)  # orthonormal columns
        if random_r:
            self.lora_R.normal_()

    @torch.no_grad()
    def set_factors(self, lora_B: torch.Tensor, lora_R: torch.Tensor, lora_A: torch.Tensor) -> None:
        self.lora_B.copy_(lora_B)
        self.lora_R.copy_(lora_R)
        self.lora_A.copy_(lora_A)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x.to(self.lora_R.dtype))
        # B R first (d_out·r² flops per call, not per token): the same product the saved plain LoRA
        # holds, so a reloaded adapter computes bit for bit what this layer does.
        return F.linear(F.linear(x, self.lora_A), self.lora_B @ self.lora_R) * self.scaling  # (..., r) -> (..., d_out)

    def delta_weight(self) -> torch.Tensor:
        return (wide(self.lora_B) @ wide(self.lora_R) @ wide(self.lora_A)) * self.scaling  # (d_out, d_in)

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (r, d_in), B R (d_out, r)): the plain LoRA with delta_weight() == s·(B R) A."""
        return self.lora_A, self.lora_B @ self.lora_R
