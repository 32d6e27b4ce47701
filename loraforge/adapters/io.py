"""Adapters on disk, in PEFT's format, written atomically.

    adapter_dir/
      adapter_config.json          PEFT's LoraConfig fields
      loraforge_config.json        the AdapterConfig dataclass, whole
      adapter_model.safetensors    base_model.model.<module path>.lora_A.weight, ...

A layer whose update is exactly s·B' A' for some factors but whose own tensors are not PEFT's
(LoRA-XS's B R A; PiSSA / LoRA-GA's B A − B0 A0) provides `lora_factors() -> (A', B')`; it is saved as
that plain LoRA, relative to the original base weights, so PEFT loads it and loraforge reloads it
as method "lora" (the trainer's checkpoint keeps the native tensors for resuming).

Only safetensors and JSON are ever read: nothing a user hands us is unpickled. A folder is written
next to its destination and renamed into place, so a crash leaves the old adapter or the new one,
never half of either.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from loraforge.adapters.inject import HEAD_NAMES, adapter_state_dict, attach, detach
from loraforge.core.config import CONFIG_NAME, LORAFORGE_CONFIG_NAME, WEIGHTS_NAME, AdapterConfig, read_adapter_config
from loraforge.core.errors import AdapterError
from loraforge.core.files import atomic_dir
from loraforge.core.registry import get_method
from loraforge.methods.base import adapter_layers
from loraforge.methods.init import InitReport

PEFT_PREFIX = "base_model.model."


def save_adapter(model: nn.Module, adapter_dir: str | Path, extra_json: dict[str, Any] | None = None) -> Path:
    """Write the attached adapter of `model` to `adapter_dir` in PEFT's format."""
    config: AdapterConfig | None = getattr(model, "loraforge_config", None)
    if config is None:
        raise AdapterError("the model has no adapter attached: nothing to save")
    if any(layer.merged for layer in adapter_layers(model).values()):
        raise AdapterError("the adapter is merged into the weights: unmerge() before saving it")
    config, state = _plain_lora(model, config)
    method = get_method(config.method)
    tensors = {PEFT_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    peft_json = config.to_peft_dict(list(model.loraforge_targets), method.peft_type or f"LORAFORGE_{method.name.upper()}")
    peft_json["fan_in_fan_out"] = any(layer.fan_in_fan_out for layer in adapter_layers(model).values())
    peft_json.update(method.peft_config(config) if method.peft_config else {})
    peft_json.update(extra_json or {})
    with atomic_dir(adapter_dir) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(peft_json, indent=2) + "\n")
        (tmp / LORAFORGE_CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    return Path(adapter_dir)


def _plain_lora(model: nn.Module, config: AdapterConfig) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """The adapter's config and tensors, with layers that have `lora_factors` written as plain LoRA
    of rank k = A'.shape[0] and the same scale s: alpha times k/r (sqrt(k/r) under rsLoRA; k/r is 1
    or 2, so alpha/rank gives s back bit for bit)."""
    state = adapter_state_dict(model)
    factored = {name: layer for name, layer in adapter_layers(model).items() if hasattr(layer, "lora_factors")}
    if not factored:
        return config, state
    shapes = {}
    for name, layer in factored.items():
        state = {k: v for k, v in state.items() if not k.startswith(name + ".")}
        lora_a, lora_b = layer.lora_factors()  # (k, d_in), (d_out, k)
        state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"] = lora_a, lora_b
        k = lora_a.shape[0]
        shapes[name] = (k, config.alpha_for(name) * (math.sqrt(k / layer.rank) if config.use_rslora else k / layer.rank))
    rank, alpha = Counter(shapes.values()).most_common(1)[0][0]
    plain = dataclasses.replace(
        config, method="lora", init="default", rank=rank, alpha=alpha,
        rank_pattern={n: k for n, (k, _) in shapes.items() if k != rank},
        alpha_pattern={n: a for n, (_, a) in shapes.items() if a != alpha},
        options={}, provenance={**config.provenance, "converted_from": {
            "method": config.method, "init": config.init, "rank": config.rank, "alpha": config.alpha,
            "options": config.options}})
    return plain, state


def read_adapter(adapter_dir: str | Path) -> tuple[AdapterConfig, list[str] | str, dict[str, torch.Tensor]]:
    """Config, the exact target list it was saved with, and tensors keyed by model path."""
    config, peft_json = read_adapter_config(adapter_dir)
    weights = Path(adapter_dir) / WEIGHTS_NAME
    if not weights.is_file():
        raise AdapterError(f"{adapter_dir}: no {WEIGHTS_NAME} (loraforge reads safetensors only, never pickles)")
    try:
        tensors = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise AdapterError(f"{weights}: not a readable safetensors file ({exc})") from exc
    state = {}
    for key, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise AdapterError(f"{weights}: tensor {key!r} holds NaN or inf values")
        state[key.removeprefix(PEFT_PREFIX)] = tensor
    return config, peft_json.get("target_modules") or config.target_modules, state


def load_adapter(model: nn.Module, adapter_dir: str | Path, trainable: bool = False) -> nn.Module:
    """Attach the adapter saved in `adapter_dir` to `model` (in place) and load its tensors.

    Checks every key and shape before touching the model; a mismatch names the first bad key.
    """
    config, targets, state = read_adapter(adapter_dir)
    expected_base = config.base_model_name_or_path
    config.target_modules = sorted(targets) if isinstance(targets, list) else targets
    # PEFT lists candidate heads ("classifier", "score") and keeps those the model has.
    if config.modules_to_save:
        config.modules_to_save = [m for m in config.modules_to_save if _has_module(model, m)] or None
    attach(model, config)
    own = adapter_state_dict(model)
    for key, tensor in state.items():
        if key not in own:
            detach(model)
            raise AdapterError(f"{adapter_dir}: key {key!r} has no place in this model (adapter for another base model?)")
        if own[key].shape != tensor.shape:
            detach(model)
            raise AdapterError(
                f"{adapter_dir}: key {key!r} has shape {tuple(tensor.shape)}, the model expects {tuple(own[key].shape)} "
                f"(adapter trained for {expected_base or 'another base model'}?)"
            )
    missing = sorted(set(own) - set(state))
    if missing:
        detach(model)
        raise AdapterError(f"{adapter_dir}: adapter lacks {len(missing)} tensors the model needs, first {missing[0]!r}")
    with torch.no_grad():
        for key, tensor in state.items():
            own[key].copy_(tensor.to(own[key].dtype))
    for tensor in own.values():
        if isinstance(tensor, nn.Parameter):
            tensor.requires_grad_(trainable)
    model.loraforge_init = InitReport(config.init, 0.0, details={"loaded_from": str(adapter_dir)})  # nothing to run
    return model


def load_pretrained(model_name: str, adapter_dir: str | Path | None = None, task: str | None = None,
                    num_labels: int | None = None) -> tuple[nn.Module, Any]:
    """Base model (+ adapter) ready for inference. The adapter's config says which task and how
    many labels its head has, so `--task` / `--num-labels` are only needed without an adapter."""
    model, tokenizer = load_base(model_name, adapter_dir, task, num_labels)
    if adapter_dir is not None:
        load_adapter(model, adapter_dir)
    model.eval()
    return model, tokenizer


def load_base(model_name: str, adapter_dir: str | Path | None = None, task: str | None = None,
              num_labels: int | None = None) -> tuple[nn.Module, Any]:
    """The base model `adapter_dir` was trained on, without the adapter: a classification adapter's
    config and head give the task and the number of labels."""
    from loraforge.core.models import load_model

    if adapter_dir is not None:
        config, _, state = read_adapter(adapter_dir)
        if config.task_type == "SEQ_CLS":
            task = task or "classification"
            heads = [t for k, t in state.items() if k.split(".")[0] in HEAD_NAMES and t.ndim == 2]
            num_labels = num_labels or (heads[-1].shape[0] if heads else None)
    return load_model(model_name, task=task, num_labels=num_labels)


def _has_module(model: nn.Module, name: str) -> bool:
    return any(path == name or path.endswith("." + name) for path, _ in model.named_modules())


def count_parameters(n: int) -> str:
    """1234567 -> '1.23M': for tables and progress lines."""
    if n < 1000:
        return str(n)
    exp = min(int(math.log10(n) // 3), 3)
    return f"{n / 10 ** (3 * exp):.2f}{' KMB'[exp]}"
