"""The training loop, `fit(run)`, and the one-call API `train(config) = fit(build_run(config))`.

    run = build_run(config)                  # model, adapter, optimizer, runtime, resume (setup.py)
    for step in range(run.start, steps):     # one optimizer step = batch_size x grad_accum x processes rows
        window = next grad_accum micro-batches   # this rank's slices of global batch `step` (loader.py)
        for micro_batch in window:
            loss = sum of token losses / label tokens in the whole window (all ranks)
            loss.backward()                  # the losses add up on the device
        read the window's loss (once), clip, optimizer step, lr from warm-up + cosine
        log (progress bar, the --log sinks); checkpoint every save_every steps

Normalising by the label tokens of the whole window (not averaging per micro-batch) makes
batch 8 and batch 2 x grad-accum 4 the same optimisation; the count is known from the CPU batches
before the first backward. The loss is read back from the device once per step, for the NaN check
and the log, so no micro-batch waits for the host. A checkpoint holds the trainable tensors, the
optimizer's state and the RNG state, and step s reads global batch s whatever the split into
processes and micro-batches, so `resume` continues to exactly the weights an uninterrupted run
reaches. Everything is safetensors + JSON, written atomically.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from loraforge.adapters.io import save_adapter
from loraforge.core.compat import autocast_dtype
from loraforge.core.errors import TrainingError
from loraforge.training.checkpoint import CHECKPOINT_DIR, save_checkpoint
from loraforge.training.config import TrainConfig
from loraforge.training.data import TokenizedDataset, count_label_tokens
from loraforge.training.health import HealthCheck
from loraforge.training.loader import to_device
from loraforge.training.loss import auxiliary_loss
from loraforge.training.metrics import MetricsLogger, plot_loss, read_metrics
from loraforge.training.runtime import launch, must_launch
from loraforge.training.schedule import lr_at
from loraforge.training.setup import Run, build_run


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


def train(config: TrainConfig, model: nn.Module | None = None, tokenizer: Any = None,
          train_data: TokenizedDataset | None = None, eval_data: TokenizedDataset | None = None,
          progress: bool = True) -> TrainResult:
    """Train an adapter as `config` says: `fit(build_run(...))` (see `build_run` for the arguments).

    With num_processes > 1 (and no launcher around), this process starts the workers and returns
    once they are done; inside a launched worker, the runtime is that worker's share of the run."""
    config.validate()
    if must_launch(config):
        return launch(config, lambda: train(config, model, tokenizer, train_data, eval_data, progress), model, tokenizer)
    return fit(build_run(config, model, tokenizer, train_data, eval_data, progress))


def fit(run: Run) -> TrainResult:
    """Train `run` from its step to config.steps, then write the final checkpoint, the adapter and
    the loss plot (rank 0). The metrics of a resumed run continue those it logged up to its step."""
    config, model, runtime, optimizer, device = run.config, run.model, run.runtime, run.optimizer, run.device
    out = run.out
    amp = autocast_dtype(config.precision, device)
    logger = MetricsLogger(out, read_metrics(out, upto=run.start), log=config.log, write=runtime.is_main)
    model.train()
    bar = tqdm(total=config.steps, initial=run.start, disable=not run.progress or not runtime.is_main, unit="step",
               desc=f"train {run.n_trainable} params")
    batches = iter(run.batches)
    health = HealthCheck(config, run.params, runtime, out / CHECKPOINT_DIR)
    for step in range(run.start, config.steps):
        t0 = time.perf_counter()
        selected = run.selector.before_step(step, model, optimizer) if run.selector is not None else {}
        window = [next(batches) for _ in range(config.grad_accum)]
        # Label tokens, rows and tokens of the whole global batch (all ranks), from the CPU tensors.
        n_labels, n_rows, tokens = runtime.sum([sum(count_label_tokens(b) for b in window),
                                                sum(len(b["input_ids"]) for b in window),
                                                sum(int(b["attention_mask"].sum()) for b in window)])
        n_labels = max(1, int(n_labels))
        window = [to_device(b, device) for b in window]

        def window_backward() -> torch.Tensor:
            """Forward and backward over this step's micro-batches: this rank's [loss, aux loss], summed
            on the device. A regulariser may call it again (at perturbed weights) for a second gradient."""
            loss_sum, aux_sum = torch.zeros((), device=device), torch.zeros((), device=device)
            for batch in window:
                with runtime.accumulate():  # gradients sync across ranks on the window's last micro-batch only
                    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                        loss = run.loss_of(batch) / n_labels
                        aux = auxiliary_loss(model)
                    if aux is not None:  # a per-micro-batch mean already: weight it by the batch's share
                        aux = aux / (len(window) * runtime.world_size)
                        aux_sum += aux.detach()
                        loss = loss + aux
                    runtime.backward(loss)
                loss_sum += loss.detach()
            return torch.stack([loss_sum, aux_sum])

        lr = lr_at(step, config)
        for group in optimizer.param_groups:  # before the window: DeepSpeed steps inside its last backward
            group["lr"] = lr * group["lr_scale"]  # the rule's ratio between groups (LoRA+) survives the schedule
        loss_sum, aux_sum = runtime.sum(window_backward().tolist())  # the step's one read of the loss
        if not math.isfinite(loss_sum):
            bar.close()
            raise TrainingError(
                f"loss became {loss_sum} at step {step + 1}; stopping. The last good checkpoint in "
                f"{out / CHECKPOINT_DIR} is intact (lower --lr, or check the data).")
        steered = run.regularizer.steer(run.params, window_backward) if run.regularizer is not None else {}
        grad_norm = runtime.clip_grad_norm(run.params, config.max_grad_norm if config.max_grad_norm > 0 else math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        grad_norm, weight_rms = health.read(grad_norm)  # the step's read of the gradient norm
        try:
            health.check(step + 1, loss_sum, grad_norm, weight_rms)
        except TrainingError:
            bar.close()
            raise
        seconds = time.perf_counter() - t0  # rank 0's step, which waited for the slowest rank's gradients
        row = {"step": step + 1, "loss": loss_sum, "lr": lr, "grad_norm": grad_norm,
               "samples_per_s": n_rows / seconds, "tokens_per_s": tokens / seconds,
               "state_mb": runtime.bytes_held(model, optimizer) / 2**20}  # rank 0's weights + optimizer state
        if aux_sum:
            row["aux_loss"] = aux_sum
        row.update(steered)
        row.update(selected)
        if run.eval_data is not None and config.eval_every and (step + 1) % config.eval_every == 0:
            row.update(runtime.run(model, lambda m: _eval_metrics(m, run.eval_data, config, run.pad_id)))
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            logger.log(row)
        bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}", samples_s=f"{row['samples_per_s']:.1f}")
        bar.update(1)
        if config.save_every and (step + 1) % config.save_every == 0 and step + 1 < config.steps:
            save_checkpoint(out / CHECKPOINT_DIR, model, optimizer, step + 1, config, runtime)
    bar.close()

    if run.eval_data is not None:
        final_eval = runtime.run(model, lambda m: _eval_metrics(m, run.eval_data, config, run.pad_id))
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
    return TrainResult(model, run.tokenizer, out, logger.history, main_process=runtime.is_main,
                       setup_seconds=run.setup_seconds)


def _eval_metrics(model: nn.Module, data: TokenizedDataset, config: TrainConfig, pad_id: int) -> dict[str, float]:
    from loraforge.training.evaluate import evaluate_dataset

    metrics = evaluate_dataset(model, data, batch_size=config.batch_size, pad_id=pad_id)
    model.train()
    return {f"eval_{k}": v for k, v in metrics.items()}
