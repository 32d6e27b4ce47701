"""Every registered method trains on a 4-bit (NF4) base (issue 19, item 7): methods that read the frozen
weight itself (DoRA's column norm, Bone's block product) get it dequantised from the 4-bit codes."""

import pytest
import torch

pytest.importorskip("bitsandbytes")

import loraforge as lf  # noqa: E402
from loraforge.core.errors import LoraforgeError  # noqa: E402
from loraforge.methods.base import adapter_layers  # noqa: E402
from loraforge.quant.nf4 import NF4Linear, quantize_base  # noqa: E402
from loraforge.testing import tiny_llama, tiny_tokenizer  # noqa: E402
from loraforge.training.config import TrainConfig  # noqa: E402
from loraforge.training.data import from_records  # noqa: E402
from loraforge.training.loop import train  # noqa: E402

TOK = tiny_tokenizer()
ROWS = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                      {"role": "assistant", "content": f"{i} + {i} = {2 * i}"}]} for i in range(8)]


def nf4_config(method: str, tmp_path) -> TrainConfig:
    return TrainConfig(out=str(tmp_path / method), method=method, quant="nf4", rank=4, alpha=8, steps=2, lr=1e-3,
                         batch_size=4, precision="fp32")


@pytest.mark.parametrize("method", [m.name for m in lf.methods() if m.name != "full"])
def test_every_method_trains_a_step_on_a_4bit_base(method, tmp_path):
    result = train(nf4_config(method, tmp_path), model=tiny_llama(), tokenizer=TOK, train_data=from_records(ROWS, TOK, max_length=48),
                   progress=False)
    assert any(isinstance(m, NF4Linear) for m in result.model.modules())
    losses = [r["loss"] for r in result.history if "loss" in r]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert (result.out / "adapter" / "adapter_model.safetensors").is_file()


def test_full_fine_tuning_on_a_4bit_base_is_refused_before_a_step(tmp_path):
    # Full fine-tuning trains the base weights: nothing frozen is left to hold in 4 bits.
    with pytest.raises(LoraforgeError, match="no frozen nn.Linear .*full fine-tuning.*drop --quant"):
        train(nf4_config("full", tmp_path), model=tiny_llama(), tokenizer=TOK,
              train_data=from_records(ROWS, TOK, max_length=48), progress=False)
    assert not (tmp_path / "full" / "metrics.jsonl").exists()


@pytest.mark.parametrize("method", ["dora", "bone", "bone-bat"])
def test_weight_reading_methods_see_the_dequantised_weight(method):
    # On the 4-bit base the layer's output equals the same layer on a dense base holding the
    # dequantised weights, to float32 rounding: the method reads exactly those weights.
    model = lf.attach(tiny_llama(), lf.AdapterConfig(method=method, rank=4, alpha=8, seed=1))
    for layer in adapter_layers(model).values():  # a non-zero update, so the method's W0 term matters
        for p in layer.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(p.numel()))
    quantize_base(model)
    name, layer = next(iter(adapter_layers(model).items()))
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0))
    quantised = layer(x)
    layer.base_layer = layer.base_layer.to_linear()
    assert torch.allclose(quantised, layer(x), atol=1e-5, rtol=1e-4), name
