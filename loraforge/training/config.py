"""`TrainConfig`: everything a run needs. The CLI's flags and the keys of `--config run.yaml` are its fields."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from loraforge.core.config import AdapterConfig
from loraforge.core.configs import component, nest_settings, opt
from loraforge.core.errors import LoraforgeError
from loraforge.core.plugins import OPTIMIZERS, QUANTIZERS, REGULARIZERS, SELECTORS, Component
from loraforge.training.metrics import sink_names


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
    options: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "the method's and initialiser's options (`loraforge methods`), e.g. {n_blocks: 4}", "flag": "--option"})
    # optimisation
    steps: int = opt(100, "optimizer steps")
    lr: float = opt(2e-4, "peak learning rate (AdamW)")
    batch_size: int = opt(8, "rows per micro-batch")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    warmup: float = opt(0.06, "fraction of the steps spent warming up linearly, then cosine to 0")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    # Plug-ins by name, each with the settings its builder takes (its signature holds their defaults):
    # `--optimizer lora-plus --loraplus-lr-ratio 8`, or `optimizer: {name: lora-plus, settings: {...}}`.
    optimizer: Component = component("adamw", "optimisation rule (loraforge/optim/)", OPTIMIZERS)
    regularizer: Component | None = component(None, "gradient regulariser (loraforge/regularizers/); costs a "
                                                    "second pass", REGULARIZERS)
    select: Component | None = component(None, "where adapters go, which layers train (loraforge/select/)",
                                         SELECTORS)
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
    log: str = opt("jsonl", "where metrics go, comma-separated: jsonl (metrics.jsonl, what --resume reads), "
                            "tensorboard (out/tensorboard; pip install 'loraforge[tensorboard]'), "
                            "wandb (offline run in out/wandb; pip install 'loraforge[wandb]')")
    save_every: int = opt(0, "0: a checkpoint only at the end")
    eval_every: int = opt(0, "0: evaluate only at the end (when eval_data is given)")
    resume: bool = opt(False, "continue from --out's checkpoint")
    # dead-run detection, once per optimizer step (training/health.py); a failed check stops the run, exit 2
    health_check: bool = opt(True, "stop a dead run (vanishing gradients, weights beyond bounds, loss far above "
                                   "its start, non-finite values) keeping the last good checkpoint")
    health_window: int = opt(5, "steps in a row with a gradient norm at most --health-min-grad-norm that stop the "
                                "run (0: never)")
    health_min_grad_norm: float = opt(1e-10, "a gradient norm at most this counts as vanished")
    health_max_growth: float = opt(1e4, "the adapter weights' RMS may reach at most this many times its start "
                                        "(a start below 0.1 counts as 0.1)")
    health_max_update: float = opt(10.0, "one step may change the weights' norm by at most this many times it")
    health_max_loss: float = opt(10.0, "the loss may reach at most this many times the first step's loss (floored at 1.0)")

    def __post_init__(self) -> None:
        # The Python API may name a plug-in (`optimizer="lora-plus"`) or give its {name, settings} mapping.
        self.optimizer = Component.of(self.optimizer)
        self.regularizer = Component.of(self.regularizer)
        self.select = Component.of(self.select)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """A config from its dict (`dataclasses.asdict`, a YAML file's keys), older flat plug-in settings
        (`loraplus_lr_ratio: 8`) included: they go into the settings of the plug-in that takes them."""
        return cls(**nest_settings(cls, values))

    def adapter_config(self) -> AdapterConfig:
        return AdapterConfig(method=self.method, rank=self.rank, alpha=self.alpha, dropout=self.dropout,
                             target_modules=parse_targets(self.targets), use_rslora=self.use_rslora, init=self.init, seed=self.seed,
                             base_model_name_or_path=self.model, options=dict(self.options))

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
        if self.quant is not None and self.quant not in QUANTIZERS.names():
            raise LoraforgeError(f"--quant must be one of {', '.join(QUANTIZERS.names())} (or not given), got {self.quant!r}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise LoraforgeError(f"--zero-stage must be 1, 2 or 3 (or 0 for none), got {self.zero_stage}")
        if self.zero_stage and self.fsdp:
            raise LoraforgeError("--fsdp and --zero-stage are two sharding engines: choose one")
        for registry, chosen in ((OPTIMIZERS, self.optimizer), (REGULARIZERS, self.regularizer),
                                 (SELECTORS, self.select)):
            if chosen is not None:
                registry.check(chosen)
        if not 0 <= self.warmup < 1:
            raise LoraforgeError(f"--warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        for name in ("health_window", "health_min_grad_norm", "health_max_growth", "health_max_update", "health_max_loss"):
            if not getattr(self, name) >= 0:  # NaN fails too
                raise LoraforgeError(f"--{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")
        sink_names(self.log)  # refuses an unknown sink, naming the registered ones



def parse_targets(text: str) -> list[str] | str:
    """'all-linear' stays; 'q_proj,v_proj' (plain names) becomes a list; anything else is a regex."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if text != "all-linear" and names and all(re.fullmatch(r"[\w.]+", n) for n in names):
        return names
    return text

