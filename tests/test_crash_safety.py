"""Nothing saved is lost: a run killed with SIGKILL at random moments (inside checkpoint writes too)
always resumes from a complete checkpoint and ends on the uninterrupted run's weights; a full disk or
an unwritable output is a clear error that leaves the previous adapter as it was; and the GPU's
random stream is saved, restored and never re-seeded behind the caller's back."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import loraforge as lf
from loraforge.core.files import atomic_dir, recover
from loraforge.testing import tiny_llama, tiny_tokenizer

KILLS = 20
SLOW_WRITE_S = 0.02  # each checkpoint file write and folder rename waits this long first
ROWS = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                      {"role": "assistant", "content": f"{2 * i}" + " ok" * (i % 4)}]} for i in range(32)]

# Runs `loraforge train` with every checkpoint file and folder swap slowed down, so that random kills
# land inside checkpoint writes as often as between them. Prints "started" when the first step of the
# run (or of the resumed run) begins, so that the parent's clock starts there, not during the imports.
CHILD = textwrap.dedent("""
    import os, sys, time
    import torch
    torch.set_num_threads(1)
    import loraforge.training.loop as loop
    from loraforge.cli import main
    from loraforge.training import checkpoint

    delay = float(os.environ["SLOW_WRITE_S"])
    def slowly(write):
        def slow(*args, **kwargs):
            time.sleep(delay)
            return write(*args, **kwargs)
        return slow
    checkpoint.save_file = slowly(checkpoint.save_file)
    os.replace = slowly(os.replace)  # the renames that swap a checkpoint folder in
    lr_at = loop.lr_at
    def announced(step, config):  # the first step begins: the parent's clock starts here
        if step == loop_start[0]:
            print("started", flush=True)
        return lr_at(step, config)
    loop_start = [None]
    fit = loop.fit
    def fit_announced(run):
        loop_start[0] = run.start
        return fit(run)
    loop.fit, loop.lr_at = fit_announced, announced
    sys.exit(main(sys.argv[1:]))
""")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, list[str]]:
    """A tiny model folder, its data, and the `train` flags of a run of 24 steps checkpointed every step."""
    root = tmp_path_factory.mktemp("crash")
    tiny_llama().save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    flags = ["train", "--model", str(root / "model"), "--data", str(root / "data.jsonl"), "--rank", "4",
             "--steps", "24", "--batch-size", "4", "--lr", "5e-3", "--dropout", "0.1", "--save-every", "1",
             "--precision", "fp32", "--max-length", "64"]
    return root, flags


def child(flags: list[str], slow_write_s: float = 0.0, **popen) -> subprocess.Popen:
    env = {**os.environ, "SLOW_WRITE_S": str(slow_write_s), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", CHILD, *flags], env=env, text=True, **popen)


def started(proc: subprocess.Popen) -> bool:
    """Wait for the child's "started" line (other lines, "no checkpoint ...", pass); False if it ends first."""
    return any(line.strip() == "started" for line in proc.stdout)


def assert_complete(checkpoint: Path) -> None:
    """What `--resume` reads is whole: the state JSON parses and both tensor files load."""
    recover(checkpoint)
    if not checkpoint.exists():
        return  # killed before the first checkpoint: the run starts again from step 0
    json.loads((checkpoint / "trainer_state.json").read_text())
    load_file(str(checkpoint / "trainable.safetensors"))
    load_file(str(checkpoint / "optimizer.safetensors"))


@pytest.mark.slow
def test_twenty_random_kills_always_resume_to_the_uninterrupted_weights(tiny_run):
    root, flags = tiny_run
    reference = child([*flags, "--out", str(root / "full")], slow_write_s=SLOW_WRITE_S, stdout=subprocess.PIPE)
    assert started(reference)
    began = time.perf_counter()
    assert reference.wait(timeout=600) == 0
    # Each kill comes within 1/KILLS of the whole run's training time after a (re)start: the twenty
    # kills fall all along the run, and it is still unfinished after the last.
    window = (time.perf_counter() - began) / KILLS
    rng = random.Random(0)
    killed = root / "killed"
    for _ in range(KILLS):
        proc = child([*flags, "--out", str(killed), "--resume"], slow_write_s=SLOW_WRITE_S, stdout=subprocess.PIPE,
                     stderr=subprocess.DEVNULL)
        assert started(proc), "the run finished before its twentieth kill"
        time.sleep(rng.uniform(0.0, window))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        assert_complete(killed / "checkpoint")
    finish = child([*flags, "--out", str(killed), "--resume"], stdout=subprocess.DEVNULL)
    assert finish.wait(timeout=600) == 0
    ours = load_file(str(killed / "adapter" / "adapter_model.safetensors"))
    theirs = load_file(str(root / "full" / "adapter" / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-6, rtol=0)
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 25))


def test_a_kill_between_the_two_renames_leaves_the_previous_folder_recoverable(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint"
    with atomic_dir(target) as tmp:
        (tmp / "state.json").write_text("1")
    renames, rename = [], os.replace

    def killed_on_second_rename(src, dst):
        renames.append((src, dst))
        if len(renames) == 2:
            raise KeyboardInterrupt  # what a kill leaves: target moved aside, the new one not yet in place
        rename(src, dst)

    monkeypatch.setattr("loraforge.core.files.os.replace", killed_on_second_rename)
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(target) as tmp:
            (tmp / "state.json").write_text("2")
    monkeypatch.undo()
    assert not target.exists()
    recover(target)
    assert (target / "state.json").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]  # the leftovers are gone


FULL_DISK = textwrap.dedent("""
    import resource, signal, sys
    from loraforge.cli import main
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    sys.exit(main(sys.argv[2:]))
""")


@pytest.mark.slow
def test_a_full_disk_is_a_clear_error_and_the_previous_adapter_is_kept(tiny_run):
    root, flags = tiny_run
    out = root / "full-disk"
    short = [*flags[:flags.index("--steps") + 1], "2", *flags[flags.index("--steps") + 2:], "--out", str(out)]
    assert child(short).wait(timeout=600) == 0
    before = {p.name: p.read_bytes() for p in (out / "adapter").iterdir()}
    again = [*short, "--seed", "1"]  # another run into the same folder, on a disk that is now full
    proc = subprocess.run([sys.executable, "-c", FULL_DISK, "4096", *again], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "loraforge: error: could not write" in proc.stderr and "File too large" in proc.stderr
    assert {p.name: p.read_bytes() for p in (out / "adapter").iterdir()} == before


def test_an_output_that_cannot_be_a_folder_is_a_clear_error(tmp_path):
    (tmp_path / "taken").write_text("a file, not a folder")
    model = lf.attach(tiny_llama(), lf.AdapterConfig(rank=2))
    with pytest.raises(lf.LoraforgeError, match=r"could not write .*taken/adapter: File exists; adapter was not written"):
        lf.save_adapter(model, tmp_path / "taken" / "adapter")
    assert (tmp_path / "taken").read_text() == "a file, not a folder"


# ---- the GPU's random stream ------------------------------------------------------------------------
class FakeCuda:
    """torch.cuda's generator calls, on a machine without a GPU: the checkpoint plumbing is checked
    here, the real device in the test below where one exists."""

    def __init__(self):
        self.state = torch.tensor([7, 7, 7], dtype=torch.uint8)
        self.restored = None

    def get_rng_state(self, device=None):
        return self.state.clone()

    def set_rng_state(self, state, device=None):
        self.restored = state.clone()


def test_a_checkpoint_saves_and_restores_the_gpu_generator(tmp_path, monkeypatch):
    from loraforge.training.checkpoint import load_checkpoint, save_checkpoint
    from loraforge.training.config import TrainConfig
    from loraforge.training.runtime import LocalRuntime

    fake = FakeCuda()
    monkeypatch.setattr(torch.cuda, "get_rng_state", fake.get_rng_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state", fake.set_rng_state)
    monkeypatch.setattr(LocalRuntime, "device", property(lambda self: torch.device("cuda")))
    model = lf.attach(tiny_llama(), lf.AdapterConfig(rank=2))
    optimizer = lf.make_optimizer(model, "adamw", lr=1e-3)
    config = TrainConfig(model="m", data="d")
    save_checkpoint(tmp_path / "checkpoint", model, optimizer, 3, config)
    saved = load_file(str(tmp_path / "checkpoint" / "optimizer.safetensors"))
    assert torch.equal(saved["rng.cuda"], fake.state) and "rng.torch" in saved
    assert load_checkpoint(tmp_path / "checkpoint", model, optimizer, config) == 3
    assert torch.equal(fake.restored, fake.state)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: exact resume of a GPU run and "
                                                           "attach leaving the caller's CUDA generator alone")
def test_on_a_gpu_attach_leaves_the_cuda_stream_and_resume_is_exact(tmp_path, kill_at_step):
    from loraforge.training.config import TrainConfig
    from loraforge.training.data import from_records
    from loraforge.training.loop import train

    torch.cuda.manual_seed(123)
    expected = torch.rand(4, device="cuda")
    torch.cuda.manual_seed(123)
    lf.attach(tiny_llama().cuda(), lf.AdapterConfig(rank=2, seed=0))
    assert torch.equal(torch.rand(4, device="cuda"), expected)

    data = from_records(ROWS, tiny_tokenizer(), max_length=64)

    def run(name: str, **kw):
        config = TrainConfig(model="m", data="d", out=str(tmp_path / name), rank=4, steps=8, lr=5e-3, batch_size=4,
                             lora_dropout=0.1, precision="fp32", save_every=2, **kw)
        return train(config, model=tiny_llama(), tokenizer=tiny_tokenizer(), train_data=data, progress=False)

    full = run("full")
    with kill_at_step(5):
        run("killed")
    resumed = run("killed", resume=True)
    ours = load_file(str(resumed.out / "adapter" / "adapter_model.safetensors"))
    for key, value in load_file(str(full.out / "adapter" / "adapter_model.safetensors")).items():
        torch.testing.assert_close(ours[key], value, atol=1e-6, rtol=0)
