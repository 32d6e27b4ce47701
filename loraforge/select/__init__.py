"""Choosing where adapters go and which layers train (`--select NAME`), one file per method.

A selector acts at two moments of a run, and each method overrides the one it needs:

    attach(model, config, search) -> None     put the adapter on the model (default: `inject.attach`);
                                              a search method (Flexora, DiffoRA, CoLoRA) first runs its
                                              search on `search`'s batches, then attaches only what it
                                              chose and writes the decision into the adapter config
                                              (explicit target paths, `rank_pattern`, `provenance["selection"]`),
                                              so a saved adapter reloads, in loraforge or PEFT, with the
                                              same structure.
    before_step(step, model, optimizer) -> {} called at the start of every optimizer step (LISA
                                              switches the trainable layers and drops the optimizer
                                              state of the ones it freezes); returns metrics to log.

Shared here: the transformer blocks of a model (`find_blocks`), a gate hook that scales one adapter
layer's update (`gate_adapter`), and `SearchData` (training and validation batches plus the loss).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from loraforge.adapters.inject import attach, tensors_replaced
from loraforge.core.config import AdapterConfig
from loraforge.core.errors import LoraforgeError
from loraforge.core.plugins import SELECTORS
from loraforge.methods.base import adapter_layers
from loraforge.training.data import BatchPlan, collate
from loraforge.training.loss import mean_batch_loss

Batch = dict[str, torch.Tensor]


@dataclass
class SearchData:
    """Batches a search reads, and the mean loss of one batch."""

    train: list[Batch]
    val: list[Batch]
    loss: Callable[[nn.Module, Batch], torch.Tensor]


class Selector:
    switches_trainable = False  # True: before_step freezes and unfreezes tensors during the run (LISA)
    steps = 0  # batches a search reads (Flexora, DiffoRA, CoLoRA); 0: the selector does not search

    def attach(self, model: nn.Module, config: AdapterConfig, search: SearchData | None) -> None:
        attach(model, config)

    def attach_for_run(self, model: nn.Module, config: AdapterConfig, train_data: Any, eval_data: Any, *,
                       batch_size: int, pad_id: int, task: str, seed: int) -> None:
        """What the trainer calls: `attach` with `steps` search batches of the run's data (`search_data`)."""
        search = search_data(train_data, eval_data, batch_size, pad_id, task, seed, self.steps) if self.steps else None
        self.attach(model, config, search)

    def before_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return {}


register_selector = SELECTORS.register


def find_blocks(model: nn.Module) -> tuple[str, list[nn.Module]]:
    """The transformer blocks (`model.layers`, `transformer.h`, `encoder.layer`, ...): the longest
    ModuleList whose entries are all of one class. Returns its path and its blocks."""
    best: tuple[str, list[nn.Module]] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(m) for m in module}) == 1:
            if best is None or len(module) > len(best[1]):
                best = (name, list(module))
    if best is None:
        raise LoraforgeError(f"{type(model).__name__} has no list of transformer blocks to select from")
    return best


def block_of(path: str, blocks_path: str) -> int | None:
    """Block index of a module path under `blocks_path` ("model.layers.3.mlp" -> 3), else None."""
    prefix = blocks_path + "."
    if not path.startswith(prefix):
        return None
    return int(path[len(prefix):].split(".", 1)[0])


def gate_adapter(layer: nn.Module, gate: Callable[[], torch.Tensor]) -> torch.utils.hooks.RemovableHandle:
    """Scale the layer's update by gate(): h = base(x) + w * delta(x), for any parametrisation,
    written as (1 - w) base(x) + w h so that the layer's own forward (fused or not) is untouched."""
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        w = gate()
        return output * w + module.base_layer(args[0]) * (1 - w)

    return layer.register_forward_hook(hook)


def adapter_paths_by_block(model: nn.Module) -> dict[int, list[str]]:
    """Adapter layer paths grouped by the block they sit in."""
    blocks_path, _ = find_blocks(model)
    grouped: dict[int, list[str]] = {}
    for path in adapter_layers(model):
        index = block_of(path, blocks_path)
        if index is not None:
            grouped.setdefault(index, []).append(path)
    return grouped


def search_data(train_data: Any, eval_data: Any, batch_size: int, pad_id: int, task: str, seed: int,
                steps: int) -> SearchData:
    """`steps` training batches and up to `steps` validation batches, seeded. Validation is
    `eval_data` when given, else every fifth training row (held out from the search's training
    batches only: the final training run sees all rows)."""
    rows = list(range(len(train_data)))
    if eval_data is None:
        val_source, val_rows = train_data, [i for i in rows if i % 5 == 4]
        rows = [i for i in rows if i % 5 != 4]
    else:
        val_source, val_rows = eval_data, list(range(len(eval_data)))
    if not rows or not val_rows:
        raise LoraforgeError("a selection search needs training and validation rows: pass more data or --eval-data")

    def batches(source: Any, picked: list[int], count: int) -> list[Batch]:
        plan = BatchPlan(len(picked), min(batch_size, len(picked)), seed=seed)
        return [collate([source[picked[i]] for i in plan.indices(k)], pad_id) for k in range(count)]

    n_val = min(steps, max(1, len(val_rows) // max(1, batch_size)))
    return SearchData(batches(train_data, rows, steps), batches(val_source, val_rows, n_val),
                      functools.partial(mean_batch_loss, task=task))


def gated_search(model: nn.Module, search: SearchData, gates: dict[str, Callable[[], torch.Tensor]],
                 gate_params: list[torch.Tensor], steps: int, lr: float, gate_lr: float, order: int = 1) -> None:
    """The bi-level search of Flexora and DiffoRA: per step one AdamW step of the adapter on a
    training batch, then one Adam step of the gate parameters on the next validation batch, each
    gate scaling its adapter layer's update (`gate_adapter`). The gate gradient is first order
    (order=1, the validation loss at the current weights, as Flexora's reference code) or the
    one-step unrolled hyper-gradient (order=2, `unrolled_gate_grads`, the paper's equation).
    Trainable tensors outside the adapter layers (a classification head) are put back afterwards."""
    if order not in (1, 2):
        raise LoraforgeError(f"--select-order must be 1 (first-order gate gradient) or 2 (unrolled), got {order}")
    layers = adapter_layers(model)
    handles = [gate_adapter(layers[path], gate) for path, gate in gates.items()]
    adapter = [p for p in model.parameters() if p.requires_grad]
    # A trainable head (modules_to_save) learns during the search too; the real run starts it afresh.
    in_layers = {id(p) for layer in layers.values() for p in layer.parameters()}
    heads = [(p, p.detach().clone()) for p in adapter if id(p) not in in_layers]
    weights_opt = torch.optim.AdamW(adapter, lr=lr)
    gates_opt = torch.optim.Adam(gate_params, lr=gate_lr)
    was_training = model.training
    model.train()
    try:
        for step in range(steps):
            train_batch, val_batch = search.train[step % len(search.train)], search.val[step % len(search.val)]
            search.loss(model, train_batch).backward()
            weights_opt.step()
            weights_opt.zero_grad(set_to_none=True)
            gates_opt.zero_grad(set_to_none=True)
            if order == 1:
                search.loss(model, val_batch).backward()
            else:
                for gate, grad in zip(gate_params, unrolled_gate_grads(model, search, adapter, gate_params,
                                                                       train_batch, val_batch, lr)):
                    gate.grad = grad
            gates_opt.step()
            gates_opt.zero_grad(set_to_none=True)
            weights_opt.zero_grad(set_to_none=True)
    finally:
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for param, start in heads:
                param.copy_(start)
        model.train(was_training)


def unrolled_gate_grads(model: nn.Module, search: SearchData, weights: list[torch.Tensor],
                        gate_params: list[torch.Tensor], train_batch: Batch, val_batch: Batch,
                        eta: float) -> list[torch.Tensor]:
    """d/d alpha of L_val(theta - eta * grad_theta L_train(theta, alpha), alpha): Flexora's (and
    DARTS') one-step unroll, exact through the second-order term, with eta the adapter's learning
    rate (the step an SGD update would take; the search's AdamW step is not differentiated)."""
    from loraforge.methods.lora import plain_autograd  # the fused LoRA node is once-differentiable

    with plain_autograd(model):
        grads = torch.autograd.grad(search.loss(model, train_batch), weights, create_graph=True, allow_unused=True)
        stepped = [w if g is None else w - eta * g for w, g in zip(weights, grads)]
        by_id = dict(zip(map(id, weights), stepped))
        by_key = {key: by_id[id(p)] for key, p in model.named_parameters(remove_duplicate=False) if id(p) in by_id}
        with tensors_replaced(model, by_key):
            val_loss = search.loss(model, val_batch)
        grads = torch.autograd.grad(val_loss, gate_params, allow_unused=True)
    return [torch.zeros_like(a) if g is None else g for a, g in zip(gate_params, grads)]
