"""The protocol every parametrisation follows: wrap one frozen linear layer and add `delta(x)`.

    h = base_layer(x) + delta(x)            (unmerged: training, multi-adapter serving)
    W <- W + delta_weight()                 (merged: plain inference, export)

A subclass defines its tensors in `__init__`, `delta(x)` (never materialising d_out x d_in when a
low-rank path exists) and `delta_weight()` (the d_out x d_in update, float32, for merging).
Every parameter and persistent buffer the layer creates (i.e. not under `base_layer.`) is adapter
state: saved with the adapter; its parameters train.

The idioms every method shares live here once: W0 in (d_out, d_in) layout (`_w0`, `_set_w0`), the
LoRA scale (`rank_and_scale`) and dropout on the adapter branch (`branch_dropout`).
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from loraforge.core.config import AdapterConfig
from loraforge.core.errors import AdapterError
from loraforge.core.modules import LINEAR_TYPES, linear_weight


class AdapterLayer(nn.Module):
    def __init__(self, base_layer: nn.Module, config: AdapterConfig, name: str):
        super().__init__()
        if not isinstance(base_layer, LINEAR_TYPES):
            raise TypeError(f"{name}: cannot adapt {type(base_layer).__name__}, only Linear / Conv1D")
        self.base_layer = base_layer
        # GPT-2's Conv1D keeps its weight as (d_in, d_out): PEFT calls this fan_in_fan_out.
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        self.out_features, self.in_features = linear_weight(base_layer).shape
        self.merged = False
        self.disabled = False

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged or self.disabled:  # merged: the update is already inside the weight
            return out
        return out + self.delta(x).to(out.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self._add_to_weight(+1.0)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self._add_to_weight(-1.0)
            self.merged = False

    def _add_to_weight(self, sign: float) -> None:
        if hasattr(self.base_layer, "to_linear"):  # a 4-bit base (quant.py): merge into its dequantised weight
            self.base_layer = self.base_layer.to_linear()
        update = wide(self.delta_weight())  # (d_out, d_in); float32 at least so merge/unmerge round-trips
        self._set_w0(wide(self._w0().detach()) + sign * update)

    def _w0(self) -> torch.Tensor:
        """The frozen weight W0 as (d_out, d_in), a view of the base layer's; on a 4-bit base
        (quant/nf4.py) the weight dequantised for this call, as its own forward does."""
        dense = getattr(self.base_layer, "dense_weight", None)
        if dense is not None:
            return dense()
        return linear_weight(self.base_layer)

    def _set_w0(self, w0: torch.Tensor) -> None:
        """Store a (d_out, d_in) matrix as the base layer's weight, in its layout and dtype."""
        weight = self.base_layer.weight
        weight.data = (w0.T if self.fan_in_fan_out else w0).to(weight.dtype).contiguous()

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, merged={self.merged}"


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterLayer)}


@contextlib.contextmanager
def adapter_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone (e.g. the 'before' side of an evaluation)."""
    layers = adapter_layers(model).values()
    if any(layer.merged for layer in layers):
        raise AdapterError("cannot disable a merged adapter: unmerge() it first")
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False


def wide(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` in float32 at least: a bf16/fp16 layer forms its update and norms in float32 (so merge
    and unmerge round-trip), and a float64 one stays float64 (the precision of parity tests)."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()



def rank_and_scale(config: AdapterConfig, name: str) -> tuple[int, float]:
    """The layer's rank r and LoRA's scale s = alpha / r, or alpha / sqrt(r) with use_rslora
    (rsLoRA, Kalajdzievski, arXiv 2312.03732: the update's size then stays stable as r grows)."""
    rank, alpha = config.rank_for(name), config.alpha_for(name)
    return rank, alpha / math.sqrt(rank) if config.use_rslora else alpha / rank


def branch_dropout(p: float) -> nn.Module:
    """Dropout on the adapter branch's input; none at all at p = 0, where a kernel would only cost a
    copy of x per layer."""
    return nn.Dropout(p) if p > 0 else nn.Identity()
