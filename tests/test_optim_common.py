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
from loraforge.training.loop import train

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
def test_resume_after_kill_reaches_the_same_weights(tmp_path, kill_at_step, rule):
    full = run(tmp_path, "full", rule)

    with kill_at_step(4):
        run(tmp_path, "killed", rule, save_every=2)
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
    with pytest.raises(lf.LoraforgeError, match="takes no setting 'allora_eta'"):
        lf.make_optimizer(model, "lora-plus", allora_eta=1.0)


@pytest.fixture
def sgd_rule():
    """A rule registered from a test, with a setting no file of the trainer names."""
    @OPTIMIZERS.register("sgd-test")
    def build_sgd(model, lr: float, weight_decay: float, momentum: float = 0.0) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=momentum,
                               weight_decay=weight_decay)

    yield "sgd-test"
    OPTIMIZERS._builders.pop("sgd-test")


def test_a_new_rule_and_its_setting_need_no_edit_of_the_trainer_or_the_cli(tmp_path, sgd_rule):
    from loraforge.cli import train_config_from_argv
    from loraforge.core.plugins import Component

    config, _ = train_config_from_argv(["--optimizer", sgd_rule, "--momentum", "0.9", "--steps", "2"])
    assert config.optimizer == Component(sgd_rule, {"momentum": 0.9})
    seen = []
    original = torch.optim.SGD.__init__

    def spy(self, params, **kw):
        seen.append(kw["momentum"])
        original(self, params, **kw)

    torch.optim.SGD.__init__ = spy
    try:
        run(tmp_path, "sgd", sgd_rule, steps=2, optimizer=config.optimizer)
    finally:
        torch.optim.SGD.__init__ = original
    assert seen == [0.9]


def test_plugin_settings_nest_under_their_plugin_from_flags_files_and_older_flat_keys(tmp_path):
    from loraforge.cli import train_config_from_argv
    from loraforge.core.plugins import Component

    want = Component("lora-plus", {"loraplus_lr_ratio": 8.0})
    assert train_config_from_argv(["--optimizer", "lora-plus", "--loraplus-lr-ratio", "8"])[0].optimizer == want
    nested, flat = tmp_path / "nested.yaml", tmp_path / "flat.yaml"
    nested.write_text("optimizer:\n  name: lora-plus\n  settings:\n    loraplus_lr_ratio: 8.0\n")
    flat.write_text("optimizer: lora-plus\nloraplus_lr_ratio: 8.0\nlisa_layers: 3\n")  # an older file: every field
    assert train_config_from_argv(["--config", str(nested)])[0].optimizer == want
    assert train_config_from_argv(["--config", str(flat)])[0].optimizer == want
    assert train_config_from_argv(["--config", str(nested), "--loraplus-lr-ratio", "4"])[0].optimizer.settings == {
        "loraplus_lr_ratio": 4.0}  # a flag wins over the file
    assert TrainConfig(optimizer="lora-plus").optimizer == Component("lora-plus")  # the Python API takes a name


def test_a_setting_the_builder_does_not_take_is_refused_naming_what_it_takes(tmp_path):
    from loraforge.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("optimizer: {name: lora-plus, settings: {ratio: 8}}\n")
    with pytest.raises(lf.LoraforgeError, match="optimizer 'lora-plus' takes no setting 'ratio'; it takes: "
                                                "loraplus_lr_ratio \\(float, default 16.0\\)"):
        TrainConfig(optimizer={"name": "lora-plus", "settings": {"ratio": 8}}).validate()
    assert main(["train", "--config", str(bad)]) == 2
    with pytest.raises(lf.LoraforgeError, match="setting 'loraplus_lr_ratio' must be a float, got 'big'"):
        TrainConfig(optimizer={"name": "lora-plus", "settings": {"loraplus_lr_ratio": "big"}}).validate()
