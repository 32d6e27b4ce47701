"""A run's plug-ins, built by name from the registries of `loraforge.core.plugins`: the optimizer,
and the quantised base (the selector and the regulariser are built straight from their registries,
`SELECTORS.build(component, ...)`). A run's config names each one with the settings its builder
takes (`TrainConfig.optimizer` is a `Component`), so the trainer knows no plug-in and a new one with a
new setting needs only its own file."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from loraforge.core.errors import LoraforgeError
from loraforge.core.plugins import OPTIMIZERS, QUANTIZERS, Component


def make_optimizer(model: nn.Module, name: str = "adamw", lr: float = 2e-4, weight_decay: float = 0.0,
                   **settings: Any) -> torch.optim.Optimizer:
    """The optimizer of rule `name` over `model`'s trainable parameters, its settings checked against
    the rule's builder (`Plugins.build`). Every param group carries `lr_scale`, its lr over the run's:
    the schedule sets `lr_t * lr_scale`, so that ratios between groups (LoRA+'s lambda) survive
    warm-up and decay."""
    if not any(p.requires_grad for p in model.parameters()):
        raise LoraforgeError("the model has no trainable parameters: attach an adapter first")
    optimizer = OPTIMIZERS.build(Component(name, settings), model, lr, weight_decay)
    for group in optimizer.param_groups:
        group.setdefault("lr_scale", group["lr"] / lr)
    return optimizer


def quantize(model: nn.Module, name: str) -> None:
    """Hold the frozen base's linear weights in the format `name` (QLoRA's nf4), in place."""
    QUANTIZERS.get(name)(model)
