"""A run's plug-ins, built by name from the registries of `loraforge.core.plugins`: the optimizer,
the regulariser, the selector and the quantised base. A run's config names each one with the settings
its builder takes (`TrainConfig.optimizer` is a `Component`), so the trainer knows no plug-in and a
new one with a new setting needs only its own file."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from loraforge.core.errors import LoraforgeError
from loraforge.core.plugins import OPTIMIZERS, QUANTIZERS, REGULARIZERS, SELECTORS


def make_optimizer(model: nn.Module, name: str = "adamw", lr: float = 2e-4, weight_decay: float = 0.0,
                   **settings: Any) -> torch.optim.Optimizer:
    """The optimizer of rule `name` over `model`'s trainable parameters. Every param group carries
    `lr_scale`, its lr over the run's: the schedule sets `lr_t * lr_scale`, so that ratios between
    groups (LoRA+'s lambda) survive warm-up and decay."""
    build = OPTIMIZERS.get(name)
    unknown = sorted(set(settings) - set(OPTIMIZERS.settings(name)))
    if unknown:
        raise LoraforgeError(f"optimizer {name!r} takes no setting {', '.join(unknown)}; "
                             f"it reads: {', '.join(OPTIMIZERS.settings(name)) or 'none'}")
    if not any(p.requires_grad for p in model.parameters()):
        raise LoraforgeError("the model has no trainable parameters: attach an adapter first")
    optimizer = build(model, lr=lr, weight_decay=weight_decay, **settings)
    for group in optimizer.param_groups:
        group.setdefault("lr_scale", group["lr"] / lr)
    return optimizer


def make_regularizer(name: str, **settings: Any) -> Any:
    """A regulariser (`steer(params, recompute) -> metrics`), called once per step before clipping."""
    return REGULARIZERS.get(name)(**settings)


def make_selector(name: str, **settings: Any) -> Any:
    """A selector (`attach_for_run`, `before_step`, `switches_trainable`): where adapters go, which train."""
    return SELECTORS.get(name)(**settings)


def quantize(model: nn.Module, name: str) -> None:
    """Hold the frozen base's linear weights in the format `name` (QLoRA's nf4), in place."""
    QUANTIZERS.get(name)(model)
