"""4-bit frozen bases (QLoRA: Dettmers et al., arXiv 2305.14314).

`quantize_base(model)` replaces every frozen linear layer of the base (adapter layers' `base_layer`
included, the output head and trained modules excluded) by an `NF4Linear`: the weight in 4-bit
NormalFloat, blocks of 64 values sharing one absmax, and the absmaxes themselves quantised to 8 bits
in blocks of 256 around their mean ("double quantisation"). Storage per weight:

    4 (code) + 8 / 64 (8-bit absmax) + 32 / (64 * 256) (float32 absmax of the absmaxes) = 4.127 bits

The codebook (16 NF4 levels) and the 8-bit absmax codebook (256 values) are fixed tables, not
per-weight storage. Compute happens in the layer's original dtype, or the autocast dtype: the dense
weight is dequantised for each matmul (forward, and again in backward for dL/dx), never kept.

The adapter is attached before quantising (train.py does so), so the same seed draws the same
adapter as on the full-precision base, and the adapter's keys and PEFT format do not change: an
adapter trained on the 4-bit base loads on the full-precision base. `dequantize_base` turns each
4-bit layer back into a dense nn.Linear holding the dequantised weight, which is what merging a
4-bit run folds the update into (PEFT's merge for bitsandbytes bases does the same).

Backend: bitsandbytes (`pip install loraforge[quant]`), whose NF4 kernels run on CPU and CUDA.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

from loraforge.core.errors import LoraforgeError
from loraforge.core.plugins import QUANTIZERS
from loraforge.methods.base import AdapterLayer

BLOCK_SIZE = 64


def backend_available() -> bool:
    """True when the 4-bit backend (bitsandbytes) is installed; checked without importing it."""
    return importlib.util.find_spec("bitsandbytes") is not None


def _functional():
    if not backend_available():
        raise LoraforgeError("--quant nf4 needs bitsandbytes: pip install 'loraforge[quant]'")
    import bitsandbytes.functional as bnbf  # noqa: PLC0415 - optional dependency, imported on use

    return bnbf


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored as NF4 with double quantisation (block 64).

    `dense_weight()` dequantises the (d_out, d_in) weight in the original dtype; LoRALinear's fused
    node calls it in forward and again in backward instead of saving it.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = weight.dtype
        packed, self.quant_state = _functional().quantize_4bit(
            weight.contiguous(), blocksize=BLOCK_SIZE, compress_statistics=True, quant_type="nf4")
        self.register_buffer("weight_nf4", packed, persistent=False)  # two 4-bit codes per byte
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def dense_weight(self) -> torch.Tensor:
        codes = self.weight_nf4 if self.weight_nf4.dtype == torch.uint8 else self.weight_nf4.view(torch.uint8)
        return _functional().dequantize_4bit(codes.view(-1, 1), self.quant_state).to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _DequantizedLinear.apply(x, self)

    def bits_per_parameter(self) -> float:
        """Stored bits per weight: 4-bit codes, 8-bit absmaxes, their float32 absmaxes and offset."""
        state = self.quant_state
        bits = self.weight_nf4.numel() * self.weight_nf4.element_size() * 8
        bits += state.absmax.numel() * state.absmax.element_size() * 8
        if state.nested:
            bits += state.state2.absmax.numel() * state.state2.absmax.element_size() * 8 + 32  # + offset
        return bits / (self.in_features * self.out_features)

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A dense nn.Linear with the dequantised weight (in `dtype`, default the original one)."""
        weight = self.dense_weight()
        dtype = dtype or weight.dtype
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=weight.device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear.requires_grad_(False)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4 block {BLOCK_SIZE}, double quant"


class _DequantizedLinear(torch.autograd.Function):
    """y = x W^T + b with W dequantised in forward and again in backward, so only 4 bits stay."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: NF4Linear) -> torch.Tensor:
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        with torch.autocast(device, enabled=False):
            bias = layer.bias.to(dtype) if layer.bias is not None else None
            out = F.linear(x.to(dtype), layer.dense_weight().to(dtype), bias)
        ctx.layer, ctx.dtype, ctx.x_dtype = layer, dtype, x.dtype
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        with torch.autocast(grad.device.type, enabled=False):
            grad_x = grad.to(ctx.dtype) @ ctx.layer.dense_weight().to(ctx.dtype)
        return grad_x.to(ctx.x_dtype), None


@QUANTIZERS.register("nf4")
def quantize_base(model: nn.Module) -> int:
    """Replace the frozen linear layers of `model` by 4-bit ones, in place; returns how many.

    Kept dense: the output head (tied to the embeddings in most small LMs), anything that trains
    (the adapters' own A/B, a classification head in modules_to_save, a base weight full
    fine-tuning unfroze). Attach the adapter first:
    attach() wraps nn.Linear layers, and its init reads the full-precision weights.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "loraforge_config", None)
    trained = list(config.modules_to_save or []) if config is not None else []
    adapters = [name for name, m in model.named_modules() if isinstance(m, AdapterLayer)]
    replaced = 0
    for name, module in list(model.named_modules()):
        # Attaching freezes the base: a weight that still trains is one the method trains (full fine-tuning).
        if type(module) is not nn.Linear or module is head or any(_under(name, t) for t in trained):
            continue
        if config is not None and module.weight.requires_grad:
            continue
        if any(_under(name, a) and name != a + ".base_layer" for a in adapters):
            continue  # an adapter's own factor, not the frozen layer it wraps
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, NF4Linear(module))
        replaced += 1
    if not replaced:
        raise LoraforgeError(f"{type(model).__name__} has no frozen nn.Linear layer to quantise (a method that "
                             "trains the base weights, such as full fine-tuning, has nothing to hold in 4 bits): "
                             "drop --quant")
    return replaced


def codes_as_parameters(model: nn.Module) -> int:
    """Make each NF4Linear's 4-bit codes a frozen Parameter that views the same bytes in the layer's
    compute dtype, so that FSDP2 and ZeRO-3, which split parameters (buffers stay whole on every
    rank) and want one dtype per unit, shard the base in 4 bits: bitsandbytes' `quant_storage`.
    The small absmax tables stay whole on each rank. For sharded runs only: a dtype cast of the model
    (`model.to(torch.bfloat16)`) would now convert the codes' bytes as numbers. Returns how many."""
    layers = [m for m in model.modules() if isinstance(m, NF4Linear) and m.weight_nf4.dtype == torch.uint8]
    for layer in layers:
        codes = layer.weight_nf4.view(-1)
        itemsize = torch.tensor([], dtype=layer.compute_dtype).element_size()
        if codes.numel() % itemsize:
            raise LoraforgeError(f"a {layer.out_features} x {layer.in_features} layer's 4-bit codes do not fill whole "
                                 f"{layer.compute_dtype} values: it cannot be sharded in 4 bits")
        delattr(layer, "weight_nf4")  # the buffer; a Parameter of the same name takes its place
        layer.weight_nf4 = nn.Parameter(codes.view(layer.compute_dtype), requires_grad=False)
    return len(layers)


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def dequantize_base(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Turn every NF4Linear of `model` back into a dense nn.Linear (for merging); returns how many."""
    names = [name for name, m in model.named_modules() if isinstance(m, NF4Linear)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, getattr(parent, child).to_linear(dtype))
    return len(names)


def quantized_bits(model: nn.Module) -> tuple[int, float]:
    """(weights held in 4 bits, their mean stored bits per weight)."""
    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    n = sum(m.in_features * m.out_features for m in layers)
    bits = sum(m.bits_per_parameter() * m.in_features * m.out_features for m in layers)
    return n, bits / max(1, n)
