"""The private parts of torch that the layers below `distributed` use, in one place (the distributed
stage keeps its own, for accelerate, DeepSpeed and torch elastic: `loraforge/distributed/_compat.py`).

Written and tested for torch 2.13; tests/test_compat.py fails when the installed torch leaves the
tested range, so that these are re-checked first.
"""

from __future__ import annotations

import torch
from torch import nn


def cpu_has_native_bf16() -> bool:
    """True on a CPU that computes bf16 natively (AVX512-BF16 or AMX), where bf16 autocast pays."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None means float32. `auto` takes bf16 where the hardware computes it natively: a GPU that
    has it, or a CPU with AVX512-BF16/AMX (measured 1.5x faster per step on SmolLM2 here)."""
    if precision == "auto":
        if device.type == "cuda":
            native = torch.cuda.is_bf16_supported()
        else:
            native = cpu_has_native_bf16()
        return torch.bfloat16 if native else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def tensor_slots(module: nn.Module, name: str) -> dict[str, torch.Tensor] | None:
    """The dict that holds `module`'s own parameter or buffer `name` (None: it has neither). Writing
    into it puts any tensor in the slot, a non-leaf one included, as torch.func.functional_call does;
    `setattr` would accept only an nn.Parameter in a parameter's place."""
    for slots in (module._parameters, module._buffers):
        if name in slots:
            return slots
    return None
