"""DeepSpeed ZeRO: which runs it takes, its config, and whole tensors and optimizer state from its partitions.

``--zero-stage N`` (or an accelerate config with ``distributed_type: DEEPSPEED``) hands the model
and optimizer to DeepSpeed's engine through accelerate's plugin. ZeRO-1 splits the AdamW moments
over the ranks, ZeRO-2 also the gradients, ZeRO-3 also every weight, frozen base included. The
engine divides the loss by grad_accum, averages over ranks and steps inside the window's last
backward, which the same scaling undoes; `optimizer_state` / `assign_whole` read and write the
partitions through DeepSpeed's per-parameter API, so checkpoints are again those of a DDP run.
"""

from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from loraforge.core.errors import LoraforgeError
from loraforge.distributed._compat import (
    is_zero3_partitioned,
    link_zero_params_to_state,
    zero_partitions,
    zero_torch_optimizer,
)

if TYPE_CHECKING:
    from loraforge.training.config import TrainConfig

# ZeRO flattens each param group into one buffer and hands the optimizer slices of it that cut
# across rows and tensors: only an update that works element by element stays the same.
ZERO_SAFE_OPTIMIZERS = ("adamw", "lora-plus")
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


def deepspeed_plugin(config: TrainConfig) -> Any:
    """accelerate's DeepSpeed plugin when the run asks for ZeRO, else None: --zero-stage N, or an
    accelerate config with distributed_type DEEPSPEED (the plugin reads the ACCELERATE_DEEPSPEED_*
    variables, or the deepspeed_config_file they name, that `accelerate launch` sets)."""
    from_config = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if not (config.zero_stage or from_config):
        return None
    if importlib.util.find_spec("deepspeed") is None:
        raise LoraforgeError("DeepSpeed ZeRO needs the deepspeed package: pip install 'loraforge[deepspeed]'")
    from accelerate.utils import DeepSpeedPlugin

    # zero3_init_flag off: the base is built whole on every rank (loraforge attaches adapters to whole
    # weights) and partitioned when the engine is built.
    settings: dict[str, Any] = {"zero3_init_flag": False}
    if not from_config:
        settings["zero_stage"] = config.zero_stage
    return DeepSpeedPlugin(**settings)


def refuse_second_backward(config: TrainConfig) -> None:
    """Refuse a regulariser: the engine steps inside the window's last backward, and a regulariser's
    second pass would step again."""
    if config.regularizer:
        raise LoraforgeError(f"--regularizer {config.regularizer.name} runs a second backward per step, and DeepSpeed's "
                             f"engine steps inside the first: use data parallel or FSDP")


def fill_deepspeed_config(plugin: Any, config: TrainConfig, world_size: int) -> None:
    """Set the DeepSpeed config's batch and clipping entries from the run's own settings, and refuse
    a config whose entries would make the engine compute another step than the loop's."""
    ds = plugin.deepspeed_config
    ours = {"gradient_accumulation_steps": config.grad_accum, "gradient_clipping": max(config.max_grad_norm, 0.0),
            "train_micro_batch_size_per_gpu": config.batch_size,
            "train_batch_size": config.batch_size * config.grad_accum * world_size}
    for key, value in ours.items():
        if ds.get(key, "auto") not in ("auto", value):
            raise LoraforgeError(f"the DeepSpeed config sets {key}={ds[key]}, this run has {value}: set it to 'auto' "
                                 f"(loraforge fills it from --batch-size, --grad-accum and --max-grad-norm)")
        ds[key] = value
    refused = [key for key in ("optimizer", "scheduler") if key in ds]
    refused += [key for key in ("fp16", "bf16") if str(ds.get(key, {}).get("enabled", False)).lower() == "true"]
    zero = ds.get("zero_optimization", {})
    refused += [f"zero_optimization.{key}" for key in ("offload_optimizer", "offload_param")
                if zero.get(key, {}).get("device", "none") not in ("none", None)]
    if refused:
        raise LoraforgeError(f"the DeepSpeed config sets {', '.join(refused)}: leave them out. loraforge builds the "
                             f"optimizer and its schedule (--optimizer, --lr, --warmup), sets precision with "
                             f"--precision, and keeps the optimizer on the device")


def gather_for_root(root: nn.Module, model: nn.Module) -> None:
    """ZeRO-3 gathers a module's parameters around that module's forward. The loss reads the head's
    weight without calling the head (it applies it to label positions only), so the root, whose
    forward runs the whole loss, gathers it too."""
    from deepspeed.runtime.zero import register_external_parameter

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for param in head.parameters() if head is not None else ():
        register_external_parameter(root, param)


@torch.no_grad()
def gathered(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` with each ZeRO-3 partitioned parameter replaced by a whole copy, gathered from
    every rank (so every rank calls this with the same keys in the same order)."""
    partitioned = [v for v in tensors.values() if is_zero3_partitioned(v)]
    if not partitioned:
        return tensors
    from deepspeed.runtime.zero import GatheredParameters

    with GatheredParameters(partitioned):
        whole = {k: v.detach().clone() for k, v in tensors.items() if is_zero3_partitioned(v)}
    return {**tensors, **whole}


@torch.no_grad()
def assign_whole(target: torch.Tensor, tensor: torch.Tensor) -> None:
    """Write `tensor` (whole; every rank has read the same) into a parameter DeepSpeed holds: the
    model's copy (ZeRO-3: its partition) and the optimizer's fp32 master copy."""
    from deepspeed.runtime.zero import GatheredParameters
    from deepspeed.utils import safe_set_full_fp32_param

    with GatheredParameters([target], modifier_rank=0, enabled=is_zero3_partitioned(target)):
        target.copy_(tensor)  # the model's copy (ZeRO-3: repartitioned on leaving)
    safe_set_full_fp32_param(target, tensor)  # the optimizer's, which the next step starts from


def optimizer_state(zero: Any, params: list[nn.Parameter], group_indices: list[list[int]]
                    ) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """A ZeRO optimizer's state as whole tensors ("state.{index}.{name}", indices into `params`, the
    order of the optimizer the loop built) and its param groups: a torch AdamW's form."""
    from deepspeed.utils import safe_get_full_optimizer_state

    inner = zero_torch_optimizer(zero)
    step = next((s["step"] for s in inner.state.values() if "step" in s), None)
    tensors = {}
    if step is not None:  # before the first step there is no state, as torch's AdamW has none
        for index, param in enumerate(params):
            for name in ADAM_MOMENTS:
                tensors[f"state.{index}.{name}"] = safe_get_full_optimizer_state(param, name)
            tensors[f"state.{index}.step"] = step.clone()
    groups = [{**{k: v for k, v in group.items() if k != "params"}, "params": indices}
              for group, indices in zip(inner.param_groups, group_indices)]
    return tensors, groups


def load_optimizer_state(zero: Any, params: list[nn.Parameter], tensors: dict[str, torch.Tensor]) -> None:
    """Undo `optimizer_state`: every rank takes its partitions of the whole tensors it read."""
    from deepspeed.utils import safe_set_full_optimizer_state

    step = tensors.get("state.0.step")
    if step is None:
        return  # written before the first step: nothing to restore
    inner = zero_torch_optimizer(zero)
    for flat in zero_partitions(zero):
        # One count per flat partition (every parameter has stepped alike), and moments that the
        # per-parameter API writes into: ZeRO creates them only at its first step.
        moments = {name: torch.zeros_like(flat) for name in ADAM_MOMENTS}
        inner.state[flat] = {"step": step.clone(), **moments}
    link_zero_params_to_state(zero)
    for index, param in enumerate(params):
        for name in ADAM_MOMENTS:
            safe_set_full_optimizer_state(param, tensors[f"state.{index}.{name}"], name)
