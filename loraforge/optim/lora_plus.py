"""LoRA+: A and B get different learning rates.

LoRA+: Efficient Low Rank Adaptation of Large Models, Hayou, Ghosh & Yu (arXiv 2402.12354).
With W = W0 + s B A and B zero-initialised, the paper's scaling argument (Sec. 3, Theorem 1) shows
that efficient feature learning at large width n needs eta_B = Theta(n) * eta_A; in practice a fixed

    eta_B = lambda * eta_A,      lambda = loraplus_lr_ratio (rule of thumb 2^4 = 16 for LLMs)

and nothing else changes: no forward change, AdamW on two groups.

The groups are PEFT's `create_loraplus_optimizer`:
    A          every trainable tensor that is not lora_B and not 1-D        lr = eta,          decay = wd
    B          lora_B and 1-D tensors that take weight decay                lr = lambda * eta, decay = wd
    B-no-decay 1-D tensors without decay (biases, nn.LayerNorm parameters)  lr = lambda * eta, decay = 0
(PEFT's fourth group, LoRA on embeddings at a fixed 1e-6, is always empty here: loraforge adapts
Linear/Conv1D layers only.) Empty groups are left out. The trainer's schedule multiplies each
group's `lr_scale` (1 or lambda), so lambda holds through warm-up and decay.
"""

from __future__ import annotations

import torch
from torch import nn

from loraforge.core.errors import LoraforgeError
from loraforge.optim import named_trainable, register_rule


def _decayed_names(model: nn.Module) -> set[str]:
    # PEFT (transformers' get_parameter_names): no decay inside nn.LayerNorm, nor for any "bias".
    in_norms = {f"{m}.{p}" if m else p for m, module in model.named_modules() if isinstance(module, nn.LayerNorm)
                for p, _ in module.named_parameters(recurse=False)}
    return {n for n, _ in model.named_parameters() if n not in in_norms and "bias" not in n}


def loraplus_groups(model: nn.Module, lr: float, weight_decay: float, lr_ratio: float) -> list[dict]:
    decayed = _decayed_names(model)
    group_a, group_b, group_b_no_decay = [], [], []
    for name, param in named_trainable(model):
        if "lora_B" in name or param.ndim == 1:
            (group_b if name in decayed else group_b_no_decay).append(param)
        else:
            group_a.append(param)
    groups = [{"params": group_a, "weight_decay": weight_decay, "lr": lr},
              {"params": group_b, "weight_decay": weight_decay, "lr": lr * lr_ratio},
              {"params": group_b_no_decay, "weight_decay": 0.0, "lr": lr * lr_ratio}]
    return [g for g in groups if g["params"]]


@register_rule("lora-plus")
def build_lora_plus(model: nn.Module, lr: float, weight_decay: float, loraplus_lr_ratio: float = 16.0) -> torch.optim.Optimizer:
    if not loraplus_lr_ratio > 0:
        raise LoraforgeError(f"--loraplus-lr-ratio must be positive, got {loraplus_lr_ratio}")
    if not any("lora_B" in name for name, _ in named_trainable(model)):
        raise LoraforgeError("LoRA+ needs trainable lora_B tensors: this adapter has none (use a B·A parametrisation)")
    return torch.optim.AdamW(loraplus_groups(model, lr, weight_decay, loraplus_lr_ratio), lr=lr, weight_decay=weight_decay)
