"""Fused computations that keep a training step close to the frozen model's own cost."""

from loraforge.core.kernels.linear_cross_entropy import linear_cross_entropy

__all__ = ["linear_cross_entropy"]
