"""Data-based starts (LoRA-GA, EVA, LoRA-SB): feed an initialiser of `loraforge.methods.init` the
first batches of the training order and the trainer's loss."""

from __future__ import annotations

import functools
from typing import Iterator

import torch
from torch import nn

from loraforge.core.errors import AdapterError
from loraforge.core.registry import resolve_initializer
from loraforge.methods.init import InitContext, InitReport, run_data_init
from loraforge.training.data import BatchPlan, TokenizedDataset, collate
from loraforge.training.loss import mean_batch_loss


def initialize(model: nn.Module, data: TokenizedDataset, batches: int = 8, batch_size: int = 8, pad_id: int = 0,
               lr: float | None = None, seed: int = 0, progress: bool = True) -> InitReport:
    """Run the attached adapter's data-based initialiser on the first `batches` batches of `data`
    (`BatchPlan` order with `seed`). The result depends only on (model, data, batches, batch_size,
    seed). A weight-based start ran in attach(); its report is returned as it is."""
    config = getattr(model, "loraforge_config", None)
    if config is None:
        raise AdapterError("the model has no adapter: attach() one before initialize()")
    init = resolve_initializer(config)
    if init is None or not init.needs_data:
        return model.loraforge_init
    if not isinstance(data, TokenizedDataset) or len(data) == 0:
        raise AdapterError(f"init {init.name!r} starts from data: pass a non-empty loraforge.training.data.TokenizedDataset")
    if batches < 1 or batch_size < 1:
        raise AdapterError(f"batches and batch_size must be at least 1, got {batches} and {batch_size}")
    device = next(model.parameters()).device

    def batch_source() -> Iterator[dict[str, torch.Tensor]]:
        plan = BatchPlan(len(data), batch_size, seed=seed)
        for k in range(batches):
            batch = collate([data[i] for i in plan.indices(k)], pad_id)
            yield {key: value.to(device) for key, value in batch.items()}

    ctx = InitContext(config, device, batch_source, functools.partial(mean_batch_loss, task=data.task), batches, lr,
                      progress)
    return run_data_init(model, ctx, seed)
