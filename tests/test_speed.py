"""`loraforge bench speed` end to end on a tiny model: the JSON keys, the table, the report's section,
and gradient checkpointing / compile options of the trainer."""

import json

import pytest
import torch

import loraforge as lf
from loraforge.bench.speed import JSON_KEYS, SpeedRun, available_precisions, bench_speed
from loraforge.testing import tiny_llama, tiny_tokenizer
from loraforge.training.config import TrainConfig
from loraforge.training.loss import batch_loss
from loraforge.training.setup import prepare_model

pytest.importorskip("peft")


def tiny_folder(tmp_path):
    folder = tmp_path / "tiny"
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


def test_bench_speed_writes_the_issue_json_and_a_report_section(tmp_path):
    run = SpeedRun(model=tiny_folder(tmp_path), batch_size=2, seq_len=16, rank=4, steps=1, warmup=1, precisions="fp32")
    report = bench_speed(run, str(tmp_path / "out.json"), command="loraforge bench speed ...", progress=False,
                         report=tmp_path / "docs" / "benchmarks.md")
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved == report and isinstance(saved["machine"], str)
    assert set(saved) == {"machine", "fp32"} and tuple(saved["fp32"]) == JSON_KEYS
    assert all(v > 0 for k, v in saved["fp32"].items() if k.endswith("_step_s"))
    doc = (tmp_path / "docs" / "benchmarks.md").read_text()
    assert "bench speed" in doc and "frozen step (limit)" in doc and "PEFT" in doc and "Machine:" in doc


def test_bench_speed_scaling_runs_the_trainer_on_1_and_2_processes_per_engine(tmp_path):
    run = SpeedRun(model=tiny_folder(tmp_path), batch_size=4, seq_len=96, rank=4, steps=2, warmup=1, num_processes="1,2",
                   engines="ddp,zero3")
    report = bench_speed(run, str(tmp_path / "scaling.json"), command="loraforge bench speed --num-processes 1,2",
                         progress=False, report=tmp_path / "docs" / "benchmarks.md")
    rows = report["scaling"]
    assert set(rows) == {"1", "2 ddp", "2 zero3"}
    assert all(row["samples_per_s"] > 0 and row["tokens_per_s"] > row["samples_per_s"] for row in rows.values())
    # Data parallel keeps everything on each rank; ZeRO-3 splits weights and optimizer state in two
    # (its own fp32 copy of the adapter's partition aside).
    assert rows["2 ddp"]["state_mb"] == pytest.approx(rows["1"]["state_mb"])
    assert rows["2 zero3"]["state_mb"] < 0.6 * rows["1"]["state_mb"]
    doc = (tmp_path / "docs" / "benchmarks.md").read_text()
    assert "| processes | engine | samples/s |" in doc and "| 2 | zero3 |" in doc
    with pytest.raises(lf.LoraforgeError, match="divide --batch-size"):
        bench_speed(SpeedRun(model=run.model, batch_size=3, num_processes="2"), None, command="", progress=False)
    with pytest.raises(lf.LoraforgeError, match="--engines: unknown zero4"):
        bench_speed(SpeedRun(model=run.model, batch_size=4, num_processes="2", engines="zero4"), None, command="",
                    progress=False)


def test_bench_speed_profile_lists_the_ops_behind_the_difference(tmp_path):
    run = SpeedRun(model=tiny_folder(tmp_path), batch_size=2, seq_len=16, rank=4, warmup=1, precisions="fp32",
                   profile=True)
    rows = bench_speed(run, None, command="loraforge bench speed --profile", progress=False,
                       report=tmp_path / "docs" / "benchmarks.md")["profile"]["fp32"]
    assert "total" in rows and len(rows) > 2
    # the LoRA node runs only in the loraforge step: it is among the ops that make the difference
    assert any("LoRA" in op and row["frozen_ms"] == 0 < row["loraforge_ms"] for op, row in rows.items())
    doc = (tmp_path / "docs" / "benchmarks.md").read_text()
    assert "bench speed --profile" in doc and "**total**" in doc


def test_bench_speed_runs_every_precision_this_machine_has(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    others = [p for p in available_precisions(torch.device("cpu")) if p != "fp32"]
    if not others:
        pytest.skip("neither bf16 nor the 4-bit backend on this machine")
    run = SpeedRun(model=tiny_folder(tmp_path), batch_size=2, seq_len=16, rank=4, steps=1, warmup=1,
                   precisions=",".join(others))
    report = bench_speed(run, None, command="loraforge bench speed ...", progress=False)
    assert not (tmp_path / "docs").exists()  # no --report: the table is printed, no file written
    assert set(report) == {"machine", *others}
    assert all(tuple(report[p]) == JSON_KEYS for p in others)


def test_grad_checkpoint_gives_the_same_gradients():
    ids = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    grads = []
    for checkpoint in (False, True):
        model = lf.attach(tiny_llama(), lf.AdapterConfig(rank=4, alpha=8, init="random", seed=0))
        prepare_model(model, TrainConfig(grad_checkpoint=checkpoint))
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        grads.append(torch.autograd.grad(batch_loss(model, batch, "causal-lm"), params))
    assert model.is_gradient_checkpointing
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
