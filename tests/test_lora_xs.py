"""LoRA-XS and LoRA-SB: the checks of shared/methods/lora-sb.md."""

import pytest
import torch
from peft import PeftModel
from torch import nn

import loraforge as lf
from loraforge.methods.lora_xs import LoRAXSLinear
from loraforge.testing import tiny_llama, tiny_tokenizer
from loraforge.training.data import BatchPlan, collate, from_records


def test_only_r_squared_trains():
    for method in ("lora-xs", "lora-sb"):
        assert lf.get_method(method).trainable_params(64, 64, lf.AdapterConfig(method=method, rank=4)) == 16
    model = lf.attach(nn.Sequential(nn.Linear(64, 64)), lf.AdapterConfig(method="lora-xs", rank=4))
    assert lf.trainable_parameters(model) == 16
    assert not model[0].lora_A.requires_grad and not model[0].lora_B.requires_grad


def test_lora_xs_starts_from_the_svd_of_w0():
    torch.manual_seed(0)
    model = lf.attach(nn.Sequential(nn.Linear(32, 24)), lf.AdapterConfig(method="lora-xs", rank=4, alpha=4, seed=0))
    layer = model[0]
    u, s, vh = torch.linalg.svd(layer.base_layer.weight)
    torch.testing.assert_close(layer.lora_B @ layer.lora_A, u[:, :4] @ torch.diag(s[:4]) @ vh[:4], atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.lora_B.T @ layer.lora_B, torch.eye(4), atol=1e-5, rtol=0)
    assert 0 < layer.lora_R.abs().max() < 1e-4  # R ~ N(0, 1e-10)
    x = torch.randn(6, 32)
    h, h0 = layer(x), layer.base_layer(x)
    assert (h - h0).norm() <= 1e-3 * h0.norm()
    assert torch.linalg.matrix_rank(layer.delta_weight()) <= 4
    with torch.no_grad():
        layer.lora_R.zero_()
    assert torch.equal(layer(x), h0)


def sb_setup(lr: float = 1e-3):
    tok = tiny_tokenizer()
    data = from_records([{"prompt": f"question {i}", "completion": f"answer {i % 5}"} for i in range(32)], tok)
    model = lf.attach(tiny_llama(), lf.AdapterConfig(method="lora-sb", rank=4, alpha=8, options={"svd_niter": None}))
    report = lf.initialize(model, data, batches=2, batch_size=8, lr=lr, progress=False)
    return model, data, report


def test_lora_sb_start_is_the_best_rank_r_sign_step():
    lr = 1e-3
    model, data, report = sb_setup(lr)
    assert report.init == "lora-sb" and report.details["first_lr"] == lr
    reference = tiny_llama().train()  # the gradient again, with Hugging Face's own loss
    plan = BatchPlan(len(data), 8, seed=0)
    for k in range(2):
        reference(**collate([data[i] for i in plan.indices(k)], pad_id=0)).loss.backward()
    for name, layer in lf.adapter_layers(model).items():
        update = -lr * torch.sign(reference.get_submodule(name).weight.grad)
        u, s, vh = torch.linalg.svd(update)
        best = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]
        assert (layer.delta_weight() - best).norm() <= 1e-4 * best.norm(), name
        torch.testing.assert_close(layer.lora_B.T @ layer.lora_B, torch.eye(4), atol=1e-4, rtol=0)
        torch.testing.assert_close(layer.lora_A @ layer.lora_A.T, torch.eye(4), atol=1e-4, rtol=0)
        diagonal = torch.diagonal(layer.lora_R)
        assert torch.equal(layer.lora_R, torch.diag(diagonal)) and (diagonal >= 0).all()
        assert (diagonal[:-1] >= diagonal[1:]).all()


def test_gradient_of_r_is_the_projected_full_gradient():
    torch.manual_seed(0)
    layer = LoRAXSLinear(nn.Linear(12, 10), lf.AdapterConfig(method="lora-xs", rank=3, alpha=6, init="random"), "x")
    x, upstream = torch.randn(5, 12), torch.randn(5, 10)
    (layer(x) * upstream).sum().backward()
    full = upstream.T @ x  # dL/dW of the merged weight: h = W x  ->  dL/dW = (dL/dh)^T x
    torch.testing.assert_close(layer.lora_R.grad, layer.scaling * layer.lora_B.T @ full @ layer.lora_A.T,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["lora-xs", "lora-sb"])
def test_merge_and_peft_export(method, tmp_path):
    if method == "lora-sb":
        model = sb_setup()[0]
    else:
        model = lf.attach(tiny_llama(), lf.AdapterConfig(method="lora-xs", rank=4, alpha=8, seed=0))
    with torch.no_grad():
        for layer in lf.adapter_layers(model).values():
            layer.lora_R.add_(0.1 * torch.randn_like(layer.lora_R))
    ids = torch.randint(5, 100, (2, 9))
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        lf.save_adapter(model, tmp_path / "a")  # plain LoRA (A, B R): rank r, same scale
        exported = PeftModel.from_pretrained(tiny_llama(), tmp_path / "a")(input_ids=ids).logits
        lf.merge(model)
        merged = model(input_ids=ids).logits
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    torch.testing.assert_close(exported, unmerged, atol=1e-5, rtol=0)


def test_bad_input():
    with pytest.raises(lf.AdapterError, match="x: lora-xs rank 12 exceeds the layer's smaller side"):
        LoRAXSLinear(nn.Linear(12, 10), lf.AdapterConfig(method="lora-xs", rank=12), "x")
    with pytest.raises(lf.AdapterError, match="brings its own start"):
        lf.attach(tiny_llama(), lf.AdapterConfig(method="lora-xs", init="gaussian"))
    model = lf.attach(tiny_llama(), lf.AdapterConfig(method="lora-sb", rank=2))
    data = from_records([{"prompt": "q", "completion": "a"}], tiny_tokenizer())
    with pytest.raises(lf.AdapterError, match="pass lr="):
        lf.initialize(model, data, batches=1)
