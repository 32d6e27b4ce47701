"""LoRA-SB's start: Initialization using Update Approximation is a Silver Bullet for Extremely
Efficient Low-Rank Fine-Tuning, Ponkshe et al. (arXiv 2411.19557). The layer is LoRA-XS's
(layers/lora_xs.py: h = W0 x + s·B R A x, only R trains).

    G      = (1/N) Σ_k ∂L_k/∂W0               N batches, base model, train mode (init/lora_ga.py)
    ΔW~    = −η₁ · sign(G)                     the first Adam step of full fine-tuning (≈ a sign step)
    ΔW~   ≈ U_r S_r V_r^T                      randomised SVD, q = r, 10 iterations (the option svd_niter;
                                               None gives the exact SVD)
    B = U_r (d_out, r),  A = V_r^T (r, d_in),  R = diag(S_r) / s

η₁ is the learning rate of the first optimizer step (lr / warmup steps under linear warm-up, the
reference code's lr / (warmup_ratio · total_steps)); the trainer passes it, a direct call of
`initialize` must (`lr=`). W0 is not modified: the model starts at W0 + ΔW~_r, the first update
already applied, so the output does not equal the base's at init (as in the reference code).

Decision: the reference code sums per-example gradients over 50 examples; sign(G) only needs G's
direction, and we take the trainer's batch loss (mean over label tokens) over N batches, the same
data path as LoRA-GA (`--init-batches`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from loraforge.core.errors import AdapterError
from loraforge.core.registry import option, read_options, register_init
from loraforge.methods.base import adapter_layers
from loraforge.methods.init import InitContext, SVDOptions, truncated_svd
from loraforge.methods.init.lora_ga import estimate_gradients


@dataclass(frozen=True)
class LoRASBOptions(SVDOptions):
    svd_niter: int | None = option(10, "subspace iterations of the randomised SVD of the sign step (the reference "
                                       "code's 10); None: the exact SVD", check=lambda n: n >= 0,
                                   want="an integer >= 0, or null")


@register_init(
    "lora-sb",
    paper="Initialization using Update Approximation is a Silver Bullet for Extremely Efficient Low-Rank "
          "Fine-Tuning (LoRA-SB, arXiv 2411.19557)",
    needs_data=True,
    methods=("lora-sb",),
    fills="sets the frozen B, A and the trained r x r R of the LoRA-XS layer from the SVD of a sign-gradient step",
    default_for=("lora-sb",),
    options=LoRASBOptions,
)
@torch.no_grad()
def lora_sb(model: nn.Module, ctx: InitContext) -> dict[str, Any]:
    if ctx.lr is None:
        raise AdapterError("lora-sb starts from full fine-tuning's first update −lr·sign(G): pass lr= (the first "
                           "optimizer step's learning rate) to initialize()")
    niter = read_options(LoRASBOptions, ctx.config).svd_niter
    grads = estimate_gradients(model, ctx, "lora-sb: gradient")
    for name, layer in adapter_layers(model).items():
        update = -ctx.lr * torch.sign(grads[name])  # (d_out, d_in)
        u, s, vh = truncated_svd(update, layer.rank, niter)  # (d_out, r), (r,), (r, d_in)
        layer.set_factors(u, torch.diag(s) / layer.scaling, vh)
    return {"first_lr": ctx.lr}
