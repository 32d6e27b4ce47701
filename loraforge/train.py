"""The training loop: one readable function, `train(config)`.

    for step in steps:                       # one optimizer step = batch_size x grad_accum rows
        for micro_batch in window(step):     # batch k of the data is a pure function of (seed, k)
            loss = sum of token losses / label tokens in the whole window
            loss.backward()
        clip, AdamW step, lr from warm-up + cosine
        log (progress bar, metrics.jsonl, TensorBoard); checkpoint every save_every steps

Normalising by the label tokens of the whole window (not averaging per micro-batch) makes
batch 8 and batch 2 x grad-accum 4 the same optimisation. A checkpoint holds the trainable
tensors, AdamW's state and the RNG state, so `resume` continues to exactly the weights an
uninterrupted run reaches. Everything is safetensors + JSON, written atomically.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .config import AdapterConfig
from .data import BatchPlan, TokenizedDataset, collate, count_label_tokens, load_dataset, read_rows
from .errors import LoraforgeError
from .init import initialize, needs_data
from .inject import adapter_state_dict, attach, is_attached, trainable_parameters
from .io import atomic_dir, atomic_write_text, count_parameters, save_adapter
from .kernels import linear_cross_entropy
from .optim import make_optimizer, rule_settings
from .regularizers import make_regularizer, regularizer_settings
from .select import Selector, make_selector, search_data, selector_settings

CHECKPOINT_DIR = "checkpoint"
# Settings a resumed run may change without changing the result it converges to.
RESUME_MAY_CHANGE = {"resume", "save_every", "log_every", "eval_every", "out", "grad_checkpoint", "compile", "fsdp",
                     "zero_stage"}
# How a global batch is split: a resumed run may split it otherwise (2 processes x batch 4 ->
# 1 x batch 8) as long as the global batch stays the same size.
BATCH_SPLIT = {"batch_size", "grad_accum", "num_processes"}
# Causal LMs whose logits are exactly lm_head(last_hidden_state): the loss may skip unlabelled positions.
PLAIN_HEAD_MODELS = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                     "GPT2LMHeadModel", "PhiForCausalLM", "Phi3ForCausalLM", "OlmoForCausalLM"}


class TrainingError(LoraforgeError):
    """The run cannot go on (NaN loss, a checkpoint from another run, ...)."""


def opt(default: Any, help: str = "") -> Any:
    """A TrainConfig field whose help text becomes the CLI flag's help."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Everything a run needs; the CLI's flags and the keys of `--config run.yaml` are these fields."""

    model: str = opt("smollm2-135m", "embedded name, local HF folder or .gguf file")
    data: str | None = opt(None, "JSONL (chat / alpaca / prompt-completion / GSM8K) or TSV/CSV (classification)")
    out: str = opt("runs/train", "run folder: config, metrics, checkpoint, adapter/")
    task: str = opt("causal-lm", "causal-lm | classification")
    num_labels: int | None = opt(None, "classification: inferred from the data when not given")
    eval_data: str | None = opt(None, "held-out data in the same form as --data")
    text_column: str | None = opt(None, "classification text column; None: sentence or text")
    label_column: str | None = opt(None, "classification label column; None: label")
    # adapter
    method: str = opt("lora", "a name from `loraforge methods`")
    rank: int = opt(8, "adapter rank r")
    alpha: float = opt(16.0, "scale s = alpha / r (alpha / sqrt(r) with --use-rslora)")
    dropout: float = opt(0.0, "dropout on the adapter branch input only")
    targets: str = opt("all-linear", "all-linear, comma-separated names, or one regex")
    use_rslora: bool = opt(False, "rank-stabilised scale alpha / sqrt(r)")
    init: str = opt("default", "default | gaussian | pissa | lora-ga | eva (lora-xs and lora-sb bring their own)")
    init_batches: int = opt(8, "training batches a data-based start (lora-ga, eva, lora-sb) reads before step 1")
    # optimisation
    steps: int = opt(100, "optimizer steps")
    lr: float = opt(2e-4, "peak learning rate (AdamW)")
    batch_size: int = opt(8, "rows per micro-batch")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    warmup: float = opt(0.06, "fraction of the steps spent warming up linearly, then cosine to 0")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    optimizer: str = opt("adamw", "optimisation rule: adamw | lora-plus | lora-pro | allora (loraforge/optim/)")
    loraplus_lr_ratio: float = opt(16.0, "lora-plus: lr of B / lr of A (lambda)")
    lorapro_mode: str = opt("full", "lora-pro: full (Adam moments in the d_out x d_in space) | efficient (A/B-sized)")
    lorapro_x_mode: str = opt("sylvester", "lora-pro: the free r x r matrix X: sylvester | symmetry | zero")
    allora_eta: float = opt(2.0, "allora: gradient factor at a zero row; needs --alpha = --rank, --dropout 0")
    regularizer: str | None = opt(None, "gradient regulariser: glad (loraforge/regularizers/); costs a second pass")
    select: str | None = opt(None, "where adapters go, which layers train: lisa | flexora | diffora | colora (select/)")
    lisa_layers: int = opt(2, "lisa: transformer blocks trained at a time (gamma)")
    lisa_interval: int = opt(20, "lisa: optimizer steps between resamplings (K)")
    select_steps: int = opt(20, "flexora/diffora: search steps; colora: steps of the short full fine-tune")
    select_lr: float = opt(0.01, "flexora/diffora: learning rate of the gates (Adam)")
    select_order: int = opt(1, "flexora/diffora: gate gradient, 1 = first order (reference code), 2 = one-step unrolled")
    diffora_ratio: float = opt(0.5, "diffora: fraction of the target modules that keep an adapter")
    colora_ig_steps: int = opt(8, "colora: integrated-gradient steps N of the contribution (FAIG)")
    glad_rho: float = opt(0.05, "glad: SAM radius of the reference gradient's perturbation")
    glad_lambda: float = opt(1.0, "glad: share of the conflicting component removed (1: full projection)")
    max_grad_norm: float = opt(1.0, "0 turns clipping off")
    max_length: int = opt(512, "tokens per row; longer rows are truncated")
    length_grouped: bool = opt(False, "batch rows of similar length together: less padding")
    precision: str = opt("auto", "auto | fp32 | bf16 | fp16 (autocast; auto = bf16 where the hardware has it)")
    seed: int = opt(0, "seeds the adapter init, data order and dropout")
    quant: str | None = opt(None, "nf4: hold the frozen base's linear weights in 4 bits, NF4 + double quantisation "
                                  "(QLoRA; pip install 'loraforge[quant]')")
    grad_checkpoint: bool = opt(False, "recompute each decoder layer's activations in backward: less memory, "
                                       "about one more forward of compute")
    compile: bool = opt(False, "torch.compile the base model's forward (off by default: see docs/benchmarks.md)")
    num_processes: int = opt(1, "data-parallel workers on this machine, started through accelerate (gloo on CPU, "
                                "NCCL on GPUs); each takes batch-size rows per micro-batch. Leave at 1 under "
                                "`accelerate launch`, whose config sets the processes")
    fsdp: bool = opt(False, "shard the frozen base, the adapter and its optimizer state over the processes (FSDP2 "
                            "through accelerate) instead of keeping a copy on each (DDP); same adapter, same files")
    zero_stage: int = opt(0, "DeepSpeed ZeRO through accelerate instead of DDP: 1 splits the adapter's AdamW "
                             "state over the processes, 2 also its gradients, 3 also the frozen base and the adapter "
                             "(0: off); same adapter, same files")
    # bookkeeping
    log_every: int = opt(1, "steps between metrics.jsonl rows")
    save_every: int = opt(0, "0: a checkpoint only at the end")
    eval_every: int = opt(0, "0: evaluate only at the end (when eval_data is given)")
    resume: bool = opt(False, "continue from --out's checkpoint")

    def adapter_config(self) -> AdapterConfig:
        return AdapterConfig(method=self.method, rank=self.rank, alpha=self.alpha, dropout=self.dropout,
                             target_modules=parse_targets(self.targets), use_rslora=self.use_rslora, init=self.init, seed=self.seed,
                             base_model_name_or_path=self.model)

    def validate(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "max_length", "init_batches", "num_processes"):
            if getattr(self, name) < 1:
                raise LoraforgeError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise LoraforgeError(f"--lr must be positive, got {self.lr}")
        if self.task not in ("causal-lm", "classification"):
            raise LoraforgeError(f"--task must be causal-lm or classification, got {self.task!r}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise LoraforgeError(f"--precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if self.quant not in (None, "nf4"):
            raise LoraforgeError(f"--quant must be nf4 (or not given), got {self.quant!r}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise LoraforgeError(f"--zero-stage must be 1, 2 or 3 (or 0 for none), got {self.zero_stage}")
        if self.zero_stage and self.fsdp:
            raise LoraforgeError("--fsdp and --zero-stage are two sharding engines: choose one")
        if not 0 <= self.warmup < 1:
            raise LoraforgeError(f"--warmup is a fraction of the steps in [0, 1), got {self.warmup}")


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


def parse_targets(text: str) -> list[str] | str:
    """'all-linear' stays; 'q_proj,v_proj' (plain names) becomes a list; anything else is a regex."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if text != "all-linear" and names and all(re.fullmatch(r"[\w.]+", n) for n in names):
        return names
    return text


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


def auxiliary_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of the `aux_loss` tensors that modules set during the last forward (e.g. a mixture of
    experts' load-balancing loss); each is consumed so that it is counted once."""
    losses = []
    for module in model.modules():
        if getattr(module, "aux_loss", None) is not None:
            losses.append(module.aux_loss)
            module.aux_loss = None
    return torch.stack(losses).sum() if losses else None


def batch_loss(model: nn.Module, batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
    """Summed loss over the batch's label tokens (causal LM) or rows (classification)."""
    if task == "classification":
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits.float(), batch["labels"], reduction="sum")
    labels = batch["labels"][:, 1:]  # position t predicts token t + 1
    keep = labels != -100  # (B, T-1)
    head = model.get_output_embeddings() if _plain_head(model) else None
    if type(head) is nn.Linear:
        # The head is a fifth of a small LM's compute and its logits dominate activation memory:
        # apply it only where a label is (the prompt tokens of SFT data carry none), in chunks of
        # rows whose logits are dropped as soon as their gradient is known (kernels/).
        hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        return linear_cross_entropy(hidden[:, :-1][keep], head.weight, labels[keep], head.bias)  # N = label tokens
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    return F.cross_entropy(logits.float()[keep], labels[keep], reduction="sum")


def prepare_model(model: nn.Module, config: TrainConfig) -> None:
    """The speed and memory options that act on the model, after the adapter is attached and any
    data-based start has read the full-precision weights: 4-bit base, activation checkpointing,
    torch.compile. None of them changes what a step computes beyond NF4's rounding of the base."""
    if config.quant:
        from .quant import quantize_base

        quantize_base(model, config.quant)
    if config.grad_checkpoint:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise LoraforgeError(f"--grad-checkpoint: {type(model).__name__} does not support activation checkpointing")
        # Non-reentrant checkpointing: gradients reach the adapters without the inputs requiring grad.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.compile:
        model.base_model.compile()  # in place: parameter names, hence adapter keys, stay the same


def _plain_head(model: nn.Module) -> bool:
    """True when logits = output_embeddings(base_model(x).last_hidden_state), nothing after it."""
    config = getattr(model, "config", None)
    return (type(model).__name__ in PLAIN_HEAD_MODELS and getattr(config, "final_logit_softcapping", None) is None
            and getattr(config, "logit_scale", None) is None)


def train(config: TrainConfig, model: nn.Module | None = None, tokenizer: Any = None,
          train_data: TokenizedDataset | None = None, eval_data: TokenizedDataset | None = None,
          progress: bool = True) -> TrainResult:
    """Train an adapter as `config` says. A model that already carries an adapter keeps training it
    (the demo's second phase); otherwise one is attached. Data may be passed in memory.

    With num_processes > 1 (and no launcher around), this process starts the workers and returns
    once they are done; inside a launched worker, `runtime` is that worker's share of the run."""
    config.validate()
    if distributed.must_launch(config):
        return distributed.launch(config, lambda: train(config, model, tokenizer, train_data, eval_data, progress),
                                  model, tokenizer)
    runtime = distributed.runtime(config)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)

    if config.task == "classification" and config.num_labels is None and train_data is None and config.data:
        # The head's size comes from the data: read the labels before building the model.
        labels = [row["label"] for row in read_rows(config.data, task="classification", text_column=config.text_column,
                                                     label_column=config.label_column)]
        config = dataclasses.replace(config, num_labels=max(2, max(labels) + 1))
    if model is None:
        from .models import load_model

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
        settings = {name: getattr(config, name) for name in selector_settings(config.select)}
        selector = make_selector(config.select, **settings)
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
                               **{name: getattr(config, name) for name in rule_settings(config.optimizer)})
    regularizer = None
    if config.regularizer:
        settings = {name: getattr(config, name) for name in regularizer_settings(config.regularizer)}
        regularizer = make_regularizer(config.regularizer, **settings)
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
    history = _read_metrics(out, upto=start)
    logger = MetricsLogger(out, history, write=runtime.is_main)

    model.train()
    bar = tqdm(total=config.steps, initial=start, disable=not progress or not runtime.is_main, unit="step",
               desc=f"train {n_trainable} params")
    for step in range(start, config.steps):
        t0 = time.perf_counter()
        selected = selector.before_step(step, model, optimizer) if selector is not None else {}
        rows = plan.indices(step)
        window = [collate([train_data[i] for i in part], pad_id)
                  for part in distributed.micro_batches(rows, config.grad_accum, runtime.rank, runtime.world_size)]
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
               "state_mb": distributed.bytes_held(model, optimizer) / 2**20}  # rank 0's weights + optimizer state
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
    with distributed.whole_adapter(model):  # FSDP: every rank gathers the adapter, rank 0 writes it
        if runtime.is_main:
            save_adapter(model, out / "adapter")
    if runtime.is_main:
        plot_loss(logger.history, out / "loss.png")
    logger.close()
    runtime.finish()
    model.eval()
    return TrainResult(model, tokenizer, out, logger.history, main_process=runtime.is_main, setup_seconds=setup_seconds)


def attach_selected(model: nn.Module, selector: Selector, config: TrainConfig, train_data: TokenizedDataset,
                    eval_data: TokenizedDataset | None, pad_id: int, out: Path) -> None:
    """Attach the adapter through the selector. A resumed run attaches the structure its first
    run chose (out/config.json) instead of searching again."""
    saved = out / "config.json"
    if config.resume and (out / CHECKPOINT_DIR).is_dir() and saved.is_file():
        attach(model, AdapterConfig.from_dict(json.loads(saved.read_text())["adapter"]))
        return
    search = search_data(train_data, eval_data, config.batch_size, pad_id, config.task, config.seed, config.select_steps)
    selector.attach(model, config.adapter_config(), search)


def _eval_metrics(model: nn.Module, data: TokenizedDataset, config: TrainConfig, pad_id: int) -> dict[str, float]:
    from .evaluate import evaluate_dataset

    metrics = evaluate_dataset(model, data, batch_size=config.batch_size, pad_id=pad_id)
    model.train()
    return {f"eval_{k}": v for k, v in metrics.items()}


# ---- checkpoints ------------------------------------------------------------------------------

def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
                    config: TrainConfig, runtime: distributed.Runtime | None = None) -> None:
    """Every rank calls this (the RNG states are gathered, and FSDP's shards); rank 0 alone writes,
    atomically, whole tensors whatever the engine. The data position is the step: batch s of a plan
    over the global batch size is the same for any split."""
    runtime = runtime or distributed.LocalRuntime()
    rng = runtime.rng_states()
    trainable = distributed.full_tensors(adapter_state_dict(model))  # DDP: every rank holds them whole
    tensors, param_groups = runtime.optimizer_state(optimizer)
    if not runtime.is_main:
        return
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}  # GPU runs: moments on the device
    tensors["rng.torch"] = rng[0]
    tensors.update({f"rng.torch.{rank}": state for rank, state in enumerate(rng) if rank})
    meta = {"step": step, "global_batch": config.batch_size * config.grad_accum * runtime.world_size,
            "config": dataclasses.asdict(config), "param_groups": param_groups,
            "trainable_keys": list(trainable)}
    with atomic_dir(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()},
                  str(tmp / "trainable.safetensors"))
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "trainer_state.json").write_text(json.dumps(meta, indent=2) + "\n")


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, config: TrainConfig,
                    runtime: distributed.Runtime | None = None) -> int:
    """Restore a checkpoint into every rank's prepared model and optimizer (each takes its shard
    under FSDP); the processes, batch size, accumulation and engine may differ from the run that
    wrote it when the global batch does not."""
    runtime = runtime or distributed.LocalRuntime()
    meta = json.loads((path / "trainer_state.json").read_text())
    saved = meta["config"]
    changed = sorted(k for k, v in dataclasses.asdict(config).items()
                     if k not in RESUME_MAY_CHANGE | BATCH_SPLIT and saved.get(k) != v and k != "steps")
    if changed:
        raise TrainingError(f"{path} was written by a run with other settings ({', '.join(changed)} differ); "
                            f"resume with the same settings or choose a new --out")
    saved_global = meta.get("global_batch", saved["batch_size"] * saved["grad_accum"])
    global_batch = config.batch_size * config.grad_accum * runtime.world_size
    if saved_global != global_batch:
        raise TrainingError(f"{path} was written with a global batch of {saved_global} rows (batch size x grad accum x "
                            f"processes), this run has {global_batch}: choose a split with the same product")
    own = adapter_state_dict(model)
    trainable = load_file(str(path / "trainable.safetensors"))
    if set(trainable) != set(own):
        raise TrainingError(f"{path}: checkpoint tensors do not match this model's adapter")
    for key, tensor in trainable.items():
        distributed.assign_whole(own[key], tensor)
    tensors = load_file(str(path / "optimizer.safetensors"))
    runtime.load_optimizer_state(optimizer, tensors, meta["param_groups"])
    # A rank the writing run did not have keeps the stream runtime.seed_workers gave it.
    rng_key = f"rng.torch.{runtime.rank}" if runtime.rank else "rng.torch"
    if rng_key in tensors:
        torch.set_rng_state(tensors[rng_key])
    return int(meta["step"])


# ---- metrics ----------------------------------------------------------------------------------

class MetricsLogger:
    """metrics.jsonl (one JSON object per logged step) + TensorBoard events. In a distributed run
    only rank 0 writes (write=False elsewhere keeps the rows in memory): one metrics stream."""

    def __init__(self, out: Path, history: list[dict[str, Any]], write: bool = True):
        self.path = out / "metrics.jsonl"
        self.history = history
        self.file = self.tensorboard = None
        if not write:
            return
        from torch.utils.tensorboard import SummaryWriter

        # Rewrite the file from the kept history: a killed run may have logged past its checkpoint.
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in history))
        self.file = self.path.open("a")
        self.tensorboard = SummaryWriter(str(out / "tensorboard"))

    def log(self, row: dict[str, Any]) -> None:
        self.history.append(row)
        if self.file is None:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tensorboard.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.tensorboard.close()


def _read_metrics(out: Path, upto: int) -> list[dict[str, Any]]:
    path = out / "metrics.jsonl"
    if upto == 0 or not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["step"] <= upto]


def plot_loss(history: list[dict[str, Any]], path: Path, title: str = "training loss") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in history if "loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train")
    evals = [r for r in history if "eval_loss" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
