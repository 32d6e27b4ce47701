"""Starting the workers of a ``--num-processes N`` run (``TrainConfig(num_processes=N)``): N
processes on this machine, the way `accelerate launch` starts them (torch elastic; gloo on CPU,
NCCL on GPUs), registered as the "elastic" launcher in `core.plugins.LAUNCHERS`. The workers are
forked, not spawned: they inherit the parsed config and whatever model or data the caller passed in
memory, and they start in a fraction of a second instead of importing torch and transformers again.
A failed run is reported as the rank that caused it and what is left on disk.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from loraforge.core.errors import LoraforgeError
from loraforge.core.plugins import LAUNCHERS
from loraforge.distributed._compat import elastic_error_message
from loraforge.distributed.reload import trained_model

if TYPE_CHECKING:
    from loraforge.training.config import TrainConfig
    from loraforge.training.loop import TrainResult


class WorkerFailed(LoraforgeError):
    """A worker of a multi-process run died or raised; the whole run was stopped."""


@LAUNCHERS.register("elastic")
def launch(config: TrainConfig, worker: Callable[[], Any], model: nn.Module | None, tokenizer: Any) -> TrainResult:
    """Run `worker` (the training run itself) in config.num_processes forked processes, then hand
    back what an in-process run would: the trained model, its tokenizer and the logged metrics.

    This is what `accelerate launch` and accelerate's notebook_launcher do (torch elastic's agent,
    a static rendezvous on this machine, fork), without the latter's device banner: each worker then
    builds its Accelerator from the environment the agent gives it. The agent watches the workers
    and, when one exits abnormally, ends the others and reports which rank failed."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from loraforge.training.checkpoint import CHECKPOINT_DIR
    from loraforge.training.loop import TrainResult, read_metrics

    if torch.cuda.is_initialized():
        raise LoraforgeError("CUDA is already in use in this process, and forked workers cannot use it: start the run "
                             "with `accelerate launch -m loraforge train ...` (or before anything touches the GPU)")
    out = os.path.abspath(config.out)
    endpoint = f"127.0.0.1:{_free_port()}"
    engine = ", FSDP" if config.fsdp else f", DeepSpeed ZeRO-{config.zero_stage}" if config.zero_stage else ""
    backend = "NCCL" if torch.cuda.is_available() else "gloo, CPU"
    print(f"training on {config.num_processes} processes{engine} ({backend})")
    launch_config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=config.num_processes, run_id="loraforge",
                                 rdzv_backend="static", rdzv_endpoint=endpoint, rdzv_configs={"rank": 0},
                                 max_restarts=0, monitor_interval=0.1, start_method="fork")
    # A forked worker that garbage-collects a native object it inherited (the rendezvous store of an
    # earlier run in this process) joins threads that fork did not copy, and hangs. So: free this
    # process's garbage now, while its threads exist, and keep the workers' collector off the rest.
    gc.collect()
    gc.freeze()
    try:
        elastic_launch(launch_config, _run_quietly(worker))()
    except ChildFailedError as exc:
        raise WorkerFailed(describe_failure(exc.failures, os.path.join(out, CHECKPOINT_DIR))) from None
    except SignalException:
        # Ctrl-C (or a SIGTERM) reached this process; the agent has already ended the workers.
        raise KeyboardInterrupt from None
    finally:
        gc.unfreeze()

    model, tokenizer = trained_model(config, Path(out), model, tokenizer)
    return TrainResult(model, tokenizer, Path(out), read_metrics(Path(out), upto=config.steps))


# What a collective raises in the ranks that are still alive when a peer has gone.
PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "DistBackendError")
# How long such a rank waits before it fails in turn: the agent polls every 0.1 s, so it sees the
# rank that died first and reports that one as the cause; the waiting ranks are then ended.
PEER_GONE_GRACE_S = 5.0


def _run_quietly(worker: Callable[[], Any]) -> Callable[[], None]:
    """The worker as the agent runs it: no return value (it would travel back through a pipe; the
    parent reads the run's files instead), and a rank whose peer vanished fails only after the
    grace period, so that the report names the rank that died rather than the ones it left behind."""
    def run() -> None:
        try:
            worker()
        except Exception as exc:
            if any(text in f"{type(exc).__name__}: {exc}" for text in PEER_GONE):
                time.sleep(PEER_GONE_GRACE_S)
            raise
    return run


def _free_port() -> int:
    """A port no other run on this machine uses, so that two runs can train side by side."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def describe_failure(failures: dict[int, Any], checkpoint: str) -> str:
    """One paragraph a user can act on: which rank failed and how, what happened to the others,
    and what is left on disk. The cause is the rank killed by a signal or that raised an error of
    its own; ranks whose collective broke because a peer vanished only followed it."""
    def reason(failure: Any) -> str:
        if failure.exitcode < 0:
            try:
                return f"killed by {signal.Signals(-failure.exitcode).name}"
            except ValueError:
                return f"killed by signal {-failure.exitcode}"
        text = elastic_error_message(failure)
        return f"exit code {failure.exitcode}: {text}" if text else f"exit code {failure.exitcode}"

    def followed(failure: Any) -> bool:
        return failure.exitcode > 0 and any(text in elastic_error_message(failure) for text in PEER_GONE)

    ranks = sorted(failures)
    causes = [r for r in ranks if not followed(failures[r])] or ranks
    first = causes[0]
    text = f"worker rank {first} failed ({reason(failures[first])})"
    others = [r for r in ranks if r != first]
    if others:
        text += "; then " + ", ".join(
            f"rank {r} ({'the same error' if reason(failures[r]) == reason(failures[first]) else reason(failures[r])})"
            for r in others)
    text += ". The whole run was stopped."
    state = os.path.join(checkpoint, "trainer_state.json")
    if os.path.isfile(state):
        with open(state) as f:
            step = json.load(f)["step"]
        text += f" The last checkpoint ({checkpoint}, step {step}) is intact: run again with --resume to continue."
    else:
        text += " No checkpoint had been written yet (set --save-every to keep progress)."
    return text
