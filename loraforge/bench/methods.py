"""`loraforge bench methods`: every registered method, one budget, one table (a LoRAFactory-style
comparison at laptop scale).

Each (method, init) runs in its own process, so its peak memory is its own:

    minilm-l6 + SST-2:        train on all but the last `dev_size` rows, report dev accuracy
    smollm2-135m + advising:  train on the phase-1 advising set, report held-out loss (10% of the rows)

Columns: trainable parameters, median step time, peak RSS, initialiser cost, final training loss,
held-out accuracy (classification) or loss (causal LM). `--rules` crosses every method with
optimisation rules, regularisers and selectors (LoRA-Pro's time and memory overhead show in the step
and peak-RSS columns; a selector's search runs inside training, so its cost is in the run, not in
"init"); `--lrs` turns the run into the learning-rate sweep of `bench/sweep.py`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..errors import LoraforgeError
from . import append_section, peak_rss_mb, save_figure

SHARED_DATA_CANDIDATES = ("$LORAFORGE_SHARED_DATA", "../shared/data", "/work/shared/data")


@dataclasses.dataclass
class BenchRun:
    model: str = "minilm-l6"
    data: str = "sst2"  # sst2 | advising | a TSV (classification) or JSONL (causal LM) path
    method: str = "lora"
    init: str = "default"
    rule: str = "adamw"  # an optimizer, regularizer or selector name (loraforge/optim, regularizers, select)
    steps: int = 300
    batch_size: int = 32
    lr: float = 2e-3
    rank: int = 8
    alpha: float = 16.0
    dev_size: int = 1000
    seed: int = 0
    out: str = "runs/bench-methods"


def shared_data(name: str) -> Path:
    for candidate in SHARED_DATA_CANDIDATES:
        root = Path(os.path.expandvars(candidate))
        if "$" not in str(root) and (root / name).exists():
            return root / name
    raise LoraforgeError(f"cannot find the shared data set {name!r}: set LORAFORGE_SHARED_DATA to the folder holding it")


def load_rows(run: BenchRun) -> tuple[str, list[dict], list[dict]]:
    """(task, train rows, held-out rows)."""
    from ..data import read_rows

    if run.data == "advising":
        from ..demo import SYSTEM
        from ..tasks.advising import build_knowledge_base, phase1_examples

        rows = [{"messages": [{"role": "system", "content": SYSTEM}, *r["messages"]]}
                for r in phase1_examples(build_knowledge_base(run.seed), run.seed)]
        cut = len(rows) // 10
        return "causal-lm", rows[cut:], rows[:cut]
    path = shared_data("sst2/train.tsv") if run.data == "sst2" else Path(run.data)
    task = "classification" if path.suffix in (".tsv", ".csv") else "causal-lm"
    rows = read_rows(path, task=task)
    strip = (lambda r: {"text": r["text"], "label": r["label"]}) if task == "classification" else (lambda r: {"messages": r["messages"]})
    rows = [strip(r) for r in rows]
    return task, rows[:-run.dev_size], rows[-run.dev_size:]


def run_one(run: BenchRun) -> dict[str, Any]:
    """Train one (method, init) and measure it; runs inside a fresh process."""
    import torch

    from ..data import from_records
    from ..evaluate import evaluate_dataset
    from ..inject import attach, trainable_parameters
    from ..models import load_model
    from ..train import TrainConfig, train

    torch.manual_seed(run.seed)
    task, train_rows, dev_rows = load_rows(run)
    model, tokenizer = load_model(run.model, task=task, num_labels=2 if task == "classification" else None)
    train_data = from_records(train_rows, tokenizer, task=task, max_length=128)
    dev_data = from_records(dev_rows, tokenizer, task=task, max_length=128)
    rss_before = peak_rss_mb()
    rule = rule_fields(run.rule)
    alpha = float(run.rank) if run.rule == "allora" else run.alpha  # ALLoRA drops the scale: s = 1
    config = TrainConfig(model=run.model, task=task, method=run.method, init=run.init, rank=run.rank, alpha=alpha,
                         steps=run.steps, batch_size=run.batch_size, lr=run.lr, seed=run.seed, max_length=128,
                         out=str(Path(run.out) / f"{run.method}-{run.init}-{run.rule}-{run.lr:g}"), **rule)
    t0 = time.perf_counter()
    if "select" not in rule:  # a selector attaches inside train(), after its search
        attach(model, config.adapter_config())
    init_seconds = time.perf_counter() - t0
    result = train(config, model=model, tokenizer=tokenizer, train_data=train_data, progress=False)
    rows = [r for r in result.history if "loss" in r]
    metrics = evaluate_dataset(model, dev_data, batch_size=64, pad_id=tokenizer.pad_token_id or 0)
    return {
        "method": run.method, "init": run.init, "rule": run.rule, "lr": run.lr, "trainable_params": trainable_parameters(model),
        "step_s": statistics.median(run.batch_size / r["samples_per_s"] for r in rows),
        "peak_rss_mb": peak_rss_mb() - rss_before, "init_s": init_seconds,
        "first_loss": rows[0]["loss"], "final_loss": statistics.mean(r["loss"] for r in rows[-10:]),
        "dev_loss": metrics["loss"], "dev_accuracy": metrics.get("accuracy"),
        "losses": [r["loss"] for r in rows],
    }


def rule_fields(rule: str) -> dict[str, str]:
    """The TrainConfig field a rule name sets: optimizer, regularizer or select."""
    from ..optim import rule_names
    from ..regularizers import regularizer_names
    from ..select import selector_names

    for field_name, names in (("optimizer", rule_names()), ("regularizer", regularizer_names()), ("select", selector_names())):
        if rule in names:
            return {field_name: rule}
    raise LoraforgeError(f"unknown rule {rule!r}: not an optimizer, regularizer or selector of loraforge")


def all_runs(base: BenchRun, methods: list[str] | None, rules: list[str] | None = None,
             lrs: list[float] | None = None) -> list[BenchRun]:
    from ..registry import methods as registered

    names = methods or [m.name for m in registered()]
    for rule in rules or []:
        rule_fields(rule)  # refuse a typo before hours of runs
    return [dataclasses.replace(base, method=name, rule=rule, lr=lr) for name in names for rule in rules or [base.rule]
            for lr in lrs or [base.lr]]


def run_in_process(run: BenchRun) -> dict[str, Any]:
    """`run_one` in a fresh process (its own peak memory); a failure is a row, not a crash."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(dataclasses.asdict(run), f)
    proc = subprocess.run([sys.executable, "-m", "loraforge.bench.methods", f.name], capture_output=True, text=True)
    os.unlink(f.name)
    if proc.returncode == 0:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    reason = (proc.stderr.strip().splitlines() or ["failed"])[-1]
    return {"method": run.method, "init": run.init, "rule": run.rule, "lr": run.lr, "error": reason[:160]}


def bench_methods(base: BenchRun, methods: list[str] | None = None, command: str = "",
                  rules: list[str] | None = None) -> list[dict[str, Any]]:
    from tqdm.auto import tqdm

    results = [run_in_process(run) for run in tqdm(all_runs(base, methods, rules), desc="bench methods", unit="run")]
    write_report(base, results, command)
    return results


def write_report(base: BenchRun, results: list[dict[str, Any]], command: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = "dev accuracy" if base.data == "sst2" or base.data.endswith((".tsv", ".csv")) else "held-out loss"
    lines = [f"| method | init | rule | trainable params | step (s) | peak RSS (MB) | init (s) | final train loss | {metric} |",
             "|---|---|---|---|---|---|---|---|---|"]
    plot = Path("docs") / f"bench-methods-{base.model}-{Path(base.data).stem}.png"
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['init']} | {r['rule']} | | | | | | n/a: {r['error']} |")
            continue
        score = r["dev_accuracy"] if r["dev_accuracy"] is not None else r["dev_loss"]
        lines.append(f"| {r['method']} | {r['init']} | {r['rule']} | {r['trainable_params']:,} | {r['step_s']:.3f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['init_s']:.2f} | {r['final_loss']:.4f} | {score:.4f} |")
        ax.plot(range(1, len(r["losses"]) + 1), r["losses"], label=f"{r['method']}/{r['init']}/{r['rule']}", linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"{base.model} on {Path(base.data).stem}, {base.steps} steps of {base.batch_size}")
    ax.legend(fontsize=7)
    save_figure(fig, plot)
    body = "\n".join(lines) + f"\n\nLoss curves: ![]({plot.name})\n"
    append_section(f"bench methods: {base.model} on {Path(base.data).stem}", command, body)
    print("\n".join(lines))


if __name__ == "__main__":  # one run, in its own process: python -m loraforge.bench.methods RUN.json
    spec = BenchRun(**json.loads(Path(sys.argv[1]).read_text()))
    print(json.dumps(run_one(spec)))
