"""Comp-LoRA: the checks of shared/methods/comp-lora.md, sides, gradients, bad input."""

import pytest
import torch
import torch.nn.functional as F
from test_methods_common import MODELS, check_gradient_matches_dense, check_layer_merge, logits
from torch import nn

import loraforge as lf
from loraforge.methods.comp_lora import CompLoRALinear
from loraforge.methods.lora import LoRALinear
from loraforge.testing import tiny_llama


def comp_config(k: int = 6, side: str = "both", **kw) -> lf.AdapterConfig:
    return lf.AdapterConfig(**{"method": "comp-lora", "rank": 4, "alpha": 8, "options": {"k": k, "side": side}, **kw})


def random_layer(k: int = 6, side: str = "both", cls=CompLoRALinear) -> nn.Module:
    torch.manual_seed(0)
    cfg = comp_config(k, side, init="random") if cls is CompLoRALinear else lf.AdapterConfig(rank=4, alpha=8, init="random")
    return cls(nn.Linear(20, 16), cfg, "x")


def top_k(layer: CompLoRALinear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(layer.base_layer.weight.detach())
    return u[:, : layer.k], s[: layer.k], vh[: layer.k].T


def fit(layer: nn.Module, steps: int = 10) -> nn.Module:
    """A few AdamW steps towards a random linear map: a toy 'new task'."""
    torch.manual_seed(1)
    x, target = torch.randn(64, 20), torch.randn(64, 16)
    optimizer = torch.optim.AdamW([p for n, p in layer.named_parameters() if "lora_" in n], lr=1e-2)
    for _ in range(steps):
        F.mse_loss(layer(x), target).backward()
        optimizer.step()
        optimizer.zero_grad()
    return layer


@pytest.mark.parametrize("name", MODELS)
def test_init_equals_base(name):
    model = MODELS[name]()
    before = logits(model)
    lf.attach(model, comp_config(k=4, seed=0))
    assert torch.equal(logits(model), before)


def test_trainable_parameter_count():
    assert lf.get_method("comp-lora").trainable_params(64, 64, comp_config()) == 512
    layer = random_layer()
    assert sum(p.numel() for n, p in layer.named_parameters() if "base_layer" not in n) == 4 * (20 + 16)
    assert {n for n, _ in layer.named_buffers()} == {"comp_U", "comp_V"}


@pytest.mark.parametrize("trained", [False, True])
def test_update_is_orthogonal_to_the_top_subspaces(trained):
    layer = fit(random_layer()) if trained else random_layer()
    u_k, _, v_k = top_k(layer)
    with torch.no_grad():
        delta = layer.delta_weight()
    assert delta.abs().max() > 1e-2
    torch.testing.assert_close(u_k.T @ delta, torch.zeros(6, 20), atol=1e-5, rtol=0)
    torch.testing.assert_close(delta @ v_k, torch.zeros(16, 6), atol=1e-5, rtol=0)


def test_principal_part_is_preserved():
    layer = fit(random_layer())
    u_k, s_k, v_k = top_k(layer)
    with torch.no_grad():
        adapted = layer.base_layer.weight + layer.delta_weight()
    torch.testing.assert_close(u_k.T @ adapted @ v_k, torch.diag(s_k), atol=1e-4, rtol=0)


@pytest.mark.parametrize("side, in_free, out_free", [("in", True, False), ("out", False, True)])
def test_one_sided_projection(side, in_free, out_free):
    layer = random_layer(side=side)
    u_k, _, v_k = top_k(layer)
    with torch.no_grad():
        delta = layer.delta_weight()
    assert ((delta @ v_k).abs().max() < 1e-5) == in_free
    assert ((u_k.T @ delta).abs().max() < 1e-5) == out_free


def test_k_zero_is_lora():
    ours, lora = random_layer(k=0), random_layer(cls=LoRALinear)
    assert torch.equal(ours.lora_A.weight, lora.lora_A.weight) and torch.equal(ours.lora_B.weight, lora.lora_B.weight)
    x = torch.randn(3, 20)
    with torch.no_grad():
        assert torch.equal(ours(x), lora(x))
    assert not list(ours.buffers())


def test_merge_equals_unmerged_and_unmerge_restores():
    check_layer_merge(random_layer())


def test_forgetting_proxy_zero_for_comp_lora_not_for_lora():
    comp, lora = fit(random_layer(), 30), fit(random_layer(cls=LoRALinear), 30)
    _, _, v_k = top_k(comp)
    with torch.no_grad():
        assert (comp.delta_weight() @ v_k).norm() < 1e-5
        assert (lora.delta_weight() @ v_k).norm() > 1e-2


def test_gradient_matches_dense_autograd():
    layer = random_layer().double()
    x = torch.randn(3, 20, dtype=torch.double)
    p_out = torch.eye(16, dtype=torch.double) - layer.comp_U @ layer.comp_U.T
    p_in = torch.eye(20, dtype=torch.double) - layer.comp_V @ layer.comp_V.T

    def dense(a, b):  # W0 + s P_out B A P_in, formed explicitly
        return F.linear(x, layer.base_layer.weight + layer.scaling * p_out @ b @ a @ p_in, layer.base_layer.bias)

    check_gradient_matches_dense(layer, [layer.lora_A.weight, layer.lora_B.weight], dense, x)


def test_default_k_is_capped_by_the_layer():
    model = lf.attach(tiny_llama(), lf.AdapterConfig(method="comp-lora", rank=4))
    ks = {name.rsplit(".", 1)[-1]: layer.k for name, layer in lf.adapter_layers(model).items()}
    assert ks["q_proj"] == 16 and ks["k_proj"] == 8  # min(4 r, min(d_out, d_in) // 2)


@pytest.mark.parametrize("options, message", [
    ({"k": 16}, r"in \[0, min\(d_out, d_in\) = 16\)"),
    ({"k": -1}, "must be an integer"),
    ({"k": 2.5}, "must be an integer"),
    ({"side": "left"}, "side"),
    ({"rank_k": 3}, "unknown option"),
])
def test_bad_options(options, message):
    with pytest.raises(lf.AdapterError, match=message):
        lf.attach(tiny_llama(), lf.AdapterConfig(method="comp-lora", rank=4, options=options))
