"""Initialisers: set an adapter's starting point from the base weights or from data.

An initialiser fills the tensors a parametrisation created; it never changes the base model.

* weight-based (PiSSA, LoRA-XS): `attach` runs it right after wrapping;
* data-based (LoRA-GA, EVA, LoRA-SB): `initialize(model, data, batches=N)` runs it, on the first N
  batches of the data (`BatchPlan` order), and the trainer calls it before its first step.

Each file here registers one with `@register_init(...)`, naming the methods whose tensors it can
fill (`methods`); any other combination is refused with an AdapterError that says why. One
registered with `default_for=(method,)` is that method's own start, used when `init="default"`.
A start that is not zero and must not show in the output (PiSSA, LoRA-GA) names `layer`: the
layer to build instead of the method's own (`residual.ResidualLoRALinear`).
"""

from __future__ import annotations

import importlib
import pkgutil
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data import BatchPlan, TokenizedDataset, collate
from ..errors import AdapterError
from ..layers.base import AdapterLayer

if TYPE_CHECKING:
    from ..config import AdapterConfig


@dataclass
class InitContext:
    """What an initialiser may read: the adapter's config and, for data-based ones, the data."""

    config: "AdapterConfig"
    device: torch.device
    data: TokenizedDataset | None = None
    batches: int = 0
    batch_size: int = 8
    pad_id: int = 0
    lr: float | None = None  # the first optimizer step's learning rate (LoRA-SB's update approximation)
    seed: int = 0
    progress: bool = True

    def iter_batches(self, desc: str) -> Iterator[dict[str, torch.Tensor]]:
        """The first `batches` batches of the training order (`BatchPlan` with the run's seed)."""
        plan = BatchPlan(len(self.data), self.batch_size, seed=self.seed)
        for k in tqdm(range(self.batches), desc=desc, unit="batch", disable=not self.progress, leave=False):
            batch = collate([self.data[i] for i in plan.indices(k)], self.pad_id)
            yield {key: value.to(self.device) for key, value in batch.items()}


@dataclass
class InitReport:
    init: str
    seconds: float
    batches: int = 0
    details: dict[str, Any] = field(default_factory=dict)  # e.g. EVA's ranks


@dataclass(frozen=True)
class Initializer:
    name: str
    paper: str
    needs_data: bool
    methods: tuple[str, ...]  # the parametrisations whose tensors it knows how to fill
    fills: str  # what it writes: the reason another method cannot take it
    run: Callable[[nn.Module, InitContext], dict[str, Any] | None]  # fills every adapter layer of the model
    layer: type[AdapterLayer] | None = None  # built instead of the method's own layer
    default_for: tuple[str, ...] = ()


_INITIALIZERS: dict[str, Initializer] = {}


def register_init(name: str, *, paper: str, needs_data: bool, methods: tuple[str, ...], fills: str,
                  layer: type[AdapterLayer] | None = None, default_for: tuple[str, ...] = ()):
    def wrap(run):
        if name in _INITIALIZERS:
            raise ValueError(f"initialiser {name!r} registered twice")
        _INITIALIZERS[name] = Initializer(name, paper, needs_data, tuple(methods), fills, run, layer,
                                          tuple(default_for))
        return run

    return wrap


def initializers() -> list[Initializer]:
    return sorted(_INITIALIZERS.values(), key=lambda i: i.name)


def initializer_names() -> tuple[str, ...]:
    return tuple(sorted(_INITIALIZERS))


def resolve_initializer(config: "AdapterConfig") -> Initializer | None:
    """The initialiser `config` asks for (None: the layer's own init), after checking it can start
    `config.method`."""
    init = _INITIALIZERS.get(config.init)
    if init is None:
        if config.init != "default":
            return None
        return next((i for i in _INITIALIZERS.values() if config.method in i.default_for), None)
    if config.method not in init.methods:
        raise AdapterError(
            f"init {init.name!r} cannot start method {config.method!r}: {init.name} {init.fills}, which fits "
            f"only method {', '.join(repr(m) for m in init.methods)}")
    return init


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


def initialize(model: nn.Module, data: TokenizedDataset, batches: int = 8, batch_size: int = 8, pad_id: int = 0,
               lr: float | None = None, seed: int = 0, progress: bool = True) -> InitReport:
    """Run the attached adapter's data-based initialiser on the first `batches` batches of `data`.

    The result depends only on (model, data, batches, batch_size, seed): the RNG is forked and
    seeded, so training's RNG stream is untouched. A weight-based start ran in attach(); its report
    is returned as it is.
    """
    config = getattr(model, "loraforge_config", None)
    if config is None:
        raise AdapterError("the model has no adapter: attach() one before initialize()")
    init = resolve_initializer(config)
    if init is None or not init.needs_data:
        return model.loraforge_init
    if not isinstance(data, TokenizedDataset) or len(data) == 0:
        raise AdapterError(f"init {init.name!r} starts from data: pass a non-empty loraforge.data.TokenizedDataset")
    if batches < 1 or batch_size < 1:
        raise AdapterError(f"batches and batch_size must be at least 1, got {batches} and {batch_size}")
    device = _device(model)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        return _run(model, init, InitContext(config, device, data, batches, batch_size, pad_id, lr, seed, progress))


def _run(model: nn.Module, init: Initializer, ctx: InitContext) -> InitReport:
    start = time.perf_counter()
    details = init.run(model, ctx) or {}
    report = InitReport(init.name, time.perf_counter() - start, ctx.batches, details)
    model.loraforge_init = report
    return report


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# ---- helpers the initialisers share --------------------------------------------------------------

def target_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterLayer)}


def base_weight(layer: AdapterLayer, name: str) -> torch.Tensor:
    """W0 as (d_out, d_in) float32, whatever the storage (GPT-2's Conv1D keeps (d_in, d_out))."""
    weight = layer.base_layer.weight
    if not weight.dtype.is_floating_point:
        raise AdapterError(f"{name}: the base weight is {weight.dtype}; initialise from a float model, quantise after")
    weight = weight.detach().float()
    return weight.T if layer.fan_in_fan_out else weight


def truncated_svd(matrix: torch.Tensor, rank: int, niter: int | None = None) -> tuple[torch.Tensor, ...]:
    """Top-`rank` SVD: U (m, r), S (r,), Vh (r, n). Exact when niter is None, else Halko et al.'s
    randomised method (`torch.svd_lowrank`, q = rank) with `niter` subspace iterations."""
    if niter is None:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    u, s, v = torch.svd_lowrank(matrix, q=rank, niter=niter)
    return u, s, v.T


# Importing each module runs its @register_init (last, so that they can import the names above).
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
