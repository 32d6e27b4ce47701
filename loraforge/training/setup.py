"""Everything a run does before its first step, `build_run(config) -> Run`: the model and its
adapter (a selector's search, a data-based start), the speed options, the optimizer and
regulariser, the runtime's wrapping, a resumed run's checkpoint and the batches from its step on.
`loop.fit(run)` takes it from there."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

from loraforge.adapters.inject import attach, is_attached, trainable_parameters
from loraforge.adapters.io import count_parameters
from loraforge.core.config import AdapterConfig
from loraforge.core.errors import LoraforgeError
from loraforge.core.files import atomic_write_text, recover
from loraforge.core.plugins import REGULARIZERS, SELECTORS
from loraforge.methods.init import needs_data
from loraforge.training.checkpoint import CHECKPOINT_DIR, load_checkpoint
from loraforge.training.components import make_optimizer, quantize
from loraforge.training.config import TrainConfig
from loraforge.training.data import TokenizedDataset, load_dataset, read_rows
from loraforge.training.initialize import initialize
from loraforge.training.loader import step_loader
from loraforge.training.loss import batch_loss
from loraforge.training.runtime import Runtime, must_launch, runtime_for
from loraforge.training.schedule import lr_at


@dataclass
class Run:
    """What `fit` needs: a built run, ready for its first step (`start`, > 0 when resumed)."""

    config: TrainConfig
    model: nn.Module  # the adapter attached, prepared by the runtime (DDP/FSDP/ZeRO wrap it in `loss_of`)
    tokenizer: Any
    runtime: Runtime
    optimizer: torch.optim.Optimizer
    loss_of: Callable[[dict[str, torch.Tensor]], torch.Tensor]  # a batch's summed loss, through the runtime's wrap
    params: list[nn.Parameter]  # the trainable ones as this rank holds them (FSDP: its shards)
    batches: DataLoader  # this rank's micro-batches of steps start..steps-1, collated on the CPU
    device: torch.device
    pad_id: int
    start: int = 0
    eval_data: TokenizedDataset | None = None
    selector: Any = None  # before_step(step, model, optimizer) -> metrics: which layers train
    regularizer: Any = None  # steer(params, recompute) -> metrics, between backward and clipping
    n_trainable: int = 0  # trainable parameters of the whole adapter, before any sharding
    setup_seconds: float = 0.0  # putting the adapter on: attach, a selector's search, a data-based init
    progress: bool = True

    @property
    def out(self) -> Path:
        return Path(self.config.out)


def build_run(config: TrainConfig, model: nn.Module | None = None, tokenizer: Any = None,
              train_data: TokenizedDataset | None = None, eval_data: TokenizedDataset | None = None,
              progress: bool = True) -> Run:
    """Build the run `config` describes, in this process. A model that already carries an adapter
    keeps training it (the demo's second phase); otherwise one is attached. Data may be passed in
    memory. Inside a launched worker the runtime is that worker's share of the run; `train` starts
    the workers of a --num-processes run."""
    config.validate()
    if must_launch(config):
        raise LoraforgeError(f"--num-processes {config.num_processes}: build_run runs in one process; call train(), "
                             f"which starts the workers, or start them with `accelerate launch`")
    runtime = runtime_for(config)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    if runtime.is_main:  # a run killed while it swapped its checkpoint in: the previous one is made whole
        recover(out / CHECKPOINT_DIR)
    torch.manual_seed(config.seed)

    if config.task == "classification" and config.num_labels is None and train_data is None and config.data:
        # The head's size comes from the data: read the labels before building the model.
        labels = [row["label"] for row in read_rows(config.data, task="classification", text_column=config.text_column,
                                                     label_column=config.label_column)]
        config = dataclasses.replace(config, num_labels=max(2, max(labels) + 1))
    if model is None:
        from loraforge.core.models import load_model

        model, tokenizer = load_model(config.model, task=config.task, num_labels=config.num_labels)
    if train_data is None:
        if config.data is None:
            raise LoraforgeError("no training data: pass --data FILE")
        train_data = load_dataset(config.data, tokenizer, task=config.task, max_length=config.max_length,
                                  text_column=config.text_column, label_column=config.label_column,
                                  num_labels=config.num_labels)
    if eval_data is None and config.eval_data:
        eval_data = load_dataset(config.eval_data, tokenizer, task=config.task, max_length=config.max_length,
                                 text_column=config.text_column, label_column=config.label_column,
                                 num_labels=config.num_labels)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if next(model.parameters()).device.type == "cpu":  # a model the caller placed stays where it is
        model.to(runtime.device)  # this process's GPU where there is one: adapter, search and data-based init run there
    setup_start = time.perf_counter()
    selector = None
    if config.select:
        selector = SELECTORS.build(config.select, lr=config.lr, seed=config.seed)
    if not is_attached(model) and selector is None:
        attach(model, config.adapter_config())
    elif not is_attached(model):
        attach_selected(model, selector, config, train_data, eval_data, pad_id, out)
    if needs_data(model):  # before the optimizer: EVA changes the layers' shapes
        initialize(model, train_data, batches=config.init_batches, batch_size=config.batch_size, pad_id=pad_id,
                   lr=lr_at(0, config), seed=config.seed, progress=progress)
    setup_seconds = time.perf_counter() - setup_start
    prepare_model(model, config)  # after the move: the 4-bit codes and their absmax tables are made on the device
    optimizer = make_optimizer(model, config.optimizer.name, config.lr, config.weight_decay, **config.optimizer.settings)
    regularizer = REGULARIZERS.build(config.regularizer) if config.regularizer else None

    runtime.seed_workers(config.seed)
    n_trainable = count_parameters(trainable_parameters(model))  # before ZeRO-3 leaves each rank a partition
    loss_of, optimizer = runtime.prepare(model, optimizer, lambda m, batch: batch_loss(m, batch, config.task),
                                         switches_trainable=selector is not None and selector.switches_trainable)
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]  # FSDP has replaced them by this rank's shards
    start = 0
    if config.resume and (out / CHECKPOINT_DIR).is_dir():
        start = load_checkpoint(out / CHECKPOINT_DIR, model, optimizer, config, runtime)
    elif config.resume and runtime.is_main:
        print(f"no checkpoint in {out}: starting from step 0")
    if runtime.is_main:
        atomic_write_text(out / "config.json", json.dumps(
            {"train": dataclasses.asdict(config), "adapter": model.loraforge_config.to_dict(),
             "init": dataclasses.asdict(model.loraforge_init) if model.loraforge_init else None}, indent=2) + "\n")
    return Run(config=config, model=model, tokenizer=tokenizer, runtime=runtime, optimizer=optimizer, loss_of=loss_of,
               params=params, batches=step_loader(train_data, config, runtime, start, pad_id, device), device=device,
               pad_id=pad_id, start=start, eval_data=eval_data, selector=selector, regularizer=regularizer,
               n_trainable=n_trainable, setup_seconds=setup_seconds, progress=progress)


def prepare_model(model: nn.Module, config: TrainConfig) -> None:
    """The speed and memory options that act on the model, after the adapter is attached and any
    data-based start has read the full-precision weights: 4-bit base, activation checkpointing,
    torch.compile. None of them changes what a step computes beyond NF4's rounding of the base."""
    if config.quant:
        quantize(model, config.quant)
    if config.grad_checkpoint:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise LoraforgeError(f"--grad-checkpoint: {type(model).__name__} does not support activation checkpointing")
        # Non-reentrant checkpointing: gradients reach the adapters without the inputs requiring grad.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.compile:
        model.base_model.compile()  # in place: parameter names, hence adapter keys, stay the same


def attach_selected(model: nn.Module, selector: Any, config: TrainConfig, train_data: TokenizedDataset,
                    eval_data: TokenizedDataset | None, pad_id: int, out: Path) -> None:
    """Attach the adapter through the selector. A resumed run attaches the structure its first
    run chose (out/config.json) instead of searching again."""
    saved = out / "config.json"
    if config.resume and (out / CHECKPOINT_DIR).is_dir() and saved.is_file():
        attach(model, AdapterConfig.from_dict(json.loads(saved.read_text())["adapter"]))
        return
    selector.attach_for_run(model, config.adapter_config(), train_data, eval_data, batch_size=config.batch_size,
                            pad_id=pad_id, task=config.task, seed=config.seed)
