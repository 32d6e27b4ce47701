"""LoRA-XS's start: Low-Rank Adaptation with Extremely Small Number of Parameters, Bałazy et al.
(arXiv 2405.17604). The layer is layers/lora_xs.py (h = W0 x + s·B R A x, only R trains).

    W0 ≈ U_r Σ_r V_r^T                    truncated SVD (exact; randomised with the option svd_niter = n)
    B = U_r   (d_out, r),  A = Σ_r V_r^T  (r, d_in),  R ~ N(0, σ²), σ = 1e-5   (r, r)

The singular values sit on the input side as in the reference code (MohammadrezaBanaei/LoRA-XS);
W0 is unchanged, so the output is W0 x up to the tiny s·B R A x. R is drawn from torch's RNG,
which attach seeds with config.seed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from loraforge.core.registry import register_init
from loraforge.methods.init import InitContext, SVDOptions, start_from_weight_svds
from loraforge.methods.lora_xs import LoRAXSLinear

R_STD = 1e-5


@register_init(
    "lora-xs",
    paper="LoRA-XS: Low-Rank Adaptation with Extremely Small Number of Parameters (arXiv 2405.17604)",
    needs_data=False,
    methods=("lora-xs",),
    fills="sets the frozen B, A and the trained r x r R of the LoRA-XS layer from the SVD of W0",
    default_for=("lora-xs",),
    options=SVDOptions,
)
@torch.no_grad()
def lora_xs(model: nn.Module, ctx: InitContext) -> dict[str, Any]:
    def start(layer: LoRAXSLinear, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> None:
        layer.set_factors(u, torch.randn(layer.rank, layer.rank) * R_STD, s[:, None] * vh)

    return start_from_weight_svds(model, ctx, "lora-xs: SVD", start)
