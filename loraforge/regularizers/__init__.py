"""Regularisers that steer each step's gradient (`--regularizer NAME`), one file each.

A regulariser is built from the run's settings and called once per optimizer step, after the
window's backward and before clipping:

    regularizer.steer(params, recompute) -> metrics to log

`recompute()` zeroes nothing itself: it runs the step's forward and backward again at the current
parameter values, accumulating into `.grad`, so a regulariser may evaluate the gradient elsewhere
(e.g. at perturbed weights) and must leave every parameter exactly as it found it.
"""

from __future__ import annotations

from typing import Callable, Protocol

from torch import nn

from loraforge.core.plugins import REGULARIZERS


class Regularizer(Protocol):
    def steer(self, params: list[nn.Parameter], recompute: Callable[[], None]) -> dict[str, float]: ...


register_regularizer = REGULARIZERS.register
