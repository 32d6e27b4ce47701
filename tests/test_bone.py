"""Bone and Bat: the checks of shared/methods/bone.md, PEFT (MiSS) parity, gradients, bad input."""

import json

import pytest
import torch
import torch.nn.functional as F
from peft import MissConfig, PeftModel, get_peft_model
from test_methods_common import MODELS, check_gradient_matches_dense, check_layer_merge, copy_into_peft, logits, perturb
from torch import nn

import loraforge as lf
from loraforge.methods.bone import BatLinear, BoneLinear
from loraforge.testing import assert_same_outputs, tiny_llama

VARIANTS = {"bone": True, "bone-bat": "bat"}  # method -> PEFT MissConfig(init_weights=...)


def bone_config(method: str = "bone", **kw) -> lf.AdapterConfig:
    return lf.AdapterConfig(**{"method": method, "rank": 4, **kw})


def random_layer(cls, d_in: int, d_out: int = 8, scale: float = 0.3):
    torch.manual_seed(0)
    layer = cls(nn.Linear(d_in, d_out), bone_config("bone" if cls is BoneLinear else "bone-bat"), "x")
    with torch.no_grad():
        layer.miss_block.normal_(std=scale)
    return layer


def explicit_bone_delta(bone: torch.Tensor, d_in: int) -> torch.Tensor:
    """bone^T repeated along the columns, block by block, the last one truncated."""
    r = bone.shape[0]
    blocks = [bone.T[:, : min(r, d_in - j)] for j in range(0, d_in, r)]
    return torch.cat(blocks, dim=1)  # (d_out, d_in)


def explicit_bat_weight(w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    r = b.shape[-1]
    out = torch.empty_like(w)
    for i in range(w.shape[0] // r):
        for j in range(w.shape[1] // r):
            block = w[i * r:(i + 1) * r, j * r:(j + 1) * r]
            out[i * r:(i + 1) * r, j * r:(j + 1) * r] = block @ (torch.eye(r) + b[i]) + b[i]
    return out


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("method", VARIANTS)
def test_init_equals_base(method, name):
    model = MODELS[name]()
    before = logits(model)
    lf.attach(model, bone_config(method))
    assert torch.equal(logits(model), before)


@pytest.mark.parametrize("method", VARIANTS)
def test_trainable_parameter_count(method):
    assert lf.get_method(method).trainable_params(64, 64, bone_config(method)) == 256
    model = lf.attach(tiny_llama(), bone_config(method, target_modules=["q_proj", "v_proj"]))
    assert lf.trainable_parameters(model) == 2 * 4 * (32 + 16)  # r d_out per layer


@pytest.mark.parametrize("d_in", [16, 70])  # 70 = 17 blocks of 4 and one of 2: zero-padded
def test_bone_equals_explicit_update(d_in):
    layer = random_layer(BoneLinear, d_in)
    x = torch.randn(3, 5, d_in)
    delta = explicit_bone_delta(layer.miss_block.detach(), d_in)
    with torch.no_grad():
        torch.testing.assert_close(layer(x) - layer.base_layer(x), x @ delta.T, atol=1e-5, rtol=0)
        torch.testing.assert_close(layer.delta_weight(), delta, atol=0, rtol=0)


def test_bat_equals_blockwise_formula():
    layer = random_layer(BatLinear, 12)
    w0 = layer.base_layer.weight.detach()
    expected = explicit_bat_weight(w0, layer.miss_block.detach())
    with torch.no_grad():
        torch.testing.assert_close(w0 + layer.delta_weight(), expected, atol=1e-5, rtol=0)
        x = torch.randn(4, 12)
        torch.testing.assert_close(layer(x), F.linear(x, expected, layer.base_layer.bias), atol=1e-5, rtol=0)


@pytest.mark.parametrize("cls", [BoneLinear, BatLinear])
def test_merge_then_unmerge_restores(cls):
    layer = random_layer(cls, 16)
    if cls is BatLinear:  # spectral norm of every B_i <= 0.5
        with torch.no_grad():
            norms = torch.linalg.matrix_norm(layer.miss_block, ord=2)
            layer.miss_block.mul_((0.5 / norms).clamp(max=1)[:, None, None])
    check_layer_merge(layer)


@pytest.mark.parametrize("cls", [BoneLinear, BatLinear])
def test_gradient_matches_dense_autograd(cls):
    layer = random_layer(cls, 16).double()
    x = torch.randn(3, 16, dtype=torch.double)
    w0 = layer.base_layer.weight

    def dense(block):
        if cls is BoneLinear:
            return F.linear(x, w0 + block.T.repeat(1, 4), layer.base_layer.bias)
        return F.linear(x, explicit_bat_weight(w0, block), layer.base_layer.bias)

    check_gradient_matches_dense(layer, [layer.miss_block], dense, x)


# ---- PEFT (MiSS; its layer takes nn.Linear only, hence tiny LLaMA) ------------------------------

@pytest.mark.parametrize("method", VARIANTS)
def test_outputs_equal_peft_miss_on_the_same_weights(method):
    ours = perturb(lf.attach(tiny_llama(), bone_config(method)))
    theirs = get_peft_model(tiny_llama(), MissConfig(r=4, init_weights=VARIANTS[method], target_modules="all-linear"))
    copy_into_peft(ours, theirs, "miss_block")
    assert_same_outputs(ours, theirs, logits)


def test_peft_loads_saved_bone_and_bat_is_marked_loraforge_only(tmp_path):
    model = perturb(lf.attach(tiny_llama(), bone_config()))
    lf.save_adapter(model, tmp_path / "bone")
    assert json.loads((tmp_path / "bone" / "adapter_config.json").read_text())["peft_type"] == "MISS"
    theirs = PeftModel.from_pretrained(tiny_llama(), tmp_path / "bone").eval()
    assert_same_outputs(model, theirs, logits)
    lf.save_adapter(lf.attach(tiny_llama(), bone_config("bone-bat")), tmp_path / "bat")
    assert json.loads((tmp_path / "bat" / "adapter_config.json").read_text())["peft_type"] == "LORAFORGE_BONE-BAT"


# ---- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("method, kw, message", [
    ("bone", {"rank": 40}, "exceeds d_in"),
    ("bone-bat", {"rank": 5}, "divisible by r = 5"),
    ("bone", {"init": "gaussian"}, "no gaussian init"),
    ("bone-bat", {"use_rslora": True}, "use_rslora"),
    ("bone", {"options": {"variant": "bat"}}, "takes no options"),
])
def test_bad_config(method, kw, message):
    with pytest.raises(lf.AdapterError, match=message):
        lf.attach(tiny_llama(), bone_config(method, **kw))


def test_bat_unmerge_of_a_singular_block_refused():
    layer = random_layer(BatLinear, 8)
    with torch.no_grad():
        layer.miss_block.zero_()
        layer.miss_block[0] = -torch.eye(4)  # I + B_0 = 0
        layer.merge()
    with pytest.raises(lf.AdapterError, match="singular"):
        layer.unmerge()
