"""Optimisation rules: how gradients become updates. `make_optimizer(model, name, lr, weight_decay)`.

A rule is a function `build(model, lr, weight_decay, **settings) -> torch.optim.Optimizer` that
registers itself here by name (one file per rule). Its keyword settings are named like the
`TrainConfig` fields that carry them (`loraplus_lr_ratio`, `allora_eta`, ...), so the trainer passes
`{name: config.<name> for name in rule_settings(rule)}` and nothing else knows a rule by name.

Every param group a rule builds carries `lr_scale`: the trainer's schedule sets
`group["lr"] = lr_t * group["lr_scale"]`, so ratios between groups (LoRA+'s lambda) survive warm-up
and decay. Optimizer state is ordinary `optimizer.state_dict()` tensors, saved and restored by the
trainer's checkpoint.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from loraforge.core.errors import LoraforgeError
from loraforge.core.plugins import Plugins

RULES: Plugins[Callable[..., torch.optim.Optimizer]] = Plugins(
    "optimizer", __name__, aliases={"loraplus": "lora-plus", "lora+": "lora-plus", "lorapro": "lora-pro"},
    fixed=("model", "lr", "weight_decay"))
register_rule = RULES.register
rule_names = RULES.names
get_rule = RULES.get
rule_settings = RULES.settings


def make_optimizer(model: nn.Module, name: str = "adamw", lr: float = 2e-4, weight_decay: float = 0.0,
                   **extras: Any) -> torch.optim.Optimizer:
    """Build the optimizer of rule `name` over `model`'s trainable parameters."""
    build = get_rule(name)
    unknown = sorted(set(extras) - set(rule_settings(name)))
    if unknown:
        raise LoraforgeError(f"optimizer {name!r} takes no setting {', '.join(unknown)}; "
                             f"it reads: {', '.join(rule_settings(name)) or 'none'}")
    if not any(p.requires_grad for p in model.parameters()):
        raise LoraforgeError("the model has no trainable parameters: attach an adapter first")
    optimizer = build(model, lr=lr, weight_decay=weight_decay, **extras)
    for group in optimizer.param_groups:
        group.setdefault("lr_scale", group["lr"] / lr)
    return optimizer


def named_trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


@register_rule("adamw")
def build_adamw(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """Plain AdamW over every trainable tensor: the baseline of every comparison."""
    return torch.optim.AdamW([p for _, p in named_trainable(model)], lr=lr, weight_decay=weight_decay)
