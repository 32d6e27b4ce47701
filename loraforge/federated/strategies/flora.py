"""FLoRA (Wang et al., arXiv 2409.05976, Sec. 3): stack the clients' factors along the rank axis,

    A_st = [p_1 s_1 A_1; ...; p_K s_K A_K]  (sum r_k, d_in),  B_st = [B_1 ... B_K]  (d_out, sum r_k),

with scale 1 (alpha = rank = sum r_k), so B_st A_st = dW* exactly, whatever the ranks and alphas.
Every round each client merges the global adapter into its copy of the base and trains a fresh LoRA
of its own rank; the server merges each round's aggregate into the global adapter (`stack_onto`).
"""

from __future__ import annotations

import torch

from loraforge.federated.aggregate import Aggregate, ClientAdapter, assemble, average_others, lora_modules, put_factors
from loraforge.federated.strategies import Strategy


class FLoRA(Strategy, name="flora"):
    """FLoRA: stack the clients' factors, the weights and scales folded into A; scale 1."""

    title = "FLoRA"
    fresh_clients = True
    reported_above = ("fedavg",)

    def aggregate(self, clients: list[ClientAdapter], weights: list[float]) -> Aggregate:
        tensors, shapes = average_others(clients, weights), {}
        for module in lora_modules(clients[0].tensors):
            parts = [c.factors(module) for c in clients]
            # A_st (sum r_k, d_in), B_st (d_out, sum r_k)
            lora_a = torch.cat([p * c.scale(module) * a for p, c, (a, _) in zip(weights, clients, parts)])
            lora_b = torch.cat([b for _, b in parts], dim=1)
            put_factors(tensors, shapes, clients[0], module, lora_a, lora_b, 1.0)
        return assemble(clients, self.name, weights, tensors, shapes)

    def combine(self, glob: Aggregate | None, agg: Aggregate) -> Aggregate:
        return stack_onto(glob, agg)


def stack_onto(glob: ClientAdapter | None, agg: ClientAdapter) -> Aggregate:
    """FLoRA's server merges each round's update; keeping the stacked factors of all rounds (all
    at scale 1) is that merged sum exactly, and stays a PEFT-loadable adapter."""
    if glob is None:
        return agg
    stacked = FLoRA().aggregate([glob, agg], [1.0, 1.0])
    heads = {k: v for k, v in agg.tensors.items() if not k.endswith((".lora_A.weight", ".lora_B.weight"))}
    stacked.tensors.update(heads)  # this round's average, not the sum of all rounds
    return stacked
