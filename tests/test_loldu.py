"""LoLDU: the checks of shared/methods/loldu.md, the W_res decision, gradients, bad input."""

import pytest
import torch
import torch.nn.functional as F
from test_methods_common import MODELS, check_gradient_matches_dense, check_layer_merge, logits, perturb
from torch import nn

import loraforge as lf
from loraforge.methods.loldu import LoLDULinear, ldu
from loraforge.testing import tiny_llama


def loldu_config(**kw) -> lf.AdapterConfig:
    return lf.AdapterConfig(**{"method": "loldu", "rank": 4, "alpha": 1.0, **kw})


def moved_layer(d_in: int = 12, d_out: int = 10, rank: int = 3) -> LoLDULinear:
    torch.manual_seed(0)
    layer = LoLDULinear(nn.Linear(d_in, d_out), loldu_config(rank=rank), "x")
    with torch.no_grad():
        layer.loldu_z.add_(0.5 * torch.randn(rank))
        layer.loldu_sigma.add_(0.2)
    return layer


@pytest.mark.parametrize("name", MODELS)
def test_init_equals_base(name):
    model = MODELS[name]()
    before = logits(model)
    lf.attach(model, loldu_config())
    assert torch.equal(logits(model), before)  # sigma z - sigma0 z0 is exactly 0


@pytest.mark.parametrize("shape", [(64, 48), (48, 64)])
def test_ldu_decomposition(shape):
    torch.manual_seed(0)
    w = torch.randn(shape)
    perm, lower, diag, upper = ldu(w)
    assert (perm @ lower @ torch.diag(diag) @ upper - w).norm() <= 1e-4 * w.norm()  # relative, as a matrix
    k = min(shape)
    torch.testing.assert_close(lower.diagonal(), torch.ones(k), atol=1e-6, rtol=0)
    torch.testing.assert_close(upper.diagonal(), torch.ones(k), atol=1e-6, rtol=0)
    assert torch.count_nonzero(lower.triu(1)) == 0 and torch.count_nonzero(upper.tril(-1)) == 0


def test_trainable_parameter_count_and_frozen_factors():
    assert lf.get_method("loldu").trainable_params(64, 64, loldu_config()) == 5
    model = lf.attach(tiny_llama(), loldu_config())
    assert lf.trainable_parameters(model) == 14 * 5  # 2 layers x 7 projections x (r + 1)
    for name, tensor in lf.adapter_state_dict(model).items():
        assert tensor.requires_grad == name.endswith(("loldu_z", "loldu_sigma")), name


def test_full_rank_reconstructs_the_weight():
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    layer = LoLDULinear(base, loldu_config(rank=12, alpha=12.0), "x")  # r = k, sigma0 = 1, z = D
    assert layer.loldu_sigma.item() == 1.0
    rebuilt = (layer.loldu_L * layer.loldu_sigma * layer.loldu_z) @ layer.loldu_U  # sigma P L_r diag(z) U_r
    torch.testing.assert_close(rebuilt, base.weight, atol=1e-4, rtol=0)
    w_res = base.weight - (layer.loldu_L * layer.loldu_init) @ layer.loldu_U
    assert w_res.abs().max() < 1e-4


def test_gradient_of_the_diagonal():
    layer = moved_layer()
    x = torch.randn(5, 12)
    h = layer(x)
    upstream = torch.randn_like(h)
    (h * upstream).sum().backward()
    grad_w = upstream.T @ x  # dL/dW for h = W x + b
    projected = (layer.loldu_L.T @ grad_w @ layer.loldu_U.T).diagonal()  # (L_r^T P^T dL/dW U_r^T)_ii
    torch.testing.assert_close(layer.loldu_z.grad, layer.loldu_sigma.detach() * projected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.loldu_sigma.grad, (layer.loldu_z.detach() * projected).sum(), atol=1e-5, rtol=1e-5)


def test_gradcheck_float64():
    layer = moved_layer().double()
    x = torch.randn(3, 12, dtype=torch.double)

    def dense(z, sigma):  # W_res + sigma P L_r diag(z) U_r, formed explicitly
        w = layer.base_layer.weight + (layer.loldu_L * (sigma * z - layer.loldu_init)) @ layer.loldu_U
        return F.linear(x, w, layer.base_layer.bias)

    check_gradient_matches_dense(layer, [layer.loldu_z, layer.loldu_sigma], dense, x)


def test_merge_equals_unmerged_and_unmerge_restores():
    check_layer_merge(moved_layer())


def test_base_weights_stay_pretrained_and_factors_travel(tmp_path):
    model = perturb(lf.attach(tiny_llama(), loldu_config()))
    with lf.adapter_disabled(model):
        torch.testing.assert_close(logits(model), logits(tiny_llama()), atol=0, rtol=0)
    lf.save_adapter(model, tmp_path / "a")
    reloaded = lf.load_adapter(tiny_llama(), tmp_path / "a")
    assert torch.equal(logits(reloaded), logits(model))
    saved = lf.adapter_state_dict(model)
    assert any(k.endswith("loldu_L") for k in saved) and any(k.endswith("loldu_init") for k in saved)
    lf.detach(model)
    for (name, p), (_, p0) in zip(model.named_parameters(), tiny_llama().named_parameters()):
        assert torch.equal(p, p0), name


@pytest.mark.parametrize("kw, message", [
    ({"rank": 40}, "exceeds min"),
    ({"init": "gaussian"}, "init must be 'default'"),
    ({"use_rslora": True}, "use_rslora"),
    ({"options": {"init_method": "lu"}}, "takes no options"),
])
def test_bad_config(kw, message):
    with pytest.raises(lf.AdapterError, match=message):
        lf.attach(tiny_llama(), loldu_config(**kw))


def test_integer_weight_refused():
    base = nn.Linear(4, 4)
    base.weight = nn.Parameter(torch.ones(4, 4, dtype=torch.int32), requires_grad=False)
    with pytest.raises(lf.AdapterError, match="floating-point"):
        LoLDULinear(base, loldu_config(rank=2), "x")


def test_zero_pivot_refused():
    base = nn.Linear(4, 4)
    with torch.no_grad():
        base.weight.zero_()
    with pytest.raises(lf.AdapterError, match="zero pivot"):
        LoLDULinear(base, loldu_config(rank=2), "x")
