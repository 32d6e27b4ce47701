"""LoRA-Pro: give A and B the gradients whose low-rank update is closest to full fine-tuning's.

LoRA-Pro: Are Low-Rank Adapters Properly Optimized?, Wang, Liang, Tan & Yang (arXiv 2407.18242,
ICLR 2025). A step (dA, dB) changes W = W0 + s B A, to first order, by s (B dA + dB A): the
"equivalent gradient" of (g_A, g_B) is g~ = s (B g_A + g_B A) (m x n). With G = dL/dW, autograd
gives g_A = s B^T G (r x n) and g_B = s G A^T (m x r). LoRA-Pro (Theorem 2.1, 2.2) minimises
||g~ - G||_F over (g_A, g_B):

    P = (B^T B)^-1, Q = (A A^T)^-1                                   (r x r; pinv of + 1e-8 I, as the reference)
    g_A* = (1/s^2) P g_A + X A                                       (r x n)
    g_B* = (1/s^2) (I - B P B^T) g_B Q - B X                         (m x r)
    => g~* = P_B G + G P_A - P_B G P_A,  P_B = B P B^T, P_A = A^T Q A  (projection onto {B Y + Z A})

for any X (r x r). Theorem 2.3 picks the X that keeps (g_A*, g_B*) closest to (g_A, g_B): the
solution of the Sylvester equation

    (B^T B) X + X (A A^T) = -(1/s^2) P g_A A^T                       (solved in the eigenbases of the two SPD matrices)

`x_mode` "zero" and "symmetry" are the reference's alternatives (same g~*, other factors).

Modes (reference repo mrflogs/LoRA-Pro, `peta/optim.py`; "full" is the paper's Algorithm 1):
  full       Adam on g~* with m x n moments per layer (the full-weight space, as full fine-tuning);
             its direction D = m^/(sqrt(v^)+eps) goes back to A, B by the same formulas with
             g_A := s B^T D, g_B := s D A^T. Memory: 2 m n floats per adapted layer.
  efficient  (g_A*, g_B*) into ordinary AdamW moments of A's and B's shapes.
Weight decay (decision): the reference scales A and B by sqrt(1 - lr wd) and also W0 by (1 - lr wd);
here only A and B are decayed (s B A shrinks by 1 - lr wd), because W0 is the frozen base the saved
adapter is applied to and must stay the pretrained weight. Trainable tensors outside adapter layers
(a classification head) get plain AdamW. Needs the plain product form s B A with A, B trainable and
nothing else trainable in the layer: DoRA, LoRA-XS, Block-LoRA, ... are refused by name.
Matrix algebra runs in float32 (float64 when the adapter is float64).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from loraforge.core.errors import LoraforgeError
from loraforge.methods.base import AdapterLayer
from loraforge.methods.lora import LoRALinear
from loraforge.optim import named_trainable, register_rule

DELTA = 1e-8  # the reference's ridge on B^T B and A A^T


def _inverse(gram: torch.Tensor) -> torch.Tensor:
    return torch.linalg.pinv(gram + DELTA * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device))


def solve_sylvester(m: torch.Tensor, n: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """X with M X + X N = C for symmetric positive semi-definite M, N (r x r). In the eigenbases
    M = U diag(l) U^T, N = V diag(u) V^T the equation is elementwise: X' = (U^T C V) / (l_i + u_j).
    Where l_i + u_j = 0 the equation says nothing about X'_ij and it is set to 0 (least norm)."""
    lam, u = torch.linalg.eigh(m)
    mu, v = torch.linalg.eigh(n)
    denom = lam[:, None] + mu[None, :]  # (r, r)
    rotated = u.T @ c @ v
    safe = denom.abs() > torch.finfo(denom.dtype).eps * denom.abs().max().clamp_min(1e-30)
    return u @ torch.where(safe, rotated / torch.where(safe, denom, 1.0), 0.0) @ v.T


def adjusted_gradients(a: torch.Tensor, b: torch.Tensor, g_a: torch.Tensor, g_b: torch.Tensor, s: float,
                       x_mode: str = "sylvester") -> tuple[torch.Tensor, torch.Tensor]:
    """(g_A*, g_B*) of the closed form above. a (r, n), b (m, r), g_a (r, n), g_b (m, r)."""
    gram_a, gram_b = a @ a.T, b.T @ b  # (r, r), (r, r)
    p, q = _inverse(gram_b), _inverse(gram_a)
    if x_mode == "sylvester":
        x = solve_sylvester(gram_b, gram_a, -(p @ g_a @ a.T) / s**2)
    elif x_mode == "symmetry":
        x = -0.5 * (p @ b.T @ g_b @ gram_a) / s**2
    else:  # "zero"
        x = torch.zeros_like(gram_a)
    g_a_star = p @ g_a / s**2 + x @ a  # (r, n)
    g_b_star = (g_b - b @ (p @ (b.T @ g_b))) @ q / s**2 - b @ x  # (m, r), (I - B P B^T) without the m x m matrix
    return g_a_star, g_b_star


def equivalent_gradient(a: torch.Tensor, b: torch.Tensor, g_a: torch.Tensor, g_b: torch.Tensor, s: float) -> torch.Tensor:
    return s * (b @ g_a + g_b @ a)  # (m, n)


class LoRAProAdamW(torch.optim.Optimizer):
    """One param group per adapter layer: params [A, B] and its `scaling`; one plain AdamW group
    for any other trainable tensor (`scaling` None)."""

    def __init__(self, groups: list[dict], lr: float, weight_decay: float, mode: str, x_mode: str,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        if mode not in ("full", "efficient"):
            raise LoraforgeError(f"--lorapro-mode must be full or efficient, got {mode!r}")
        if x_mode not in ("sylvester", "symmetry", "zero"):
            raise LoraforgeError(f"--lorapro-x-mode must be sylvester, symmetry or zero, got {x_mode!r}")
        defaults = dict(lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, mode=mode, x_mode=x_mode, scaling=None)
        super().__init__(groups, defaults)

    def _adam_direction(self, state: dict, grad: torch.Tensor, group: dict) -> torch.Tensor:
        """Bias-corrected m^ / (sqrt(v^) + eps), the moments kept in `state` (created on first use)."""
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(grad)
            state["exp_avg_sq"] = torch.zeros_like(grad)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        t = float(state["step"])
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (state["exp_avg_sq"] / (1 - beta2**t)).sqrt_().add_(group["eps"])
        return state["exp_avg"] / (1 - beta1**t) / denom

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch's signature
        for group in self.param_groups:
            if group["scaling"] is None:
                for param in group["params"]:
                    if param.grad is not None:
                        param.mul_(1 - group["lr"] * group["weight_decay"])
                        param.sub_(group["lr"] * self._adam_direction(self.state[param], param.grad.float(), group))
            else:
                self._pair_step(group)

    def _pair_step(self, group: dict) -> None:
        param_a, param_b = group["params"]
        if param_a.grad is None or param_b.grad is None:  # a frozen layer (LISA) or no gradient this step
            return
        dtype = torch.float64 if param_a.dtype == torch.float64 else torch.float32
        a, b = param_a.to(dtype), param_b.to(dtype)  # (r, n), (m, r)
        g_a, g_b, s = param_a.grad.to(dtype), param_b.grad.to(dtype), group["scaling"]
        if group["mode"] == "full":
            g_a_star, g_b_star = adjusted_gradients(a, b, g_a, g_b, s, "zero")  # g~* does not depend on X
            direction = self._adam_direction(self.state[param_a], equivalent_gradient(a, b, g_a_star, g_b_star, s), group)
            step_a, step_b = adjusted_gradients(a, b, s * b.T @ direction, s * direction @ a.T, s, group["x_mode"])
        else:
            g_a_star, g_b_star = adjusted_gradients(a, b, g_a, g_b, s, group["x_mode"])
            step_a = self._adam_direction(self.state[param_a], g_a_star, group)
            step_b = self._adam_direction(self.state[param_b], g_b_star, group)
        shrink = math.sqrt(1 - group["lr"] * group["weight_decay"])  # s B A decays by 1 - lr wd
        for param, update in ((param_a, step_a), (param_b, step_b)):
            param.mul_(shrink).sub_(group["lr"] * update.to(param.dtype))


def lora_pro_groups(model: nn.Module) -> list[dict]:
    pairs, claimed = [], set()
    for name, layer in model.named_modules():
        if not isinstance(layer, AdapterLayer):
            continue
        own = [p for p in layer.parameters() if p.requires_grad and all(p is not q for q in layer.base_layer.parameters())]
        if not own:
            continue
        plain = (isinstance(layer, LoRALinear) and type(layer).delta_weight is LoRALinear.delta_weight and len(own) == 2
                 and tuple(layer.lora_A.weight.shape) == (layer.rank, layer.in_features)
                 and tuple(layer.lora_B.weight.shape) == (layer.out_features, layer.rank)
                 and all(p is layer.lora_A.weight or p is layer.lora_B.weight for p in own))
        if not plain:
            raise LoraforgeError(
                f"LoRA-Pro needs the plain product form W0 + s·B·A with only A and B trainable; layer {name!r} is a "
                f"{type(layer).__name__} (use --method lora, or another --optimizer)")
        pairs.append({"params": [layer.lora_A.weight, layer.lora_B.weight], "scaling": float(layer.scaling)})
        claimed |= {id(layer.lora_A.weight), id(layer.lora_B.weight)}
    if not pairs:
        raise LoraforgeError("LoRA-Pro found no trainable LoRA layer in the model")
    others = [p for _, p in named_trainable(model) if id(p) not in claimed]
    return pairs + ([{"params": others}] if others else [])


@register_rule("lora-pro")
def build_lora_pro(model: nn.Module, lr: float, weight_decay: float, lorapro_mode: str = "full",
                   lorapro_x_mode: str = "sylvester") -> torch.optim.Optimizer:
    return LoRAProAdamW(lora_pro_groups(model), lr=lr, weight_decay=weight_decay, mode=lorapro_mode, x_mode=lorapro_x_mode)
