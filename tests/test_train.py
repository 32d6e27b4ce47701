"""Trainer: outputs, exact resume, accumulation equivalence, NaN stop, the loss's head shortcut."""

import json
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import loraforge as lf
from loraforge.core.errors import TrainingError
from loraforge.testing import tiny_bert, tiny_gpt2, tiny_llama, tiny_tokenizer
from loraforge.training.config import TrainConfig
from loraforge.training.data import collate, from_records
from loraforge.training.loop import fit, train
from loraforge.training.loss import batch_loss
from loraforge.training.setup import build_run

TOK = tiny_tokenizer()


def chat_records(n: int = 24) -> list[dict]:
    # Responses of different lengths, so per-micro-batch averaging would differ from token normalisation.
    return [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"## Sum\n- {i} + {i} = {2 * i}" + " ok" * (i % 5)}]}
            for i in range(n)]


def run(tmp_path, name="run", model=None, data=None, **kw):
    settings = dict(rank=4, alpha=8, steps=6, lr=5e-3, batch_size=4, precision="fp32") | kw
    config = TrainConfig(out=str(tmp_path / name), **settings)
    model = model or tiny_llama()
    data = data or from_records(chat_records(), TOK, max_length=64)
    return train(config, model=model, tokenizer=TOK, train_data=data, progress=False)


def adapter_tensors(out) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def test_run_writes_everything_and_lowers_the_loss(tmp_path):
    result = run(tmp_path, steps=20, lr=3e-2, rank=8)
    out = result.out
    for name in ("config.json", "metrics.jsonl", "loss.png", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "checkpoint/trainer_state.json"):
        assert (out / name).is_file(), name
    assert not (out / "tensorboard").exists()  # an optional sink: --log tensorboard
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert {"step", "loss", "lr", "samples_per_s"} <= set(rows[0])
    assert result.loss_reduction > 0.3
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["rank"] == 8 and config["adapter"]["method"] == "lora"


def test_resume_after_kill_reaches_the_same_weights(tmp_path, kill_at_step):
    full = run(tmp_path, "full", steps=8, dropout=0.1)
    # Kill a second run inside step 6 (its last checkpoint is from step 4), then resume it.
    with kill_at_step(5):
        run(tmp_path, "killed", steps=8, dropout=0.1, save_every=2)
    resumed = run(tmp_path, "killed", steps=8, dropout=0.1, save_every=2, resume=True)
    for key, value in adapter_tensors(full.out).items():
        torch.testing.assert_close(adapter_tensors(resumed.out)[key], value, atol=1e-6, rtol=0)
    steps = [json.loads(line)["step"] for line in (resumed.out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


def test_resume_refuses_a_checkpoint_from_other_settings(tmp_path):
    run(tmp_path, "a", steps=2)
    with pytest.raises(TrainingError, match="lr"):
        run(tmp_path, "a", steps=4, lr=1e-2, resume=True)


def test_gradient_accumulation_equals_the_full_batch(tmp_path):
    one = run(tmp_path, "one", batch_size=4, grad_accum=1)
    accum = run(tmp_path, "accum", batch_size=2, grad_accum=2)
    # Same rows per step? BatchPlan cuts batch k from (seed, k): batch 4 step s == batches 2s, 2s+1 of size 2.
    for key, value in adapter_tensors(one.out).items():
        torch.testing.assert_close(adapter_tensors(accum.out)[key], value, atol=1e-5, rtol=0)


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    original = batch_loss
    calls = {"n": 0}

    def poisoned(model, batch, task):  # steps 1-3 are fine, step 4 diverges
        calls["n"] += 1
        loss = original(model, batch, task)
        return loss * float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr("loraforge.training.setup.batch_loss", poisoned)
    with pytest.raises(TrainingError, match="loss became nan at step 4"):
        run(tmp_path, "nan", steps=6, save_every=1)
    checkpoint = tmp_path / "nan" / "checkpoint"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == 3
    assert all(torch.isfinite(t).all() for t in load_file(str(checkpoint / "trainable.safetensors")).values())
    assert not (tmp_path / "nan" / "adapter").exists()  # no final adapter from a diverged run


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_loss_on_label_positions_only_equals_full_logits(make):
    model = lf.attach(make(), lf.AdapterConfig(rank=4, init="random"))
    data = from_records(chat_records(6), TOK, max_length=64)
    batch = collate(list(data), pad_id=0)
    fast = batch_loss(model, batch, "causal-lm")
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    full = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), batch["labels"][:, 1:].reshape(-1),
                                             ignore_index=-100, reduction="sum")
    torch.testing.assert_close(fast, full, atol=1e-4, rtol=1e-5)


def test_classification_training_trains_the_head(tmp_path):
    rows = [{"text": ("good fine great " if i % 2 else "bad awful poor ") * 2, "label": i % 2} for i in range(32)]
    data = from_records(rows, TOK, task="classification", max_length=32)
    model = tiny_bert()
    head_before = model.classifier.weight.detach().clone()
    result = run(tmp_path, model=model, data=data, task="classification", steps=15, lr=1e-2)
    assert not torch.equal(result.model.classifier.weight, head_before)
    assert "base_model.model.classifier.weight" in adapter_tensors(result.out)
    assert result.loss_reduction > 0.2


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(lf.LoraforgeError, match="--steps"):
        run(tmp_path, steps=0)
    with pytest.raises(lf.LoraforgeError, match="--precision"):
        run(tmp_path, precision="fp8")


def test_build_run_then_fit_is_train(tmp_path):
    trained = run(tmp_path, "train", dropout=0.1, grad_accum=2, batch_size=2)
    config = TrainConfig(out=str(tmp_path / "two-part"), rank=4, alpha=8, steps=6, lr=5e-3, batch_size=2, grad_accum=2,
                         precision="fp32", dropout=0.1)
    built = build_run(config, model=tiny_llama(), tokenizer=TOK, train_data=from_records(chat_records(), TOK, max_length=64),
                      progress=False)
    assert built.start == 0 and len(built.batches) == 6 * 2  # micro-batches of this (the one) rank
    fitted = fit(built)
    for key, value in adapter_tensors(trained.out).items():
        assert torch.equal(adapter_tensors(fitted.out)[key], value), key
    assert [r["loss"] for r in fitted.history] == [r["loss"] for r in trained.history]


def test_resume_with_another_split_reads_the_same_batches(tmp_path, kill_at_step):
    """Killed as 2 micro-batches of 2 rows after the step-4 checkpoint, resumed as one batch of 4:
    the DataLoader of the resumed run starts at global batch 4 and reaches the uninterrupted adapter."""
    full = run(tmp_path, "full", steps=8)  # no dropout: its masks depend on the micro-batches' shapes
    with kill_at_step(5):
        run(tmp_path, "killed", steps=8, save_every=2, batch_size=2, grad_accum=2)
    resumed = run(tmp_path, "killed", steps=8, save_every=2, resume=True)
    for key, value in adapter_tensors(full.out).items():
        torch.testing.assert_close(adapter_tensors(resumed.out)[key], value, atol=1e-5, rtol=0)
    assert [r["step"] for r in resumed.history] == list(range(1, 9))


def test_the_loss_is_read_once_per_step_not_per_micro_batch(tmp_path, monkeypatch):
    """Reading a tensor on the host waits for the device: the loop may do it per step, never per
    micro-batch. So one batch of 4 and 4 micro-batches of 1 read tensors equally often."""
    reads = {"n": 0}
    for name in ("item", "tolist", "__float__"):
        def counted(self, *args, _read=getattr(torch.Tensor, name), **kwargs):
            reads["n"] += 1
            return _read(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    counts = []
    for batch_size, grad_accum in ((4, 1), (1, 4)):
        reads["n"] = 0
        run(tmp_path, f"accum{grad_accum}", steps=3, batch_size=batch_size, grad_accum=grad_accum)
        counts.append(reads["n"])
    assert counts[0] == counts[1] > 0


def test_log_sinks(tmp_path):
    both = run(tmp_path, "both", steps=2, log="tensorboard,jsonl").out
    assert any((both / "tensorboard").iterdir())
    assert len((both / "metrics.jsonl").read_text().splitlines()) == 2 and (both / "loss.png").is_file()
    only_tensorboard = run(tmp_path, "tb", steps=2, log="tensorboard").out
    assert any((only_tensorboard / "tensorboard").iterdir()) and not (only_tensorboard / "metrics.jsonl").exists()


def test_log_flag_and_unknown_sinks(tmp_path):
    from loraforge.cli import train_config_from_argv

    assert train_config_from_argv(["--log", "tensorboard,jsonl"])[0].log == "tensorboard,jsonl"
    with pytest.raises(lf.LoraforgeError, match="unknown metric sink 'mlflow'; registered: jsonl, tensorboard, wandb"):
        TrainConfig(log="jsonl,mlflow").validate()


def test_wandb_sink_writes_an_offline_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the optional wandb sink: pip install 'loraforge[wandb]'")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline is the sink's own default, with no network
    out = run(tmp_path, steps=2, log="jsonl,wandb").out
    [record] = (out / "wandb").glob("offline-run-*/*.wandb")
    # wandb's service process writes the file after finish() returns; on busy cores that takes a while
    deadline = time.monotonic() + 120
    while b"grad_norm" not in record.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert b"grad_norm" in record.read_bytes()  # the trainer's rows reached the run's history


def test_wandb_sink_without_wandb_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(lf.LoraforgeError, match=r"pip install 'loraforge\[wandb\]'"):
        run(tmp_path, steps=1, log="wandb")


def test_tensorboard_sink_without_tensorboard_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with pytest.raises(lf.LoraforgeError, match=r"pip install 'loraforge\[tensorboard\]'"):
        run(tmp_path, steps=1, log="tensorboard")
