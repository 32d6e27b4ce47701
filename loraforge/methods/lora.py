"""LoRA and rsLoRA.

LoRA: Low-Rank Adaptation of Large Language Models, Hu et al. (arXiv 2106.09685), eq. (3):

         x ──┬──────────── W0 (frozen) ─────────────┐
             │                                      (+)──> h = W0 x + b + s · B A drop(x)
             └─ drop ─> A (r x d_in) ─> B (d_out x r) ┘

with s = alpha / r. rsLoRA (Kalajdzievski, arXiv 2312.03732) only changes the scale to
s = alpha / sqrt(r), which keeps the update's size stable as r grows.

Training forward (`LoRALinear.forward`): one autograd node per layer, `_LoRAFunction`, instead of
the five of the plain formulation (base linear, A, B, scale, add). It saves the input x once for
both paths (q/k/v and gate/up share one saved x; under autocast the plain path would also save a
bf16 copy per projection), keeps only x A^T (N x r) besides, accumulates s (x A^T) B^T into the base
output in place (no N x d_out temporary for the update) and applies s to the N x r factors, not to
N x d_out tensors. Outputs and gradients equal the plain formulation (tests/test_lora.py,
tests/test_speed_layers.py); subclasses that change `delta` (and any dropout in training) take the
plain path.

Init (PEFT's default, which the paper's "A Gaussian, B zero" leaves open): A Kaiming-uniform with
a = sqrt(5), B = 0, so the adapted model equals the base at step 0. The tensors are drawn in PEFT's
order (nn.Linear's own init for A then B, then Kaiming on A), so one seed gives PEFT's adapter.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from loraforge.core.config import AdapterConfig
from loraforge.core.registry import register
from loraforge.methods.base import AdapterLayer, branch_dropout, rank_and_scale, wide


@register(
    "lora",
    axis="rank",
    paper="LoRA: Low-Rank Adaptation of Large Language Models (arXiv 2106.09685); rsLoRA (arXiv 2312.03732)",
    peft_type="LORA",
)
class LoRALinear(AdapterLayer):
    def __init__(self, base_layer: nn.Module, config: AdapterConfig, name: str):
        super().__init__(base_layer, config, name)
        self.rank, self.scaling = rank_and_scale(config, name)
        self.dropout = branch_dropout(config.dropout)
        self.fused = True  # False: the plain formulation, whose backward is differentiable (`plain_autograd`)
        device = base_layer.weight.device
        self.lora_A = nn.Linear(self.in_features, self.rank, bias=False, device=device)  # (r, d_in)
        self.lora_B = nn.Linear(self.rank, self.out_features, bias=False, device=device)  # (d_out, r)
        lora_init_(self.lora_A.weight, self.lora_B.weight, config.init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled or not self._fusable(x):
            return super().forward(x)
        return _LoRAFunction.apply(x, self.base_layer, self.lora_A.weight, self.lora_B.weight, self.scaling)

    def _fusable(self, x: torch.Tensor) -> bool:
        """The fused node computes exactly base(x) + delta(x) only for LoRA's own delta, an inactive
        dropout and a frozen base whose dense weight it can read (nn.Linear or a 4-bit layer)."""
        base = self.base_layer
        return (self.fused and type(self).delta is LoRALinear.delta and not self.fan_in_fan_out
                and (isinstance(self.dropout, nn.Identity) or not self.training)
                and ((type(base) is nn.Linear and not base.weight.requires_grad) or hasattr(base, "dense_weight"))
                and (base.bias is None or not base.bias.requires_grad)
                and (torch.is_autocast_enabled(x.device.type) or x.dtype == _weight_dtype(base) == self.lora_A.weight.dtype))

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x.to(self.lora_A.weight.dtype))
        return self.lora_B(self.lora_A(x)) * self.scaling  # (..., r) -> (..., d_out)

    def delta_weight(self) -> torch.Tensor:
        return (wide(self.lora_B.weight) @ wide(self.lora_A.weight)) * self.scaling  # (d_out, d_in)


@torch.no_grad()
def lora_init_(lora_A: torch.Tensor, lora_B: torch.Tensor, init: str) -> None:
    """LoRA's start, in place: A (r, d_in) Kaiming-uniform (a = sqrt 5), or N(0, 1/r^2) with
    init="gaussian"; B = 0, except that init="random" keeps B's own non-zero draw (tests of merge
    and gradients)."""
    if lora_A.is_meta:
        return
    if init == "gaussian":
        nn.init.normal_(lora_A, std=1.0 / lora_A.shape[0])
    else:
        nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
    if init != "random":
        nn.init.zeros_(lora_B)


@contextmanager
def plain_autograd(model: nn.Module) -> Iterator[None]:
    """LoRA layers take the plain formulation inside the block, so that gradients can be
    differentiated again (`create_graph=True`: Flexora's unrolled hyper-gradient)."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    try:
        for layer in layers:
            layer.fused = False
        yield
    finally:
        for layer in layers:
            layer.fused = True


def _weight_dtype(base: nn.Module) -> torch.dtype:
    return base.weight.dtype if type(base) is nn.Linear else base.compute_dtype


def _dense_weight(base: nn.Module) -> torch.Tensor:
    """The frozen (d_out, d_in) weight: nn.Linear's own, or a 4-bit layer's dequantised copy (made
    again in backward rather than kept, so that the 4-bit base stays 4-bit between the passes)."""
    return base.weight if type(base) is nn.Linear else base.dense_weight()


class _LoRAFunction(torch.autograd.Function):
    """h = x W^T + b + s (x A^T) B^T, W and b frozen, as one autograd node.

    Backward, with g = dL/dh and u = s g B (N x r):
        dL/dx = g W + u A,    dL/dA = u^T x,    dL/dB = s g^T (x A^T)
    Under autocast every matmul runs in the autocast dtype, as F.linear would; gradients come back
    in the dtypes of x, A and B.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, base: nn.Module, lora_A: torch.Tensor, lora_B: torch.Tensor,
                scaling: float) -> torch.Tensor:
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        with torch.autocast(device, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)  # (N, d_in)
            bias = base.bias.to(dtype) if base.bias is not None else None
            out = F.linear(x2, _dense_weight(base).to(dtype), bias)  # (N, d_out)
            xa = x2 @ lora_A.to(dtype).T  # (N, r)
            out.addmm_(xa, lora_B.to(dtype).T, alpha=scaling)
        ctx.save_for_backward(x, lora_A, lora_B, xa)
        ctx.base, ctx.scaling, ctx.dtype = base, scaling, dtype
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    @once_differentiable  # x A^T is saved without its graph: a second derivative would be wrong, so refuse it
    def backward(ctx, grad: torch.Tensor):
        x, lora_A, lora_B, xa = ctx.saved_tensors
        dtype, s = ctx.dtype, ctx.scaling
        with torch.autocast(x.device.type, enabled=False):
            g = grad.reshape(-1, grad.shape[-1]).to(dtype)  # (N, d_out)
            # The two products with g are taken transposed, (B^T g^T)^T and (xa^T g)^T: the same
            # numbers, but CPU BLAS reads the tall g 3-4x faster this way round in float32 (no
            # slower in bf16); they were most of the adapter's cost in a step (bench speed --profile).
            u = (lora_B.to(dtype).T @ g.T).T.mul_(s)  # (N, r)
            grad_x = grad_A = grad_B = None
            if ctx.needs_input_grad[0]:
                grad_x = (g @ _dense_weight(ctx.base).to(dtype)).addmm_(u, lora_A.to(dtype))
                grad_x = grad_x.reshape(x.shape).to(x.dtype)
            if ctx.needs_input_grad[2]:
                grad_A = (u.T @ x.reshape(-1, x.shape[-1]).to(dtype)).to(lora_A.dtype)  # (r, d_in)
            if ctx.needs_input_grad[3]:
                grad_B = (xa.T @ g).mul_(s).T.contiguous().to(lora_B.dtype)  # (d_out, r)
        return grad_x, None, grad_A, grad_B, None
