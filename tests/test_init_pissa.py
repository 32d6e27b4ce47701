"""PiSSA: the checks of shared/methods/pissa.md, PEFT parity of the start and of the saved conversion."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

import loraforge as lf
from loraforge.methods.init.residual import ResidualLoRALinear
from loraforge.testing import tiny_llama


def pissa_layer(weight: torch.Tensor, rank: int = 4, alpha: float = 8.0, **options) -> ResidualLoRALinear:
    base = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        base.weight.copy_(weight)
    model = lf.attach(nn.Sequential(base), lf.AdapterConfig(init="pissa", rank=rank, alpha=alpha, options=options))
    return model[0]


def decaying(d_out: int = 24, d_in: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d_out, d_in, generator=g))
    v, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=g))
    return u @ torch.diag(0.7 ** torch.arange(d_in, dtype=torch.float32) * 3) @ v.T  # (d_out, d_in), sigma_i = 3 * 0.7^i


def residual(layer: ResidualLoRALinear) -> torch.Tensor:
    return layer.base_layer.weight - layer.scaling * layer.lora_B0 @ layer.lora_A0  # W_res = W0 - s B0 A0


def test_output_equals_the_base_layer_at_init():
    layer = pissa_layer(decaying())
    x = torch.randn(5, 16)
    assert torch.equal(layer(x), layer.base_layer(x))  # exactly: the start cancels term by term
    torch.testing.assert_close(residual(layer) + layer.scaling * layer.lora_B.weight @ layer.lora_A.weight,
                               layer.base_layer.weight, atol=1e-5, rtol=0)


def test_singular_values_and_residual_norm():
    weight = decaying()
    layer = pissa_layer(weight, rank=4, alpha=8.0)
    sigma = torch.linalg.svdvals(weight)
    ba = layer.lora_B.weight @ layer.lora_A.weight
    torch.testing.assert_close(torch.linalg.svdvals(ba)[:4], sigma[:4] / layer.scaling, rtol=1e-4, atol=0)
    torch.testing.assert_close(torch.linalg.matrix_norm(residual(layer), ord=2), sigma[4], rtol=1e-4, atol=0)


def test_factors_have_orthogonal_rows_and_columns():
    layer = pissa_layer(decaying(), rank=4, alpha=8.0)
    expected = torch.diag(torch.linalg.svdvals(decaying())[:4] / layer.scaling)
    a, b = layer.lora_A.weight, layer.lora_B.weight
    torch.testing.assert_close(a @ a.T, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(b.T @ b, expected, atol=1e-5, rtol=0)


def test_scale_invariance():
    one, two = pissa_layer(decaying(), alpha=4.0), pissa_layer(decaying(), alpha=32.0)
    torch.testing.assert_close(one.scaling * one.lora_B.weight @ one.lora_A.weight,
                               two.scaling * two.lora_B.weight @ two.lora_A.weight, atol=1e-5, rtol=0)
    torch.testing.assert_close(residual(one), residual(two), atol=1e-5, rtol=0)


def test_randomised_svd_with_16_iterations_is_close():
    exact = pissa_layer(decaying(64, 48))
    torch.manual_seed(0)
    fast = pissa_layer(decaying(64, 48), svd_niter=16)
    ba_exact = exact.lora_B.weight @ exact.lora_A.weight
    ba_fast = fast.lora_B.weight @ fast.lora_A.weight
    assert torch.linalg.norm(ba_fast - ba_exact) / torch.linalg.norm(ba_exact) < 1e-2


def test_conversion_after_updates_reproduces_the_pissa_model_on_the_original_weights():
    layer = pissa_layer(decaying())
    with torch.no_grad():
        layer.lora_A.weight.add_(0.1 * torch.randn_like(layer.lora_A.weight))
        layer.lora_B.weight.add_(0.1 * torch.randn_like(layer.lora_B.weight))
    lora_a, lora_b = layer.lora_factors()  # [A; A0], [B, -B0]: rank 2r on W0
    assert lora_a.shape == (8, 16) and lora_b.shape == (24, 8)
    x = torch.randn(5, 16)
    pissa_model = x @ residual(layer).T + layer.base_layer.bias + layer.scaling * x @ (layer.lora_B.weight @ layer.lora_A.weight).T
    torch.testing.assert_close(layer(x), pissa_model, atol=1e-4, rtol=0)
    torch.testing.assert_close(layer.base_layer(x) + layer.scaling * x @ lora_a.T @ lora_b.T, pissa_model, atol=1e-4, rtol=0)


def test_start_equals_peft_pissa():
    targets = ["q_proj", "v_proj", "down_proj"]
    ours = lf.attach(tiny_llama(), lf.AdapterConfig(init="pissa", rank=4, alpha=8, target_modules=targets))
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                         init_lora_weights="pissa"))
    for name, layer in lf.adapter_layers(ours).items():
        theirs = peft_model.base_model.model.get_submodule(name)
        start = layer.scaling * layer.lora_B.weight @ layer.lora_A.weight  # signs of singular pairs cancel here
        torch.testing.assert_close(start, theirs.scaling["default"] * theirs.lora_B["default"].weight
                                   @ theirs.lora_A["default"].weight, atol=1e-5, rtol=0)
        torch.testing.assert_close(residual(layer), theirs.base_layer.weight, atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore:PiSSA changes the base weights")
def test_saved_adapter_matches_peft_weight_conversion(tmp_path):
    """PEFT trains on W_res and converts on save; loraforge keeps W0: both give the same LoRA."""
    targets = ["q_proj", "v_proj"]
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                         init_lora_weights="pissa"))
    peft_model.peft_config["default"].init_lora_weights = True
    peft_model.save_pretrained(tmp_path / "init")
    peft_model.peft_config["default"].init_lora_weights = "pissa"
    ours = lf.attach(tiny_llama(), lf.AdapterConfig(init="pissa", rank=4, alpha=8, target_modules=targets))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the same "training" update on both
        for name, layer in lf.adapter_layers(ours).items():
            theirs = peft_model.base_model.model.get_submodule(name)
            for factor in ("lora_A", "lora_B"):
                step = 0.05 * torch.randn(getattr(layer, factor).weight.shape, generator=g)
                getattr(layer, factor).weight.copy_(getattr(theirs, factor)["default"].weight + step)
                layer_start = layer.lora_A0 if factor == "lora_A" else layer.lora_B0
                layer_start.copy_(getattr(theirs, factor)["default"].weight)  # same signs as PEFT's SVD
                getattr(theirs, factor)["default"].weight.add_(step)
    peft_model.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    lf.save_adapter(ours, tmp_path / "ours")
    x = torch.randint(5, 100, (2, 9))
    with torch.no_grad():
        trained = peft_model(input_ids=x).logits
        from_peft = PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft")(input_ids=x).logits
        from_ours = PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")(input_ids=x).logits
    torch.testing.assert_close(from_ours, trained, atol=1e-5, rtol=0)
    torch.testing.assert_close(from_ours, from_peft, atol=1e-5, rtol=0)
    ours_json = (tmp_path / "ours" / "adapter_config.json").read_text()
    assert '"r": 8' in ours_json and '"lora_alpha": 16.0' in ours_json and '"init_lora_weights": true' in ours_json
