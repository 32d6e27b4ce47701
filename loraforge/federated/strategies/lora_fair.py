"""LoRA-FAIR (Bian et al., arXiv 2411.14961, Sec. 4): keep the averaged pair (A, B) of fedavg and
add a server residual dB to B,

    dB* = argmin ||(B + dB) A - dW*/s||_F^2 + lam' ||dB||_F^2,   dB* = (dW*/s - B A) A^T (A A^T + lam' I)^+

(pseudo-inverse: lam = 0 works even for a rank-deficient A). Decision (the spec leaves S and lam
unverified): S is the squared Frobenius distance and the penalty is squared (ridge), so the solve is
exact rather than a few gradient steps; lam' = lam * tr(A A^T) / r makes lam independent of the
factors' size. With lam -> 0 this is the spec's closed form B' = dW* A^T (A A^T)^-1; dB = 0 is
feasible, so the error is never above fedavg's. The result keeps rank r; clients start the next
round from it, as in fedavg.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from loraforge.core.errors import AdapterError
from loraforge.federated.aggregate import Aggregate, ClientAdapter, assemble, average_others, lora_modules, put_factors
from loraforge.federated.strategies import Strategy
from loraforge.federated.strategies.fedavg import averaged_factors


@dataclass(frozen=True)
class LoRAFair(Strategy, name="lora-fair"):
    """LoRA-FAIR: fedavg's pair with the least-squares (ridge) residual dB added to B."""

    title = "LoRA-FAIR"
    reported_above = ("fedavg", "flora")
    lam: float = 1e-2  # ridge weight of the residual
    pad: bool = False  # zero-pad the clients to the largest rank, as fedavg does

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lam) and self.lam >= 0):
            raise AdapterError(f"lora-fair lam must be finite and >= 0, got {self.lam!r}")

    def aggregate(self, clients: list[ClientAdapter], weights: list[float]) -> Aggregate:
        tensors, shapes = average_others(clients, weights), {}
        for module in lora_modules(clients[0].tensors):
            lora_a, lora_b, scale = averaged_factors(clients, weights, module, self.pad)
            a64, b64 = lora_a.double(), lora_b.double()
            target = sum(p * c.delta_weight(module).double() for p, c in zip(weights, clients)) / scale  # (d_out, d_in)
            gram = a64 @ a64.T  # (r, r)
            ridge = self.lam * gram.trace() / gram.shape[0] * torch.eye(gram.shape[0], dtype=torch.float64)
            delta_b = (target - b64 @ a64) @ a64.T @ torch.linalg.pinv(gram + ridge)  # (d_out, r)
            put_factors(tensors, shapes, clients[0], module, lora_a, (b64 + delta_b).float(), scale)
        return assemble(clients, self.name, weights, tensors, shapes)
