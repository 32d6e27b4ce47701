"""Server-side aggregation of the clients' LoRA adapters: FedAvg of factors, FLoRA, LoRA-FAIR.

Client k sends, for every adapted matrix W (d_out x d_in), factors A_k (r_k, d_in), B_k (d_out, r_k)
and its scale s_k (alpha/r_k, or alpha/sqrt(r_k) under rsLoRA); p_k are the clients' weights
(n_k / sum n_j). The update the server wants is the weighted sum of the clients' updates

    dW* = sum_k p_k s_k B_k A_k                                                  (d_out, d_in)

- fedavg (FedIT, the baseline both papers compare with): A = sum p_k A_k, B = sum p_k B_k, so
  s B A = dW* + cross terms sum_{k != j} p_k p_j s_k B_k A_j - sum_k p_k (1 - p_k) s_k B_k A_k.
  Needs one rank (pad=True zero-pads to the largest, the FLoRA paper's zero-padding baseline).
- flora (FLoRA, Wang et al., arXiv 2409.05976, Sec. 3): stack along the rank axis,
      A_st = [p_1 s_1 A_1; ...; p_K s_K A_K]  (sum r_k, d_in),  B_st = [B_1 ... B_K]  (d_out, sum r_k),
  with scale 1 (alpha = rank = sum r_k), so B_st A_st = dW* exactly, whatever the ranks and alphas.
- lora_fair (LoRA-FAIR, Bian et al., arXiv 2411.14961, Sec. 4): keep the averaged pair (A, B) of
  fedavg and add a server residual dB to B, dB* = argmin ||(B + dB) A - dW*/s||_F^2 + lam' ||dB||_F^2,
  whose closed form is dB* = (dW*/s - B A) A^T (A A^T + lam' I)^+   (pseudo-inverse: lam = 0 works
  even for a rank-deficient A). Decision (the spec leaves S and lam unverified): S is the squared
  Frobenius distance and the penalty is squared (ridge), so the solve is exact rather than a few
  gradient steps; lam' = lam * tr(A A^T) / r makes lam independent of the factors' size. With
  lam -> 0 this is the spec's closed form B' = dW* A^T (A A^T)^-1; dB = 0 is feasible, so the
  error is never above fedavg's. The result keeps rank r; clients start the next round from it.

Weights of `modules_to_save` (a classification head) are averaged with p_k by every strategy.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

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


def fedavg(clients: list[ClientAdapter], weights: list[float], pad: bool = False) -> Aggregate:
    """FedIT: average A and B separately (zero-padded to the largest rank with pad=True)."""
    tensors, shapes = _average_others(clients, weights), {}
    for module in lora_modules(clients[0].tensors):
        lora_a, lora_b, scale = _averaged_factors(clients, weights, module, pad)
        _put(tensors, shapes, clients[0], module, lora_a, lora_b, scale)
    return _aggregate(clients, "fedavg", weights, tensors, shapes)


def flora(clients: list[ClientAdapter], weights: list[float]) -> Aggregate:
    """FLoRA: stack the clients' factors, the weights and scales folded into A; scale 1."""
    tensors, shapes = _average_others(clients, weights), {}
    for module in lora_modules(clients[0].tensors):
        parts = [c.factors(module) for c in clients]
        lora_a = torch.cat([p * c.scale(module) * a for p, c, (a, _) in zip(weights, clients, parts)])  # (sum r, d_in)
        lora_b = torch.cat([b for _, b in parts], dim=1)  # (d_out, sum r_k)
        _put(tensors, shapes, clients[0], module, lora_a, lora_b, 1.0)
    return _aggregate(clients, "flora", weights, tensors, shapes)


def lora_fair(clients: list[ClientAdapter], weights: list[float], lam: float = 1e-2, pad: bool = False) -> Aggregate:
    """LoRA-FAIR: fedavg's pair with the least-squares (ridge) residual dB added to B."""
    if not (math.isfinite(lam) and lam >= 0):
        raise AdapterError(f"lora-fair lam must be finite and >= 0, got {lam!r}")
    tensors, shapes = _average_others(clients, weights), {}
    for module in lora_modules(clients[0].tensors):
        lora_a, lora_b, scale = _averaged_factors(clients, weights, module, pad)
        a64, b64 = lora_a.double(), lora_b.double()
        target = sum(p * c.delta_weight(module).double() for p, c in zip(weights, clients)) / scale  # (d_out, d_in)
        gram = a64 @ a64.T  # (r, r)
        ridge = lam * gram.trace() / gram.shape[0] * torch.eye(gram.shape[0], dtype=torch.float64)
        delta_b = (target - b64 @ a64) @ a64.T @ torch.linalg.pinv(gram + ridge)  # (d_out, r)
        _put(tensors, shapes, clients[0], module, lora_a, (b64 + delta_b).float(), scale)
    return _aggregate(clients, "lora-fair", weights, tensors, shapes)


def stack_onto(glob: ClientAdapter | None, agg: ClientAdapter) -> Aggregate:
    """FLoRA's server merges each round's update; keeping the stacked factors of all rounds (all
    at scale 1) is that merged sum exactly, and stays a PEFT-loadable adapter."""
    if glob is None:
        return agg
    stacked = flora([glob, agg], [1.0, 1.0])
    heads = {k: v for k, v in agg.tensors.items() if not k.endswith((".lora_A.weight", ".lora_B.weight"))}
    stacked.tensors.update(heads)  # this round's average, not the sum of all rounds
    return stacked


STRATEGIES: dict[str, Callable[..., Aggregate]] = {"fedavg": fedavg, "flora": flora, "lora-fair": lora_fair}


def _averaged_factors(clients: list[ClientAdapter], weights: list[float], module: str,
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


def _average_others(clients: list[ClientAdapter], weights: list[float]) -> dict[str, torch.Tensor]:
    keys = [k for k in clients[0].tensors if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    dtype = {k: clients[0].tensors[k].dtype for k in keys}
    return {k: sum(p * c.tensors[k].float() for p, c in zip(weights, clients)).to(dtype[k]) for k in keys}


def _put(tensors: dict, shapes: dict, first: ClientAdapter, module: str, lora_a: torch.Tensor,
         lora_b: torch.Tensor, scale: float) -> None:
    dtype = first.tensors[f"{module}.lora_A.weight"].dtype
    tensors[f"{module}.lora_A.weight"] = lora_a.to(dtype).contiguous()
    tensors[f"{module}.lora_B.weight"] = lora_b.to(dtype).contiguous()
    shapes[module] = (lora_a.shape[0], scale)


def _aggregate(clients: list[ClientAdapter], strategy: str, weights: list[float], tensors: dict,
               shapes: dict[str, tuple[int, float]]) -> Aggregate:
    """The aggregate's config: the first client's when every module keeps its rank and scale,
    else plain scaling with per-module rank/alpha patterns (alpha = s * rank gives scale s)."""
    first = clients[0].config
    same = all(first.rank_for(m) == r and clients[0].scale(m) == s for m, (r, s) in shapes.items())
    fields: dict[str, Any] = {}
    if not same:
        per_module = {m: (r, s * r) for m, (r, s) in shapes.items()}
        rank, alpha = Counter(per_module.values()).most_common(1)[0][0]
        fields = dict(use_rslora=False, rank=rank, alpha=alpha,
                      rank_pattern={m: r for m, (r, _) in per_module.items() if r != rank},
                      alpha_pattern={m: a for m, (_, a) in per_module.items() if a != alpha})
    extras = {**first.extras, "federated": {"strategy": strategy, "clients": [c.name for c in clients],
                                            "weights": list(weights)}}
    config = dataclasses.replace(first, init="default", seed=None, extras=extras, **fields)
    return Aggregate(f"{strategy} of {len(clients)} adapters", config, clients[0].targets, tensors)


def _sorted(targets: list[str] | str) -> list[str] | str:
    return sorted(targets) if isinstance(targets, list) else targets
