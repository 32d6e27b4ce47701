"""Functional per-row LoRA: adapters given as tensors at forward time, a different one per batch row.

For each named Linear W0 of a plain model and each row b of the batch (hooks, no attached layers):

    h_b = W0 x_b + s · (x_b A_b^T) B_b^T          A: (R, r, d_in), B: (R, d_out, r), R = batch rows

The tensors can be any tensors (a hypernetwork's outputs keep the model differentiable in them); a row
whose A or B is zero gets the base output exactly. Heterogeneous batches (several subjects in one
forward, base and personalised rows of Hybrid-Model CFG) and serving's per-request adapters are the
same path.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, NamedTuple

import torch
from torch import nn

from loraforge.core.config import AdapterConfig
from loraforge.core.errors import AdapterError
from loraforge.core.modules import submodule
from loraforge.methods.base import rank_and_scale


class RowLoRA(NamedTuple):
    a: torch.Tensor  # (R, r, d_in)
    b: torch.Tensor  # (R, d_out, r)
    scale: float


@contextlib.contextmanager
def per_row_lora(model: nn.Module, factors: dict[str, RowLoRA]) -> Iterator[None]:
    """For the duration, row b of every batch through `model` gets its own update at each named Linear."""
    hooks = []
    try:
        for name, f in factors.items():
            module = submodule(model, name)
            if not isinstance(module, nn.Linear):
                raise AdapterError(f"{name!r} is a {type(module).__name__}, not a Linear: no per-row LoRA there")
            if f.a.dim() != 3 or f.b.dim() != 3 or f.a.shape[2] != module.in_features or \
                    f.b.shape[1] != module.out_features or f.a.shape[1] != f.b.shape[2] or f.a.shape[0] != f.b.shape[0]:
                raise AdapterError(f"{name!r}: A {tuple(f.a.shape)} and B {tuple(f.b.shape)} do not fit a "
                                   f"{module.in_features} -> {module.out_features} Linear as (R, r, in), (R, out, r)")
            hooks.append(module.register_forward_hook(_hook(name, f)))
        yield
    finally:
        for hook in hooks:
            hook.remove()


def _hook(name: str, f: RowLoRA):
    def add_rows(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        x = inputs[0]
        if x.shape[0] != f.a.shape[0]:
            raise AdapterError(f"{name!r}: a batch of {x.shape[0]} rows, adapters for {f.a.shape[0]}")
        flat = x.reshape(x.shape[0], -1, x.shape[-1]).to(f.a.dtype)  # (R, T, d_in)
        delta = (flat @ f.a.transpose(1, 2)) @ f.b.transpose(1, 2)  # (R, T, r) -> (R, T, d_out)
        return output + (f.scale * delta).reshape(output.shape).to(output.dtype)
    return add_rows


def rows_from_state(config: AdapterConfig, state: dict[str, torch.Tensor], rows: int) -> dict[str, RowLoRA]:
    """A saved LoRA (keys `<path>.lora_A.weight`) as the same adapter for `rows` batch rows."""
    factors = {}
    for key, a in state.items():
        if not key.endswith(".lora_A.weight"):
            continue
        name = key.removesuffix(".lora_A.weight")
        b = state.get(f"{name}.lora_B.weight")
        if b is None:
            raise AdapterError(f"{name!r}: lora_A without lora_B")
        factors[name] = RowLoRA(a.expand(rows, *a.shape), b.expand(rows, *b.shape), rank_and_scale(config, name)[1])
    if not factors:
        raise AdapterError("the adapter holds no lora_A / lora_B tensors (only plain LoRA runs per row)")
    return factors


def stack_rows(per_row: list[dict[str, RowLoRA]]) -> dict[str, RowLoRA]:
    """Adapters of single rows (R = 1 each, same layers) -> one batch of len(per_row) rows."""
    return {name: RowLoRA(torch.cat([p[name].a for p in per_row]), torch.cat([p[name].b for p in per_row]), f.scale)
            for name, f in per_row[0].items()}
