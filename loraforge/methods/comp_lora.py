"""Comp-LoRA: LoRA kept inside the complement of the weight's top-k singular subspaces.

Complementary Subspace Low-Rank Adaptation of Vision-Language Models for Few-Shot Classification
(arXiv 2501.15040). With W0 = U S V^T (exact SVD, float32, at attach) and U_k (d_out x k),
V_k (d_in x k) its top-k singular vectors, frozen:

    P_out = I - U_k U_k^T,   P_in = I - V_k V_k^T
    dW = s P_out B A P_in          side="both" (the paper's Fig. 1: fixed projections on both sides)
    dW = s P_out B A               side="out"
    dW = s B A P_in                side="in"
    h  = W0 x + b + s (P_out B) ((A P_in) x)

A (r x d_in), B (d_out x r) train, as in LoRA (same init and draw order, s = alpha / r or
alpha / sqrt(r) with rsLoRA; B = 0 so the output equals the base at step 0). The projection sits
in every forward, so U_k^T dW = 0 and dW V_k = 0 hold whatever the optimiser does. It is applied
to the factors, A P_in = A - (A V_k) V_k^T and P_out B = B - U_k (U_k^T B): r k (d_in + d_out) work
per forward, whatever the number of tokens, and never a d x d projector. Trainable: r (d_in + d_out),
as LoRA; k = 0 is exactly LoRA.

Decisions where the paper's method section could not be read: the projector form (same update set
as the figure's basis form), side="both" by default, A and B zero/Kaiming as LoRA (not MiLoRA's
minor singular vectors). U_k, V_k are saved with the adapter (buffers `comp_U`, `comp_V`), so a
reload does not depend on how another SVD routine splits near-equal singular values.

Options (`CompLoRAOptions`): k (0 <= k < min(d_out, d_in); default min(4 r, min(d_out, d_in) // 2),
the spec's "start with 4 r", capped so that half of the smaller space stays free), side ("both" |
"in" | "out").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from loraforge.core.config import AdapterConfig
from loraforge.core.errors import AdapterError
from loraforge.core.registry import option, read_options, register
from loraforge.methods.base import wide
from loraforge.methods.lora import LoRALinear


@dataclass(frozen=True)
class CompLoRAOptions:
    k: int | None = option(None, "top singular directions of W0 the update stays out of, below min(d_out, d_in); "
                                 "None: min(4 r, min(d_out, d_in) // 2)", check=lambda k: k >= 0,
                           want="an integer >= 0, or null")
    side: Literal["both", "in", "out"] = option("both", "where the projection acts: both (the paper's Fig. 1), in "
                                                        "(A P_in) or out (P_out B)")


@register(
    "comp-lora",
    axis="rank",
    paper="Complementary Subspace Low-Rank Adaptation of Vision-Language Models for Few-Shot Classification (arXiv 2501.15040)",
    options=CompLoRAOptions,
    verified=False,
)
class CompLoRALinear(LoRALinear):
    def __init__(self, base_layer: nn.Module, config: AdapterConfig, name: str):
        super().__init__(base_layer, config, name)  # A, B, s and dropout exactly as LoRA draws them
        options, min_dim = read_options(CompLoRAOptions, config), min(self.in_features, self.out_features)
        self.k = min(4 * self.rank, min_dim // 2) if options.k is None else options.k
        if self.k >= min_dim:
            raise AdapterError(f"{name}: comp-lora option 'k' must be an integer in [0, min(d_out, d_in) = {min_dim}), "
                               f"got {self.k}")
        self.side = options.side
        device = base_layer.weight.device
        use_out, use_in = self.k > 0 and self.side in ("both", "out"), self.k > 0 and self.side in ("both", "in")
        self.register_buffer("comp_U", torch.empty(self.out_features, self.k, device=device) if use_out else None)
        self.register_buffer("comp_V", torch.empty(self.in_features, self.k, device=device) if use_in else None)
        if self.k > 0 and not self.lora_A.weight.is_meta:
            self._fill_subspaces()

    @torch.no_grad()
    def _fill_subspaces(self) -> None:
        u, _, vh = torch.linalg.svd(wide(self._w0()), full_matrices=False)
        if self.comp_U is not None:
            self.comp_U.copy_(u[:, : self.k])  # (d_out, k)
        if self.comp_V is not None:
            self.comp_V.copy_(vh[: self.k].T)  # (d_in, k)

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.lora_A.weight, self.lora_B.weight  # (r, d_in), (d_out, r)
        if self.comp_V is not None:
            a = a - (a @ self.comp_V) @ self.comp_V.T  # A P_in
        if self.comp_U is not None:
            b = b - self.comp_U @ (self.comp_U.T @ b)  # P_out B
        return a, b

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self._factors()
        x = self.dropout(x.to(a.dtype))
        return (x @ a.T) @ b.T * self.scaling  # (..., r) -> (..., d_out)

    def delta_weight(self) -> torch.Tensor:
        a, b = self._factors()
        return (wide(b) @ wide(a)) * self.scaling  # (d_out, d_in)
