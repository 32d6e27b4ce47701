"""GLAD (loraforge/regularizers/glad.py) from its equations, on a tiny model and through the trainer."""

import pytest
import torch
from safetensors.torch import load_file

import loraforge as lf
from loraforge.core.plugins import REGULARIZERS, Component
from loraforge.testing import tiny_bert, tiny_llama, tiny_tokenizer
from loraforge.training.config import TrainConfig
from loraforge.training.data import from_records
from loraforge.training.loop import train

TOK = tiny_tokenizer()
IDS = torch.randint(5, 100, (3, 12), generator=torch.Generator().manual_seed(0))


def model_and_grads(seed: int = 0):
    model = lf.attach(tiny_llama(), lf.AdapterConfig(rank=4, alpha=8, init="random", seed=seed))
    params = [p for p in model.parameters() if p.requires_grad]

    def recompute():
        model(input_ids=IDS, labels=IDS).loss.backward()

    recompute()
    return model, params, recompute


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.flatten() for t in tensors])


def test_rho_zero_leaves_the_gradient_alone():
    _, params, recompute = model_and_grads()
    before = [p.grad.clone() for p in params]
    assert REGULARIZERS.build(Component("glad", {"glad_rho": 0.0})).steer(params, recompute) == {}
    for p, g in zip(params, before):
        assert torch.equal(p.grad, g)


def test_perturbation_has_norm_rho_along_g_and_is_undone_bitwise():
    _, params, recompute = model_and_grads()
    weights = [p.detach().clone() for p in params]
    g = flat(p.grad for p in params)
    seen = {}

    def spy():
        seen["eps"] = flat(p.detach() for p in params) - flat(weights)
        recompute()

    REGULARIZERS.build(Component("glad", {"glad_rho": 0.1})).steer(params, spy)
    eps = seen["eps"]
    torch.testing.assert_close(eps.norm(), torch.tensor(0.1), atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.nn.functional.cosine_similarity(eps, g, dim=0), torch.tensor(1.0), atol=1e-6, rtol=0)
    for p, w in zip(params, weights):
        assert torch.equal(p.detach(), w)


def test_agreeing_reference_keeps_g_and_conflicting_one_is_projected_out():
    _, params, recompute = model_and_grads()
    g = flat(p.grad for p in params).clone()
    reference = {}

    def against():  # a reference gradient that conflicts with g: -g plus something orthogonal-ish
        recompute()
        for p in params:
            p.grad.mul_(-1).add_(torch.randn_like(p) * 1e-3)
        reference["g"] = flat(p.grad for p in params).clone()

    metrics = REGULARIZERS.build(Component("glad", {"glad_rho": 0.05})).steer(params, against)
    assert metrics["glad_cosine"] < 0
    steered = flat(p.grad for p in params)
    assert abs(torch.dot(steered, reference["g"])) < 1e-6 * g.norm() * reference["g"].norm()
    expected = g - torch.dot(g, reference["g"]) / reference["g"].square().sum() * reference["g"]
    torch.testing.assert_close(steered, expected, atol=1e-6, rtol=1e-5)

    _, params, recompute = model_and_grads()
    g = flat(p.grad for p in params).clone()
    metrics = REGULARIZERS.build(Component("glad", {"glad_rho": 1e-4})).steer(params, recompute)  # tiny step: g_sam ~ g
    assert metrics["glad_cosine"] > 0.99
    assert torch.equal(flat(p.grad for p in params), g)


def test_lambda_half_removes_half_the_conflict():
    _, params, recompute = model_and_grads()
    g = flat(p.grad for p in params).clone()
    reference = {}

    def against():
        recompute()
        for p in params:
            p.grad.mul_(-1)
        reference["g"] = flat(p.grad for p in params).clone()

    REGULARIZERS.build(Component("glad", {"glad_rho": 1e-4, "glad_lambda": 0.5})).steer(params, against)
    r = reference["g"]
    torch.testing.assert_close(flat(p.grad for p in params), g - 0.5 * torch.dot(g, r) / r.square().sum() * r,
                               atol=1e-6, rtol=1e-5)


def run(tmp_path, name, **kw):
    rows = [{"text": ("good fine great " if i % 2 else "bad awful poor ") * 2, "label": i % 2} for i in range(16)]
    data = from_records(rows, TOK, task="classification", max_length=32)
    config = TrainConfig.from_dict(dict(out=str(tmp_path / name), task="classification", rank=4, alpha=8, steps=4, lr=1e-2, batch_size=4,
                         precision="fp32", **kw))
    model = tiny_bert()
    base = {k: v.clone() for k, v in model.state_dict().items() if "classifier" not in k}
    result = train(config, model=model, tokenizer=TOK, train_data=data, progress=False)
    return result, base


def test_trainer_with_glad_rho_zero_is_plain_training_and_base_never_moves(tmp_path):
    plain, _ = run(tmp_path, "plain")
    glad0, _ = run(tmp_path, "glad0", regularizer="glad", glad_rho=0.0)
    glad, base = run(tmp_path, "glad", regularizer="glad", glad_rho=0.05)
    a, b, c = (load_file(str(r.out / "adapter" / "adapter_model.safetensors")) for r in (plain, glad0, glad))
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-7, rtol=0)
    assert any(not torch.equal(c[key], a[key]) for key in a)
    assert all("glad_cosine" in row for row in glad.history if "loss" in row)
    own = glad.model.state_dict()
    for key, value in base.items():
        key_now = key if key in own else key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(own[key_now], value), key


def test_unknown_regularizer_is_refused(tmp_path):
    with pytest.raises(lf.LoraforgeError, match="unknown regularizer"):
        run(tmp_path, "bad", regularizer="sam2")
