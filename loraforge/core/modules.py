"""Module utilities every layer shares: which layers are adaptable, which ones a target spec picks,
a linear layer's weight in one layout, and the submodule at a dotted path (to read it or replace it)."""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from loraforge.core.config import AdapterConfig
from loraforge.core.errors import AdapterError


def find_targets(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Module paths that `config.target_modules` selects, with PEFT's matching rules."""
    excluded = _excluded_prefixes(model, config)
    targets = []
    for name, module in model.named_modules():
        if not name or any(name == p or name.startswith(p + ".") for p in excluded):
            continue
        spec = config.target_modules
        if spec == "all-linear":
            hit = isinstance(module, LINEAR_TYPES)
        elif isinstance(spec, str):
            hit = re.fullmatch(spec, name) is not None
        else:
            hit = any(name == t or name.endswith("." + t) for t in spec)
        if hit:
            if not isinstance(module, LINEAR_TYPES):
                raise AdapterError(f"target {name!r} is a {type(module).__name__}; only Linear/Conv1D layers can be adapted")
            targets.append(name)
    if not targets:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LINEAR_TYPES)})
        raise AdapterError(
            f"target_modules {config.target_modules!r} matches no Linear layer of {type(model).__name__}; "
            f"its linear layers are named: {', '.join(linear)}"
        )
    return targets


def _excluded_prefixes(model: nn.Module, config: AdapterConfig) -> list[str]:
    # Never adapt the output head (PEFT's all-linear rule) nor a module trained in full.
    excluded = list(config.modules_to_save or [])
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None:
        excluded += [name for name, m in model.named_modules() if m is output]
    return excluded


def submodule(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        raise AdapterError(f"module {name!r} not found in {type(model).__name__}") from exc


def replace_module(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put `module` at the dotted path `name` of `model`; returns the module that was there."""
    parent_name, _, child = name.rpartition(".")
    parent = submodule(model, parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, module)
    return old


def linear_weight(module: nn.Module) -> torch.Tensor:
    """A Linear's or Conv1D's weight as (d_out, d_in), a view: GPT-2's Conv1D stores (d_in, d_out)."""
    return module.weight.T if isinstance(module, Conv1D) else module.weight


LINEAR_TYPES = (nn.Linear, Conv1D)

