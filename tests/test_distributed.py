"""Multi-process training on accelerate (gloo on CPU), data parallel, FSDP and DeepSpeed ZeRO: one
global batch, any split or engine, the same adapter; resume across process counts and engines; a
dead worker stops the run and leaves its last checkpoint intact.

Multi-process runs fork their workers from this process (TrainConfig.num_processes), so the tiny
model and data passed in memory reach them, and so do the monkeypatches below."""

import importlib.util
import json
import os
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file

from loraforge.adapters.io import load_adapter
from loraforge.core.errors import LoraforgeError
from loraforge.distributed._compat import zero_partitions
from loraforge.distributed.launch import WorkerFailed
from loraforge.distributed.runtime import AccelerateRuntime
from loraforge.testing import tiny_llama, tiny_tokenizer
from loraforge.training.config import TrainConfig
from loraforge.training.data import from_records
from loraforge.training.loop import lr_at, train
from loraforge.training.runtime import micro_batches

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
    return train(TrainConfig.from_dict(dict(out=str(out), **settings)), model=tiny_llama(), tokenizer=TOK, train_data=DATA,
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
                                   dict(batch_size=2, grad_accum=2, num_processes=2),
                                   dict(batch_size=2, grad_accum=2, num_processes=2, fsdp=True)],
                         ids=["1x2x4", "2x4", "2x2x2", "2x2x2-fsdp"])
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
    monkeypatch.setattr("loraforge.training.loop.lr_at", _dies_in_step_4_on_rank_1)
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


def _interrupted_in_step_4(step: int, config: TrainConfig) -> float:
    if step == 3:
        raise KeyboardInterrupt
    return lr_at(step, config)


def test_two_processes_resume_a_one_process_run(tmp_path, reference, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr("loraforge.training.loop.lr_at", _interrupted_in_step_4)
    with pytest.raises(KeyboardInterrupt):
        run(out, batch_size=8, save_every=3)
    monkeypatch.undo()
    resumed = run(out, batch_size=2, grad_accum=2, num_processes=2, resume=True)  # 1 x 8 -> 2 x 2 x 2
    assert_same_adapter(resumed.out, reference)


def test_an_error_in_the_workers_reaches_the_caller(tmp_path):
    run(tmp_path / "run", steps=2)
    with pytest.raises(WorkerFailed, match=r"worker rank [01] failed \(exit code 1: TrainingError: .*global batch of 8 rows.* this run has 4"):
        run(tmp_path / "run", steps=4, batch_size=2, num_processes=2, resume=True)


@pytest.mark.parametrize("engine", [[], ["--fsdp"], ["--zero-stage", "2"]], ids=["ddp", "fsdp", "zero2"])
def test_cli_num_processes_trains_and_reports_once(tmp_path, capsys, engine):
    from loraforge.cli import main

    tiny_llama().save_pretrained(tmp_path / "model")
    TOK.save_pretrained(tmp_path / "model")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records()))
    code = main(["train", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "train.jsonl"), "--rank", "4",
                 "--steps", "2", "--batch-size", "4", "--num-processes", "2", "--precision", "fp32",
                 "--out", str(tmp_path / "out"), *engine])
    assert code == 0
    assert capsys.readouterr().out.count("adapter written to") == 1
    assert metric_steps(tmp_path / "out") == [1, 2]
    train_config = json.loads((tmp_path / "out" / "config.json").read_text())["train"]
    assert train_config["num_processes"] == 2
    assert train_config["fsdp"] == ("--fsdp" in engine) and train_config["zero_stage"] == (2 if "2" in engine else 0)


# ---- FSDP ---------------------------------------------------------------------------------------

def _records_partitions(monkeypatch, folder) -> None:
    """After prepare, every worker writes {parameter: [whole numel, this rank's numel]} and, under
    ZeRO, the number of elements its optimizer updates (its flat partitions) to folder."""
    prepare = AccelerateRuntime.prepare

    def local(p: torch.Tensor) -> int:
        if hasattr(p, "ds_tensor"):  # ZeRO-3: this rank's partition
            return p.ds_tensor.numel()
        return p.to_local().numel() if hasattr(p, "to_local") else p.numel()  # FSDP's DTensor: its shard

    def recording(self, model, optimizer, loss_fn, **options):
        loss, prepared = prepare(self, model, optimizer, loss_fn, **options)
        sizes = {name: [getattr(p, "ds_numel", p.numel()), local(p)] for name, p in model.named_parameters()}
        if self.zero_stage:
            sizes["optimizer"] = sum(t.numel() for t in zero_partitions(prepared.optimizer))
        (folder / f"partitions-{self.rank}.json").write_text(json.dumps(sizes))
        return loss, prepared

    monkeypatch.setattr(AccelerateRuntime, "prepare", recording)


def test_fsdp_shards_base_and_adapter_and_saves_the_whole_adapter(tmp_path, reference, monkeypatch):
    _records_partitions(monkeypatch, tmp_path)
    result = run(tmp_path / "fsdp", batch_size=4, num_processes=2, fsdp=True)
    for rank in (0, 1):
        sizes = json.loads((tmp_path / f"partitions-{rank}.json").read_text())
        for name in ("model.layers.0.self_attn.q_proj.base_layer.weight",  # frozen base (32, 32)
                     "model.layers.0.self_attn.q_proj.lora_A.weight",  # adapter (4, 32)
                     "model.layers.1.mlp.down_proj.lora_B.weight"):  # adapter (32, 4)
            whole, local = sizes[name]
            assert local == whole // 2, name  # half the rows on each rank
    # One PEFT-format adapter, the files of any other run, whole tensors equal to the 1-process run's.
    assert sorted(p.name for p in (result.out / "adapter").iterdir()) == \
        ["adapter_config.json", "adapter_model.safetensors", "loraforge_config.json"]
    assert_same_adapter(result.out, reference)
    loaded = load_adapter(tiny_llama(), result.out / "adapter")
    for key, value in loaded.state_dict().items():
        if "lora_" in key:
            torch.testing.assert_close(value, reference["base_model.model." + key], atol=1e-5, rtol=0, msg=key)


@pytest.mark.parametrize("engines", [[dict(fsdp=True)], [dict(zero_stage=3), dict(zero_stage=2)]], ids=["fsdp", "zero"])
def test_sharded_checkpoints_resume_across_engines(tmp_path, reference, monkeypatch, engines):
    """A sharded run's checkpoint (gathered whole) resumes on one process; one process's resumes
    sharded (split on load: FSDP's shards, ZeRO's partitions and its fp32 copy); all reach the
    uninterrupted adapter."""
    out = tmp_path / "sharded-first"
    monkeypatch.setattr("loraforge.training.loop.lr_at", _dies_in_step_4_on_rank_1)
    with pytest.raises(WorkerFailed, match=r"worker rank 1 failed \(killed by SIGKILL\).*step 3\) is intact"):
        run(out, batch_size=4, num_processes=2, save_every=3, **engines[0])
    monkeypatch.undo()
    assert_same_adapter(run(out, batch_size=8, resume=True).out, reference)

    out = tmp_path / "one-first"
    monkeypatch.setattr("loraforge.training.loop.lr_at", _interrupted_in_step_4)
    with pytest.raises(KeyboardInterrupt):
        run(out, batch_size=8, save_every=3)
    monkeypatch.undo()
    for i, engine in enumerate(engines):
        resumed = shutil.copytree(out, tmp_path / f"resumed-{i}")
        assert_same_adapter(run(resumed, batch_size=4, num_processes=2, resume=True, **engine).out, reference)


@pytest.mark.parametrize("engine", [dict(), dict(fsdp=True)], ids=["ddp", "fsdp"])
@pytest.mark.parametrize("settings", [dict(select="lisa", lisa_layers=1, lisa_interval=2), dict(regularizer="glad")],
                         ids=["lisa", "glad"])
def test_two_processes_run_what_changes_the_step(tmp_path, settings, engine):
    """LISA switches the trained blocks mid-run (DDP must not wait for the frozen ones' gradients),
    GLAD takes a second backward at moved weights."""
    one = adapter(run(tmp_path / "one", **settings).out)
    assert_same_adapter(run(tmp_path / "two", batch_size=4, num_processes=2, **engine, **settings).out, one)


def test_fsdp_refuses_what_it_cannot_shard(tmp_path, monkeypatch):
    with pytest.raises(LoraforgeError, match="--fsdp shards the model over several processes"):
        run(tmp_path / "one", fsdp=True)
    with pytest.raises(WorkerFailed, match="FSDP does not support --optimizer lora-pro"):
        run(tmp_path / "pro", batch_size=4, num_processes=2, fsdp=True, optimizer="lora-pro")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` sets from a config file
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(WorkerFailed, match="fsdp_version 1: loraforge trains with FSDP2 only"):
        run(tmp_path / "v1", batch_size=4, num_processes=2)


def test_an_accelerate_fsdp_config_runs_fsdp(tmp_path, reference, monkeypatch):
    """The environment `accelerate launch --config_file examples/accelerate/fsdp.yaml` gives the workers."""
    for name, value in {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "true",
                        "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP"}.items():
        monkeypatch.setenv(name, value)
    _records_partitions(monkeypatch, tmp_path)
    result = run(tmp_path / "run", batch_size=4, num_processes=2)
    sizes = json.loads((tmp_path / "partitions-1.json").read_text())
    whole, local = sizes["model.layers.1.self_attn.o_proj.lora_B.weight"]
    assert local == whole // 2
    assert_same_adapter(result.out, reference)


@pytest.mark.parametrize("settings", [dict(init="pissa"), dict(method="lora-xs")], ids=["pissa", "lora-xs"])
def test_a_multi_process_run_hands_back_the_trained_model(tmp_path, settings):
    """Starts that change the base (PiSSA) or export other tensors than they train (LoRA-XS): the
    caller's model gets the exported adapter, which gives the trained outputs on its untouched base."""
    one = run(tmp_path / "one", **settings).model.eval()
    two = run(tmp_path / "two", batch_size=4, num_processes=2, **settings).model
    ids = torch.randint(5, 100, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(two(input_ids=ids).logits, one(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


# ---- DeepSpeed ZeRO -----------------------------------------------------------------------------

TRAINABLE = 4096  # the tiny model's adapter: 2 layers x 7 projections, rank 4


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_zero_partitions_as_its_stage_says_and_saves_the_whole_adapter(tmp_path, reference, monkeypatch,
                                                                                 stage):
    _records_partitions(monkeypatch, tmp_path)
    result = run(tmp_path / "run", batch_size=2, grad_accum=2, num_processes=2, zero_stage=stage)
    for rank in (0, 1):
        sizes = json.loads((tmp_path / f"partitions-{rank}.json").read_text())
        base, adapter_a = (sizes["model.layers.0.self_attn.q_proj.base_layer.weight"],
                           sizes["model.layers.1.mlp.down_proj.lora_A.weight"])
        assert sizes["optimizer"] == TRAINABLE // 2  # every stage: AdamW's elements split in two
        if stage < 3:  # weights whole on every rank
            assert base == [1024, 1024] and adapter_a == [256, 256]
        else:  # every weight split in two, frozen base included
            assert base == [1024, 512] and adapter_a == [256, 128]
    assert sorted(p.name for p in (result.out / "adapter").iterdir()) == \
        ["adapter_config.json", "adapter_model.safetensors", "loraforge_config.json"]
    assert_same_adapter(result.out, reference)
    assert metric_steps(result.out) == list(range(1, STEPS + 1))


def test_deepspeed_clips_at_the_runs_max_grad_norm(tmp_path):
    """The engine clips inside its step: with --max-grad-norm its config's (not accelerate's default of
    1.0), so both the logged norms and the adapter match one process."""
    one = run(tmp_path / "one", max_grad_norm=0.05)
    two = run(tmp_path / "two", batch_size=4, num_processes=2, zero_stage=2, max_grad_norm=0.05)
    assert_same_adapter(two.out, adapter(one.out))
    torch.testing.assert_close([row["grad_norm"] for row in two.history], [row["grad_norm"] for row in one.history],
                               atol=1e-5, rtol=1e-5)


def test_deepspeed_zero3_evaluates_the_partitioned_model(tmp_path):
    """Evaluation runs the model outside the training step: ZeRO-3 must gather each layer for it, and
    the head the loss applies to label positions only."""
    def evaluated(out, **kw):
        config = TrainConfig.from_dict(dict(out=str(out), rank=4, alpha=8, steps=2, lr=5e-3, precision="fp32", eval_every=1, **kw))
        result = train(config, model=tiny_llama(), tokenizer=TOK, train_data=DATA, eval_data=DATA, progress=False)
        return [row["eval_loss"] for row in result.history if "eval_loss" in row]

    one = evaluated(tmp_path / "one", batch_size=8)
    assert len(one) == 3  # after each step, and at the end
    torch.testing.assert_close(evaluated(tmp_path / "zero3", batch_size=4, num_processes=2, zero_stage=3), one,
                               atol=1e-5, rtol=0)


def test_deepspeed_zero3_trains_a_classifier_and_its_head(tmp_path):
    """Sequence classification: the adapter and the trained head (modules_to_save), partitioned under
    ZeRO-3 like the rest, match one process (a base without dropout, whose masks differ per rank)."""
    from transformers import BertForSequenceClassification

    from loraforge.testing import tiny_bert

    def bert():
        config = tiny_bert().config
        config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
        torch.manual_seed(0)
        return BertForSequenceClassification(config).eval()

    rows = [{"text": f"this is {'good' if i % 2 else 'bad'} " * (1 + i % 4), "label": i % 2} for i in range(24)]
    data = from_records(rows, TOK, task="classification", max_length=32)

    def trained(out, **kw):
        config = TrainConfig.from_dict(dict(out=str(out), rank=4, alpha=8, steps=4, lr=5e-3, precision="fp32", task="classification",
                             num_labels=2, **kw))
        return train(config, model=bert(), tokenizer=TOK, train_data=data, progress=False).out

    one = adapter(trained(tmp_path / "one", batch_size=8))
    assert any("classifier" in key for key in one)
    assert_same_adapter(trained(tmp_path / "zero3", batch_size=4, num_processes=2, zero_stage=3), one)


def _deepspeed_config_file(tmp_path, monkeypatch, **entries) -> None:
    """What `accelerate launch` gives the workers for a config with deepspeed_config_file: cfg.json."""
    config = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto",
              "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"} | entries
    (tmp_path / "ds.json").write_text(json.dumps(config))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(tmp_path / "ds.json"))


def test_a_deepspeed_config_file_runs_zero(tmp_path, reference, monkeypatch):
    _deepspeed_config_file(tmp_path, monkeypatch)
    _records_partitions(monkeypatch, tmp_path)
    assert_same_adapter(run(tmp_path / "run", batch_size=4, num_processes=2).out, reference)
    assert json.loads((tmp_path / "partitions-0.json").read_text())["optimizer"] == TRAINABLE // 2


@pytest.mark.parametrize("entries, refusal", [
    (dict(train_micro_batch_size_per_gpu=16), "sets train_micro_batch_size_per_gpu=16, this run has 4"),
    (dict(gradient_clipping=0.5), "sets gradient_clipping=0.5, this run has 1.0"),
    (dict(bf16={"enabled": True}, optimizer={"type": "Adam", "params": {"lr": 1e-3}}), "sets optimizer, bf16: leave"),
    (dict(zero_optimization={"stage": 3, "offload_param": {"device": "cpu"}}), "sets zero_optimization.offload_param"),
], ids=["micro-batch", "clipping", "optimizer-bf16", "offload"])
def test_a_deepspeed_config_that_would_change_the_step_is_refused(tmp_path, monkeypatch, entries, refusal):
    _deepspeed_config_file(tmp_path, monkeypatch, **entries)
    with pytest.raises(WorkerFailed, match=refusal):
        run(tmp_path / "run", batch_size=4, num_processes=2)


def test_deepspeed_refuses_what_it_cannot_partition(tmp_path, monkeypatch):
    with pytest.raises(LoraforgeError, match="--zero-stage shards the model over several processes"):
        run(tmp_path / "one", zero_stage=2)
    with pytest.raises(LoraforgeError, match="--fsdp and --zero-stage are two sharding engines"):
        run(tmp_path / "both", batch_size=4, num_processes=2, zero_stage=2, fsdp=True)
    with pytest.raises(LoraforgeError, match="--zero-stage must be 1, 2 or 3"):
        run(tmp_path / "four", batch_size=4, num_processes=2, zero_stage=4)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "deepspeed" else find_spec(name, *args))
    with pytest.raises(WorkerFailed, match=r"needs the deepspeed package: pip install 'loraforge\[deepspeed\]'"):
        run(tmp_path / "missing", batch_size=4, num_processes=2, zero_stage=2)
    monkeypatch.undo()
    refused = {"allora": (dict(optimizer="allora", alpha=4, dropout=0.0), "does not support --optimizer allora"),
               "glad": (dict(regularizer="glad"), "--regularizer glad runs a second backward"),
               "lisa": (dict(select="lisa", lisa_layers=1), "switches the trained blocks \\(lisa\\) cannot train")}
    for name, (settings, refusal) in refused.items():
        with pytest.raises(WorkerFailed, match=refusal):
            run(tmp_path / name, batch_size=4, num_processes=2, zero_stage=2, **settings)


def test_accelerate_launch_with_the_example_zero3_config(tmp_path):
    """The real launcher and examples/accelerate/deepspeed_zero3.yaml (on 2 CPU processes here), against
    the same command on one process."""
    import subprocess
    import sys

    tiny_llama().save_pretrained(tmp_path / "model")
    TOK.save_pretrained(tmp_path / "model")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records()))
    args = ["train", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "train.jsonl"), "--rank", "4",
            "--steps", "3", "--precision", "fp32", "--lr", "5e-3"]
    config = os.path.join(os.path.dirname(__file__), "..", "examples", "accelerate", "deepspeed_zero3.yaml")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "--num_processes", "2",
              "-m", "loraforge", *args, "--batch-size", "4", "--out", str(tmp_path / "zero3")]
    done = subprocess.run(launch, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    subprocess.run([sys.executable, "-m", "loraforge", *args, "--batch-size", "8", "--out", str(tmp_path / "one")],
                   check=True, capture_output=True, timeout=300)
    assert_same_adapter(tmp_path / "zero3", adapter(tmp_path / "one"))
    assert json.loads((tmp_path / "zero3" / "checkpoint" / "trainer_state.json").read_text())["global_batch"] == 8


@pytest.mark.parametrize("engine", [dict(fsdp=True), dict(zero_stage=3)], ids=["fsdp", "zero3"])
def test_a_4bit_base_is_sharded_in_4_bits(tmp_path, monkeypatch, engine):
    """QLoRA under FSDP or ZeRO-3: the NF4 codes are split over the ranks like any weight (viewed in
    the base's dtype), and the adapter is the one a single process trains on the same 4-bit base."""
    one = adapter(run(tmp_path / "one", quant="nf4").out)
    _records_partitions(monkeypatch, tmp_path)
    result = run(tmp_path / "two", batch_size=4, num_processes=2, quant="nf4", **engine)
    for rank in (0, 1):
        sizes = json.loads((tmp_path / f"partitions-{rank}.json").read_text())
        whole, local = sizes["model.layers.0.self_attn.q_proj.base_layer.weight_nf4"]
        assert whole == 32 * 32 // 8 and local == whole // 2  # 32 x 32 codes of 4 bits = 128 float32 values
    assert_same_adapter(result.out, one)
