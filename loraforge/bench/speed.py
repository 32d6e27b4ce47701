"""`loraforge bench speed`: a loraforge LoRA training step against the frozen-base limit and PEFT.

The least work an adapter step can do is the base model's forward plus the backward pass of the
activation gradients through every frozen layer, with no weight gradient: the **frozen step**
(all base weights frozen, `inputs_embeds.requires_grad_(True)`, the model's own full-logits loss).
Against it, in one process and interleaved round by round (so that noise from other work on the
machine hits every variant alike), after warm-up rounds:

    loraforge              attach + train.batch_loss (chunked label-only head) + backward + AdamW step
    loraforge, plain head  the same model, loss from the model's full logits: isolates the layer work
    loraforge, grad ckpt   the same model with activation checkpointing per decoder layer
    loraforge, compiled    a copy under torch.compile (only with --compile: compiling takes minutes)
    PEFT                   get_peft_model with the same LoRA config + model(labels=...).loss + AdamW

for each precision available here: fp32, bf16 (autocast, where the CPU or GPU computes it natively)
and nf4 (4-bit base, fp32 compute; PEFT on bitsandbytes' Linear4bit). Times are medians over the
measured rounds. Peak memory is the growth of the process's peak RSS during a step over its RSS
before it (CPU; glibc is told to hand freed blocks straight back, and the kernel's high-water mark
is reset before each step), or `torch.cuda.max_memory_allocated` growth on a GPU; the largest over
the measured rounds.

PEFT is imported here only: it is a reference, never a dependency of the library's code paths.

`--profile` instead profiles one frozen and one loraforge step per precision (torch.profiler, self
CPU time by op, after `--warmup` rounds) and lists the ops that make up the difference.

`--num-processes 1,2` measures data-parallel scaling instead (`scaling`): the trainer itself, one
global batch of `--batch-size` rows split over N workers (accelerate, gloo on CPU, NCCL on GPUs),
`--warmup` + `--steps` steps on rows of `--seq-len` tokens; the median of rank 0's samples/s and
tokens/s over the measured steps (each covers the whole global batch), and the weights and
optimizer state rank 0 holds. `--engines ddp,fsdp,zero1,zero2,zero3` runs each multi-process count
under each engine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from loraforge.bench import append_section, machine, map_large_blocks, release_freed_memory, status_mb
from loraforge.core.compat import autocast_dtype
from loraforge.core.configs import opt
from loraforge.core.models import default_device

JSON_KEYS = ("frozen_step_s", "loraforge_step_s", "peft_step_s", "loraforge_peak_mb", "peft_peak_mb")
ROW_LABELS = {"frozen": "frozen step (limit)", "loraforge": "loraforge", "plain_head": "loraforge, plain head",
              "grad_ckpt": "loraforge, --grad-checkpoint", "compiled": "loraforge, --compile", "peft": "PEFT"}


@dataclasses.dataclass
class SpeedRun:
    model: str = opt("smollm2-135m", "embedded name or local Hugging Face folder")
    batch_size: int = opt(8, "sequences per step")
    seq_len: int = opt(128, "tokens per sequence")
    rank: int = opt(8, "LoRA rank")
    targets: str = opt("all-linear", "target modules (all-linear or comma-separated names)")
    steps: int = opt(5, "timed steps (median reported)")
    warmup: int = opt(1, "untimed steps first")
    precisions: str = opt("all", 'comma-separated subset of fp32,bf16,nf4; "all": every one this machine has')
    compile: bool = opt(False, "also time the step under torch.compile")
    seed: int = opt(0, "seed of the random batch and init")
    num_processes: str = opt("", 'e.g. "1,2": data-parallel scaling of the trainer instead of the step comparison')
    engines: str = opt("ddp", "with --num-processes: comma-separated ddp, fsdp, zero1, zero2, zero3")
    profile: bool = opt(False, "where the loraforge step's time over the frozen step goes, op by op, instead")


def available_precisions(device: torch.device) -> list[str]:
    from loraforge.quant.nf4 import backend_available

    found = ["fp32"]
    if autocast_dtype("auto", device) == torch.bfloat16:
        found.append("bf16")
    if backend_available():
        found.append("nf4")
    return found


class PeakMemory:
    """Peak memory growth of one step: RSS high-water mark on CPU, allocator peak on CUDA."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cpu":
            map_large_blocks()

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated() / 2**20
            return
        release_freed_memory()
        with contextlib.suppress(OSError):  # without it (not Linux) the peak is the process's peak so far
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        self.before = status_mb("VmRSS")

    def stop(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20 - self.before
        return status_mb("VmHWM") - self.before


def _batch(vocab: int, run: SpeedRun, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(run.seed)
    ids = torch.randint(0, vocab, (run.batch_size, run.seq_len), generator=g).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _load(run: SpeedRun, device: torch.device) -> nn.Module:
    from loraforge.core.models import load_model

    model, _ = load_model(run.model)
    return model.to(device).train()


def _bnb_base(model: nn.Module) -> nn.Module:
    """The same base with bitsandbytes' Linear4bit layers (NF4, double quant, block 64): what PEFT
    wraps in its own 4-bit LoRA layer."""
    import bitsandbytes as bnb

    head = model.get_output_embeddings()
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or module is head:
            continue
        q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                              compute_dtype=module.weight.dtype, compress_statistics=True, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, compress_statistics=True,
                                     quant_type="nf4", blocksize=64)
        if module.bias is not None:
            q.bias = nn.Parameter(module.bias.data, requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, q.to(module.weight.device))
    return model


def _steps(run: SpeedRun, precision: str, device: torch.device) -> dict[str, Callable[[], None]]:
    """One closure per variant, each doing one full step on its own model."""
    from peft import LoraConfig, get_peft_model

    from loraforge.adapters.inject import attach
    from loraforge.core.config import AdapterConfig
    from loraforge.quant.nf4 import quantize_base
    from loraforge.training.config import parse_targets
    from loraforge.training.loss import batch_loss

    amp = torch.bfloat16 if precision == "bf16" else None
    targets = parse_targets(run.targets)

    def autocast():
        return torch.autocast(device.type, dtype=amp, enabled=amp is not None)

    def lora_model() -> nn.Module:
        model = attach(_load(run, device), AdapterConfig(rank=run.rank, alpha=2 * run.rank, target_modules=targets,
                                                        seed=run.seed))
        if precision == "nf4":
            quantize_base(model)
        return model

    frozen = _load(run, device).requires_grad_(False)
    if precision == "nf4":
        quantize_base(frozen)
    ours = lora_model()
    batch = _batch(ours.config.vocab_size, run, device)
    n_labels = int((batch["labels"][:, 1:] != -100).sum())
    peft_base = _load(run, device)
    if precision == "nf4":
        peft_base = _bnb_base(peft_base)
    torch.manual_seed(run.seed)
    peft_model = get_peft_model(peft_base, LoraConfig(r=run.rank, lora_alpha=2 * run.rank, target_modules=targets))

    def frozen_step() -> None:
        embeds = frozen.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
        with autocast():
            loss = frozen(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        loss.backward()

    def trainer(model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor],
                setup: Callable[[bool], None] = lambda on: None) -> Callable[[], None]:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step() -> None:
            setup(True)
            with autocast():
                loss = loss_fn(model)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            setup(False)
        return step

    def checkpointing(on: bool) -> None:
        if on:
            ours.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            ours.gradient_checkpointing_disable()

    fused_loss = lambda m: batch_loss(m, batch, "causal-lm") / n_labels  # noqa: E731
    steps = {"frozen": frozen_step, "loraforge": trainer(ours, fused_loss),
             "plain_head": trainer(ours, lambda m: m(**batch).loss),
             "grad_ckpt": trainer(ours, fused_loss, checkpointing)}
    if run.compile:
        compiled = lora_model()
        compiled.base_model.compile()
        steps["compiled"] = trainer(compiled, fused_loss)
    steps["peft"] = trainer(peft_model, lambda m: m(**batch).loss)
    return steps


def wanted_precisions(run: SpeedRun, device: torch.device) -> list[str]:
    """`--precisions`, checked against what this machine has ("all": every one of those)."""
    have = available_precisions(device)
    wanted = have if run.precisions == "all" else [p.strip() for p in run.precisions.split(",")]
    missing = [p for p in wanted if p not in have]
    if missing:
        from loraforge.core.errors import LoraforgeError

        raise LoraforgeError(f"precision {', '.join(missing)} is not available here (available: {', '.join(have)})")
    return wanted


def measure(run: SpeedRun, progress: bool = True) -> dict[str, dict[str, dict[str, float]]]:
    """{precision: {variant: {"step_s": median seconds, "peak_mb": largest peak growth}}}."""
    device = default_device()
    wanted = wanted_precisions(run, device)
    memory = PeakMemory(device)
    n_variants = len(ROW_LABELS) - (0 if run.compile else 1)
    bar = tqdm(total=len(wanted) * (run.warmup + run.steps) * n_variants, disable=not progress, unit="step",
               desc="bench speed")
    results = {}
    for precision in wanted:
        steps = _steps(run, precision, device)
        times: dict[str, list[float]] = {name: [] for name in steps}
        peaks: dict[str, list[float]] = {name: [] for name in steps}
        names = list(steps)
        for rnd in range(run.warmup + run.steps):
            shift = rnd % len(names)  # rotate the order: no variant always runs first after a pause
            for name in names[shift:] + names[:shift]:
                bar.set_postfix(precision=precision, variant=name)
                memory.start()
                t0 = time.perf_counter()
                steps[name]()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - t0
                peak = memory.stop()
                if rnd >= run.warmup:
                    times[name].append(seconds)
                    peaks[name].append(peak)
                bar.update(1)
        results[precision] = {name: {"step_s": statistics.median(times[name]), "peak_mb": max(peaks[name])}
                              for name in names}
        del steps  # free this precision's three models before building the next ones
        gc.collect()
    bar.close()
    return results


def to_json(results: dict[str, dict[str, dict[str, float]]]) -> dict[str, Any]:
    """The issue's JSON: machine plus, per precision, exactly JSON_KEYS."""
    out: dict[str, Any] = {"machine": machine()}
    for precision, rows in results.items():
        out[precision] = {"frozen_step_s": rows["frozen"]["step_s"], "loraforge_step_s": rows["loraforge"]["step_s"],
                          "peft_step_s": rows["peft"]["step_s"], "loraforge_peak_mb": rows["loraforge"]["peak_mb"],
                          "peft_peak_mb": rows["peft"]["peak_mb"]}
    return out


def table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = ["| precision | step | median step (s) | / frozen step | / PEFT step | peak memory growth (MB) |",
             "|---|---|---|---|---|---|"]
    for precision, rows in results.items():
        frozen, peft = rows["frozen"]["step_s"], rows["peft"]["step_s"]
        for name, row in rows.items():
            lines.append(f"| {precision} | {ROW_LABELS[name]} | {row['step_s']:.3f} | {row['step_s'] / frozen:.3f} | "
                         f"{row['step_s'] / peft:.3f} | {row['peak_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def where_time_goes(run: SpeedRun, top: int = 8) -> dict[str, dict[str, dict[str, float]]]:
    """{precision: {op: {"frozen_ms", "loraforge_ms"}}}: self CPU time of one profiled step of each,
    the `top` ops by difference plus "total"."""
    from torch.profiler import ProfilerActivity, profile

    device = default_device()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    wanted = wanted_precisions(run, device)
    results = {}
    for precision in wanted:
        steps = _steps(dataclasses.replace(run, compile=False), precision, device)  # no compiled copy to build
        for _ in range(max(run.warmup, 1)):
            steps["frozen"](), steps["loraforge"]()
        ms = {}
        for name in ("frozen", "loraforge"):
            with profile(activities=activities) as prof:
                steps[name]()
            ms[name] = {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}
        ops = sorted(set(ms["frozen"]) | set(ms["loraforge"]),
                     key=lambda op: -abs(ms["loraforge"].get(op, 0) - ms["frozen"].get(op, 0)))[:top]
        rows = {op: {"frozen_ms": ms["frozen"].get(op, 0.0), "loraforge_ms": ms["loraforge"].get(op, 0.0)} for op in ops}
        rows["total"] = {name + "_ms": sum(ms[name].values()) for name in ("frozen", "loraforge")}
        results[precision] = rows
        del steps
        gc.collect()
    return results


def profile_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = ["| precision | op | frozen step (ms) | loraforge step (ms) | difference (ms) |", "|---|---|---:|---:|---:|"]
    for precision, rows in results.items():
        for op, row in rows.items():
            lines.append(f"| {precision} | {'**total**' if op == 'total' else op} | {row['frozen_ms']:.0f} | "
                         f"{row['loraforge_ms']:.0f} | {row['loraforge_ms'] - row['frozen_ms']:+.0f} |")
    return "\n".join(lines) + "\n"


ENGINES = {"ddp": {}, "fsdp": {"fsdp": True}, "zero1": {"zero_stage": 1}, "zero2": {"zero_stage": 2},
           "zero3": {"zero_stage": 3}}


def scaling(run: SpeedRun, progress: bool = True) -> dict[str, dict[str, float]]:
    """{"N engine": {"processes", "samples_per_s", "tokens_per_s", "state_mb"}}: the trainer on one
    global batch, split N ways, under each engine (one process runs alone: "1")."""
    import copy
    import tempfile

    from loraforge.core.errors import LoraforgeError
    from loraforge.core.models import load_model
    from loraforge.training.config import TrainConfig
    from loraforge.training.data import from_records
    from loraforge.training.loop import train

    counts = [int(n) for n in run.num_processes.split(",")]
    if any(n < 1 or run.batch_size % n for n in counts):
        raise LoraforgeError(f"--num-processes {run.num_processes}: each count must be at least 1 and divide "
                             f"--batch-size {run.batch_size} (one global batch, split evenly)")
    engines = run.engines.split(",")
    if unknown := [e for e in engines if e not in ENGINES]:
        raise LoraforgeError(f"--engines: unknown {', '.join(unknown)}; choose from {', '.join(ENGINES)}")
    model, tokenizer = load_model(run.model)
    words = "the of and to in is was for on that with as by at from his her it an were".split()
    text = " ".join(words[(7 * i) % len(words)] for i in range(4 * run.seq_len))  # every row fills seq_len tokens
    data = from_records([{"prompt": f"Row {i}.", "completion": text} for i in range(4 * run.batch_size)], tokenizer,
                        max_length=run.seq_len)
    runs = [(n, engine) for n in counts for engine in (engines if n > 1 else ["ddp"])]
    results = {}
    for n, engine in tqdm(runs, desc="bench speed --num-processes", disable=not progress):
        with tempfile.TemporaryDirectory() as out:
            config = TrainConfig(model=run.model, out=out, steps=run.warmup + run.steps, rank=run.rank,
                                 alpha=2.0 * run.rank, targets=run.targets, batch_size=run.batch_size // n,
                                 num_processes=n, max_length=run.seq_len, seed=run.seed, precision="fp32",
                                 **(ENGINES[engine] if n > 1 else {}))
            history = train(config, model=copy.deepcopy(model), tokenizer=tokenizer, train_data=data, progress=False).history
        measured = [row for row in history if "samples_per_s" in row][run.warmup:]
        results[f"{n} {engine}" if n > 1 else "1"] = {
            "processes": n, **{key: statistics.median(row[key] for row in measured)
                               for key in ("samples_per_s", "tokens_per_s", "state_mb")}}
    return results


def scaling_table(results: dict[str, dict[str, float]]) -> str:
    one = results.get("1")
    lines = ["| processes | engine | samples/s | tokens/s | speed-up over 1 process | weights + optimizer state "
             "on rank 0 (MB) |", "|---:|---|---:|---:|---:|---:|"]
    for name, row in results.items():
        engine = name.split()[1] if " " in name else "-"
        speedup = f"{row['samples_per_s'] / one['samples_per_s']:.2f}" if one else "n/a"
        lines.append(f"| {row['processes']} | {engine} | {row['samples_per_s']:.2f} | {row['tokens_per_s']:.0f} | "
                     f"{speedup} | {row['state_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def bench_speed(run: SpeedRun, json_path: str | None, command: str, progress: bool = True,
                report: Path | None = None) -> dict[str, Any]:
    """One of the three benchmarks (scaling, profile, or the step comparison): its table is printed
    and appended as a section to `report`, its measurements with the machine written to `json_path`,
    each when given."""
    if run.num_processes:
        rates = scaling(run, progress)
        body = scaling_table(rates)
        title = (f"bench speed --num-processes: {run.model}, global batch {run.batch_size} x {run.seq_len} "
                 f"tokens, LoRA r={run.rank} {run.targets}, median of {run.steps} steps after {run.warmup}")
        measured = {"machine": machine(), "scaling": rates}
        notes = ""
    elif run.profile:
        found = where_time_goes(run)
        body = profile_table(found)
        title = (f"bench speed --profile: {run.model}, batch {run.batch_size} x {run.seq_len} tokens, LoRA r={run.rank} "
                 f"{run.targets}, self CPU time of one step by op")
        measured = {"machine": machine(), "profile": found}
        notes = ("\nThe ops with the largest difference between one loraforge step and one frozen step "
                 "(torch.profiler; profiling adds its own overhead, so totals exceed the timed medians).\n")
    else:
        results = measure(run, progress)
        body = table(results)
        title = (f"bench speed: {run.model}, batch {run.batch_size} x {run.seq_len} tokens, LoRA r={run.rank} "
                 f"{run.targets}, median of {run.steps} interleaved steps after {run.warmup} warm-up")
        measured = to_json(results)
        notes = ("\nRatios: loraforge step / frozen step and loraforge step / PEFT step (targets on CPU fp32: "
                 "<= 1.05 and <= 0.92). The frozen step keeps the model's own full-logits loss; the loraforge row "
                 "uses the chunked label-only head, the plain-head row does not. nf4 computes in fp32.\n")
    if report:
        append_section(report, title, command, body + notes)
    print(body)
    if json_path:
        Path(json_path).write_text(json.dumps(measured, indent=2) + "\n")
    return measured
