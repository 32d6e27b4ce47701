"""The fast paths of issue 7 equal the plain formulations: fused LoRA node, chunked head loss,
gradient checkpointing."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import loraforge as lf
from loraforge.methods.lora import LoRALinear


def plain_forward(layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    """h = W0 x + b + s B A x, written out with autograd's own ops."""
    return layer.base_layer(x) + layer.scaling * F.linear(F.linear(x, layer.lora_A.weight), layer.lora_B.weight)


def random_layer(bias: bool = True, **kw) -> LoRALinear:
    torch.manual_seed(0)
    return LoRALinear(nn.Linear(48, 40, bias=bias).requires_grad_(False),
                      lf.AdapterConfig(rank=4, alpha=8, init="random", **kw), "x")


def grads(layer: LoRALinear, x: torch.Tensor, forward) -> tuple[torch.Tensor, ...]:
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    out = forward(layer, x)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out.float() * upstream).sum().backward()
    return out.detach(), x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad


@pytest.mark.parametrize("bias", [True, False])
def test_fused_lora_node_equals_plain_formulation(bias):
    layer = random_layer(bias)
    x = torch.randn(3, 7, 48)
    fused = grads(layer, x, lambda m, v: m(v))
    assert type(layer(x).grad_fn).__name__ == "_LoRAFunctionBackward"  # the fast path ran
    for got, want in zip(fused, grads(layer, x, plain_forward)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_fused_lora_node_under_autocast_matches_plain_autocast():
    layer = random_layer()
    x = torch.randn(2, 5, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = grads(layer, x, lambda m, v: m(v))
        plain = grads(layer, x, plain_forward)
    assert fused[0].dtype == torch.bfloat16 and fused[1].dtype == torch.float32
    for got, want in zip(fused, plain):  # bf16 rounding of intermediate sums differs in order only
        torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)


def test_dropout_in_training_takes_the_plain_path():
    layer = random_layer(dropout=0.1).train()
    assert type(layer(torch.randn(2, 48)).grad_fn).__name__ != "_LoRAFunctionBackward"
    assert type(layer.eval()(torch.randn(2, 48)).grad_fn).__name__ == "_LoRAFunctionBackward"
