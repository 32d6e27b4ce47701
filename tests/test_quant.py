"""QLoRA: NF4 storage and error bounds, training on a 4-bit base, PEFT-format adapters, merging."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("bitsandbytes")

import loraforge as lf  # noqa: E402
from loraforge.adapters.io import load_adapter  # noqa: E402
from loraforge.methods.lora import LoRALinear  # noqa: E402
from loraforge.quant.nf4 import NF4Linear, dequantize_base, quantize_base, quantized_bits  # noqa: E402
from loraforge.testing import assert_same_outputs, tiny_llama, tiny_tokenizer  # noqa: E402
from loraforge.training.config import TrainConfig  # noqa: E402
from loraforge.training.data import from_records  # noqa: E402
from loraforge.training.loop import train  # noqa: E402

# The 16 NF4 levels (QLoRA, appendix E); the widest gap is between -1 and the next level.
NF4_LEVELS = torch.tensor([-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
                           0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0])


def gaussian_linear(d_out: int = 1536, d_in: int = 576) -> nn.Linear:
    torch.manual_seed(0)
    layer = nn.Linear(d_in, d_out, bias=False).requires_grad_(False)
    nn.init.normal_(layer.weight, std=0.02)
    return layer


def test_storage_is_4_127_bits_per_weight():
    q = NF4Linear(gaussian_linear())
    # 4 + 8/64 + 32/(64*256), plus one float32 offset for the whole tensor.
    assert q.bits_per_parameter() == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-4)
    assert q.weight_nf4.numel() == 1536 * 576 // 2


def test_quantisation_error_within_nf4_bounds():
    layer = gaussian_linear()
    error = (NF4Linear(layer).dense_weight() - layer.weight).reshape(-1, 64).abs()  # blocks of 64
    absmax = layer.weight.reshape(-1, 64).abs().amax(1, keepdim=True)
    half_gap = (NF4_LEVELS.diff().max() / 2).item()  # 0.152: rounding to the nearest level
    # + the 8-bit double quantisation of the absmax (a relative error of about 1%)
    assert (error / absmax).max() <= half_gap * 1.02 + 0.01
    # Gaussian weights fall mostly between the dense middle levels: the typical error is much smaller.
    assert (error / absmax).mean() < 0.04


def test_forward_with_4bit_base_is_close_to_full_precision():
    layer = gaussian_linear()  # SmolLM2's up_proj shape, weights N(0, 0.02)
    x = torch.randn(64, 576, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, quant = layer(x), NF4Linear(layer)(x)
    relative = ((quant - full).norm() / full.norm()).item()
    assert relative < 0.1, relative  # measured 0.092: NF4's RMS weight error on Gaussian weights

    model = tiny_llama()
    assert quantize_base(model) == 14  # 2 layers x 7 projections; the tied head stays dense
    n, bits = quantized_bits(model)
    assert n == sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, NF4Linear))
    assert 4.127 < bits < 4.2  # tiny layers fill their last block of 256 absmaxes only partly


def test_fused_lora_node_on_4bit_base_equals_plain_formulation():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(64, 48).requires_grad_(False), lf.AdapterConfig(rank=4, alpha=8, init="random"), "x")
    layer.base_layer = NF4Linear(layer.base_layer)
    x = torch.randn(5, 64, requires_grad=True)
    out = layer(x)
    assert type(out.grad_fn).__name__ == "_LoRAFunctionBackward"
    out.pow(2).sum().backward()
    got = x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad

    w = layer.base_layer.dense_weight()
    x2, a, b = (t.detach().clone().requires_grad_(True) for t in (x, layer.lora_A.weight, layer.lora_B.weight))
    (F.linear(x2, w, layer.base_layer.bias) + layer.scaling * x2 @ a.T @ b.T).pow(2).sum().backward()
    for g, want in zip(got, (x2.grad, a.grad, b.grad)):
        torch.testing.assert_close(g, want, atol=1e-5, rtol=1e-5)


def chat_records(n: int = 24) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} + {i} = {2 * i}"}]} for i in range(n)]


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    tok = tiny_tokenizer()
    config = TrainConfig(out=str(tmp_path_factory.mktemp("qlora") / "run"), quant="nf4", rank=8, alpha=16,
                         steps=20, lr=3e-2, batch_size=4, precision="fp32")
    return train(config, model=tiny_llama(), tokenizer=tok, train_data=from_records(chat_records(), tok, max_length=64),
                 progress=False)


def test_training_on_4bit_base_lowers_the_loss(qlora_run):
    assert any(isinstance(m, NF4Linear) for m in qlora_run.model.modules())
    assert qlora_run.loss_reduction > 0.3


def test_adapter_from_4bit_base_loads_on_full_precision_base_and_in_peft(qlora_run):
    from peft import PeftModel

    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        trained = qlora_run.model(input_ids=ids).logits
        ours = load_adapter(tiny_llama(), qlora_run.out / "adapter").eval()
        full_precision = ours(input_ids=ids).logits
        peft = PeftModel.from_pretrained(tiny_llama(), qlora_run.out / "adapter").eval()
        assert_same_outputs(ours, peft, lambda model: model(input_ids=ids).logits)
        # Same adapter, base weights differing by NF4's rounding only (tiny N(0, 0.2) weights: ~20% each).
        assert not torch.equal(full_precision, trained)


def test_merge_of_4bit_run_dequantises(qlora_run):
    model = qlora_run.model
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        plain = lf.merge_and_unload(model)
        assert not any(isinstance(m, NF4Linear) for m in plain.modules())
        assert all(m.weight.dtype == torch.float32 for m in plain.modules() if isinstance(m, nn.Linear))
        torch.testing.assert_close(plain(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_dequantize_base_gives_dense_layers_with_the_4bit_weights():
    model = tiny_llama()
    quantize_base(model)
    q_proj = model.model.layers[0].self_attn.q_proj
    weight = q_proj.dense_weight()
    assert dequantize_base(model, torch.bfloat16) == 14
    dense = model.model.layers[0].self_attn.q_proj
    assert type(dense) is nn.Linear and dense.weight.dtype == torch.bfloat16
    torch.testing.assert_close(dense.weight.float(), weight, atol=1e-2, rtol=1e-2)
