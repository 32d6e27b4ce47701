"""The random state a run reads: the CPU generator and, on a GPU, that device's generator (dropout
masks on CUDA tensors come from it). A checkpoint keeps both, so that a resumed GPU run draws what
the uninterrupted one drew; `seeded` draws from a seed and leaves every generator of the caller,
CPU and CUDA, where it was."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """A block whose draws come from `seed` on the CPU and every GPU; None: the caller's streams."""
    if seed is None:
        yield
        return
    # torch.manual_seed seeds every CUDA device too: fork them all, not only the CPU's.
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The generators a run on `device` reads: `torch` (the CPU's) and, on a GPU, `cuda`."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Restore what `rng_state` returned (a checkpoint written on the CPU has no `cuda` entry: a GPU
    run resumed from it keeps its device stream)."""
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
