"""`attach` on a tiny CLIP (both towers) and a tiny diffusers UNet's attention; PEFT loads the saved adapters."""

import pytest
import torch
from peft import PeftModel
from vision_helpers import tiny_clip, tiny_unet

from loraforge.adapters.inject import attach
from loraforge.adapters.io import save_adapter
from loraforge.core.config import AdapterConfig
from loraforge.methods.base import adapter_layers

CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def clip_inputs():
    torch.manual_seed(0)
    return {"input_ids": torch.randint(0, 500, (2, 7)), "pixel_values": torch.randn(2, 3, 16, 16)}


def unet_inputs():
    torch.manual_seed(0)
    return (torch.randn(2, 3, 16, 16), torch.tensor([10, 500]), torch.randn(2, 5, 32))


def test_lora_on_both_clip_towers_saves_in_peft_format(tmp_path):
    model = tiny_clip(tmp_path / "tok")
    before = model(**clip_inputs()).logits_per_image
    attach(model, AdapterConfig(rank=2, alpha=4, target_modules=CLIP_TARGETS, init="random", seed=0,
                                task_type="FEATURE_EXTRACTION"))
    names = set(adapter_layers(model))
    assert any(n.startswith("text_model.") for n in names) and any(n.startswith("vision_model.") for n in names)
    assert len(names) == 2 * 6  # one layer per tower, six projections each
    ours = model(**clip_inputs()).logits_per_image
    assert not torch.allclose(ours, before)
    save_adapter(model, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(tiny_clip(tmp_path / "tok"), str(tmp_path / "adapter"))
    torch.testing.assert_close(peft_model.get_base_model()(**clip_inputs()).logits_per_image, ours, atol=1e-5, rtol=1e-5)


def test_lora_on_unet_attention_loads_in_peft_and_diffusers(tmp_path):
    model = tiny_unet()
    attach(model, AdapterConfig(rank=2, alpha=4, target_modules=UNET_TARGETS, init="random", seed=0,
                                task_type="FEATURE_EXTRACTION"))
    names = set(adapter_layers(model))
    assert names and {n.rsplit(".", 1)[-1] for n in names} == {"to_q", "to_k", "to_v", "0"}
    ours = model(*unet_inputs()).sample
    save_adapter(model, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(tiny_unet(), str(tmp_path / "adapter"))
    torch.testing.assert_close(peft_model.get_base_model()(*unet_inputs()).sample, ours, atol=1e-5, rtol=1e-5)
    # diffusers' own loader reads no alpha from PEFT's JSON (it takes alpha = rank): it agrees at scale 1
    model = tiny_unet()
    attach(model, AdapterConfig(rank=2, alpha=2, target_modules=UNET_TARGETS, init="random", seed=0))
    ours = model(*unet_inputs()).sample
    save_adapter(model, tmp_path / "adapter")
    unet = tiny_unet()
    unet.load_lora_adapter(str(tmp_path / "adapter"), weight_name="adapter_model.safetensors",
                           prefix="base_model.model")  # PEFT's key prefix, where diffusers puts "unet"
    torch.testing.assert_close(unet(*unet_inputs()).sample, ours, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("targets", [CLIP_TARGETS])
def test_block_and_comp_lora_on_clip_keep_their_specs(tmp_path, targets):
    model = attach(tiny_clip(tmp_path / "tok"), AdapterConfig(method="block-lora", rank=2, target_modules=targets,
                                                               init="random", seed=0, options={"n_blocks": 4}))
    for name, layer in adapter_layers(model).items():
        delta = layer.delta_weight()  # (d_out, d_in): every column block identical (spec check 4)
        blocks = delta.unflatten(1, (4, -1))
        torch.testing.assert_close(blocks, blocks[:, :1].expand_as(blocks), atol=1e-6, rtol=0)
        assert layer.lora_A.weight.numel() == 2 * layer.in_features // 4, name
    model = attach(tiny_clip(tmp_path / "tok"), AdapterConfig(method="comp-lora", rank=2, target_modules=targets,
                                                               init="random", seed=0))
    for name, layer in adapter_layers(model).items():
        delta = layer.delta_weight()  # U_k^T dW = 0 and dW V_k = 0 (spec check 2)
        torch.testing.assert_close(layer.comp_U.T @ delta, torch.zeros(layer.k, delta.shape[1]), atol=1e-5, rtol=0)
        torch.testing.assert_close(delta @ layer.comp_V, torch.zeros(delta.shape[0], layer.k), atol=1e-5, rtol=0)
