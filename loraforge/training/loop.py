"""The training loop: one readable function, `train(config)`.

    for step in steps:                       # one optimizer step = batch_size x grad_accum rows
        for micro_batch in window(step):     # batch k of the data is a pure function of (seed, k)
            loss = sum of token losses / label tokens in the whole window
            loss.backward()
        clip, AdamW step, lr from warm-up + cosine
        log (progress bar, the --log sinks: metrics.jsonl, TensorBoard); checkpoint every save_every steps

Normalising by the label tokens of the whole window (not averaging per micro-batch) makes
batch 8 and batch 2 x grad-accum 4 the same optimisation. A checkpoint holds the trainable
tensors, AdamW's state and the RNG state, so `resume` continues to exactly the weights an
uninterrupted run reaches. Everything is safetensors + JSON, written atomically.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from loraforge.adapters.inject import attach, is_attached, trainable_parameters
from loraforge.adapters.io import count_parameters, save_adapter
from loraforge.core.config import AdapterConfig
from loraforge.core.errors import LoraforgeError, TrainingError
from loraforge.core.files import atomic_write_text
from loraforge.core.plugins import OPTIMIZERS, REGULARIZERS, SELECTORS
from loraforge.methods.init import needs_data
from loraforge.training.checkpoint import CHECKPOINT_DIR, load_checkpoint, save_checkpoint
from loraforge.training.components import make_optimizer, make_regularizer, make_selector, quantize, settings_of
from loraforge.training.config import TrainConfig
from loraforge.training.data import BatchPlan, TokenizedDataset, collate, count_label_tokens, load_dataset, read_rows
from loraforge.training.initialize import initialize
from loraforge.training.loss import auxiliary_loss, batch_loss
from loraforge.training.metrics import MetricsLogger, plot_loss, read_metrics
from loraforge.training.runtime import launch, micro_batches, must_launch, runtime_for


@dataclass
class TrainResult:
    model: nn.Module
    tokenizer: Any
    out: Path
    history: list[dict[str, Any]] = field(default_factory=list)  # the logged metrics rows
    main_process: bool = True  # False in the other workers of a distributed run: they report nothing
    setup_seconds: float = 0.0  # putting the adapter on: attach, a selector's search, a data-based init

    @property
    def loss_reduction(self) -> float:
        """1 - (mean loss of the last 10% of steps) / (mean loss of the first 10%)."""
        losses = [row["loss"] for row in self.history if "loss" in row]
        k = max(1, len(losses) // 10)
        return 1.0 - (sum(losses[-k:]) / k) / (sum(losses[:k]) / k)



def lr_at(step: int, config: TrainConfig) -> float:
    warmup_steps = int(config.warmup * config.steps)
    if step < warmup_steps:
        return config.lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, config.steps - warmup_steps)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None means float32. `auto` takes bf16 where the hardware computes it natively: a GPU that
    has it, or a CPU with AVX512-BF16/AMX (measured 1.5x faster per step on SmolLM2 here)."""
    if precision == "auto":
        if device.type == "cuda":
            native = torch.cuda.is_bf16_supported()
        else:
            native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        return torch.bfloat16 if native else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]



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



def train(config: TrainConfig, model: nn.Module | None = None, tokenizer: Any = None,
          train_data: TokenizedDataset | None = None, eval_data: TokenizedDataset | None = None,
          progress: bool = True) -> TrainResult:
    """Train an adapter as `config` says. A model that already carries an adapter keeps training it
    (the demo's second phase); otherwise one is attached. Data may be passed in memory.

    With num_processes > 1 (and no launcher around), this process starts the workers and returns
    once they are done; inside a launched worker, `runtime` is that worker's share of the run."""
    config.validate()
    if must_launch(config):
        return launch(config, lambda: train(config, model, tokenizer, train_data, eval_data, progress), model, tokenizer)
    runtime = runtime_for(config)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
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
        selector = make_selector(config.select, **settings_of(SELECTORS, config.select, config))
    if not is_attached(model) and selector is None:
        attach(model, config.adapter_config())
    elif not is_attached(model):
        attach_selected(model, selector, config, train_data, eval_data, pad_id, out)
    if needs_data(model):  # before the optimizer: EVA changes the layers' shapes
        initialize(model, train_data, batches=config.init_batches, batch_size=config.batch_size, pad_id=pad_id,
                   lr=lr_at(0, config), seed=config.seed, progress=progress)
    setup_seconds = time.perf_counter() - setup_start
    prepare_model(model, config)  # after the move: the 4-bit codes and their absmax tables are made on the device
    optimizer = make_optimizer(model, config.optimizer, config.lr, config.weight_decay,
                               **settings_of(OPTIMIZERS, config.optimizer, config))
    regularizer = None
    if config.regularizer:
        regularizer = make_regularizer(config.regularizer, **settings_of(REGULARIZERS, config.regularizer, config))
    # Step s reads global batch s, whatever its split into micro-batches and processes.
    plan = BatchPlan(len(train_data), config.batch_size * config.grad_accum * runtime.world_size, seed=config.seed,
                     length_grouped=config.length_grouped, lengths=train_data.lengths)

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
    amp = autocast_dtype(config.precision, device)
    if runtime.is_main:
        atomic_write_text(out / "config.json", json.dumps(
            {"train": dataclasses.asdict(config), "adapter": model.loraforge_config.to_dict(),
             "init": dataclasses.asdict(model.loraforge_init) if model.loraforge_init else None}, indent=2) + "\n")
    history = read_metrics(out, upto=start)
    logger = MetricsLogger(out, history, log=config.log, write=runtime.is_main)

    model.train()
    bar = tqdm(total=config.steps, initial=start, disable=not progress or not runtime.is_main, unit="step",
               desc=f"train {n_trainable} params")
    for step in range(start, config.steps):
        t0 = time.perf_counter()
        selected = selector.before_step(step, model, optimizer) if selector is not None else {}
        rows = plan.indices(step)
        window = [collate([train_data[i] for i in part], pad_id)
                  for part in micro_batches(rows, config.grad_accum, runtime.rank, runtime.world_size)]
        # The label tokens of the whole global batch (all ranks), known before the first backward.
        n_labels = max(1, int(runtime.sum([sum(count_label_tokens(b) for b in window)])[0]))

        def window_backward() -> tuple[float, float]:
            """Forward and backward over this step's micro-batches: (loss, aux loss) of this rank.
            A regulariser may call it again (at perturbed weights) to get a second gradient."""
            loss_sum, aux_sum = 0.0, 0.0
            for batch in window:
                batch = {k: v.to(device) for k, v in batch.items()}
                with runtime.accumulate():  # gradients sync across ranks on the window's last micro-batch only
                    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                        loss = loss_of(batch) / n_labels
                        aux = auxiliary_loss(model)
                    if aux is not None:  # a per-micro-batch mean already: weight it by the batch's share
                        aux = aux / (len(window) * runtime.world_size)
                        aux_sum += aux.item()
                        loss = loss + aux
                    runtime.backward(loss)
                loss_sum += loss.item()
            return loss_sum, aux_sum

        lr = lr_at(step, config)
        for group in optimizer.param_groups:  # before the window: DeepSpeed steps inside its last backward
            group["lr"] = lr * group["lr_scale"]  # the rule's ratio between groups (LoRA+) survives the schedule
        loss_sum, aux_sum = window_backward()
        tokens = sum(int(b["attention_mask"].sum()) for b in window)
        loss_sum, aux_sum, tokens = runtime.sum([loss_sum, aux_sum, tokens])
        if not math.isfinite(loss_sum):
            bar.close()
            raise TrainingError(
                f"loss became {loss_sum} at step {step + 1}; stopping. The last good checkpoint in "
                f"{out / CHECKPOINT_DIR} is intact (lower --lr, or check the data).")
        steered = regularizer.steer(params, window_backward) if regularizer is not None else {}
        grad_norm = runtime.clip_grad_norm(params, config.max_grad_norm if config.max_grad_norm > 0 else math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0  # rank 0's step, which waited for the slowest rank's gradients
        row = {"step": step + 1, "loss": loss_sum, "lr": lr, "grad_norm": float(grad_norm),
               "samples_per_s": len(rows) / seconds, "tokens_per_s": tokens / seconds,
               "state_mb": runtime.bytes_held(model, optimizer) / 2**20}  # rank 0's weights + optimizer state
        if aux_sum:
            row["aux_loss"] = aux_sum
        row.update(steered)
        row.update(selected)
        if eval_data is not None and config.eval_every and (step + 1) % config.eval_every == 0:
            row.update(runtime.run(model, lambda m: _eval_metrics(m, eval_data, config, pad_id)))
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            logger.log(row)
        bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}", samples_s=f"{row['samples_per_s']:.1f}")
        bar.update(1)
        if config.save_every and (step + 1) % config.save_every == 0 and step + 1 < config.steps:
            save_checkpoint(out / CHECKPOINT_DIR, model, optimizer, step + 1, config, runtime)
    bar.close()

    if eval_data is not None:
        final_eval = runtime.run(model, lambda m: _eval_metrics(m, eval_data, config, pad_id))
        logger.log({"step": config.steps, **final_eval})
    save_checkpoint(out / CHECKPOINT_DIR, model, optimizer, config.steps, config, runtime)
    with runtime.whole_adapter(model):  # FSDP: every rank gathers the adapter, rank 0 writes it
        if runtime.is_main:
            save_adapter(model, out / "adapter")
    if runtime.is_main:
        plot_loss(logger.history, out / "loss.png")
    logger.close()
    runtime.finish()
    model.eval()
    return TrainResult(model, tokenizer, out, logger.history, main_process=runtime.is_main, setup_seconds=setup_seconds)


def attach_selected(model: nn.Module, selector: Any, config: TrainConfig, train_data: TokenizedDataset,
                    eval_data: TokenizedDataset | None, pad_id: int, out: Path) -> None:
    """Attach the adapter through the selector. A resumed run attaches the structure its first
    run chose (out/config.json) instead of searching again."""
    saved = out / "config.json"
    if config.resume and (out / CHECKPOINT_DIR).is_dir() and saved.is_file():
        attach(model, AdapterConfig.from_dict(json.loads(saved.read_text())["adapter"]))
        return
    selector.attach_for_run(model, config.adapter_config(), train_data, eval_data, batch_size=config.batch_size,
                            pad_id=pad_id, task=config.task, seed=config.seed, steps=config.select_steps)


def _eval_metrics(model: nn.Module, data: TokenizedDataset, config: TrainConfig, pad_id: int) -> dict[str, float]:
    from loraforge.training.evaluate import evaluate_dataset

    metrics = evaluate_dataset(model, data, batch_size=config.batch_size, pad_id=pad_id)
    model.train()
    return {f"eval_{k}": v for k, v in metrics.items()}


# ---- checkpoints ------------------------------------------------------------------------------


# ---- metrics ----------------------------------------------------------------------------------


