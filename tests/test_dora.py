"""DoRA: the checks of shared/methods/dora.md, PEFT parity both ways, gradients."""

import json

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from test_methods_common import MODELS, logits, perturb
from torch import nn

import loraforge as lf
from loraforge.methods.dora import DoRALinear
from loraforge.testing import assert_same_outputs, tiny_llama


def dora_config(**kw) -> lf.AdapterConfig:
    return lf.AdapterConfig(**{"method": "dora", "rank": 4, "alpha": 8, "seed": 7, **kw})


def random_layer(d_in: int = 12, d_out: int = 10, **kw) -> DoRALinear:
    """A layer with non-zero A, B and a magnitude moved off the norm (so m/n != 1)."""
    torch.manual_seed(0)
    layer = DoRALinear(nn.Linear(d_in, d_out), dora_config(init="random", **kw), "x")
    with torch.no_grad():
        layer.lora_magnitude_vector.mul_(1 + 0.3 * torch.rand(d_out))
    return layer


def dense(layer: DoRALinear, a, b, m, x, detach: bool = True) -> torch.Tensor:
    """h = diag(m / ||V||) V x + b with V = W0 + s B A, formed explicitly."""
    v = layer.base_layer.weight + layer.scaling * b @ a
    norm = v.norm(dim=1)
    return F.linear(x, (m / (norm.detach() if detach else norm))[:, None] * v, layer.base_layer.bias)


def grads(layer: DoRALinear, x: torch.Tensor, detach: bool = True) -> list[torch.Tensor]:
    params = [p.detach().clone().requires_grad_() for p in
              (layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector)]
    dense(layer, *params, x, detach).pow(2).sum().backward()
    return [p.grad for p in params]


@pytest.mark.parametrize("name", MODELS)
def test_init_equals_base_and_magnitude_is_the_row_norm(name):
    model = MODELS[name]()
    before = logits(model)
    lf.attach(model, dora_config())
    torch.testing.assert_close(logits(model), before, atol=1e-6, rtol=0)
    for layer in lf.adapter_layers(model).values():
        torch.testing.assert_close(layer.lora_magnitude_vector, layer._w0().norm(dim=1), atol=1e-6, rtol=0)


def test_trainable_parameter_count():
    assert lf.get_method("dora").trainable_params(64, 64, lf.AdapterConfig(rank=4)) == 512 + 64
    model = lf.attach(tiny_llama(), dora_config(target_modules=["q_proj", "v_proj"]))
    assert lf.trainable_parameters(model) == 2 * (4 * (32 + 32) + 32 + 4 * (32 + 16) + 16)


def test_efficient_form_equals_explicit_form():
    layer = random_layer()
    x = torch.randn(3, 5, 12)
    a, b, m = layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector
    with torch.no_grad():
        torch.testing.assert_close(layer(x), dense(layer, a, b, m, x), atol=1e-5, rtol=0)
        torch.testing.assert_close(layer.base_layer(x) + layer.delta(x), dense(layer, a, b, m, x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("base", [nn.Linear(12, 10), nn.Linear(12, 10, bias=False)])
def test_merge_rows_have_norm_m_and_unmerge_restores(base):
    torch.manual_seed(0)
    layer = DoRALinear(base, dora_config(init="random"), "x")
    with torch.no_grad():
        layer.lora_magnitude_vector.mul_(1.5)
    w0, x = base.weight.detach().clone(), torch.randn(4, 12)
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        torch.testing.assert_close(base.weight.norm(dim=1), layer.lora_magnitude_vector, atol=0, rtol=1e-5)
        torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=0)
        layer.unmerge()
    torch.testing.assert_close(base.weight, w0, atol=1e-5, rtol=0)
    assert "merge_norm" not in layer.state_dict()


def test_gradients_equal_dense_autograd_with_detached_norm():
    layer = random_layer()
    x = torch.randn(4, 12)
    layer(x).pow(2).sum().backward()
    ours = [layer.lora_A.weight.grad, layer.lora_B.weight.grad, layer.lora_magnitude_vector.grad]
    for got, want in zip(ours, grads(layer, x, detach=True)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    a, b, m = layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector
    with torch.no_grad():  # same forward values either way ...
        torch.testing.assert_close(dense(layer, a, b, m, x, detach=False), dense(layer, a, b, m, x))
    assert not torch.allclose(ours[0], grads(layer, x, detach=False)[0], atol=1e-4)  # ... not the same gradient


def test_forward_never_builds_the_full_update(monkeypatch):
    model = perturb(lf.attach(tiny_llama(), dora_config()))

    def forbidden(self):
        raise AssertionError("delta_weight() called in the training forward")

    monkeypatch.setattr(DoRALinear, "delta_weight", forbidden)
    model.train()
    model(input_ids=torch.tensor([[5, 6, 7]]), labels=torch.tensor([[5, 6, 7]])).loss.backward()


# ---- PEFT parity -------------------------------------------------------------------------------

def peft_dora(make, **kw):
    base = make()
    torch.manual_seed(7)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules="all-linear", **kw))


def peft_tensors(peft_model) -> dict[str, torch.Tensor]:
    named = {k.replace(".default", ""): v for k, v in peft_model.named_parameters() if "lora_" in k}
    return {k.removeprefix("base_model.model.").replace("lora_magnitude_vector.weight", "lora_magnitude_vector"): v
            for k, v in named.items()}


@pytest.mark.parametrize("name", MODELS)
def test_same_seed_gives_peft_adapter_and_outputs_after_perturbation(name):
    ours = lf.attach(MODELS[name](), dora_config())
    theirs = peft_dora(MODELS[name])
    state = peft_tensors(theirs)
    for key, value in lf.adapter_state_dict(ours).items():
        assert torch.equal(state[key], value), key
    perturb(ours, scale=0.1)
    with torch.no_grad():
        for key, value in lf.adapter_state_dict(ours).items():
            state[key].copy_(value)
    assert_same_outputs(ours, theirs.eval(), logits)


def test_dropout_in_training_matches_peft():
    ours = perturb(lf.attach(tiny_llama(), dora_config(dropout=0.3)), scale=0.1).train()
    theirs = peft_dora(tiny_llama, lora_dropout=0.3).train()
    state = peft_tensors(theirs)
    with torch.no_grad():
        for key, value in lf.adapter_state_dict(ours).items():
            state[key].copy_(value)
    torch.manual_seed(3)
    got = logits(ours)
    torch.manual_seed(3)
    torch.testing.assert_close(logits(theirs), got, atol=1e-5, rtol=0)  # same masks, same x' in both terms


@pytest.mark.parametrize("name", MODELS)
def test_peft_loads_loraforge_dora(name, tmp_path):
    model = perturb(lf.attach(MODELS[name](), dora_config()), scale=0.1)
    lf.save_adapter(model, tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["use_dora"] is True
    theirs = PeftModel.from_pretrained(MODELS[name](), tmp_path / "a").eval()
    assert_same_outputs(model, theirs, logits)


@pytest.mark.parametrize("name", MODELS)
def test_loraforge_loads_peft_dora(name, tmp_path):
    theirs = get_peft_model(MODELS[name](), LoraConfig(r=4, lora_alpha=16, use_dora=True, init_lora_weights=False,
                                                       target_modules="all-linear")).eval()
    theirs.save_pretrained(tmp_path / "peft")
    ours = lf.load_adapter(MODELS[name](), tmp_path / "peft")
    assert ours.loraforge_config.method == "dora"
    assert_same_outputs(ours, theirs, logits)
