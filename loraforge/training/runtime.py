"""What the loop asks of the processes it runs in: a `Runtime`.

One process with no launcher gets `LocalRuntime`, the plain loop. A multi-process run (DDP, FSDP,
DeepSpeed ZeRO) gets the runtime that `loraforge.distributed` registers as "accelerate" in
`core.plugins.RUNTIMES`, and `--num-processes N` starts its workers through the launcher it
registers in `core.plugins.LAUNCHERS`; the trainer names neither package, so the distributed stage
sits above training and nothing here imports accelerate.

Exact equivalence at any scale: optimizer step s reads global batch s of a `BatchPlan` over
batch_size x grad_accum x processes rows, and `micro_batches` cuts it into grad_accum x processes
slices, rank r taking slice k x processes + r at accumulation step k (each rank's
`loader.StepSampler`; `loraforge.distributed`'s docstring has the rest of the argument).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from loraforge.core.errors import LoraforgeError
from loraforge.core.models import default_device
from loraforge.core.plugins import LAUNCHERS, RUNTIMES
from loraforge.core.rng import rng_state
from loraforge.training.config import TrainConfig

# Set in every worker by torchrun, `accelerate launch` and torch elastic (which `--num-processes` uses).
LAUNCHER_ENV = "LOCAL_RANK"


def launched() -> bool:
    """True inside a worker that a distributed launcher started (torchrun's world of one included)."""
    return LAUNCHER_ENV in os.environ


def must_launch(config: TrainConfig) -> bool:
    """True when this process has to start the workers itself: --num-processes > 1, not launched."""
    return config.num_processes > 1 and not launched()


class Runtime(Protocol):
    """One process's share of a run. Collectives (`sum`, `rng_states`, `full_tensors`, ...) are
    called by every rank in the same order."""

    rank: int
    world_size: int
    is_main: bool

    @property
    def device(self) -> torch.device: ...

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                loss_fn: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor], switches_trainable: bool = False
                ) -> tuple[Callable[[dict[str, torch.Tensor]], torch.Tensor], torch.optim.Optimizer]: ...
    def seed_workers(self, seed: int) -> None: ...
    def accumulate(self) -> contextlib.AbstractContextManager[None]: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def sum(self, values: list[float]) -> list[float]: ...
    def clip_grad_norm(self, params: Sequence[nn.Parameter], max_norm: float) -> torch.Tensor: ...
    def rng_states(self) -> list[dict[str, torch.Tensor]]: ...
    def run(self, model: nn.Module, fn: Callable[[nn.Module], Any]) -> Any: ...
    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]: ...
    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                             groups: list[dict]) -> None: ...
    def full_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...
    def assign_whole(self, target: torch.Tensor, tensor: torch.Tensor) -> None: ...
    def whole_adapter(self, model: nn.Module) -> contextlib.AbstractContextManager[None]: ...
    def bytes_held(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> int: ...
    def finish(self) -> None: ...


class LocalRuntime:
    """One process, no launcher: every method is what the single-process loop always did."""

    rank = 0
    world_size = 1
    is_main = True

    @property
    def device(self) -> torch.device:
        return default_device()

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                loss_fn: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor], switches_trainable: bool = False
                ) -> tuple[Callable[[dict[str, torch.Tensor]], torch.Tensor], torch.optim.Optimizer]:
        return (lambda batch: loss_fn(model, batch)), optimizer

    def seed_workers(self, seed: int) -> None:
        """Nothing to do: the one process keeps the stream torch.manual_seed(seed) started."""

    def accumulate(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def sum(self, values: list[float]) -> list[float]:
        return values

    def clip_grad_norm(self, params: Sequence[nn.Parameter], max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def rng_states(self) -> list[dict[str, torch.Tensor]]:
        return [rng_state(self.device)]

    def run(self, model: nn.Module, fn: Callable[[nn.Module], Any]) -> Any:
        return fn(model)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
        return torch_optimizer_state(optimizer)

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                             groups: list[dict]) -> None:
        load_torch_optimizer_state(optimizer, tensors, groups)

    def full_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return tensors

    @torch.no_grad()
    def assign_whole(self, target: torch.Tensor, tensor: torch.Tensor) -> None:
        target.copy_(tensor)

    def whole_adapter(self, model: nn.Module) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def bytes_held(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
        """Bytes of weights (parameters and buffers) and optimizer state."""
        tensors = [*model.parameters(), *model.buffers(),
                   *(v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor))]
        return sum(t.numel() * t.element_size() for t in tensors)

    def finish(self) -> None:
        """Nothing to tear down."""


def torch_optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """A torch optimizer's state dict as flat tensors ("state.{index}.{name}") and its param groups."""
    state = optimizer.state_dict()
    tensors = {f"state.{i}.{k}": v for i, s in state["state"].items()
               for k, v in s.items() if isinstance(v, torch.Tensor)}
    return tensors, state["param_groups"]


def load_torch_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict],
                               shard_like: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = lambda param, t: t
                               ) -> None:
    """Undo `torch_optimizer_state`; a moment takes the form of its parameter (`shard_like`: this
    rank's shard under FSDP), a step count does not."""
    params = [p for group in optimizer.param_groups for p in group["params"]]  # the indices of the state
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if key.startswith("state."):
            _, index, name = key.split(".", 2)
            param = params[int(index)]
            whole = tensor.shape == param.shape  # a moment; a step count is a scalar
            state.setdefault(int(index), {})[name] = shard_like(param, tensor) if whole else tensor
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def micro_batches(rows: list[int], grad_accum: int, rank: int, world_size: int) -> list[list[int]]:
    """This rank's grad_accum micro-batches of one global batch: slice k x world_size + rank of
    grad_accum x world_size near-equal contiguous slices (equal when the batch is full; contiguous
    so that length-grouped batches stay grouped within each micro-batch)."""
    slots = grad_accum * world_size
    if len(rows) < slots:
        raise LoraforgeError(f"a global batch of {len(rows)} rows cannot feed {grad_accum} micro-batches on each of "
                             f"{world_size} processes: use more data or a smaller --grad-accum / --num-processes")
    bounds = [len(rows) * j // slots for j in range(slots + 1)]
    return [rows[bounds[j]:bounds[j + 1]] for j in (k * world_size + rank for k in range(grad_accum))]


def runtime_for(config: TrainConfig) -> Runtime:
    """This process's runtime: a launched worker's (accelerate), else the one local process."""
    if launched():
        return RUNTIMES.get("accelerate")(config)
    if config.fsdp or config.zero_stage:
        raise LoraforgeError(f"{'--fsdp' if config.fsdp else '--zero-stage'} shards the model over several processes: "
                             f"add --num-processes N (N > 1) or start the run with `accelerate launch`")
    return LocalRuntime()


def launch(config: TrainConfig, worker: Callable[[], Any], model: nn.Module | None, tokenizer: Any) -> Any:
    """Start config.num_processes workers running `worker` (the run itself) and return the run's result."""
    return LAUNCHERS.get("elastic")(config, worker, model, tokenizer)

