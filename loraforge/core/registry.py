"""Name -> method, name -> initialiser. A parametrisation registers itself with `@register(...)` in
its own file of `loraforge.methods`, an initialiser with `@register_init(...)` in its file of
`loraforge.methods.init`; the CLI, the saver and the tests look them up here and never by class.

The registry sits below the methods it lists: the first lookup imports their package by name
(`importlib`), so that every file's decorator has run, and nothing here imports a method.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from loraforge.core.errors import AdapterError

if TYPE_CHECKING:
    from loraforge.core.config import AdapterConfig
    from loraforge.methods.base import AdapterLayer
    from loraforge.methods.init import InitContext


@dataclass(frozen=True)
class Method:
    name: str
    axis: str  # the unified study's taxonomy: rank | init | optimisation | mixture
    paper: str  # title and arXiv id
    layer: type["AdapterLayer"] | None  # None: no layer wraps anything (full fine-tuning trains W itself)
    merges: bool  # the update folds exactly into the frozen weight
    peft_type: str | None  # PEFT can load the saved adapter as this type (None: it cannot)
    # Methods that adapt whole blocks rather than single Linear layers (a mixture of experts in the
    # FFN) bring their own attach(model, config) -> paths they replaced; None: wrap each target Linear.
    attach: Callable[[nn.Module, "AdapterConfig"], list[str]] | None = None
    # The saved and checkpointed state is every base parameter (full fine-tuning, the baseline the
    # analysis compares LoRA against), not tensors the method added.
    trains_base: bool = False

    def trainable_params(self, d_in: int, d_out: int, config: "AdapterConfig") -> int:
        """Count by building the layer on the meta device: no formula to keep in sync."""
        if self.layer is None:  # the layer's own weight trains
            return d_in * d_out
        with torch.device("meta"):
            layer = self.layer(nn.Linear(d_in, d_out, bias=False), config, "layer")
        return sum(p.numel() for n, p in layer.named_parameters() if not n.startswith("base_layer."))


_METHODS: dict[str, Method] = {}


def register(name: str, *, axis: str, paper: str, merges: bool = True, peft_type: str | None = None,
             attach: Callable[[nn.Module, "AdapterConfig"], list[str]] | None = None, trains_base: bool = False):
    """Decorates a method's AdapterLayer class; with trains_base=True it decorates the method's
    attach(model, config) instead, since a method that trains the base weights wraps no layer."""
    def wrap(obj):
        if name in _METHODS:
            raise ValueError(f"method {name!r} registered twice")
        layer, hook = (None, obj) if trains_base else (obj, attach)
        _METHODS[name] = Method(name, axis, paper, layer, merges, peft_type, hook, trains_base)
        return obj

    return wrap


def get_method(name: str) -> Method:
    _load_builtin_methods()
    if name not in _METHODS:
        raise AdapterError(f"unknown method {name!r}; registered: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def methods() -> list[Method]:
    _load_builtin_methods()
    return sorted(_METHODS.values(), key=lambda m: m.name)


def _load_builtin_methods() -> None:
    # Importing the package runs every method and initialiser file's decorator (once).
    importlib.import_module("loraforge.methods")


@dataclass(frozen=True)
class Initializer:
    name: str
    paper: str
    needs_data: bool
    methods: tuple[str, ...]  # the parametrisations whose tensors it knows how to fill
    fills: str  # what it writes: the reason another method cannot take it
    run: Callable[[nn.Module, "InitContext"], dict[str, Any] | None]  # fills every adapter layer of the model
    layer: type["AdapterLayer"] | None = None  # built instead of the method's own layer
    default_for: tuple[str, ...] = ()


_INITIALIZERS: dict[str, Initializer] = {}


def register_init(name: str, *, paper: str, needs_data: bool, methods: tuple[str, ...], fills: str,
                  layer: type["AdapterLayer"] | None = None, default_for: tuple[str, ...] = ()):
    def wrap(run):
        if name in _INITIALIZERS:
            raise ValueError(f"initialiser {name!r} registered twice")
        _INITIALIZERS[name] = Initializer(name, paper, needs_data, tuple(methods), fills, run, layer,
                                          tuple(default_for))
        return run

    return wrap


def initializers() -> list[Initializer]:
    _load_builtin_methods()
    return sorted(_INITIALIZERS.values(), key=lambda i: i.name)


def initializer_names() -> tuple[str, ...]:
    _load_builtin_methods()
    return tuple(sorted(_INITIALIZERS))


def resolve_initializer(config: "AdapterConfig") -> Initializer | None:
    """The initialiser `config` asks for (None: the layer's own init), after checking it can start
    `config.method`."""
    _load_builtin_methods()
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

