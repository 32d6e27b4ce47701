"""Any method's adapter as a plain PEFT LoRA of rank R, for engines that load only LoRA (vLLM,
LoRAX, llama.cpp).

Every method that merges has a dense update per layer, dW = W' - W0 (its own `delta_weight()`, or
the saved weights less the base's for full fine-tuning). The best rank-R approximation of dW in
the Frobenius (and spectral) norm is its truncated SVD (Eckart-Young):

    dW = U S Vᵀ,   B = U[:, :R] S[:R]^½  (d_out, R),   A = S[:R]^½ Vᵀ[:R]  (R, d_in),   s = alpha/R = 1
    ||dW - B A||_F / ||dW||_F = sqrt(sum_{i>R} S_i²) / sqrt(sum_i S_i²)

exact (to rounding) when rank(dW) <= R: LoRA, LoRA-XS/SB, LoLDU, Block-LoRA, Comp-LoRA and Bone
at their rank; DoRA (its magnitude rescales whole rows), RandLoRA and Bone-Bat updates are usually
of full rank and lose their tail. The singular values are
split evenly between B and A so that neither factor holds them all (PEFT's fp16 loads keep both in
range). modules_to_save (a head, trained embedding rows) travel unchanged.

The report gives, per layer, rank(dW) and the relative error above, and on a few fixed prompts the
logits' relative error ||L_lora - L|| / ||L|| and the share of the adapter's own effect that the
conversion loses, ||L_lora - L|| / ||L - L_base||. A method whose update depends on the input
(MixLoRA's router) has no dW and is refused.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loraforge.adapters.inject import attach, detach
from loraforge.adapters.io import load_adapter, read_adapter, save_adapter
from loraforge.core.config import AdapterConfig
from loraforge.core.errors import AdapterError
from loraforge.core.files import atomic_write_text
from loraforge.core.modules import find_targets
from loraforge.core.registry import get_method
from loraforge.methods.base import adapter_layers

# Short, varied texts: the logits check needs inputs, not a data set (the layer errors do not).
PROMPTS = ("The capital of France is", "def add(a, b):\n    return",
           "Question: what is 12 times 7?\nAnswer:", "Once upon a time, in a small village by the sea,")
REPORT_NAME = "conversion_report.json"


@dataclasses.dataclass
class LayerError:
    name: str
    shape: list[int]  # [d_out, d_in]
    rank: int  # numerical rank of dW (float32 tolerance: what the method's own rounding leaves)
    relative_error: float  # ||dW - B A||_F / ||dW||_F, 0 for dW = 0
    exact: bool  # rank <= R: the plain LoRA holds dW itself, to rounding


@torch.no_grad()
def truncated_lora(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """(A (R', d_in), B (d_out, R'), rank(dW), relative error) for dW (d_out, d_in), R' = min(R, d_out, d_in)."""
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)  # (d_out, k), (k,), (k, d_in)
    keep = min(rank, s.numel())
    root = s[:keep].sqrt()
    lora_b, lora_a = u[:, :keep] * root, root[:, None] * vh[:keep]  # (d_out, R'), (R', d_in)
    tol = s.max() * max(delta.shape) * torch.finfo(torch.float32).eps if s.numel() else 0.0
    total = s.square().sum()
    error = (s[keep:].square().sum() / total).sqrt().item() if total > 0 else 0.0
    return lora_a, lora_b, int((s > tol).sum()), error


def dense_updates(model: nn.Module, adapter_dir: str | Path) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """Load the adapter onto `model` (in place) and return its config and {layer path: dW (d_out, d_in)}.
    For full fine-tuning the model then holds the tuned weights, and dW = W' - W0 on every linear
    layer `all-linear` names (heads excepted)."""
    config = read_adapter(adapter_dir)[0]
    method = get_method(config.method)
    if not method.merges:
        raise AdapterError(f"{adapter_dir}: method {config.method!r} has no dense update per layer (its update depends "
                           "on the input), so it cannot become a plain LoRA")
    if method.trains_base:
        names = find_targets(model, AdapterConfig())
        before = {n: _dense(model.get_submodule(n)).clone() for n in names}
        load_adapter(model, adapter_dir)
        return config, {n: _dense(model.get_submodule(n)) - w0 for n, w0 in before.items()}
    load_adapter(model, adapter_dir)
    return config, {name: layer.delta_weight().detach().float() for name, layer in adapter_layers(model).items()}


def convert_to_lora(model: nn.Module, tokenizer: Any, adapter_dir: str | Path, rank: int,
                    out: str | Path) -> dict[str, Any]:
    """Write `adapter_dir`'s adapter for the base `model` as a plain LoRA of rank `rank` to `out`;
    returns the report (also written to out/conversion_report.json). `model` is left without adapter,
    its modules_to_save (for full fine-tuning: all its weights) holding the adapter's values."""
    if rank < 1:
        raise AdapterError(f"--rank must be a positive integer, got {rank}")
    base = copy.deepcopy(model) if get_method(read_adapter(adapter_dir)[0].method).trains_base else None
    side, tokenizer.padding_side = tokenizer.padding_side, "right"  # pads after each text: its logits stay its own
    inputs = tokenizer(list(PROMPTS), return_tensors="pt", padding=True).to(_device(model))
    tokenizer.padding_side = side
    logits_base = _logits(model, inputs)
    config, deltas = dense_updates(model, adapter_dir)  # modules_to_save now hold the adapter's values
    logits_adapter = _logits(model, inputs)
    factors, layers = {}, []
    for name, delta in deltas.items():
        lora_a, lora_b, delta_rank, error = truncated_lora(delta, rank)
        factors[name] = (lora_a, lora_b)
        layers.append(LayerError(name, list(delta.shape), delta_rank, error, delta_rank <= rank))
    detach(model)  # full fine-tuning: only the record goes, the tuned weights stay
    base = model if base is None else base
    plain = AdapterConfig(
        method="lora", rank=rank, alpha=float(rank), target_modules=sorted(deltas), modules_to_save=config.modules_to_save,
        rank_pattern={n: a.shape[0] for n, (a, _) in factors.items() if a.shape[0] != rank},
        alpha_pattern={n: float(a.shape[0]) for n, (a, _) in factors.items() if a.shape[0] != rank},
        task_type=config.task_type, base_model_name_or_path=config.base_model_name_or_path,
        provenance={**config.provenance, "converted_from": {
            "method": config.method, "init": config.init, "rank": config.rank, "alpha": config.alpha,
            "options": config.options, "to_rank": rank}})
    attach(base, plain)
    try:
        with torch.no_grad():
            for name, layer in adapter_layers(base).items():
                lora_a, lora_b = factors[name]
                layer.lora_A.weight.copy_(lora_a)
                layer.lora_B.weight.copy_(lora_b)
        logits_lora = _logits(base, inputs)
        save_adapter(base, out)
    finally:
        detach(base)
    report = _report(config.method, rank, layers, logits_base, logits_adapter, logits_lora)
    atomic_write_text(Path(out) / REPORT_NAME, json.dumps(report, indent=2) + "\n")
    return report


def _report(method: str, rank: int, layers: list[LayerError], base: torch.Tensor, adapter: torch.Tensor,
            lora: torch.Tensor) -> dict[str, Any]:
    lost, effect = (lora - adapter).norm().item(), (adapter - base).norm().item()
    errors = [layer.relative_error for layer in layers]
    return {
        "method": method, "rank": rank, "layers": len(layers),
        "exact_layers": sum(layer.exact for layer in layers),
        "max_layer_relative_error": max(errors, default=0.0),
        "mean_layer_relative_error": sum(errors) / len(errors) if errors else 0.0,
        "logits_relative_error": lost / adapter.norm().item(),
        "logits_error_of_adapter_effect": lost / effect if effect > 0 else None,
        "top1_agreement": (lora.argmax(-1) == adapter.argmax(-1)).float().mean().item(),
        "positions": int(adapter.shape[0]),  # prompt tokens (a classifier: prompts) the logits were compared on
        "per_layer": [dataclasses.asdict(layer) for layer in layers],
    }


@torch.no_grad()
def _logits(model: nn.Module, inputs: Any) -> torch.Tensor:
    """(tokens, vocab) float32: the logits of every prompt's real (non-padding) tokens, one forward;
    (prompts, labels) for a classifier."""
    logits = model(**inputs).logits
    return (logits[inputs.attention_mask.bool()] if logits.dim() == 3 else logits).float()


def _dense(module: nn.Module) -> torch.Tensor:
    weight = module.weight.detach().float()
    return weight if isinstance(module, nn.Linear) else weight.T  # Conv1D stores (d_in, d_out)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device

