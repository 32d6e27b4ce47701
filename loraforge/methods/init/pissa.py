"""PiSSA: Principal Singular Values and Singular Vectors Adaptation of Large Language Models,
Meng et al. (arXiv 2404.02948, NeurIPS 2024).

LoRA's architecture, started on the principal part of W0 instead of noise and zero:

    W0 = U S V^T                              (exact SVD; or randomised with the option svd_niter = n)
    A  = diag(sqrt(S_r / s)) V_r^T            (r, d_in)
    B  = U_r diag(sqrt(S_r / s))              (d_out, r)      so s·B A = U_r S_r V_r^T
    W_res = W0 − s·B A                        (= W0 minus its best rank-r approximation)

W_res is not written into the base: `ResidualLoRALinear` keeps W0 and subtracts the frozen start
s·B0 A0 (same function, see residual.py), and saves the rank-2r LoRA [B, −B0], [A; A0] that PEFT's
`path_initial_model_for_weight_conversion` writes, with α doubled (√2·α under rsLoRA).
Deterministic with the exact SVD (PEFT's `init_lora_weights="pissa"` default); the randomised one
(PEFT's "pissa_niter_<n>") draws from torch's RNG, which attach seeds with config.seed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from loraforge.core.registry import register_init
from loraforge.methods.init import InitContext, SVDOptions, start_from_weight_svds
from loraforge.methods.init.residual import ResidualLoRALinear


@register_init(
    "pissa",
    paper="PiSSA: Principal Singular Values and Singular Vectors Adaptation of Large Language Models (arXiv 2404.02948)",
    needs_data=False,
    methods=("lora",),
    fills="sets LoRA's A (r x d_in) and B (d_out x r) to the top-r singular components of W0 and subtracts "
          "their product from the layer",
    layer=ResidualLoRALinear,
    options=SVDOptions,
)
@torch.no_grad()
def pissa(model: nn.Module, ctx: InitContext) -> dict[str, Any]:
    def start(layer: ResidualLoRALinear, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> None:
        root = (s / layer.scaling).sqrt()  # sqrt(S_r / s)
        layer.start_at(root[:, None] * vh, u * root)

    return start_from_weight_svds(model, ctx, "pissa: SVD", start)
