"""Optimisation rules: how gradients become updates (`loraforge.training.components.make_optimizer`).

A rule is a function `build(model, lr, weight_decay, **settings) -> torch.optim.Optimizer` that
registers itself in `core.plugins.OPTIMIZERS` by name (one file per rule). Its keyword settings are
named like the `TrainConfig` fields that carry them (`loraplus_lr_ratio`, `allora_eta`, ...), so the
trainer passes `{name: config.<name> for name in OPTIMIZERS.settings(rule)}` and nothing else knows
a rule by name.

Every param group a rule builds carries `lr_scale`: the trainer's schedule sets
`group["lr"] = lr_t * group["lr_scale"]`, so ratios between groups (LoRA+'s lambda) survive warm-up
and decay. Optimizer state is ordinary `optimizer.state_dict()` tensors, saved and restored by the
trainer's checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn

from loraforge.core.plugins import OPTIMIZERS

register_rule = OPTIMIZERS.register


def named_trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


@register_rule("adamw")
def build_adamw(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """Plain AdamW over every trainable tensor: the baseline of every comparison."""
    return torch.optim.AdamW([p for _, p in named_trainable(model)], lr=lr, weight_decay=weight_decay)
