"""The learning-rate schedule: linear warm-up over the first `warmup x steps` steps, then cosine to 0."""

from __future__ import annotations

import math

from loraforge.training.config import TrainConfig


def lr_at(step: int, config: TrainConfig) -> float:
    """The learning rate of optimizer step `step` (0-based): a pure function of the step, so a
    resumed run needs no scheduler state."""
    warmup_steps = int(config.warmup * config.steps)
    if step < warmup_steps:
        return config.lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, config.steps - warmup_steps)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
