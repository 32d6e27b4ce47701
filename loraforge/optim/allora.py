"""ALLoRA: no dropout, no scale, and a per-row learning rate inversely proportional to the row's norm.

ALLoRA: Adaptive Learning Rate Mitigates LoRA Fatal Flaws, Huang & Balestriero (arXiv 2410.09692).
LoRA's dropout, its zero start and its alpha/r scale slow short fine-tuning runs down; ALLoRA drops
dropout (p = 0) and the scale (s = 1) and multiplies each parameter's gradient by a coefficient
inversely proportional to its l2 norm, which is eta at 0 (fast escape from the zero start) and
~1/||P_i|| once the row has grown:

    c_i = 1 / sqrt(||P_i||_2^2 + 1 / eta^2)          grad(P_i) <- c_i * grad(P_i)          then AdamW

The paper scales "per sample and per parameter gradients"; c_i depends on the weights only, so
scaling each sample's gradient and summing equals scaling the batch gradient, as done here.
Decisions where the paper's method section could not be read here (recorded, unverified):
  - granularity: one coefficient per row of each adapter tensor in torch's layout, i.e. per output
    unit of lora_A (r rows) and of lora_B (d_out rows); a 1-D tensor (DoRA's magnitude) has one per
    element. Applied to every trainable tensor of every adapter layer, so any parametrisation works.
  - eta default 2 (the only published value found, from a third-party optimizer's "allora" switch).
  - order: after the trainer's gradient clipping (clipping sees the raw gradient), before AdamW.
    Adam is invariant to a constant gradient scale; the rule acts through c_i changing over time.
The scale and dropout are the adapter's: this rule refuses an adapter with s != 1 or dropout > 0
(train with --alpha equal to --rank, --dropout 0) rather than change the model behind the user's back.
Trainable tensors outside adapter layers (a classification head) get plain AdamW.
"""

from __future__ import annotations

import torch
from torch import nn

from loraforge.core.errors import LoraforgeError
from loraforge.methods.base import AdapterLayer
from loraforge.optim import named_trainable, register_rule


def allora_coefficients(param: torch.Tensor, eta: float) -> torch.Tensor:
    """c_i for each row i of `param` (dim 0), shaped to broadcast against it."""
    rows = param.detach().float().reshape(param.shape[0], -1)  # (rows, rest)
    coef = (rows.square().sum(1) + 1.0 / eta**2).rsqrt()  # (rows,)
    return coef.reshape((-1,) + (1,) * (param.ndim - 1))


class ALLoRAAdamW(torch.optim.AdamW):
    """AdamW whose groups with an `allora_eta` rescale their gradients row by row first."""

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch's signature
        for group in self.param_groups:
            if group.get("allora_eta") is None:
                continue
            for param in group["params"]:
                if param.grad is not None:
                    param.grad.mul_(allora_coefficients(param, group["allora_eta"]).to(param.grad.dtype))
        return super().step(closure)


def _check_adapter(model: nn.Module) -> list[nn.Parameter]:
    adapted: list[nn.Parameter] = []
    for name, layer in model.named_modules():
        if not isinstance(layer, AdapterLayer):
            continue
        if getattr(layer, "scaling", 1.0) != 1.0:
            raise LoraforgeError(f"ALLoRA removes LoRA's scale, but layer {name!r} has s = {layer.scaling:g}: "
                                 f"train with --alpha equal to --rank (and no --use-rslora)")
        if any(isinstance(m, nn.Dropout) and m.p > 0 for m in layer.modules()):
            raise LoraforgeError(f"ALLoRA removes dropout, but layer {name!r} has dropout: train with --dropout 0")
        base = {id(p) for p in layer.base_layer.parameters()}
        adapted += [p for p in layer.parameters() if p.requires_grad and id(p) not in base]
    return adapted


@register_rule("allora")
def build_allora(model: nn.Module, lr: float, weight_decay: float, allora_eta: float = 2.0) -> torch.optim.Optimizer:
    if not allora_eta > 0:
        raise LoraforgeError(f"--allora-eta must be positive, got {allora_eta}")
    adapted = _check_adapter(model)
    if not adapted:
        raise LoraforgeError("ALLoRA found no trainable adapter tensors in the model")
    ids = {id(p) for p in adapted}
    others = [p for _, p in named_trainable(model) if id(p) not in ids]
    groups = [{"params": adapted, "allora_eta": allora_eta}] + ([{"params": others, "allora_eta": None}] if others else [])
    return ALLoRAAdamW(groups, lr=lr, weight_decay=weight_decay)
