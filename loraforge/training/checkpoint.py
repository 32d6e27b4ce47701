"""Checkpoints: the trainable tensors, the optimizer state and the RNG state, written atomically as
safetensors + JSON, so that `resume` continues to exactly the weights an uninterrupted run reaches."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from loraforge.adapters.inject import adapter_state_dict
from loraforge.core.errors import TrainingError
from loraforge.core.files import atomic_dir
from loraforge.core.rng import set_rng_state
from loraforge.training.config import TrainConfig
from loraforge.training.runtime import LocalRuntime, Runtime

CHECKPOINT_DIR = "checkpoint"


# Settings a resumed run may change without changing the result it converges to.
RESUME_MAY_CHANGE = {"resume", "save_every", "log_every", "log", "eval_every", "out", "grad_checkpoint", "compile",
                     "fsdp", "zero_stage"}


# How a global batch is split: a resumed run may split it otherwise (2 processes x batch 4 ->
# 1 x batch 8) as long as the global batch stays the same size.
BATCH_SPLIT = {"batch_size", "grad_accum", "num_processes"}


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
                    config: TrainConfig, runtime: Runtime | None = None) -> None:
    """Every rank calls this (the RNG states are gathered, and FSDP's shards); rank 0 alone writes,
    atomically, whole tensors whatever the engine. The data position is the step: batch s of a plan
    over the global batch size is the same for any split."""
    runtime = runtime or LocalRuntime()
    rng = runtime.rng_states()
    trainable = runtime.full_tensors(adapter_state_dict(model))  # DDP: every rank holds them whole
    tensors, param_groups = runtime.optimizer_state(optimizer)
    if not runtime.is_main:
        return
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}  # GPU runs: moments on the device
    tensors.update({_rng_key(kind, rank): state for rank, states in enumerate(rng) for kind, state in states.items()})
    meta = {"step": step, "global_batch": config.batch_size * config.grad_accum * runtime.world_size,
            "config": dataclasses.asdict(config), "param_groups": param_groups,
            "trainable_keys": list(trainable)}
    with atomic_dir(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()},
                  str(tmp / "trainable.safetensors"))
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "trainer_state.json").write_text(json.dumps(meta, indent=2) + "\n")


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, config: TrainConfig,
                    runtime: Runtime | None = None) -> int:
    """Restore a checkpoint into every rank's prepared model and optimizer (each takes its shard
    under FSDP); the processes, batch size, accumulation and engine may differ from the run that
    wrote it when the global batch does not."""
    runtime = runtime or LocalRuntime()
    meta = json.loads((path / "trainer_state.json").read_text())
    saved = dataclasses.asdict(TrainConfig.from_dict(meta["config"]))  # one written before plug-in components too
    changed = sorted(k for k, v in dataclasses.asdict(config).items()
                     if k not in RESUME_MAY_CHANGE | BATCH_SPLIT and saved.get(k) != v and k != "steps")
    if changed:
        raise TrainingError(f"{path} was written by a run with other settings ({', '.join(changed)} differ); "
                            f"resume with the same settings or choose a new --out")
    saved_global = meta.get("global_batch", saved["batch_size"] * saved["grad_accum"])
    global_batch = config.batch_size * config.grad_accum * runtime.world_size
    if saved_global != global_batch:
        raise TrainingError(f"{path} was written with a global batch of {saved_global} rows (batch size x grad accum x "
                            f"processes), this run has {global_batch}: choose a split with the same product")
    own = adapter_state_dict(model)
    trainable = load_file(str(path / "trainable.safetensors"))
    if set(trainable) != set(own):
        raise TrainingError(f"{path}: checkpoint tensors do not match this model's adapter")
    for key, tensor in trainable.items():
        runtime.assign_whole(own[key], tensor)
    tensors = load_file(str(path / "optimizer.safetensors"))
    runtime.load_optimizer_state(optimizer, tensors, meta["param_groups"])
    # A rank the writing run did not have keeps the stream runtime.seed_workers gave it.
    own_rng = {kind: tensors[_rng_key(kind, runtime.rank)] for kind in ("torch", "cuda")
               if _rng_key(kind, runtime.rank) in tensors}
    if own_rng:
        set_rng_state(own_rng, runtime.device)
    return int(meta["step"])


def _rng_key(kind: str, rank: int) -> str:
    """`rng.torch`, `rng.cuda` for rank 0 (as single-process checkpoints always had), `rng.torch.1`, ..."""
    return f"rng.{kind}.{rank}" if rank else f"rng.{kind}"

