"""Multi-process training on Hugging Face accelerate (DDP, FSDP or DeepSpeed ZeRO), with the same answer at any scale.

Two ways in, one training loop (`loraforge.training.loop.train`):

* ``loraforge train ... --num-processes N`` (``TrainConfig(num_processes=N)`` in Python) starts N
  workers on this machine the way `accelerate launch` does (torch elastic; gloo on CPU, NCCL on GPUs).
  The workers are forked, not spawned: they inherit the parsed config and whatever model or data
  the caller passed in memory, and they start in a fraction of a second instead of importing torch
  and transformers again.
* ``accelerate launch [--config_file cfg.yaml] -m loraforge train ...`` starts the workers itself
  (several GPUs, several nodes); `train` sees the launcher's environment and joins it.

Sharded: ``--fsdp`` (or an accelerate config with ``distributed_type: FSDP``, ``fsdp_version: 2``)
runs accelerate's FSDP2 plugin (torch's `fully_shard`) instead of DDP: each decoder layer, frozen
base and adapter alike, is one unit whose parameters and AdamW moments are split over the ranks.
Everything that reads or writes whole tensors (checkpoint, PEFT adapter, resume) goes through
`full_tensors` / `shard_like` / `whole_adapter`, so the files are those of a DDP run and either kind
of run resumes the other's checkpoint. The step is the same computation (reduce-scatter instead of
all-reduce), so the adapter matches DDP's to float rounding.

DeepSpeed: ``--zero-stage N`` (or an accelerate config with ``distributed_type: DEEPSPEED``) hands
the model and optimizer to DeepSpeed's engine through accelerate's plugin. ZeRO-1 splits the AdamW
moments over the ranks, ZeRO-2 also the gradients, ZeRO-3 also every weight, frozen base included.
The engine divides the loss by grad_accum, averages over ranks and steps inside the window's last
backward, which the same scaling undoes; `optimizer_state` / `assign_whole` read and write the
partitions through DeepSpeed's per-parameter API, so checkpoints are again those of a DDP run.

A run that is none of these (one process, not launched) gets `LocalRuntime`, which is the plain loop:
accelerate is not even imported.

Exact equivalence. Optimizer step s reads global batch s of a `BatchPlan` whose batch size is
batch_size x grad_accum x processes, so the rows of a step do not depend on how they are split.
`micro_batches` cuts them into grad_accum x processes slices; rank r takes slice k x processes + r
at accumulation step k. Every rank divides its summed token losses by the label tokens of the
whole global batch (all-reduced before the first backward) and multiplies by processes x
grad_accum, which undoes the means DDP takes over ranks and accelerate takes over accumulation
steps. The optimizer then sees (sum of token-loss gradients) / (global label tokens)
for every split: 1 x 8, 1 x 2 x 4, 2 x 4 and 2 x 2 x 2 reach the same adapter up to float rounding.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import json
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from loraforge.core.errors import LoraforgeError
from loraforge.core.plugins import LAUNCHERS, OPTIMIZERS, RUNTIMES
from loraforge.training.runtime import load_torch_optimizer_state, torch_optimizer_state

if TYPE_CHECKING:
    from loraforge.training.config import TrainConfig
    from loraforge.training.loop import TrainResult


class WorkerFailed(LoraforgeError):
    """A worker of a multi-process run died or raised; the whole run was stopped."""



# ---- the runtimes the loop talks to ------------------------------------------------------------


class _Root(nn.Module):
    """The model as one module whose forward runs a function of it (the loss; under FSDP also the
    evaluation), so that DDP and FSDP see the forward that training runs: the loss may call parts of
    the model (the head on label positions only), which a wrapper around the bare model would not
    see: DDP would not synchronise them, FSDP would not gather the root's shards for them."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def _no_split_modules(self) -> list[str] | None:
        """The model's decoder layer classes: accelerate's FSDP plugin makes each layer one unit."""
        return getattr(self.model, "_no_split_modules", None)

    def forward(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(self.model, *args)


@RUNTIMES.register("accelerate")
class AccelerateRuntime:
    """A worker of a distributed run: accelerate's Accelerator does device placement, the process
    group, DDP or FSDP, and gradient sync across ranks (skipped on all but a window's last micro-batch)."""

    def __init__(self, config: TrainConfig):
        from accelerate import Accelerator
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType

        plugin = _fsdp_plugin(config)
        zero = _deepspeed_plugin(config)
        self.sharded = plugin is not None
        self.zero_stage = zero.zero_stage if zero is not None else 0
        if self.sharded:
            _check_optimizer(config, "FSDP", SHARD_SAFE_OPTIMIZERS)
        if zero is not None:
            _check_deepspeed(config)
        # cpu=True makes accelerate pick gloo when there is no GPU: it would otherwise see no device
        # to run on and fall back to one undistributed process. accelerate divides the loss by
        # grad_accum and skips the optimizer step until the last micro-batch of the window
        # (DeepSpeed's engine does both itself). Mixed precision stays ours (--precision, torch.autocast).
        cpu = not torch.cuda.is_available()
        self.accelerator = Accelerator(cpu=cpu, fsdp_plugin=plugin, deepspeed_plugin=zero,
                                       gradient_accumulation_steps=config.grad_accum, mixed_precision="no")
        if cpu and (plugin is not None or zero is not None):
            # accelerate turns FSDP and DeepSpeed on for accelerator devices only (in AcceleratorState
            # their branches sit under `not cpu`; on CPU the plugin is silently dropped and the run
            # would be DDP). torch's FSDP2 and DeepSpeed's CPU accelerator both run on gloo, so the
            # CPU run is switched over once gloo is up: from here on it is accelerate's own FSDP2 or
            # DeepSpeed path, the one a GPU run takes.
            state = self.accelerator.state
            if zero is not None:
                state.distributed_type = DistributedType.DEEPSPEED
                zero.set_mixed_precision("no")
                zero.select(_from_accelerator_state=True)
                state.deepspeed_plugins = zero
            else:
                state.distributed_type = DistributedType.FSDP
                state.fsdp_plugin = plugin
            # What AcceleratorState itself does when it switches: every later AcceleratorState() (DeepSpeed's
            # preparation makes some) copies PartialState's fields over its own.
            PartialState._shared_state["distributed_type"] = state.distributed_type
        if zero is not None:
            from transformers.integrations import unset_hf_deepspeed_config

            # Selecting the plugin registers its config with transformers, whose from_pretrained would then
            # build a ZeRO-3 model already partitioned (zero.Init); the adapter is attached to whole weights,
            # and the engine partitions them.
            unset_hf_deepspeed_config()
        if self.accelerator.gradient_accumulation_steps != config.grad_accum:
            raise LoraforgeError(f"the accelerate config sets gradient_accumulation_steps="
                                 f"{self.accelerator.gradient_accumulation_steps}: leave it out and use --grad-accum")
        self.device = self.accelerator.device  # this rank's GPU, or the CPU
        self.rank = self.accelerator.process_index
        self.world_size = self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        if config.num_processes not in (1, self.world_size):
            raise LoraforgeError(f"--num-processes {config.num_processes} inside a launcher that started "
                                 f"{self.world_size} processes: leave --num-processes out under `accelerate launch`")
        if zero is not None:
            _fill_deepspeed_config(zero, config, self.world_size)
        self.scale = float(self.world_size * config.grad_accum)
        self.wrapped: nn.Module | None = None
        self.params: list[nn.Parameter] = []  # the optimizer's parameters, in its order (the checkpoint's)
        self.group_indices: list[list[int]] = []  # their indices in that order, per param group
        self.loss_fn: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor] | None = None

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                loss_fn: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor], switches_trainable: bool = False
                ) -> tuple[Callable[[dict[str, torch.Tensor]], torch.Tensor], torch.optim.Optimizer]:
        """Wrap the model (DDP, or FSDP: its parameters become this rank's shards, and the optimizer's
        move with them) and hand back the loss of a batch. `switches_trainable`: the run freezes and
        unfreezes tensors as it goes (LISA), so some the wrapper knows get no gradient at a step."""
        routed = any(hasattr(m, "aux_loss") for m in model.modules())
        if self.zero_stage and (routed or switches_trainable):
            # DeepSpeed partitions flat buffers of the tensors that train, fixed when the engine is built.
            what = "a routed adapter (mixlora)" if routed else "a selector that switches the trained blocks (lisa)"
            raise LoraforgeError(f"{what} cannot train under DeepSpeed ZeRO: use data parallel or FSDP")
        if routed:
            if self.sharded:
                # FSDP reduce-scatters the gradients each rank has; ranks whose tokens chose other
                # experts would offer different sets, and the collective would not line up.
                raise LoraforgeError("a routed adapter (mixlora) cannot train under FSDP: the experts no token "
                                     "chose get no gradient on some ranks only; use data parallel (leave out --fsdp)")
        if routed or switches_trainable:
            from accelerate.utils import DistributedDataParallelKwargs

            # A routed adapter (MixLoRA) leaves the experts no token chose without a gradient, and LISA
            # the blocks it froze: DDP would otherwise wait for those gradients forever. Not the
            # default: it costs a graph walk per step.
            self.accelerator.ddp_handler = DistributedDataParallelKwargs(find_unused_parameters=True)
        if self.sharded or self.zero_stage == 3:
            from loraforge.quant.nf4 import codes_as_parameters

            codes_as_parameters(model)  # a 4-bit base (--quant) is then sharded in 4 bits
        self.loss_fn = loss_fn
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        sizes = [len(group["params"]) for group in optimizer.param_groups]
        self.group_indices = [list(range(sum(sizes[:g]), sum(sizes[:g + 1]))) for g in range(len(sizes))]
        root = _Root(model)
        self.wrapped, optimizer = self.accelerator.prepare(root, optimizer)
        if self.zero_stage == 3:
            _gather_for_root(root, model)
        # The loop gets a method, not the DDP module itself, so that `finish` holds its last reference.
        return self._loss, optimizer

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        assert self.wrapped is not None, "prepare() first"
        return self.wrapped(self.loss_fn, batch)

    def seed_workers(self, seed: int) -> None:
        """Rank 0 keeps the single-process stream; the others draw their own dropout masks."""
        if self.rank:
            torch.manual_seed(seed + self.rank)

    def accumulate(self) -> contextlib.AbstractContextManager[None]:
        return self.accelerator.accumulate(self.wrapped)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss * self.scale)

    def sum(self, values: list[float]) -> list[float]:
        """Sum over ranks, in float64 so that label and token counts stay exact."""
        tensor = torch.tensor(values, dtype=torch.float64, device=self.accelerator.device)
        torch.distributed.all_reduce(tensor)
        return tensor.tolist()

    def clip_grad_norm(self, params: Sequence[nn.Parameter], max_norm: float) -> torch.Tensor:
        return self.accelerator.clip_grad_norm_(params, max_norm)

    def rng_states(self) -> list[torch.Tensor]:
        """Every rank's torch RNG state, gathered on all ranks (a checkpoint keeps them all)."""
        states: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(states, torch.get_rng_state())
        return states

    def run(self, model: nn.Module, fn: Callable[[nn.Module], Any]) -> Any:
        """fn(model) outside the training step (evaluation). Under FSDP it runs inside the root's
        forward, which gathers the shards the root holds (embeddings, final norm, head)."""
        if (self.sharded or self.zero_stage == 3) and self.wrapped is not None:
            return self.wrapped(fn)
        return fn(model)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
        """The optimizer's state as whole tensors ("state.{index}.{name}", in the order of the optimizer
        the loop built) and its param groups, gathered on every rank: a DDP run's form for any engine."""
        if not self.zero_stage:
            tensors, groups = torch_optimizer_state(optimizer)
            return full_tensors(tensors), groups
        from deepspeed.utils import safe_get_full_optimizer_state

        inner = optimizer.optimizer.optimizer  # accelerate's wrapper > DeepSpeed's ZeRO optimizer > AdamW
        step = next((s["step"] for s in inner.state.values() if "step" in s), None)
        tensors = {}
        if step is not None:  # before the first step there is no state, as torch's AdamW has none
            for index, param in enumerate(self.params):
                for name in ADAM_MOMENTS:
                    tensors[f"state.{index}.{name}"] = safe_get_full_optimizer_state(param, name)
                tensors[f"state.{index}.step"] = step.clone()
        groups = [{**{k: v for k, v in group.items() if k != "params"}, "params": indices}
                  for group, indices in zip(inner.param_groups, self.group_indices)]
        return tensors, groups

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                             groups: list[dict]) -> None:
        """Undo `optimizer_state`: every rank takes its part of the whole tensors it read."""
        if not self.zero_stage:
            load_torch_optimizer_state(optimizer, tensors, groups, shard_like)
            return
        from deepspeed.utils import safe_set_full_optimizer_state

        step = tensors.get("state.0.step")
        if step is None:
            return  # written before the first step: nothing to restore
        zero = optimizer.optimizer
        for flat in zero_partitions(zero):
            # One count per flat partition (every parameter has stepped alike), and moments that the
            # per-parameter API writes into: ZeRO creates them only at its first step.
            moments = {name: torch.zeros_like(flat) for name in ADAM_MOMENTS}
            zero.optimizer.state[flat] = {"step": step.clone(), **moments}
        if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2 link each parameter to its slice
            zero._lazy_init_hp_params_optimizer_state()
        for index, param in enumerate(self.params):
            for name in ADAM_MOMENTS:
                safe_set_full_optimizer_state(param, tensors[f"state.{index}.{name}"], name)

    def full_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return full_tensors(tensors)

    def assign_whole(self, target: torch.Tensor, tensor: torch.Tensor) -> None:
        assign_whole(target, tensor)

    def whole_adapter(self, model: nn.Module) -> contextlib.AbstractContextManager[None]:
        return whole_adapter(model)

    def bytes_held(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
        return bytes_held(model, optimizer)

    def finish(self) -> None:
        # DDP's Reducer holds the process group. Were it freed after the group is destroyed, it would
        # drop the group's last reference while holding the GIL, and the group's destructor joins
        # gloo threads that may need the GIL to free their last work's tensors: a deadlock, seen in
        # about one run in seven. Freed first, the Reducer leaves the group to destroy_process_group,
        # whose binding releases the GIL before it joins.
        self.wrapped = None
        self.accelerator.free_memory()
        gc.collect()
        self.accelerator.end_training()


# ---- FSDP: which runs, and whole tensors from shards -------------------------------------------

# Optimizers whose update of an element reads no other row of its tensor, so that a shard (FSDP2
# splits tensors by rows, dim 0) is updated as the whole tensor would be: AdamW and LoRA+ work
# element by element, ALLoRA scales each row by its own norm. LoRA-Pro reads whole A and B.
SHARD_SAFE_OPTIMIZERS = ("adamw", "lora-plus", "allora")


def _fsdp_plugin(config: TrainConfig) -> Any:
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


def _check_optimizer(config: TrainConfig, engine: str, safe_optimizers: tuple[str, ...]) -> None:
    """Refuse an optimizer whose update would compute something else on the engine's shards.
    (Selectors, LISA's switching of trained blocks, GLAD's second pass and a 4-bit base run under
    FSDP as they do under DDP: tests/test_distributed.py.)"""
    if OPTIMIZERS.aliases.get(config.optimizer, config.optimizer) not in safe_optimizers:
        raise LoraforgeError(f"{engine} does not support --optimizer {config.optimizer} (its update reads whole rows "
                             f"or matrices; {', '.join(safe_optimizers)} work on shards): leave it out, or train "
                             f"data parallel")


# ---- DeepSpeed ZeRO ----------------------------------------------------------------------------

# ZeRO flattens each param group into one buffer and hands the optimizer slices of it that cut
# across rows and tensors: only an update that works element by element stays the same.
ZERO_SAFE_OPTIMIZERS = ("adamw", "lora-plus")
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


def _deepspeed_plugin(config: TrainConfig) -> Any:
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


def _check_deepspeed(config: TrainConfig) -> None:
    _check_optimizer(config, "DeepSpeed ZeRO", ZERO_SAFE_OPTIMIZERS)
    if config.regularizer:
        # The engine steps inside the window's last backward; a regulariser's second pass would step again.
        raise LoraforgeError(f"--regularizer {config.regularizer} runs a second backward per step, and DeepSpeed's "
                             f"engine steps inside the first: use data parallel or FSDP")


def _fill_deepspeed_config(plugin: Any, config: TrainConfig, world_size: int) -> None:
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


def zero_partitions(zero: Any) -> list[torch.Tensor]:
    """This rank's flat fp32 partitions of a ZeRO optimizer, one per param group: what its AdamW
    updates and keys its state by. Any other optimizer (or None) has none."""
    return (getattr(zero, "fp32_partitioned_groups_flat", None)  # ZeRO-3
            or getattr(zero, "single_partition_of_fp32_groups", []))  # ZeRO-1/2


def _gather_for_root(root: nn.Module, model: nn.Module) -> None:
    """ZeRO-3 gathers a module's parameters around that module's forward. The loss reads the head's
    weight without calling the head (it applies it to label positions only), so the root, whose
    forward runs the whole loss, gathers it too."""
    from deepspeed.runtime.zero import register_external_parameter

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for param in head.parameters() if head is not None else ():
        register_external_parameter(root, param)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


@torch.no_grad()
def full_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The whole tensors. A DTensor (FSDP's shard of a parameter or of its optimizer state) is
    gathered from every rank, so under FSDP every rank calls this with the same keys in the same
    order; any other tensor is whole already and comes back as it is."""
    if not _distributed():
        return tensors
    from torch.distributed.tensor import DTensor

    partitioned = [v for v in tensors.values() if hasattr(v, "ds_id")]  # DeepSpeed ZeRO-3's parameters
    if partitioned:
        from deepspeed.runtime.zero import GatheredParameters

        with GatheredParameters(partitioned):
            gathered = {k: v.detach().clone() for k, v in tensors.items() if hasattr(v, "ds_id")}
        tensors = {**tensors, **gathered}
    return {k: v.full_tensor().detach() if isinstance(v, DTensor) else v for k, v in tensors.items()}


@torch.no_grad()
def assign_whole(target: torch.Tensor, tensor: torch.Tensor) -> None:
    """Write `tensor` (whole, as a checkpoint holds it; every rank has read the same) into `target`,
    whatever holds it: FSDP's shard, DeepSpeed's partition and fp32 master copy, or the tensor itself."""
    if hasattr(target, "ds_id") or hasattr(target, "_hp_mapping"):
        from deepspeed.runtime.zero import GatheredParameters
        from deepspeed.utils import safe_set_full_fp32_param

        with GatheredParameters([target], modifier_rank=0, enabled=hasattr(target, "ds_id")):
            target.copy_(tensor)  # the model's copy (ZeRO-3: repartitioned on leaving)
        safe_set_full_fp32_param(target, tensor)  # the optimizer's, which the next step starts from
        return
    target.copy_(shard_like(target, tensor))


def shard_like(target: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` (whole, as a checkpoint holds it) in the form `target` takes: this rank's shard
    under FSDP, cut locally since every rank has read the same file; else `tensor` itself."""
    if not _distributed():
        return tensor
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(target, DTensor):
        return tensor
    return distribute_tensor(tensor.to(target.device), target.device_mesh, target.placements, src_data_rank=None)


@contextlib.contextmanager
def whole_adapter(model: nn.Module) -> Iterator[None]:
    """For the duration, the model's adapter tensors are whole, so that code written for a plain
    model (`save_adapter`, a layer's `lora_factors`) reads them unchanged. Under FSDP every rank
    enters it (the gather is a collective) and gets its own whole copy for that while; nothing runs
    the model meanwhile, so FSDP never sees its shards swapped out. Elsewhere it changes nothing."""
    from loraforge.adapters.inject import adapter_state_dict, tensors_replaced

    state = adapter_state_dict(model)
    whole = full_tensors(state)
    with tensors_replaced(model, {key: whole[key] for key in state if whole[key] is not state[key]}):
        yield


def bytes_held(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of weights (parameters and buffers) and optimizer state this rank holds: what FSDP and
    ZeRO divide. A shard counts its local part; ZeRO also holds an fp32 copy of its partition."""
    def local(tensor: torch.Tensor) -> int:
        if hasattr(tensor, "ds_tensor"):  # ZeRO-3: the parameter's own storage is released
            tensor = tensor.ds_tensor
        elif hasattr(tensor, "to_local"):  # FSDP's DTensor
            tensor = tensor.to_local()
        return tensor.numel() * tensor.element_size()

    total = sum(local(t) for t in (*model.parameters(), *model.buffers()))
    # Inside accelerate's wrapper: DeepSpeed's ZeRO optimizer, whose fp32 copy counts too, if any.
    total += sum(local(t) for t in zero_partitions(getattr(optimizer, "optimizer", None)))
    return total + sum(local(v) for state in optimizer.state.values() for v in state.values()
                       if isinstance(v, torch.Tensor))



# ---- starting the workers ----------------------------------------------------------------------

@LAUNCHERS.register("elastic")
def launch(config: TrainConfig, worker: Callable[[], Any], model: nn.Module | None, tokenizer: Any) -> TrainResult:
    """Run `worker` (the training run itself) in config.num_processes forked processes, then hand
    back what an in-process run would: the trained model, its tokenizer and the logged metrics.

    This is what `accelerate launch` and accelerate's notebook_launcher do (torch elastic's agent,
    a static rendezvous on this machine, fork), without the latter's device banner: each worker then
    builds its Accelerator from the environment the agent gives it. The agent watches the workers
    and, when one exits abnormally, ends the others and reports which rank failed."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from loraforge.training.checkpoint import CHECKPOINT_DIR
    from loraforge.training.loop import TrainResult, read_metrics

    if torch.cuda.is_initialized():
        raise LoraforgeError("CUDA is already in use in this process, and forked workers cannot use it: start the run "
                             "with `accelerate launch -m loraforge train ...` (or before anything touches the GPU)")
    out = os.path.abspath(config.out)
    endpoint = f"127.0.0.1:{_free_port()}"
    engine = ", FSDP" if config.fsdp else f", DeepSpeed ZeRO-{config.zero_stage}" if config.zero_stage else ""
    backend = "NCCL" if torch.cuda.is_available() else "gloo, CPU"
    print(f"training on {config.num_processes} processes{engine} ({backend})")
    launch_config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=config.num_processes, run_id="loraforge",
                                 rdzv_backend="static", rdzv_endpoint=endpoint, rdzv_configs={"rank": 0},
                                 max_restarts=0, monitor_interval=0.1, start_method="fork")
    # A forked worker that garbage-collects a native object it inherited (the rendezvous store of an
    # earlier run in this process) joins threads that fork did not copy, and hangs. So: free this
    # process's garbage now, while its threads exist, and keep the workers' collector off the rest.
    gc.collect()
    gc.freeze()
    try:
        elastic_launch(launch_config, _run_quietly(worker))()
    except ChildFailedError as exc:
        raise WorkerFailed(describe_failure(exc.failures, os.path.join(out, CHECKPOINT_DIR))) from None
    except SignalException:
        # Ctrl-C (or a SIGTERM) reached this process; the agent has already ended the workers.
        raise KeyboardInterrupt from None
    finally:
        gc.unfreeze()

    model, tokenizer = _trained_model(config, Path(out), model, tokenizer)
    return TrainResult(model, tokenizer, Path(out), read_metrics(Path(out), upto=config.steps))


# What a collective raises in the ranks that are still alive when a peer has gone.
PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "DistBackendError")
# How long such a rank waits before it fails in turn: the agent polls every 0.1 s, so it sees the
# rank that died first and reports that one as the cause; the waiting ranks are then ended.
PEER_GONE_GRACE_S = 5.0


def _run_quietly(worker: Callable[[], Any]) -> Callable[[], None]:
    """The worker as the agent runs it: no return value (it would travel back through a pipe; the
    parent reads the run's files instead), and a rank whose peer vanished fails only after the
    grace period, so that the report names the rank that died rather than the ones it left behind."""
    def run() -> None:
        try:
            worker()
        except Exception as exc:
            if any(text in f"{type(exc).__name__}: {exc}" for text in PEER_GONE):
                time.sleep(PEER_GONE_GRACE_S)
            raise
    return run


def _free_port() -> int:
    """A port no other run on this machine uses, so that two runs can train side by side."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def describe_failure(failures: dict[int, Any], checkpoint: str) -> str:
    """One paragraph a user can act on: which rank failed and how, what happened to the others,
    and what is left on disk. The cause is the rank killed by a signal or that raised an error of
    its own; ranks whose collective broke because a peer vanished only followed it."""
    def error_text(failure: Any) -> str:
        # torch elastic's error file holds {"message": "Type: text", "extraInfo": {traceback}}.
        message = failure.message.get("message", "") if isinstance(failure.message, dict) else failure.message
        return (message or "").strip()

    def reason(failure: Any) -> str:
        if failure.exitcode < 0:
            try:
                return f"killed by {signal.Signals(-failure.exitcode).name}"
            except ValueError:
                return f"killed by signal {-failure.exitcode}"
        text = error_text(failure)
        return f"exit code {failure.exitcode}: {text}" if text else f"exit code {failure.exitcode}"

    def followed(failure: Any) -> bool:
        return failure.exitcode > 0 and any(text in error_text(failure) for text in PEER_GONE)

    ranks = sorted(failures)
    causes = [r for r in ranks if not followed(failures[r])] or ranks
    first = causes[0]
    text = f"worker rank {first} failed ({reason(failures[first])})"
    others = [r for r in ranks if r != first]
    if others:
        text += "; then " + ", ".join(
            f"rank {r} ({'the same error' if reason(failures[r]) == reason(failures[first]) else reason(failures[r])})"
            for r in others)
    text += ". The whole run was stopped."
    state = os.path.join(checkpoint, "trainer_state.json")
    if os.path.isfile(state):
        with open(state) as f:
            step = json.load(f)["step"]
        text += f" The last checkpoint ({checkpoint}, step {step}) is intact: run again with --resume to continue."
    else:
        text += " No checkpoint had been written yet (set --save-every to keep progress)."
    return text


def _trained_model(config: TrainConfig, out: Path, model: nn.Module | None, tokenizer: Any) -> tuple[nn.Module, Any]:
    """The caller's model (or a freshly loaded base) carrying the adapter the workers wrote."""
    from safetensors.torch import load_file

    from loraforge.adapters.inject import adapter_state_dict, is_attached
    from loraforge.adapters.io import load_adapter, load_pretrained
    from loraforge.training.checkpoint import CHECKPOINT_DIR

    if model is None:
        return load_pretrained(config.model, out / "adapter", task=config.task, num_labels=config.num_labels)
    if not is_attached(model):
        # The workers attached and initialised their own copies; the export is what they trained,
        # written for the untouched base this model still is (PiSSA's residual folded back, LoRA-XS's
        # frozen factors multiplied in), so it is loaded rather than the native tensors.
        load_adapter(model, out / "adapter", trainable=True)
        return model.eval(), tokenizer
    # The caller attached the adapter: the checkpoint holds its tensors exactly as trained.
    own = adapter_state_dict(model)
    with torch.no_grad():
        for key, tensor in load_file(str(out / CHECKPOINT_DIR / "trainable.safetensors")).items():
            own[key].copy_(tensor)
    model.eval()
    return model, tokenizer
