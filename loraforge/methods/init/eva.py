"""EVA: One Initialization to Rule them All: Fine-tuning via Explained Variance Adaptation,
Paischer et al. (arXiv 2410.07170; NeurIPS 2025 as "Parameter Efficient Fine-tuning via Explained
Variance Adaptation").

Plain LoRA (h = W0 x + s_l·B_l A_l x), started from the data that reaches each layer:

    X_l = inputs of layer l on the data          tokens x d_in; padding (and label −100) positions dropped
    X_l − mean ≈ U S V^T                         incremental PCA over batches (pca.py), k_l = round(ρ r_l) components
    ξ_l,i = S_i² / Σ ||x − mean||²               explained-variance ratio of component i
    r_l   = |{ i : ξ_l,i among the Σ_l r largest ξ of all layers }|     rank redistribution (budget Σ_l r)
    A_l   = V^T[:r_l]   (r_l, d_in),   B_l = 0,   α_l = α · r_l / r     (so s_l = α / r is unchanged)

A layer given r_l = 0 loses its adapter. After each batch a component i is converged when its cosine
with the previous estimate is ≥ τ; a layer stops collecting once the components it is currently
assigned have converged, and the whole pass stops when every layer has. Layers fed the very same
tensor (q, k, v; gate, up) share one PCA. The ranks go to rank_pattern / alpha_pattern (full module
paths, as PEFT writes them): the saved adapter is a plain LoRA PEFT loads.

Options (`EVAOptions`): eva_rho (ρ ≥ 1, default 2; 1 = no redistribution), eva_tau (τ, default 0.99).
Decision: PEFT cycles the data until every layer converges; loraforge stops after `batches`
batches (`--init-batches`) at the latest, uses the components as they stand, and warns which
layers had not converged. The redistribution, convergence rule and randomised SVD (seed 42) follow
PEFT's `initialize_lora_eva_weights`, so both give the same ranks on the same batches.
"""

from __future__ import annotations

import itertools
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from loraforge.core.errors import AdapterError
from loraforge.core.modules import replace_module
from loraforge.core.registry import option, read_options, register_init
from loraforge.methods.base import adapter_disabled, adapter_layers
from loraforge.methods.init import InitContext
from loraforge.methods.init.pca import IncrementalPCA


@dataclass(frozen=True)
class EVAOptions:
    eva_rho: float = option(2.0, "components collected per layer, round(rho r); 1: no rank redistribution",
                            check=lambda rho: rho >= 1, want="a number at least 1")
    eva_tau: float = option(0.99, "cosine with the previous estimate at which a component has converged")


def redistribute(ratios: dict[str, torch.Tensor], budget: int) -> dict[str, int]:
    """r_l = how many of layer l's ratios are among the `budget` largest of all layers."""
    keys, values = zip(*[(name, value) for name, layer_ratios in ratios.items() for value in layer_ratios])
    top = torch.stack(values).argsort(descending=True)[:budget]
    counts = Counter(keys[i] for i in top.tolist())
    return {name: counts.get(name, 0) for name in ratios}


@register_init(
    "eva",
    paper="One Initialization to Rule them All: Fine-tuning via Explained Variance Adaptation (arXiv 2410.07170)",
    needs_data=True,
    methods=("lora",),
    fills="sets LoRA's A (r_l x d_in) to principal directions of the layer's inputs, B = 0, and changes each "
          "layer's rank",
    options=EVAOptions,
)
@torch.no_grad()
def eva(model: nn.Module, ctx: InitContext) -> dict[str, Any]:
    options = read_options(EVAOptions, ctx.config)
    rho, tau = float(options.eva_rho), float(options.eva_tau)
    layers = adapter_layers(model)
    budget = sum(layer.rank for layer in layers.values())
    k = {name: round(layer.rank * rho) for name, layer in layers.items()}
    for name, layer in layers.items():
        if k[name] > layer.in_features:
            raise AdapterError(f"{name}: EVA needs round(rho * r) = {k[name]} components of {layer.in_features}-d inputs")
    batches = ctx.iter_batches("eva: PCA of layer inputs")
    first = next(batches)
    was_training = model.training
    model.eval()
    try:
        with adapter_disabled(model):
            owner = _shared_inputs(model, layers, first)  # layer -> the layer whose PCA it uses
            for name in layers:
                k[owner[name]] = max(k[owner[name]], k[name])
            k = {name: k[owner[name]] for name in layers}
            hooked = [name for name in layers if owner[name] == name]
            # PEFT's order (owners, then the others group by group): equal ratios break ties alike.
            position = {name: i for i, name in enumerate(layers)}
            order = hooked + sorted((n for n in layers if owner[n] != n), key=lambda n: (position[owner[n]], position[n]))
            pcas = {name: IncrementalPCA(k[name]) for name in hooked}
            ranks, used = dict(k), 0
            for batch in itertools.chain([first], batches):
                done = {name: bool(pcas[name].converged[:ranks[name]].all()) for name in hooked}
                if all(done.values()):
                    break
                mask = batch["attention_mask"].bool()
                if batch["labels"].dim() == 2:  # token labels: keep the positions that carry one
                    mask &= batch["labels"] != -100
                _forward_with_hooks(model, {n: layers[n] for n in hooked if not done[n]}, pcas, batch, mask, tau)
                used += 1
                if all(p.components is not None for p in pcas.values()):
                    ranks = redistribute({n: pcas[owner[n]].ratios[:k[n]] for n in order}, budget)
                    for name in order[len(hooked):]:  # a shared PCA's owner holds the largest rank of its group
                        if ranks[owner[name]] < ranks[name]:
                            ranks[owner[name]], ranks[name] = ranks[name], ranks[owner[name]]
    finally:
        model.train(was_training)
    missing = [name for name in hooked if pcas[name].components is None]
    if missing:
        raise AdapterError(f"EVA: {missing[0]} never saw {k[missing[0]]} tokens in one batch; raise batch_size")
    late = [name for name in layers if not bool(pcas[owner[name]].converged[:ranks[name]].all())]
    if late:
        warnings.warn(f"EVA: {len(late)} layers had not converged (tau={tau}) after {used} batches, first {late[0]}; "
                      "their components are used as they stand (raise --init-batches)")
    _apply(model, layers, ranks, {name: pcas[owner[name]].components for name in layers})
    return {"ranks": {name: ranks[name] for name in layers}, "batches_used": used, "not_converged": late}


def _shared_inputs(model: nn.Module, layers: dict[str, nn.Module], batch: dict[str, torch.Tensor]) -> dict[str, str]:
    """Each layer -> the first layer (module order) fed the very same input tensor, itself if none."""
    seen: dict[str, torch.Tensor] = {}
    handles = [layer.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, args[0]))
               for name, layer in layers.items()]
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for handle in handles:
            handle.remove()
    first_reader: dict[int, str] = {}
    return {name: first_reader.setdefault(id(seen[name]), name) for name in layers}


def _forward_with_hooks(model: nn.Module, layers: dict[str, nn.Module], pcas: dict[str, IncrementalPCA],
                        batch: dict[str, torch.Tensor], mask: torch.Tensor, tau: float) -> None:
    def fold(name):
        def hook(module, args, out):
            x = args[0]  # (B, T, d_in); a pooler sees (B, d_in): all of its rows count
            rows = x[mask] if x.shape[:-1] == mask.shape else x.reshape(-1, x.shape[-1])  # (tokens, d_in)
            if rows.shape[0] >= pcas[name].n_components:  # fewer rows than components: skip the batch
                pcas[name].partial_fit(rows, tau)
        return hook

    handles = [layer.register_forward_hook(fold(name)) for name, layer in layers.items()]
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for handle in handles:
            handle.remove()


def _apply(model: nn.Module, layers: dict[str, nn.Module], ranks: dict[str, int],
           components: dict[str, torch.Tensor]) -> None:
    """Give each layer its rank (rebuilding it, or unwrapping it at rank 0) and A = its components."""
    config = model.loraforge_config
    alphas = {name: config.alpha_for(name) * ranks[name] / layer.rank for name, layer in layers.items()}
    config.rank_pattern = {n: r for n, r in ranks.items() if r and r != config.rank}
    config.alpha_pattern = {n: a for n, a in alphas.items() if ranks[n] and a != config.alpha}
    removed = [name for name in layers if ranks[name] == 0]
    for name, layer in layers.items():
        if ranks[name] == 0:
            replace_module(model, name, layer.base_layer)
            continue
        if ranks[name] != layer.rank:
            layer = type(layer)(layer.base_layer, config, name).train(layer.training)
            replace_module(model, name, layer)
        layer.lora_A.weight.copy_(components[name][:ranks[name]])
    model.loraforge_targets = [t for t in model.loraforge_targets if t not in removed]
    model.loraforge_adapter_keys = [key for key in model.loraforge_adapter_keys
                                    if not any(key.startswith(name + ".") for name in removed)]
