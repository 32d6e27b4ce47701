"""GLAD: steer each step's gradient with a sharpness-aware (SAM) reference gradient.

GLAD: Generalizable Tuning for Vision-Language Models, Peng, Wang, Liu & Chen (arXiv 2507.13089).
"Generalizable LoRA tuning with RegulArized GraDient": plain LoRA overfits few-shot data, so the
update direction is regularised by the gradient SAM (Foret et al., arXiv 2010.01412) computes at the
worst nearby point, which points towards flatter regions:

    g     = grad L(theta)                                  (the window's ordinary backward)
    eps   = rho * g / ||g||_2                              (||eps|| = rho, parallel to g)
    g_sam = grad L(theta + eps)                            (second forward/backward; theta restored bitwise)
    g_reg = g                                   if <g, g_sam> >= 0
          = g - lam * <g, g_sam> / ||g_sam||^2 * g_sam   otherwise   (lam = 1: g_reg orthogonal to g_sam)

then the optimizer steps with g_reg. theta is every trainable tensor (adapter and, for a
classifier, its head); the frozen base never moves.

Decision (the combination rule is not in the abstract, and the paper's code is unreleased): the
paper's overview figure describes the SAM gradient as "a reference signal to steer the original
gradient"; the steering rule taken here is the conflict projection of ProGrad (Zhu et al., arXiv
2205.14865), the gradient-steering rule of the CLIP-tuning line GLAD compares against: keep g when it
agrees with the reference, remove the conflicting component (scaled by lam) when it does not.
rho default 0.05 is SAM's; lam default 1 is ProGrad's full projection. Cost: two forward/backward
passes per step. With rho = 0 the reference is g itself and GLAD is plain training.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from loraforge.core.errors import LoraforgeError
from loraforge.regularizers import register_regularizer


class GLAD:
    def __init__(self, glad_rho: float = 0.05, glad_lambda: float = 1.0):
        if glad_rho < 0:
            raise LoraforgeError(f"--glad-rho must be >= 0, got {glad_rho}")
        if not 0 <= glad_lambda <= 1:
            raise LoraforgeError(f"--glad-lambda must be in [0, 1], got {glad_lambda}")
        self.rho, self.lam = glad_rho, glad_lambda

    @torch.no_grad()
    def steer(self, params: list[nn.Parameter], recompute: Callable[[], None]) -> dict[str, float]:
        params = [p for p in params if p.grad is not None]
        grads = [p.grad.detach().clone() for p in params]
        norm = torch.sqrt(sum(g.float().square().sum() for g in grads))
        if self.rho == 0 or norm == 0:
            return {}
        originals = [p.detach().clone() for p in params]
        for param, grad in zip(params, grads):
            param.add_((self.rho / norm) * grad.float().to(param.dtype))  # theta + eps
            param.grad = None
        with torch.enable_grad():
            recompute()
        references = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        for param, original in zip(params, originals):
            param.copy_(original)  # back to theta exactly
        dot = sum((g.float() * r.float()).sum() for g, r in zip(grads, references))
        ref_sq = sum(r.float().square().sum() for r in references)
        cosine = float(dot / (norm * ref_sq.sqrt()).clamp_min(1e-30))
        coef = self.lam * dot / ref_sq if dot < 0 else torch.zeros(())
        for param, grad, ref in zip(params, grads, references):
            param.grad = (grad.float() - coef * ref.float()).to(grad.dtype)
        return {"glad_cosine": cosine}


@register_regularizer("glad")
def build_glad(glad_rho: float = 0.05, glad_lambda: float = 1.0) -> GLAD:
    return GLAD(glad_rho, glad_lambda)
