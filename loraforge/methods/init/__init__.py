"""Initialisers: set an adapter's starting point from the base weights or from data.

An initialiser fills the tensors a parametrisation created; it never changes the base model.

* weight-based (PiSSA, LoRA-XS): `attach` runs it right after wrapping;
* data-based (LoRA-GA, EVA, LoRA-SB): `loraforge.training.initialize(model, data, batches=N)` runs it
  on the first N batches of the data, and the trainer calls it before its first step. The data side
  reaches an initialiser only through `InitContext.iter_batches` and `InitContext.loss`, which the
  training layer provides: nothing here knows how a data set is read or batched.

Each file here registers one with `@register_init(...)`, naming the methods whose tensors it can
fill (`methods`); any other combination is refused with an AdapterError that says why. One
registered with `default_for=(method,)` is that method's own start, used when `init="default"`.
A start that is not zero and must not show in the output (PiSSA, LoRA-GA) names `layer`: the
layer to build instead of the method's own (`residual.ResidualLoRALinear`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from loraforge.core.errors import AdapterError
from loraforge.core.modules import linear_weight
from loraforge.core.registry import Initializer, option, read_options, resolve_initializer
from loraforge.core.rng import seeded
from loraforge.methods.base import AdapterLayer, adapter_layers

if TYPE_CHECKING:
    from loraforge.core.config import AdapterConfig


Batch = dict[str, torch.Tensor]


@dataclass
class InitContext:
    """What an initialiser may read: the adapter's config and, for data-based ones, the batches of
    the training order and the trainer's loss."""

    config: "AdapterConfig"
    device: torch.device
    # The first `batches` batches of the training order, on `device`.
    batch_source: Callable[[], Iterator[Batch]] | None = None
    loss: Callable[[nn.Module, Batch], torch.Tensor] | None = None  # mean loss over one batch's labels
    batches: int = 0
    lr: float | None = None  # the first optimizer step's learning rate (LoRA-SB's update approximation)
    progress: bool = True

    def iter_batches(self, desc: str) -> Iterator[Batch]:
        if self.batch_source is None:
            raise AdapterError(f"init {self.config.init!r} starts from data: run it through initialize()")
        yield from tqdm(self.batch_source(), total=self.batches, desc=desc, unit="batch",
                        disable=not self.progress, leave=False)


@dataclass
class InitReport:
    init: str
    seconds: float
    batches: int = 0
    details: dict[str, Any] = field(default_factory=dict)  # e.g. EVA's ranks



def start_at_attach(model: nn.Module, config: "AdapterConfig") -> InitReport | None:
    """Run a weight-based initialiser (attach calls this right after wrapping, inside its seeded RNG).
    None when the start needs data: `initialize` must run before training."""
    init = resolve_initializer(config)
    if init is None:
        return InitReport(config.init, 0.0)
    if init.needs_data:
        return None
    return _run(model, init, InitContext(config, _device(model)))


def needs_data(model: nn.Module) -> bool:
    """True when the attached adapter's start is data-based and has not run yet."""
    return getattr(model, "loraforge_config", None) is not None and getattr(model, "loraforge_init", None) is None


def run_data_init(model: nn.Module, ctx: InitContext, seed: int) -> InitReport:
    """Run the attached adapter's data-based initialiser with `ctx`'s batches. The result depends
    only on the model, the batches and `seed`: the RNG is forked and seeded, so training's RNG
    stream is untouched. A weight-based start ran in attach(); its report is returned as it is."""
    init = resolve_initializer(ctx.config)
    if init is None or not init.needs_data:
        return model.loraforge_init
    with seeded(seed):
        return _run(model, init, ctx)


def _run(model: nn.Module, init: Initializer, ctx: InitContext) -> InitReport:
    start = time.perf_counter()
    details = init.run(model, ctx) or {}
    report = InitReport(init.name, time.perf_counter() - start, ctx.batches, details)
    model.loraforge_init = report
    return report


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# ---- helpers the initialisers share --------------------------------------------------------------

def base_weight(layer: AdapterLayer, name: str) -> torch.Tensor:
    """W0 as (d_out, d_in) float32, whatever the storage (GPT-2's Conv1D keeps (d_in, d_out))."""
    weight = linear_weight(layer.base_layer)
    if not weight.dtype.is_floating_point:
        raise AdapterError(f"{name}: the base weight is {weight.dtype}; initialise from a float model, quantise after")
    return weight.detach().float()


def truncated_svd(matrix: torch.Tensor, rank: int, niter: int | None = None) -> tuple[torch.Tensor, ...]:
    """Top-`rank` SVD: U (m, r), S (r,), Vh (r, n). Exact when niter is None, else Halko et al.'s
    randomised method (`torch.svd_lowrank`, q = rank) with `niter` subspace iterations."""
    if niter is None:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    u, s, v = torch.svd_lowrank(matrix, q=rank, niter=niter)
    return u, s, v.T


@dataclass(frozen=True)
class SVDOptions:
    """The options of a start from an SVD (PiSSA, LoRA-XS; LoRA-SB with its own default)."""

    svd_niter: int | None = option(None, "subspace iterations of a randomised SVD (torch.svd_lowrank); None: the "
                                         "exact SVD", check=lambda n: n >= 0, want="an integer >= 0, or null")


def start_from_weight_svds(model: nn.Module, ctx: InitContext, desc: str,
                           start: Callable[[AdapterLayer, torch.Tensor, torch.Tensor, torch.Tensor], None]) -> dict[str, Any]:
    """Call start(layer, U (d_out, r), S (r,), Vh (r, d_in)) with the top-r SVD of each adapter layer's
    W0, exact or randomised as the `svd_niter` option says; returns the initialiser's report."""
    niter = read_options(SVDOptions, ctx.config).svd_niter
    for name, layer in tqdm(adapter_layers(model).items(), desc=desc, unit="layer", leave=False, disable=not ctx.progress):
        start(layer, *truncated_svd(base_weight(layer, name), layer.rank, niter))
    return {"svd": "exact" if niter is None else f"randomised, {niter} iterations"}
