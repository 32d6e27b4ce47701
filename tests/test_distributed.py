"""Data-parallel training on accelerate (gloo on CPU): one global batch, any split, the same adapter;
resume across process counts; a dead worker stops the run and leaves its last checkpoint intact.

Multi-process runs fork their workers from this process (TrainConfig.num_processes), so the tiny
model and data passed in memory reach them, and so do the monkeypatches below."""

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from loraforge.data import from_records
from loraforge.distributed import WorkerFailed, micro_batches
from loraforge.errors import LoraforgeError
from loraforge.train import TrainConfig, lr_at, train
from loraforge.testing import tiny_llama, tiny_tokenizer

TOK = tiny_tokenizer()
STEPS = 6


def records(n: int = 24) -> list[dict]:
    # Responses from 2 to ~40 characters: per-micro-batch means would weigh their tokens unequally.
    return [{"messages": [{"role": "user", "content": f"Add {i} and {i}."},
                          {"role": "assistant", "content": f"{2 * i}" + " because" * (i % 6)}]}
            for i in range(n)]


DATA = from_records(records(), TOK, max_length=64)


def run(out, **kw):
    settings = dict(rank=4, alpha=8, steps=STEPS, lr=5e-3, batch_size=8, precision="fp32") | kw
    return train(TrainConfig(out=str(out), **settings), model=tiny_llama(), tokenizer=TOK, train_data=DATA,
                 progress=False)


def adapter(out) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def assert_same_adapter(out, reference: dict[str, torch.Tensor]) -> None:
    got = adapter(out)
    assert set(got) == set(reference)
    for key, value in reference.items():
        torch.testing.assert_close(got[key], value, atol=1e-5, rtol=0, msg=key)


def metric_steps(out) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    """1 process x batch 8, uninterrupted."""
    return adapter(run(tmp_path_factory.mktemp("reference") / "run").out)


def test_micro_batches_split_the_global_batch_in_order():
    rows = list(range(8))
    assert micro_batches(rows, grad_accum=2, rank=0, world_size=2) == [[0, 1], [4, 5]]
    assert micro_batches(rows, grad_accum=2, rank=1, world_size=2) == [[2, 3], [6, 7]]
    assert micro_batches(rows, grad_accum=1, rank=0, world_size=1) == [rows]
    assert micro_batches(list(range(5)), grad_accum=1, rank=1, world_size=2) == [[2, 3, 4]]  # short last batch
    with pytest.raises(LoraforgeError, match="cannot feed"):
        micro_batches([0], grad_accum=1, rank=0, world_size=2)


@pytest.mark.parametrize("split", [dict(batch_size=2, grad_accum=4), dict(batch_size=4, num_processes=2),
                                   dict(batch_size=2, grad_accum=2, num_processes=2)],
                         ids=["1x2x4", "2x4", "2x2x2"])
def test_every_split_of_the_global_batch_reaches_the_same_adapter(tmp_path, reference, split):
    result = run(tmp_path / "run", **split)
    assert_same_adapter(result.out, reference)
    # One metrics stream: rank 0's, each step once, with the throughput of all ranks together.
    assert metric_steps(result.out) == list(range(1, STEPS + 1))
    last = result.history[-1]
    assert last["samples_per_s"] > 0 and last["tokens_per_s"] > last["samples_per_s"]
    state = json.loads((result.out / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == STEPS and state["global_batch"] == 8


def _dies_in_step_4_on_rank_1(step: int, config: TrainConfig) -> float:
    if step == 3 and os.environ.get("RANK") == "1":
        os.kill(os.getpid(), signal.SIGKILL)
    return lr_at(step, config)


def test_a_dead_worker_stops_the_run_then_one_process_resumes_it(tmp_path, reference, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr("loraforge.train.lr_at", _dies_in_step_4_on_rank_1)
    with pytest.raises(WorkerFailed, match=r"worker rank 1 failed \(killed by SIGKILL\)") as failure:
        run(out, batch_size=4, num_processes=2, save_every=3)
    assert "step 3) is intact" in str(failure.value)
    checkpoint = out / "checkpoint"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == 3
    assert not [p for p in out.iterdir() if p.name.startswith(".checkpoint")]  # no half-written copy
    assert not (out / "adapter").exists()
    monkeypatch.undo()

    resumed = run(out, batch_size=8, resume=True)  # 2 processes x 4 -> 1 x 8
    assert_same_adapter(resumed.out, reference)
    assert metric_steps(out) == list(range(1, STEPS + 1))


def test_two_processes_resume_a_one_process_run(tmp_path, reference, monkeypatch):
    out = tmp_path / "run"

    def interrupted_in_step_4(step, config):
        if step == 3:
            raise KeyboardInterrupt
        return lr_at(step, config)

    monkeypatch.setattr("loraforge.train.lr_at", interrupted_in_step_4)
    with pytest.raises(KeyboardInterrupt):
        run(out, batch_size=8, save_every=3)
    monkeypatch.undo()
    resumed = run(out, batch_size=2, grad_accum=2, num_processes=2, resume=True)  # 1 x 8 -> 2 x 2 x 2
    assert_same_adapter(resumed.out, reference)


def test_an_error_in_the_workers_reaches_the_caller(tmp_path):
    run(tmp_path / "run", steps=2)
    with pytest.raises(WorkerFailed, match=r"worker rank [01] failed \(exit code 1: TrainingError: .*global batch of 8 rows.* this run has 4"):
        run(tmp_path / "run", steps=4, batch_size=2, num_processes=2, resume=True)


def test_cli_num_processes_trains_and_reports_once(tmp_path, capsys):
    from loraforge.cli import main

    tiny_llama().save_pretrained(tmp_path / "model")
    TOK.save_pretrained(tmp_path / "model")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records()))
    code = main(["train", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "train.jsonl"), "--rank", "4",
                 "--steps", "2", "--batch-size", "4", "--num-processes", "2", "--precision", "fp32",
                 "--out", str(tmp_path / "out")])
    assert code == 0
    assert capsys.readouterr().out.count("adapter written to") == 1
    assert metric_steps(tmp_path / "out") == [1, 2]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["train"]["num_processes"] == 2
