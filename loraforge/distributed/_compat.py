"""Every use of accelerate's, DeepSpeed's, torch's and transformers' internals: attributes,
arguments and formats that are not their public API (private names, the insides of optimizer
wrappers, state switched after construction, torch elastic's error file). They move between
releases without notice, so they all sit here, each behind a function that says what it does, and
the rest of the package uses only these functions and the libraries' public API.

Written for, and tested with (tests/test_compat.py pins these): accelerate 1.16, DeepSpeed 0.19,
torch 2.13, transformers 5.25. When that test fails after an upgrade, re-check each function here
against the new release (tests/test_distributed.py exercises them all), then move the pins.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# ---- accelerate ---------------------------------------------------------------------------------


def enable_sharding_on_cpu(accelerator: Any, fsdp_plugin: Any, deepspeed_plugin: Any) -> None:
    """Switch a CPU Accelerator, built with gloo up, to FSDP (`fsdp_plugin`) or DeepSpeed
    (`deepspeed_plugin`): accelerate turns them on for accelerator devices only (in AcceleratorState
    their branches sit under `not cpu`; on CPU the plugin is silently dropped and the run would be
    DDP), while torch's FSDP2 and DeepSpeed's CPU accelerator both run on gloo. From here on the run
    takes accelerate's own FSDP2 or DeepSpeed path, the one a GPU run takes."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    state = accelerator.state
    if deepspeed_plugin is not None:
        state.distributed_type = DistributedType.DEEPSPEED
        deepspeed_plugin.set_mixed_precision("no")
        deepspeed_plugin.select(_from_accelerator_state=True)  # what AcceleratorState does with a GPU
        state.deepspeed_plugins = deepspeed_plugin
    else:
        state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = fsdp_plugin
    # What AcceleratorState itself does when it switches: every later AcceleratorState() (DeepSpeed's
    # preparation makes some) copies PartialState's fields over its own.
    PartialState._shared_state["distributed_type"] = state.distributed_type


def let_ddp_find_unused_parameters(accelerator: Any) -> None:
    """Make the DDP wrapper that `accelerator.prepare` builds tolerate parameters that get no
    gradient at some step. The public way is a kwargs handler given to the Accelerator's
    constructor; the runtime learns that it needs this only later, from the model."""
    from accelerate.utils import DistributedDataParallelKwargs

    accelerator.ddp_handler = DistributedDataParallelKwargs(find_unused_parameters=True)


def show_layer_classes(root: nn.Module, model: nn.Module) -> None:
    """Give `root`, a module wrapping `model`, the model's decoder layer classes: accelerate's FSDP
    plugin (transformer_based_wrap) makes each module of a class that transformers' private
    `_no_split_modules` names one unit, and reads it on the module it prepares."""
    root._no_split_modules = getattr(model, "_no_split_modules", None)


# ---- torch --------------------------------------------------------------------------------------


def elastic_error_message(failure: Any) -> str:
    """The error a failed worker raised ("Type: text"), from torch elastic's `ProcessFailure`, whose
    `message` is the worker's error file ({"message": ..., "extraInfo": {traceback}}) or a string."""
    message = failure.message.get("message", "") if isinstance(failure.message, dict) else failure.message
    return (message or "").strip()


# ---- transformers -------------------------------------------------------------------------------


def forget_hf_deepspeed_config() -> None:
    """Unregister the DeepSpeed config that selecting accelerate's plugin registers with transformers,
    whose from_pretrained would then build a ZeRO-3 model already partitioned (zero.Init)."""
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


# ---- DeepSpeed ----------------------------------------------------------------------------------


def zero_partitions(zero: Any) -> list[torch.Tensor]:
    """This rank's flat fp32 partitions of a ZeRO optimizer, one per param group: what its AdamW
    updates and keys its state by. Any other optimizer (or None) has none."""
    return (getattr(zero, "fp32_partitioned_groups_flat", None)  # ZeRO-3
            or getattr(zero, "single_partition_of_fp32_groups", []))  # ZeRO-1/2


def zero_torch_optimizer(zero: Any) -> torch.optim.Optimizer:
    """The torch optimizer (AdamW) a ZeRO optimizer steps over its flat partitions."""
    return zero.optimizer


def link_zero_params_to_state(zero: Any) -> None:
    """Point each parameter's fp32 slice at the optimizer state of its flat partition, so that
    DeepSpeed's per-parameter state API can write into state created by hand. ZeRO-1/2 do this
    lazily at their first step; ZeRO-3 needs nothing."""
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
        zero._lazy_init_hp_params_optimizer_state()


def is_zero3_partitioned(tensor: torch.Tensor) -> bool:
    """True for a ZeRO-3 parameter, whose own storage is released and whose data is this rank's partition."""
    return hasattr(tensor, "ds_id")


def held_by_zero(tensor: torch.Tensor) -> bool:
    """True for a parameter DeepSpeed holds: a ZeRO-3 partitioned one, or one a ZeRO-1/2 optimizer
    keeps an fp32 master slice of."""
    return is_zero3_partitioned(tensor) or hasattr(tensor, "_hp_mapping")


def zero3_local(tensor: torch.Tensor) -> torch.Tensor:
    """The storage this rank holds for `tensor`: its partition under ZeRO-3, else the tensor itself."""
    return tensor.ds_tensor if hasattr(tensor, "ds_tensor") else tensor
