"""FedAvg of the factors (FedIT, the baseline both the FLoRA and the LoRA-FAIR paper compare with):

    A = sum p_k A_k,  B = sum p_k B_k,  so
    s B A = dW* + cross terms sum_{k != j} p_k p_j s_k B_k A_j - sum_k p_k (1 - p_k) s_k B_k A_k.

Needs one rank (pad=True zero-pads to the largest, the FLoRA paper's zero-padding baseline). Every
client starts a round from the global adapter, and the round's aggregate replaces it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraforge.core.errors import AdapterError
from loraforge.federated.aggregate import Aggregate, ClientAdapter, assemble, average_others, lora_modules, put_factors
from loraforge.federated.strategies import Strategy


@dataclass(frozen=True)
class FedAvg(Strategy, name="fedavg"):
    """FedIT: average A and B separately (zero-padded to the largest rank with pad=True)."""

    title = "FedAvg"
    pad: bool = False

    def aggregate(self, clients: list[ClientAdapter], weights: list[float]) -> Aggregate:
        tensors, shapes = average_others(clients, weights), {}
        for module in lora_modules(clients[0].tensors):
            lora_a, lora_b, scale = averaged_factors(clients, weights, module, self.pad)
            put_factors(tensors, shapes, clients[0], module, lora_a, lora_b, scale)
        return assemble(clients, self.name, weights, tensors, shapes)


def averaged_factors(clients: list[ClientAdapter], weights: list[float], module: str,
                     pad: bool) -> tuple[torch.Tensor, torch.Tensor, float]:
    """sum p_k A_k (r, d_in) and sum p_k (s_k / s) B_k (d_out, r), with s the clients' common scale
    (or 1 when their scales differ, so every client's update keeps its own size)."""
    ranks = [c.tensors[f"{module}.lora_A.weight"].shape[0] for c in clients]
    rank = max(ranks)
    if not pad and len(set(ranks)) > 1:
        odd = next(i for i, r in enumerate(ranks) if r != ranks[0])
        raise AdapterError(f"adapter {clients[odd].name}: key {module + '.lora_A.weight'!r} has rank {ranks[odd]}, "
                           f"adapter {clients[0].name} has {ranks[0]}: averaging factors needs one rank "
                           "(zero-pad with --pad, or stack them with --strategy flora)")
    scales = [c.scale(module) for c in clients]
    scale = scales[0] if len(set(scales)) == 1 else 1.0
    lora_a = sum(p * _pad(c.factors(module)[0], rank, 0) for p, c in zip(weights, clients))
    lora_b = sum(p * (s / scale) * _pad(c.factors(module)[1], rank, 1) for p, s, c in zip(weights, scales, clients))
    return lora_a, lora_b, scale


def _pad(t: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
    shape = list(t.shape)
    shape[dim] = rank - t.shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim=dim)
