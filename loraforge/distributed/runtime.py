"""The runtime a worker of a multi-process run talks to: `AccelerateRuntime`, registered as
"accelerate" in `core.plugins.RUNTIMES`. It builds accelerate's Accelerator for DDP, FSDP
(`fsdp.py`) or DeepSpeed ZeRO (`zero.py`) and answers the loop's `Runtime` calls for whichever
engine runs, so the loop never asks which one it is.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from loraforge.core.errors import LoraforgeError
from loraforge.core.plugins import OPTIMIZERS, RUNTIMES
from loraforge.core.rng import rng_state
from loraforge.distributed import _compat, fsdp, zero
from loraforge.training.runtime import load_torch_optimizer_state, torch_optimizer_state

if TYPE_CHECKING:
    from loraforge.training.config import TrainConfig

Loss = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]


class _Root(nn.Module):
    """The model as one module whose forward runs a function of it (the loss; under FSDP also the
    evaluation), so that DDP and FSDP see the forward that training runs: the loss may call parts of
    the model (the head on label positions only), which a wrapper around the bare model would not
    see: DDP would not synchronise them, FSDP would not gather the root's shards for them."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        _compat.show_layer_classes(self, model)  # FSDP makes each decoder layer one unit

    def forward(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(self.model, *args)


@RUNTIMES.register("accelerate")
class AccelerateRuntime:
    """A worker of a distributed run: accelerate's Accelerator does device placement, the process
    group, DDP or FSDP, and gradient sync across ranks (skipped on all but a window's last micro-batch)."""

    def __init__(self, config: TrainConfig):
        from accelerate import Accelerator

        plugin = fsdp.fsdp_plugin(config)
        zero_plugin = zero.deepspeed_plugin(config)
        self.sharded = plugin is not None
        self.zero_stage = zero_plugin.zero_stage if zero_plugin is not None else 0
        if self.sharded:
            _refuse_optimizer(config, "FSDP", fsdp.SHARD_SAFE_OPTIMIZERS)
        if zero_plugin is not None:
            _refuse_optimizer(config, "DeepSpeed ZeRO", zero.ZERO_SAFE_OPTIMIZERS)
            zero.refuse_second_backward(config)
        # cpu=True makes accelerate pick gloo when there is no GPU: it would otherwise see no device
        # to run on and fall back to one undistributed process. accelerate divides the loss by
        # grad_accum and skips the optimizer step until the last micro-batch of the window
        # (DeepSpeed's engine does both itself). Mixed precision stays ours (--precision, torch.autocast).
        cpu = not torch.cuda.is_available()
        self.accelerator = Accelerator(cpu=cpu, fsdp_plugin=plugin, deepspeed_plugin=zero_plugin,
                                       gradient_accumulation_steps=config.grad_accum, mixed_precision="no")
        if cpu and (plugin is not None or zero_plugin is not None):
            _compat.enable_sharding_on_cpu(self.accelerator, plugin, zero_plugin)
        if zero_plugin is not None:
            # Else from_pretrained would build a ZeRO-3 model already partitioned; the adapter is
            # attached to whole weights, and the engine partitions them.
            _compat.forget_hf_deepspeed_config()
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
        if zero_plugin is not None:
            zero.fill_deepspeed_config(zero_plugin, config, self.world_size)
        self.scale = float(self.world_size * config.grad_accum)
        self.wrapped: nn.Module | None = None
        self.params: list[nn.Parameter] = []  # the optimizer's parameters, in its order (the checkpoint's)
        self.group_indices: list[list[int]] = []  # their indices in that order, per param group
        self.loss_fn: Loss | None = None

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Loss,
                switches_trainable: bool = False
                ) -> tuple[Callable[[dict[str, torch.Tensor]], torch.Tensor], torch.optim.Optimizer]:
        """Wrap the model (DDP, or FSDP: its parameters become this rank's shards, and the optimizer's
        move with them) and hand back the loss of a batch. `switches_trainable`: the run freezes and
        unfreezes tensors as it goes (LISA), so some the wrapper knows get no gradient at a step."""
        routed = any(hasattr(m, "aux_loss") for m in model.modules())
        if self.zero_stage and (routed or switches_trainable):
            # DeepSpeed partitions flat buffers of the tensors that train, fixed when the engine is built.
            what = "a routed adapter (mixlora)" if routed else "a selector that switches the trained blocks (lisa)"
            raise LoraforgeError(f"{what} cannot train under DeepSpeed ZeRO: use data parallel or FSDP")
        if routed and self.sharded:
            # FSDP reduce-scatters the gradients each rank has; ranks whose tokens chose other
            # experts would offer different sets, and the collective would not line up.
            raise LoraforgeError("a routed adapter (mixlora) cannot train under FSDP: the experts no token "
                                 "chose get no gradient on some ranks only; use data parallel (leave out --fsdp)")
        if routed or switches_trainable:
            # A routed adapter (MixLoRA) leaves the experts no token chose without a gradient, and LISA
            # the blocks it froze: DDP would otherwise wait for those gradients forever. Not the
            # default: it costs a graph walk per step.
            _compat.let_ddp_find_unused_parameters(self.accelerator)
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
            zero.gather_for_root(root, model)
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

    def rng_states(self) -> list[dict[str, torch.Tensor]]:
        """Every rank's RNG states (CPU, and its GPU's), gathered on all ranks (a checkpoint keeps them all)."""
        states: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(states, rng_state(self.device))
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
        if self.zero_stage:
            # accelerate's wrapper holds DeepSpeed's ZeRO optimizer.
            return zero.optimizer_state(optimizer.optimizer, self.params, self.group_indices)
        tensors, groups = torch_optimizer_state(optimizer)
        return self.full_tensors(tensors), groups

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                             groups: list[dict]) -> None:
        """Undo `optimizer_state`: every rank takes its part of the whole tensors it read."""
        if self.zero_stage:
            zero.load_optimizer_state(optimizer.optimizer, self.params, tensors)
        else:
            load_torch_optimizer_state(optimizer, tensors, groups, fsdp.shard_like)

    def full_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The whole tensors, from FSDP's shards and ZeRO-3's partitions (a collective: every rank
        calls it with the same keys in the same order); any other tensor comes back as it is."""
        return fsdp.whole_tensors(zero.gathered(tensors))

    @torch.no_grad()
    def assign_whole(self, target: torch.Tensor, tensor: torch.Tensor) -> None:
        """Write `tensor` (whole, as a checkpoint holds it; every rank has read the same) into `target`,
        whatever holds it: FSDP's shard, DeepSpeed's partition and fp32 master copy, or the tensor itself."""
        if _compat.held_by_zero(target):
            zero.assign_whole(target, tensor)
        else:
            target.copy_(fsdp.shard_like(target, tensor))

    @contextlib.contextmanager
    def whole_adapter(self, model: nn.Module) -> Iterator[None]:
        """For the duration, the model's adapter tensors are whole, so that code written for a plain
        model (`save_adapter`, a layer's `lora_factors`) reads them unchanged. Under FSDP every rank
        enters it (the gather is a collective) and gets its own whole copy for that while; nothing runs
        the model meanwhile, so FSDP never sees its shards swapped out. Elsewhere it changes nothing."""
        from loraforge.adapters.inject import adapter_state_dict, tensors_replaced

        state = adapter_state_dict(model)
        whole = self.full_tensors(state)
        with tensors_replaced(model, {key: whole[key] for key in state if whole[key] is not state[key]}):
            yield

    def bytes_held(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
        """Bytes of weights (parameters and buffers) and optimizer state this rank holds: what FSDP and
        ZeRO divide. A shard counts its local part; ZeRO also holds an fp32 copy of its partition."""
        def local(tensor: torch.Tensor) -> int:
            tensor = fsdp.local_shard(_compat.zero3_local(tensor))
            return tensor.numel() * tensor.element_size()

        total = sum(local(t) for t in (*model.parameters(), *model.buffers()))
        # Inside accelerate's wrapper: DeepSpeed's ZeRO optimizer, whose fp32 copy counts too, if any.
        total += sum(local(t) for t in _compat.zero_partitions(getattr(optimizer, "optimizer", None)))
        return total + sum(local(v) for state in optimizer.state.values() for v in state.values()
                           if isinstance(v, torch.Tensor))

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


def _refuse_optimizer(config: TrainConfig, engine: str, safe_optimizers: tuple[str, ...]) -> None:
    """Refuse an optimizer whose update would compute something else on the engine's shards.
    (Selectors, LISA's switching of trained blocks, GLAD's second pass and a 4-bit base run under
    FSDP as they do under DDP: tests/test_distributed.py.)"""
    name = config.optimizer.name
    if OPTIMIZERS.aliases.get(name, name) not in safe_optimizers:
        raise LoraforgeError(f"{engine} does not support --optimizer {name} (its update reads whole rows "
                             f"or matrices; {', '.join(safe_optimizers)} work on shards): leave it out, or train "
                             f"data parallel")
