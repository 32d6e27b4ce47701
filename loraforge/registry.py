"""Name -> method. A parametrisation registers itself with `@register(...)` in its own file;
the CLI, the saver and the tests look methods up here and never by class."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from .errors import AdapterError

if TYPE_CHECKING:
    from .config import AdapterConfig
    from .layers.base import AdapterLayer


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
    # Importing the layers package runs every method file's @register.
    from . import layers  # noqa: F401
    from . import moe  # noqa: F401
