"""Regularisers that steer each step's gradient (`--regularizer NAME`), one file each.

A regulariser is built from the run's settings and called once per optimizer step, after the
window's backward and before clipping:

    regularizer.steer(params, recompute) -> metrics to log

`recompute()` zeroes nothing itself: it runs the step's forward and backward again at the current
parameter values, accumulating into `.grad`, so a regulariser may evaluate the gradient elsewhere
(e.g. at perturbed weights) and must leave every parameter exactly as it found it.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Callable, Protocol

from torch import nn

from ..errors import LoraforgeError


class Regularizer(Protocol):
    def steer(self, params: list[nn.Parameter], recompute: Callable[[], None]) -> dict[str, float]: ...


_REGULARIZERS: dict[str, Callable[..., Regularizer]] = {}


def register_regularizer(name: str):
    def wrap(build: Callable[..., Regularizer]) -> Callable[..., Regularizer]:
        if name in _REGULARIZERS:
            raise ValueError(f"regularizer {name!r} registered twice")
        _REGULARIZERS[name] = build
        return build

    return wrap


def regularizer_names() -> list[str]:
    _load()
    return sorted(_REGULARIZERS)


def regularizer_settings(name: str) -> list[str]:
    """Keyword settings the regulariser reads, named like the TrainConfig fields that carry them."""
    return list(inspect.signature(_get(name)).parameters)


def make_regularizer(name: str, **settings: float) -> Regularizer:
    return _get(name)(**settings)


def _get(name: str) -> Callable[..., Regularizer]:
    _load()
    if name not in _REGULARIZERS:
        raise LoraforgeError(f"unknown regularizer {name!r}; registered: {', '.join(sorted(_REGULARIZERS))}")
    return _REGULARIZERS[name]


def _load() -> None:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
