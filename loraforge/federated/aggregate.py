"""What every federated strategy (strategies/) shares: the clients' adapters, the checks that refuse
what cannot be aggregated, and the assembly of an aggregate with its config.

Client k sends, for every adapted matrix W (d_out x d_in), factors A_k (r_k, d_in), B_k (d_out, r_k)
and its scale s_k (alpha/r_k, or alpha/sqrt(r_k) under rsLoRA); p_k are the clients' weights
(n_k / sum n_j). The update the server wants is the weighted sum of the clients' updates

    dW* = sum_k p_k s_k B_k A_k                                                  (d_out, d_in)

Weights of `modules_to_save` (a classification head) are averaged with p_k by every strategy.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from loraforge.core.config import AdapterConfig
from loraforge.core.errors import AdapterError


@dataclass
class ClientAdapter:
    name: str  # the folder it came from: error messages name it
    config: AdapterConfig
    targets: list[str] | str
    tensors: dict[str, torch.Tensor]  # keyed by model path, e.g. "model.layers.0.mlp.up_proj.lora_A.weight"

    def factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tensors[f"{module}.lora_A.weight"].float(), self.tensors[f"{module}.lora_B.weight"].float()

    def scale(self, module: str) -> float:
        rank, alpha = self.tensors[f"{module}.lora_A.weight"].shape[0], self.config.alpha_for(module)
        return alpha / math.sqrt(rank) if self.config.use_rslora else alpha / rank

    def delta_weight(self, module: str) -> torch.Tensor:
        lora_a, lora_b = self.factors(module)
        return self.scale(module) * (lora_b @ lora_a)  # (d_out, d_in)


Aggregate = ClientAdapter  # an aggregate is one more adapter of the same shape of data


def lora_modules(tensors: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k.removesuffix(".lora_A.weight") for k in tensors if k.endswith(".lora_A.weight"))


def check_clients(clients: list[ClientAdapter], weights: list[float]) -> None:
    """Refuse what cannot be aggregated, naming the adapter and the key at fault."""
    if not clients:
        raise AdapterError("no adapters to aggregate")
    if len(weights) != len(clients):
        raise AdapterError(f"{len(weights)} weights for {len(clients)} adapters: give one weight per adapter")
    for client, w in zip(clients, weights):
        if not math.isfinite(w) or w < 0:
            raise AdapterError(f"weight {w!r} for adapter {client.name}: weights must be finite and non-negative")
    if abs(sum(weights) - 1.0) > 1e-6:
        raise AdapterError(f"weights sum to {sum(weights):.8g}, not 1 (adapters {', '.join(c.name for c in clients)})")
    first = clients[0]
    for client in clients:
        if client.config.method != "lora":
            raise AdapterError(f"adapter {client.name}: key 'method' is {client.config.method!r}; only plain LoRA "
                               "adapters (A, B factors) can be aggregated")
        for key in ("base_model_name_or_path", "task_type", "modules_to_save"):
            mine, theirs = getattr(client.config, key), getattr(first.config, key)
            if mine != theirs:
                raise AdapterError(f"adapter {client.name}: key {key!r} is {mine!r}, "
                                   f"adapter {first.name} has {theirs!r}")
        if _sorted(client.targets) != _sorted(first.targets):
            raise AdapterError(f"adapter {client.name}: key 'target_modules' is {client.targets!r}, "
                               f"adapter {first.name} has {first.targets!r}")
        for key in sorted(set(client.tensors) ^ set(first.tensors)):
            owner, other = (client, first) if key in client.tensors else (first, client)
            raise AdapterError(f"adapter {other.name} lacks key {key!r} that adapter {owner.name} has "
                               "(different target modules or base model?)")
        for key, tensor in client.tensors.items():
            theirs = first.tensors[key].shape
            # lora_A may differ in its rank rows, lora_B in its rank columns; nothing else may differ
            same = {"lora_A": tensor.shape[1:] == theirs[1:], "lora_B": tensor.shape[:1] == theirs[:1]}.get(
                key.split(".")[-2], tensor.shape == theirs)
            if not same:
                raise AdapterError(f"adapter {client.name}: key {key!r} has shape {tuple(tensor.shape)}, adapter "
                                   f"{first.name} has {tuple(theirs)} (adapter for another base model?)")
        for module in lora_modules(client.tensors):
            if f"{module}.lora_B.weight" not in client.tensors:
                raise AdapterError(f"adapter {client.name}: key {module + '.lora_A.weight'!r} has no lora_B beside it")
            lora_a, lora_b = client.factors(module)
            if lora_b.shape[1] != lora_a.shape[0]:
                raise AdapterError(f"adapter {client.name}: key {module + '.lora_B.weight'!r} has rank "
                                   f"{lora_b.shape[1]}, its lora_A has {lora_a.shape[0]}")


def average_others(clients: list[ClientAdapter], weights: list[float]) -> dict[str, torch.Tensor]:
    """The tensors that are not LoRA factors (a `modules_to_save` head), averaged with p_k."""
    keys = [k for k in clients[0].tensors if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    dtype = {k: clients[0].tensors[k].dtype for k in keys}
    return {k: sum(p * c.tensors[k].float() for p, c in zip(weights, clients)).to(dtype[k]) for k in keys}


def put_factors(tensors: dict, shapes: dict, first: ClientAdapter, module: str, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scale: float) -> None:
    """Keep a module's aggregated factors in the clients' dtype, and its rank and scale for `assemble`."""
    dtype = first.tensors[f"{module}.lora_A.weight"].dtype
    tensors[f"{module}.lora_A.weight"] = lora_a.to(dtype).contiguous()
    tensors[f"{module}.lora_B.weight"] = lora_b.to(dtype).contiguous()
    shapes[module] = (lora_a.shape[0], scale)


def assemble(clients: list[ClientAdapter], strategy: str, weights: list[float], tensors: dict,
             shapes: dict[str, tuple[int, float]]) -> Aggregate:
    """The aggregate `strategy` built (`shapes`: each module's rank and scale), with a config: the first
    client's when every module keeps its rank and scale, else plain scaling with per-module rank/alpha
    patterns (alpha = s * rank gives scale s)."""
    first = clients[0].config
    same = all(first.rank_for(m) == r and clients[0].scale(m) == s for m, (r, s) in shapes.items())
    fields: dict[str, Any] = {}
    if not same:
        per_module = {m: (r, s * r) for m, (r, s) in shapes.items()}
        rank, alpha = Counter(per_module.values()).most_common(1)[0][0]
        fields = dict(use_rslora=False, rank=rank, alpha=alpha,
                      rank_pattern={m: r for m, (r, _) in per_module.items() if r != rank},
                      alpha_pattern={m: a for m, (_, a) in per_module.items() if a != alpha})
    provenance = {**first.provenance, "federated": {"strategy": strategy, "clients": [c.name for c in clients],
                                                    "weights": list(weights)}}
    # The aggregate starts from nothing: the clients' start and its options (EVA's eva_rho) do not carry
    # over, and plain LoRA, the one method aggregated (check_clients), has no options of its own.
    config = dataclasses.replace(first, init="default", seed=None, options={}, provenance=provenance, **fields)
    return Aggregate(f"{strategy} of {len(clients)} adapters", config, clients[0].targets, tensors)


def _sorted(targets: list[str] | str) -> list[str] | str:
    return sorted(targets) if isinstance(targets, list) else targets
