"""Pairs (W0, dW) per adapted module, one module at a time, from any fine-tuned weights.

A source is one of
  * None: the adapter attached to the model (e.g. right after training);
  * an adapter folder (`adapter_config.json`, loraforge or PEFT format): loaded onto the model for
    the duration, dW taken from each layer's own `delta_weight()`, so every method that merges
    (LoRA with rank_pattern / alpha_pattern / rsLoRA scaling, DoRA, ...) is read by its own formula;
  * a folder of `*.safetensors` weights of the whole model (`loraforge merge` output, or the folder
    `loraforge train --method full` writes, whose config says method "full"): dW = W - W0 for every
    linear layer the files hold (output and classification heads excepted, as `all-linear` excepts
    them). Tensors are read lazily, one at a time.

Matrices come back as (d_out, d_in) float32 whatever the layer stores: GPT-2's Conv1D keeps its
weight as (d_in, d_out), so it is transposed here. Nothing is computed until a module is asked for,
so a 7B model never holds more than one dense update at a time.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors import safe_open
from torch import nn

from loraforge.adapters.inject import classification_head, detach, is_attached
from loraforge.adapters.io import PEFT_PREFIX, load_adapter
from loraforge.core.config import CONFIG_NAME, AdapterConfig, read_adapter_config
from loraforge.core.errors import AdapterError
from loraforge.core.modules import find_targets
from loraforge.core.registry import get_method
from loraforge.methods.base import AdapterLayer, adapter_layers

ModuleUpdate = Callable[[], tuple[torch.Tensor, torch.Tensor]]  # () -> (W0, dW), both (d_out, d_in)


def source_kind(path: str | Path) -> str:
    """'adapter' or 'weights'; an AdapterError for anything else."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"{path}: no such folder (expected an adapter folder or a folder of safetensors weights)")
    if (path / CONFIG_NAME).is_file():
        return "adapter"
    if any(path.glob("*.safetensors")):
        return "weights"
    raise AdapterError(f"{path}: neither an adapter folder (no {CONFIG_NAME}) nor a folder of *.safetensors weights")


@contextmanager
def open_updates(model: nn.Module, source: str | Path | None = None) -> Iterator[dict[str, ModuleUpdate]]:
    """Yield {module path: () -> (W0, dW)} for `source` against the base `model`; undone on exit."""
    if source is None:
        if not is_attached(model):
            raise AdapterError("the model carries no adapter: attach or load one, or name a folder to analyse")
        yield _attached_updates(model)
        return
    if is_attached(model):
        raise AdapterError("the base model already carries an adapter: detach() it before comparing other weights")
    config = read_adapter_config(source)[0] if source_kind(source) == "adapter" else None
    if config is None or get_method(config.method).trains_base:  # the files hold W' itself
        with ExitStack() as stack:
            yield _weight_file_updates(model, Path(source), stack)
        return
    if not get_method(config.method).merges:
        raise AdapterError(f"{source}: method {config.method!r} has no dense update (it does not merge), nothing to analyse")
    load_adapter(model, source)
    try:
        yield _attached_updates(model)
    finally:
        detach(model)


def _attached_updates(model: nn.Module) -> dict[str, ModuleUpdate]:
    method = get_method(model.loraforge_config.method)
    if method.trains_base:
        raise AdapterError(f"method {method.name!r} trained the weights in place, so W0 is gone: save the model "
                           "and analyse that folder against a freshly loaded base")
    if not method.merges:
        raise AdapterError(f"method {method.name!r} has no dense update (it does not merge), nothing to analyse")
    layers = adapter_layers(model)
    if any(layer.merged for layer in layers.values()):
        raise AdapterError("the adapter is merged into the weights, so W0 is gone: unmerge() it first")
    return {name: partial(_layer_update, layer) for name, layer in layers.items()}


@torch.no_grad()
def _layer_update(layer: AdapterLayer) -> tuple[torch.Tensor, torch.Tensor]:
    weight = layer.base_layer.weight.detach()
    w0 = (weight.T if layer.fan_in_fan_out else weight).to(torch.float32, copy=True)  # (d_out, d_in), not a view
    return w0, layer.delta_weight().detach().float()  # (d_out, d_in)


def _weight_file_updates(model: nn.Module, folder: Path, stack: ExitStack) -> dict[str, ModuleUpdate]:
    handles: dict[str, tuple[Any, str]] = {}  # model key -> (open safetensors file, key in that file)
    for file in sorted(folder.glob("*.safetensors")):
        try:
            handle = stack.enter_context(safe_open(str(file), framework="pt"))
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise AdapterError(f"{file}: not a readable safetensors file ({exc})") from exc
        handles.update({key.removeprefix(PEFT_PREFIX): (handle, key) for key in handle.keys()})
    head = classification_head(model)
    names = find_targets(model, AdapterConfig(modules_to_save=[head] if head else None))
    updates = {}
    for name in names:
        key = name + ".weight"
        if key not in handles:
            continue
        module = model.get_submodule(name)
        handle, file_key = handles[key]
        shape = tuple(handle.get_slice(file_key).get_shape())
        if shape != tuple(module.weight.shape):
            raise AdapterError(f"{folder}: tensor {key!r} has shape {shape}, the model's is {tuple(module.weight.shape)} "
                               "(weights of another base model?)")
        updates[name] = partial(_file_update, module, handle, file_key)
    if not updates:
        found = next(iter(handles), "none")
        raise AdapterError(f"{folder}: no tensor matches a linear layer of {type(model).__name__} "
                           f"(expected keys like {names[0] + '.weight'!r}, found e.g. {found!r})")
    return updates


@torch.no_grad()
def _file_update(module: nn.Module, handle: Any, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    w0, tuned = module.weight.detach().to(torch.float32, copy=True), handle.get_tensor(key).float()
    if not torch.isfinite(tuned).all():
        raise AdapterError(f"tensor {key!r} holds NaN or inf values")
    if not isinstance(module, nn.Linear):  # Conv1D: stored (d_in, d_out) in the model and in the file
        w0, tuned = w0.T, tuned.T
    return w0, tuned - w0  # (d_out, d_in) each
