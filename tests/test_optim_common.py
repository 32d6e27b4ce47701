"""Every optimisation rule through the trainer: a killed and resumed run reaches the weights of an
uninterrupted one (optimizer state saved and restored), and gradient accumulation changes nothing."""

import pytest
import torch
from safetensors.torch import load_file

import loraforge as lf
from loraforge.core.plugins import OPTIMIZERS
from loraforge.testing import tiny_llama, tiny_tokenizer
from loraforge.training.config import TrainConfig
from loraforge.training.data import from_records
from loraforge.training.loop import lr_at, train

TOK = tiny_tokenizer()
DATA = from_records([{"prompt": f"Q{i}: {i}+{i}?", "completion": f" {2 * i}" + "!" * (i % 4)} for i in range(24)], TOK,
                    max_length=32)
SETTINGS = {"allora": {"alpha": 4}}  # ALLoRA runs without LoRA's scale: alpha = rank


def run(tmp_path, name, rule, **kw):
    settings = dict(rank=4, alpha=8, steps=6, lr=5e-3, batch_size=4, precision="fp32", optimizer=rule,
                    weight_decay=0.01) | SETTINGS.get(rule, {}) | kw
    config = TrainConfig(out=str(tmp_path / name), **settings)
    return train(config, model=tiny_llama(), tokenizer=TOK, train_data=DATA, progress=False)


def adapter(result) -> dict[str, torch.Tensor]:
    return load_file(str(result.out / "adapter" / "adapter_model.safetensors"))


def test_every_rule_is_listed():
    assert {"adamw", "lora-plus", "lora-pro", "allora"} <= set(OPTIMIZERS.names())


@pytest.mark.parametrize("rule", ["lora-plus", "lora-pro", "allora"])
def test_resume_after_kill_reaches_the_same_weights(tmp_path, monkeypatch, rule):
    full = run(tmp_path, "full", rule)

    def killed_at_step_5(step, config):
        if step == 4:
            raise KeyboardInterrupt
        return lr_at(step, config)

    monkeypatch.setattr("loraforge.training.loop.lr_at", killed_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "killed", rule, save_every=2)
    monkeypatch.setattr("loraforge.training.loop.lr_at", lr_at)
    resumed = run(tmp_path, "killed", rule, save_every=2, resume=True)
    reference = adapter(full)
    assert any(v.abs().sum() > 0 for k, v in reference.items() if "lora_B" in k)
    for key, value in adapter(resumed).items():
        torch.testing.assert_close(value, reference[key], atol=1e-6, rtol=0)


@pytest.mark.parametrize("rule", ["lora-pro", "allora"])
def test_gradient_accumulation_equals_the_full_batch(tmp_path, rule):
    one = run(tmp_path, "one", rule, steps=3)
    accum = run(tmp_path, "accum", rule, steps=3, batch_size=2, grad_accum=2)
    # LoRA-Pro's (B^T B)^-1 magnifies float32 rounding while B is still near its zero start.
    atol = 1e-4 if rule == "lora-pro" else 1e-5
    for key, value in adapter(one).items():
        torch.testing.assert_close(adapter(accum)[key], value, atol=atol, rtol=0)


def test_unknown_rule_or_setting_is_refused():
    model = lf.attach(tiny_llama(), lf.AdapterConfig(rank=4))
    with pytest.raises(lf.LoraforgeError, match="unknown optimizer"):
        lf.make_optimizer(model, "sgdw")
    with pytest.raises(lf.LoraforgeError, match="takes no setting allora_eta"):
        lf.make_optimizer(model, "lora-plus", allora_eta=1.0)
