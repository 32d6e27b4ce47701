"""Find the target layers of a model, wrap them in adapter layers, and undo it.

`attach` replaces each matching Linear/Conv1D in place by its method's `AdapterLayer`, which keeps
the original module as `base_layer`; module paths stay those of the base model, so the saved keys
are PEFT's (`<path>.lora_A.weight`). Everything but the adapter tensors and `modules_to_save`
(a classification head) is frozen.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import torch
from torch import nn

from loraforge.core.compat import tensor_slots
from loraforge.core.config import TASK_TYPES, AdapterConfig
from loraforge.core.errors import AdapterError
from loraforge.core.modules import find_targets, replace_module, submodule
from loraforge.core.registry import get_method, resolve_initializer
from loraforge.core.rng import seeded
from loraforge.methods.base import adapter_layers
from loraforge.methods.init import start_at_attach

HEAD_NAMES = ("classifier", "score")  # sequence-classification heads in transformers



def is_attached(model: nn.Module) -> bool:
    return getattr(model, "loraforge_config", None) is not None


def classification_head(model: nn.Module) -> str | None:
    return next((name for name in HEAD_NAMES if isinstance(getattr(model, name, None), nn.Module)), None)



def attach(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Wrap the target layers of `model` (in place) and freeze everything else. Returns `model`.

    The adapter's state is whatever the wrapping created: every parameter and persistent buffer
    that the model did not have before (plus `modules_to_save`). New parameters train; the
    base model's stay frozen.
    """
    if is_attached(model):
        raise AdapterError("this model already carries an adapter: detach() or merge_and_unload() it first")
    config = dataclasses.replace(config)  # the model keeps its own resolved copy
    method = get_method(config.method)
    initializer = resolve_initializer(config)
    # A non-zero start that must not show in the output needs its own layer (init/residual.py).
    layer_cls = initializer.layer if initializer is not None and initializer.layer is not None else method.layer
    head = classification_head(model)
    if config.task_type is None:
        config.task_type = TASK_TYPES["classification"] if head else TASK_TYPES["causal-lm"]
    if config.modules_to_save is None and config.task_type == "SEQ_CLS" and head:
        config.modules_to_save = [head]
    for param in model.parameters():
        param.requires_grad_(False)
    base_tensors = {id(t) for t in model.state_dict(keep_vars=True).values()}
    with seeded(config.seed):  # every generator of the caller's, CPU and CUDA, is left as it was
        if method.attach is not None:
            targets = method.attach(model, config)
        else:
            targets = find_targets(model, config)
            for name in targets:
                replace_module(model, name, layer_cls(submodule(model, name), config, name))
        # Weight-based starts run now, in the seeded RNG; data-based ones wait for init.initialize().
        init_report = start_at_attach(model, config)
    if method.trains_base:
        model.loraforge_adapter_keys = _parameter_keys(model)
    else:
        model.loraforge_adapter_keys = [k for k, t in model.state_dict(keep_vars=True).items() if id(t) not in base_tensors]
    for name in config.modules_to_save or []:
        for param in submodule(model, name).parameters():
            param.requires_grad_(True)
    model.loraforge_config = config
    model.loraforge_targets = targets
    model.loraforge_init = init_report  # None until a data-based start has run
    return model


def detach(model: nn.Module) -> nn.Module:
    """Remove the adapter: every wrapped layer becomes its (unmerged) base layer again."""
    for layer in adapter_layers(model).values():
        layer.unmerge()
    return _unwrap(model)


def merge(model: nn.Module) -> None:
    """Fold every adapter layer's update into its base weights, in place (undo with `unmerge`). A
    method whose update has no dense form (a mixture of experts) folds only the layers that have."""
    for layer in adapter_layers(model).values():
        layer.merge()


def unmerge(model: nn.Module) -> None:
    for layer in adapter_layers(model).values():
        layer.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold the update into the base weights and drop the adapter modules: a plain model."""
    method = model.loraforge_config.method
    if not get_method(method).merges:
        raise AdapterError(f"method {method!r} does not merge into the weights (its update is input-dependent)")
    merge(model)
    return _unwrap(model)



@contextlib.contextmanager
def tensors_replaced(model: nn.Module, by_key: dict[str, torch.Tensor]) -> Iterator[None]:
    """For the duration, the parameter or buffer slot at each state-dict key holds the given tensor
    instead (any tensor: a non-leaf one keeps the model a differentiable function of it, as
    torch.func.functional_call does; a gathered whole one lets plain-model code read an FSDP shard's
    full value). The original tensors are put back on exit, whatever happened."""
    swapped: list[tuple[dict, str, torch.Tensor]] = []
    try:
        for key, tensor in by_key.items():
            path, _, name = key.rpartition(".")
            module = submodule(model, path) if path else model
            slots = tensor_slots(module, name)
            if slots is None:
                raise AdapterError(f"{key!r} is neither a parameter nor a buffer of {type(model).__name__}")
            swapped.append((slots, name, slots[name]))
            slots[name] = tensor
        yield
    finally:
        for slots, name, original in reversed(swapped):
            slots[name] = original


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What an adapter saves, keyed by model path: adapter tensors and modules_to_save weights."""
    everything = model.state_dict(keep_vars=True)
    state = {key: everything[key] for key in model.loraforge_adapter_keys}
    for name in model.loraforge_config.modules_to_save or []:
        for pname, param in submodule(model, name).named_parameters():
            state[f"{name}.{pname}"] = param
    return state


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _parameter_keys(model: nn.Module) -> list[str]:
    """Every parameter's state-dict key, a tied one (SmolLM2's embedding and output head) once:
    safetensors refuses to save one tensor under two names."""
    seen: set[int] = set()
    keys = []
    for key, tensor in model.state_dict(keep_vars=True).items():
        if isinstance(tensor, nn.Parameter) and id(tensor) not in seen:
            seen.add(id(tensor))
            keys.append(key)
    return keys


def _unwrap(model: nn.Module) -> nn.Module:
    for name, layer in adapter_layers(model).items():
        replace_module(model, name, layer.base_layer)
    model.loraforge_config = model.loraforge_targets = model.loraforge_adapter_keys = model.loraforge_init = None
    return model



