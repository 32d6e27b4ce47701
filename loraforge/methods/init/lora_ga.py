"""LoRA-GA: Low-Rank Adaptation with Gradient Approximation, Wang et al. (arXiv 2407.05000, NeurIPS 2024).

Start LoRA so that its first step follows the best low-rank approximation of full fine-tuning's:

    G     = (1/N) Σ_k ∂L_k/∂W0                  N batches, base model (adapter off), train mode, float32
    G    ≈ U S V^T                              randomised SVD, q = min(4r, d_out, d_in), 4 iterations
    A     = c · V[:, :r]^T                      (r, d_in)     right singular vectors 1..r
    B     = c · U[:, r:2r]                      (d_out, r)    left singular vectors r+1..2r   ("ArB2r")
    c     = d_out^{1/4} / sqrt(γ),  γ = 16      ("stable" scale; the option lora_ga_gamma)
    W_res = W0 − s·B A                          (ResidualLoRALinear: W0 kept, the start subtracted)

Then one SGD step moves the weight by −η s² (G A^T A + B B^T G) = −η s² c² G_2r (G's best rank-2r
approximation) to first order.

Decision (the spec leaves it open): the scale follows the paper's reference code
(Outsider565/LoRA-GA: both A and B times c). PEFT 0.21's `init_lora_weights="lora_ga"` instead
multiplies B by diag(S[r:2r])·c and leaves A unscaled; its A and B span the same singular vectors
(tested), but its start is a different size. The loss is the trainer's (`InitContext.loss`, mean
over the batch's label tokens), each of the N batches weighing the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from loraforge.core.errors import AdapterError
from loraforge.core.registry import option, read_options, register_init
from loraforge.methods.base import adapter_disabled, adapter_layers
from loraforge.methods.init import InitContext
from loraforge.methods.init.residual import ResidualLoRALinear


@dataclass(frozen=True)
class LoRAGAOptions:
    lora_ga_gamma: float = option(16.0, "gamma of the 'stable' scale c = d_out^(1/4) / sqrt(gamma) of A and B",
                                  check=lambda g: g > 0, want="a number > 0")


def lora_ga_start(grad: torch.Tensor, rank: int, gamma: float = 16.0,
                  name: str = "layer") -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, d_in), B (d_out, r)) from the gradient G (d_out, d_in) of one layer."""
    d_out, d_in = grad.shape
    if 2 * rank > min(d_out, d_in):
        raise AdapterError(f"{name}: LoRA-GA takes 2r = {2 * rank} singular vectors of a {d_out} x {d_in} gradient; "
                           f"use rank <= {min(d_out, d_in) // 2}")
    u, _, v = torch.svd_lowrank(grad.float(), q=min(4 * rank, d_out, d_in), niter=4)  # (d_out, q), (q,), (d_in, q)
    c = d_out ** 0.25 / gamma ** 0.5
    return c * v[:, :rank].T, c * u[:, rank:2 * rank]


def estimate_gradients(model: nn.Module, ctx: InitContext, desc: str) -> dict[str, torch.Tensor]:
    """G (d_out, d_in) per adapter layer: the mean over ctx's batches of ∂(mean loss)/∂W0 of the
    base model. Only the target weights take gradients; everything is restored afterwards."""
    layers = adapter_layers(model)
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in layers.values():
        layer.base_layer.weight.requires_grad_(True)
        layer.base_layer.weight.grad = None
    model.train()
    try:
        with adapter_disabled(model), torch.enable_grad():
            for batch in ctx.iter_batches(desc):
                ctx.loss(model, batch).backward()
        grads = {}
        for name, layer in layers.items():
            grad = layer.base_layer.weight.grad.float() / ctx.batches
            grads[name] = grad.T if layer.fan_in_fan_out else grad  # (d_out, d_in)
    finally:
        for layer in layers.values():
            layer.base_layer.weight.grad = None
        for p, flag in requires_grad.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return grads


@register_init(
    "lora-ga",
    paper="LoRA-GA: Low-Rank Adaptation with Gradient Approximation (arXiv 2407.05000)",
    needs_data=True,
    methods=("lora",),
    fills="sets LoRA's A (r x d_in) and B (d_out x r) to singular vectors of the full-weight gradient and subtracts "
          "their product from the layer",
    layer=ResidualLoRALinear,
    options=LoRAGAOptions,
)
@torch.no_grad()
def lora_ga(model: nn.Module, ctx: InitContext) -> dict[str, Any]:
    gamma = float(read_options(LoRAGAOptions, ctx.config).lora_ga_gamma)
    grads = estimate_gradients(model, ctx, "lora-ga: gradient")
    for name, layer in adapter_layers(model).items():
        layer.start_at(*lora_ga_start(grads[name], layer.rank, gamma, name))
    return {"gamma": gamma}
