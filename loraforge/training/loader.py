"""What each optimizer step reads: this rank's micro-batches, from a `torch.utils.data.DataLoader`.

Step s reads global batch s of a `BatchPlan` over batch_size x grad_accum x processes rows, and
`micro_batches` cuts it into grad_accum x processes slices of which this rank takes grad_accum.
`StepSampler` yields exactly those slices for steps start..steps-1, so a resumed run (start > 0)
reads from its step on what the uninterrupted run read, whatever either's split. The DataLoader
decides only where and when the slices are collated: in this process on the CPU (a worker's hand-
over would cost more than it saves on a small model's step), in background workers into pinned
memory on a GPU, so that the next window is ready and its copy to the device does not block.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Sampler

from loraforge.training.config import TrainConfig
from loraforge.training.data import BatchPlan, TokenizedDataset, collate
from loraforge.training.runtime import Runtime, micro_batches

GPU_WORKERS = 2  # collate processes feeding a GPU run; collating a micro-batch takes milliseconds


class StepSampler(Sampler[list[int]]):
    """A batch sampler: the grad_accum micro-batches (example indices) of `rank` for each step of
    start..steps-1, in order: global batch s of `plan`, cut by `micro_batches`."""

    def __init__(self, plan: BatchPlan, start: int, steps: int, grad_accum: int, rank: int = 0,
                 world_size: int = 1):
        self.plan, self.start, self.steps = plan, start, steps
        self.grad_accum, self.rank, self.world_size = grad_accum, rank, world_size

    def __len__(self) -> int:
        return max(0, self.steps - self.start) * self.grad_accum

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.steps):
            yield from micro_batches(self.plan.indices(step), self.grad_accum, self.rank, self.world_size)


def step_loader(data: TokenizedDataset, config: TrainConfig, runtime: Runtime, start: int, pad_id: int,
                device: torch.device) -> DataLoader:
    """This rank's micro-batches of steps start..config.steps-1, collated on the CPU (pinned on a GPU)."""
    plan = BatchPlan(len(data), config.batch_size * config.grad_accum * runtime.world_size, seed=config.seed,
                     length_grouped=config.length_grouped, lengths=data.lengths)
    sampler = StepSampler(plan, start, config.steps, config.grad_accum, runtime.rank, runtime.world_size)
    gpu = device.type == "cuda"
    # Its own generator: a DataLoader draws a worker seed when iterated, which must not move the
    # torch RNG stream that dropout reads and a checkpoint restores.
    return DataLoader(data, batch_sampler=sampler, collate_fn=functools.partial(collate, pad_id=pad_id),
                      num_workers=GPU_WORKERS if gpu else 0, prefetch_factor=max(2, config.grad_accum) if gpu else None,
                      pin_memory=gpu, generator=torch.Generator().manual_seed(config.seed))


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch on `device`; from pinned memory the copy runs alongside the compute queued before it."""
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}
