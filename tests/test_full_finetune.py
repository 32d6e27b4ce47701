"""`--method full`: full fine-tuning through the same trainer, checkpoints and resume as an adapter,
saved as safetensors, and read by the analysis as W' against a fresh base (the paper's baseline)."""

import argparse
import json

import pytest
import torch
from safetensors.torch import load_file

import loraforge as lf
from loraforge.analysis import analyze
from loraforge.analysis.cli import add_parser
from loraforge.testing import tiny_llama, tiny_tokenizer
from loraforge.training.config import TrainConfig
from loraforge.training.data import from_records
from loraforge.training.loop import train

TOK = tiny_tokenizer()


def records(n: int = 16) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} + {i} = {2 * i}"}]} for i in range(n)]


def run(tmp_path, name: str = "full", **kw):
    settings = dict(method="full", steps=6, lr=1e-3, batch_size=4, precision="fp32") | kw
    config = TrainConfig(out=str(tmp_path / name), **settings)
    return train(config, model=tiny_llama(), tokenizer=TOK, train_data=from_records(records(), TOK, max_length=48),
                 progress=False)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([[5, 6, 7, 8, 9]])).logits


def test_every_parameter_trains_and_counts():
    model = lf.attach(tiny_llama(), lf.AdapterConfig(method="full"))
    assert all(p.requires_grad for p in model.parameters())
    assert lf.trainable_parameters(model) == sum(p.numel() for p in tiny_llama().parameters())
    assert not lf.adapter_layers(model)  # nothing wrapped: the base weights themselves train
    assert lf.get_method("full").trainable_params(32, 48, lf.AdapterConfig(method="full")) == 32 * 48


def test_trainer_saves_every_weight_as_safetensors_and_they_reload(tmp_path):
    result = run(tmp_path, steps=12)
    assert result.loss_reduction > 0
    saved = load_file(str(result.out / "adapter" / "adapter_model.safetensors"))
    base = dict(tiny_llama().named_parameters())  # named_parameters lists a tied weight once
    assert {k.removeprefix("base_model.model.") for k in saved} == set(base)
    assert all(not torch.equal(saved["base_model.model." + k], p) for k, p in base.items() if p.ndim == 2)
    config = json.loads((result.out / "adapter" / "loraforge_config.json").read_text())
    assert config["method"] == "full"
    reloaded = lf.load_adapter(tiny_llama(), result.out / "adapter")
    assert torch.equal(logits(reloaded), logits(result.model))
    plain = lf.merge_and_unload(reloaded)  # already plain weights: nothing to fold, same outputs
    assert not hasattr(plain, "peft_config") and torch.equal(logits(plain), logits(result.model))


def test_resume_after_kill_reaches_the_same_weights(tmp_path, kill_at_step):
    whole = run(tmp_path, "whole", steps=6)

    with kill_at_step(4):
        run(tmp_path, "killed", steps=6, save_every=2)
    resumed = run(tmp_path, "killed", steps=6, save_every=2, resume=True)
    ours = load_file(str(resumed.out / "adapter" / "adapter_model.safetensors"))
    for key, value in load_file(str(whole.out / "adapter" / "adapter_model.safetensors")).items():
        torch.testing.assert_close(ours[key], value, atol=1e-6, rtol=0)


def test_analysis_reads_a_full_fine_tune_against_a_fresh_base(tmp_path):
    result = run(tmp_path, steps=4)
    tuned = dict(result.model.named_parameters())
    found = analyze(tiny_llama(), result.out / "adapter")
    assert len(found) == 14  # every linear layer but the output head
    for name, module in found.items():
        delta = tuned[name + ".weight"].detach() - tiny_llama().get_submodule(name).weight
        torch.testing.assert_close(module.update_spectrum, torch.linalg.svdvals(delta), atol=1e-5, rtol=1e-4)
    with pytest.raises(lf.AdapterError, match="W0 is gone"):
        analyze(result.model)


def test_analyze_cli_compares_full_fine_tuning_with_lora(tmp_path):
    full = run(tmp_path, "full", steps=4).out / "adapter"
    lora = run(tmp_path, "lora", method="lora", rank=2, alpha=4, lr=5e-3, steps=4).out / "adapter"
    tiny_llama().save_pretrained(tmp_path / "model")
    TOK.save_pretrained(tmp_path / "model")
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["analyze", "--model", str(tmp_path / "model"), "--adapter", str(full),
                              "--compare", str(lora), "--out", str(tmp_path / "report")])
    assert args.run(args) == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    module = report["modules"]["model.layers.0.mlp.up_proj"]
    assert module["effective_rank"] > 2  # a full update is not low rank
    (lora_report,) = report["compare"].values()  # both folders are named "adapter": labelled by path
    lora_module = lora_report["modules"]["model.layers.0.mlp.up_proj"]
    assert lora_module["effective_rank"] <= 2 + 1e-6  # rank-2 LoRA
    assert module["relative_update_norm"] > 0
