"""ALLoRA (loraforge/optim/allora.py) from its equation c_i = 1 / sqrt(||P_i||^2 + 1/eta^2)."""

import math

import pytest
import torch

import loraforge as lf
from loraforge.optim.allora import allora_coefficients
from loraforge.testing import tiny_llama


def test_zero_row_gets_eta_and_the_norm_one_over_eta_row_eta_over_sqrt2():
    eta = 3.0
    param = torch.zeros(3, 4)
    param[1] = torch.tensor([1.0, 0, 0, 0]) / eta
    param[2] = torch.tensor([2.0, 1, 0, 0])
    coef = allora_coefficients(param, eta).flatten()
    torch.testing.assert_close(coef[0], torch.tensor(eta), rtol=1e-7, atol=0)
    torch.testing.assert_close(coef[1], torch.tensor(eta / math.sqrt(2)), rtol=1e-6, atol=0)
    torch.testing.assert_close(coef[2], torch.tensor(1 / math.sqrt(5 + 1 / eta**2)), rtol=1e-6, atol=0)


def test_coefficients_fall_as_the_norm_grows():
    norms = torch.linspace(0, 10, 50)
    param = torch.zeros(50, 2)
    param[:, 0] = norms
    coef = allora_coefficients(param, 2.0).flatten()
    assert torch.all(coef[1:] < coef[:-1])


def _model(**kw):
    return lf.attach(tiny_llama(), lf.AdapterConfig(**({"rank": 4, "alpha": 4, "init": "random", "seed": 0} | kw)))


def test_step_rescales_each_row_by_its_coefficient_keeping_its_direction():
    model = _model()
    optimizer = lf.make_optimizer(model, "allora", lr=1e-3, allora_eta=2.0)
    ids = torch.randint(5, 100, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    raw = [p.grad.clone() for p in params]
    expected = [allora_coefficients(p, 2.0) * g for p, g in zip(params, raw)]  # c_i from the weights before the step
    optimizer.step()
    for param, grad, want in zip(params, raw, expected):
        torch.testing.assert_close(param.grad, want)
        cosine = torch.nn.functional.cosine_similarity(param.grad, grad, dim=1)
        nonzero = grad.norm(dim=1) > 0
        torch.testing.assert_close(cosine[nonzero], torch.ones_like(cosine[nonzero]))


def test_refuses_a_scale_or_dropout():
    with pytest.raises(lf.LoraforgeError, match="--alpha equal to --rank"):
        lf.make_optimizer(_model(alpha=8), "allora", lr=1e-3)
    with pytest.raises(lf.LoraforgeError, match="--dropout 0"):
        lf.make_optimizer(_model(dropout=0.1), "allora", lr=1e-3)


def test_no_dropout_means_deterministic_training_forward():
    model = _model()
    model.train()
    ids = torch.randint(5, 100, (2, 12))
    torch.testing.assert_close(model(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)
