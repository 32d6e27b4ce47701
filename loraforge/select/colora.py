"""CoLoRA: give each module a LoRA rank in proportion to its measured contribution to the task.

Contribution-based Low-Rank Adaptation with Pre-training Model for Real Image Restoration, Park, Kim &
Chun (arXiv 2408.01099, ECCV 2024). Applied here to any model's target Linear layers:

 1. a short full fine-tune of the target weights: theta_pre -> theta_ft (`--select-steps` AdamW steps
    at the run's `--lr` on the search's training batches; the weights are put back afterwards);
 2. contribution by FAIG (filter attribution by integrated gradients, Xie et al., NeurIPS 2021), the
    path theta(t) = theta_pre + t (theta_ft - theta_pre), N = `--colora-ig-steps` right Riemann points:
        IG_i   = (theta_ft,i - theta_pre,i) * (1/N) sum_k dL(theta(k/N))/dtheta_i       (signed, per weight)
        FAIG_l = sum over the filters f of l of | sum_{i in f} IG_i |                    (filter = output row)
    L is the mean loss over the search's validation batches; sum_i IG_i -> L(theta_ft) - L(theta_pre)
    as N grows (completeness);
 3. ranks: the budget of uniform LoRA (--rank x M modules) is shared in proportion to c_l = FAIG_l,
    every module keeping rank >= 1 and <= min(d_in, d_out); rounding gives the leftover units to
    the largest fractional parts. All contributions 0 (theta_ft = theta_pre): uniform --rank.
Decisions (the paper's c_l -> delta_l formula, its alpha/beta constants and the FAIG aggregation
could not be read; no code is public): the proportional budget split and per-row filters above.
PROD pre-training (the paper's other half) is a base-model recipe, not an adapter step: not here.
The ranks go into the adapter config's `rank_pattern` (PEFT's semantics, so PEFT loads the adapter)
and `provenance["selection"]` keeps every module's contribution.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from loraforge.adapters.inject import attach
from loraforge.core.config import AdapterConfig
from loraforge.core.errors import LoraforgeError
from loraforge.core.modules import find_targets
from loraforge.core.registry import get_method
from loraforge.select import SearchData, Selector, register_selector


def integrated_gradients(model: nn.Module, weights: dict[str, nn.Parameter], start: dict[str, torch.Tensor],
                         end: dict[str, torch.Tensor], search: SearchData, steps: int) -> dict[str, torch.Tensor]:
    """Signed IG of every weight along start -> end; the weights are left at `start`."""
    total = {name: torch.zeros_like(w) for name, w in weights.items()}
    for k in range(1, steps + 1):
        with torch.no_grad():
            for name, w in weights.items():
                w.copy_(start[name] + (k / steps) * (end[name] - start[name]))
        loss = sum(search.loss(model, batch) for batch in search.val) / len(search.val)
        grads = torch.autograd.grad(loss, list(weights.values()))
        for name, grad in zip(weights, grads):
            total[name] += grad
    with torch.no_grad():
        for name, w in weights.items():
            w.copy_(start[name])
    return {name: (end[name] - start[name]) * total[name] / steps for name in weights}


def faig(attribution: torch.Tensor, fan_in_fan_out: bool = False) -> float:
    """Sum over output units (filters) of |the unit's summed signed attribution|. A Conv1D weight
    (GPT-2) is stored (d_in, d_out): its output units are columns."""
    per_unit = attribution.sum(0) if fan_in_fan_out else attribution.reshape(attribution.shape[0], -1).sum(1)
    return float(per_unit.abs().sum())


def allocate_ranks(scores: dict[str, float], budget: int, caps: dict[str, int], uniform: int) -> dict[str, int]:
    """Integer ranks >= 1 and <= caps, summing to `budget` (when the caps allow), proportional to
    the scores; `uniform` for every module when all scores are 0."""
    names = list(scores)
    if sum(scores.values()) <= 0:
        return {n: min(uniform, caps[n]) for n in names}
    if budget < len(names):
        raise LoraforgeError(f"a rank budget of {budget} cannot give {len(names)} modules rank 1 each")
    share = {n: 1.0 for n in names}
    spare, free = float(budget - len(names)), [n for n in names if caps[n] > 1]
    while spare > 1e-9 and free:  # water-filling: what a capped module cannot take goes to the others
        weight = sum(scores[n] for n in free)
        if weight <= 0:
            break
        given, spare = {n: spare * scores[n] / weight for n in free}, 0.0
        for n in list(free):
            room = caps[n] - share[n]
            if given[n] >= room:
                share[n], spare = float(caps[n]), spare + given[n] - room
                free.remove(n)
            else:
                share[n] += given[n]
    ranks = {n: int(share[n]) for n in names}
    left = budget - sum(ranks.values())
    order = sorted((n for n in names if ranks[n] < caps[n]),
                   key=lambda n: (-(share[n] - ranks[n]), -scores[n], names.index(n)))
    for n in order[:max(0, left)]:
        ranks[n] += 1
    return ranks


class CoLoRA(Selector):
    def __init__(self, select_steps: int = 20, lr: float = 2e-4, colora_ig_steps: int = 8):
        if colora_ig_steps < 1:
            raise LoraforgeError(f"--colora-ig-steps must be at least 1, got {colora_ig_steps}")
        self.steps, self.lr, self.ig_steps = select_steps, lr, colora_ig_steps

    def attach(self, model: nn.Module, config: AdapterConfig, search: SearchData | None) -> None:
        if search is None:
            raise LoraforgeError("colora measures contributions on data: pass training data")
        if get_method(config.method).uniform_rank:  # refused before the search, not after it
            raise LoraforgeError(f"colora gives each module its own rank, and {config.method} has one rank for every "
                                 "layer: choose another --method or --select")
        targets = find_targets(model, config)
        weights = {name: model.get_submodule(name).weight for name in targets}
        start = {name: w.detach().clone() for name, w in weights.items()}
        flags = {p: p.requires_grad for p in model.parameters()}
        for param in model.parameters():
            param.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
        try:
            optimizer = torch.optim.AdamW(list(weights.values()), lr=self.lr)
            for step in range(self.steps):
                search.loss(model, search.train[step % len(search.train)]).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            end = {name: w.detach().clone() for name, w in weights.items()}
            attribution = integrated_gradients(model, weights, start, end, search, self.ig_steps)
        finally:
            with torch.no_grad():
                for name, w in weights.items():
                    w.copy_(start[name])
            for param, flag in flags.items():
                param.requires_grad_(flag)
        scores = {name: faig(a, isinstance(model.get_submodule(name), Conv1D)) for name, a in attribution.items()}
        caps = {name: min(w.shape) for name, w in weights.items()}
        ranks = allocate_ranks(scores, config.rank * len(targets), caps, config.rank)
        chosen = dataclasses.replace(
            config, target_modules=targets, rank_pattern={n: r for n, r in ranks.items() if r != config.rank},
            provenance={**config.provenance, "selection": {"method": "colora", "ranks": ranks, "contribution": scores}})
        attach(model, chosen)


@register_selector("colora")
def build_colora(select_steps: int = 20, lr: float = 2e-4, colora_ig_steps: int = 8) -> CoLoRA:
    return CoLoRA(select_steps, lr, colora_ig_steps)
