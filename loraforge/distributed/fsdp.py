"""FSDP: which runs shard with it, and whole tensors from its shards.

``--fsdp`` (or an accelerate config with ``distributed_type: FSDP``, ``fsdp_version: 2``) runs
accelerate's FSDP2 plugin (torch's `fully_shard`) instead of DDP: each decoder layer, frozen base
and adapter alike, is one unit whose parameters and AdamW moments are split over the ranks.
Everything that reads or writes whole tensors (checkpoint, PEFT adapter, resume) goes through
`whole_tensors` / `shard_like` (the runtime's `full_tensors`, `assign_whole`, `whole_adapter`), so
the files are those of a DDP run and either kind of run resumes the other's checkpoint. The step is
the same computation (reduce-scatter instead of all-reduce), so the adapter matches DDP's to float
rounding.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch

from loraforge.core.errors import LoraforgeError

if TYPE_CHECKING:
    from loraforge.training.config import TrainConfig

# Optimizers whose update of an element reads no other row of its tensor, so that a shard (FSDP2
# splits tensors by rows, dim 0) is updated as the whole tensor would be: AdamW and LoRA+ work
# element by element, ALLoRA scales each row by its own norm. LoRA-Pro reads whole A and B.
SHARD_SAFE_OPTIMIZERS = ("adamw", "lora-plus", "allora")


def fsdp_plugin(config: TrainConfig) -> Any:
    """accelerate's FSDP plugin when the run asks for FSDP, else None: --fsdp (FSDP2, one unit per
    decoder layer of the model's `_no_split_modules`) or an accelerate config with distributed_type
    FSDP, whose settings `accelerate launch` passes in FSDP_* variables that the plugin reads."""
    from_config = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if not (config.fsdp or from_config):
        return None
    version = os.environ.get("FSDP_VERSION", "1") if from_config else "2"  # accelerate's default is 1
    if version != "2":
        # FSDP1 flattens each unit's parameters into one tensor (the adapter's keys are gone); on CPU
        # accelerate's plugin cannot even be built for it (it looks for an accelerator device).
        raise LoraforgeError(f"the accelerate config asks for fsdp_version {version}: loraforge trains with FSDP2 "
                             f"only, set fsdp_version: 2 (examples/accelerate/fsdp.yaml)")
    from accelerate.utils import FullyShardedDataParallelPlugin

    settings = {} if from_config else {"fsdp_version": 2, "auto_wrap_policy": "transformer_based_wrap"}
    return FullyShardedDataParallelPlugin(**settings)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


@torch.no_grad()
def whole_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The whole tensors: a DTensor (FSDP's shard of a parameter or of its optimizer state) is
    gathered from every rank, so under FSDP every rank calls this with the same keys in the same
    order; any other tensor is whole already and comes back as it is."""
    if not _distributed():
        return tensors
    from torch.distributed.tensor import DTensor

    return {k: v.full_tensor().detach() if isinstance(v, DTensor) else v for k, v in tensors.items()}


def shard_like(target: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` (whole, as a checkpoint holds it) in the form `target` takes: this rank's shard
    under FSDP, cut locally since every rank has read the same file; else `tensor` itself."""
    if not _distributed():
        return tensor
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(target, DTensor):
        return tensor
    return distribute_tensor(tensor.to(target.device), target.device_mesh, target.placements, src_data_rank=None)


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """The part of `tensor` this rank holds: its shard if FSDP's DTensor, else the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor
