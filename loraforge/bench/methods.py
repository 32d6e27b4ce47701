"""`loraforge bench methods`: every registered method, one budget, one table (a LoRAFactory-style
comparison at laptop scale).

Each (method, init) runs in its own process, so its peak memory is its own:

    minilm-l6 + SST-2:        train on all but the last `dev_size` rows, report dev accuracy
    smollm2-135m + advising:  train on the phase-1 advising set, report held-out loss (10% of the rows)

Columns: trainable parameters, median step time, peak RSS, initialiser cost (`TrainResult.setup_seconds`:
attaching, a selector's search, the data-based start), final training loss, held-out accuracy (classification) or loss (causal
LM). Every registered method runs with its own start, and plain LoRA once more with each initialiser
that starts it (`--inits`). `--rules` crosses every method with optimisation rules, regularisers and
selectors (LoRA-Pro's time and memory overhead show in the step and peak-RSS columns; a selector's
search is part of putting the adapter on, so its cost is in "init"); `--pairs lora/lisa,dora/adamw`
runs just those combinations instead of a cross; `--lrs` turns the run into the
learning-rate sweep of `bench/sweep.py`; `--method-lrs full=1e-4,pissa=5e-4,...` gives single methods
(or initialisers) their own rate.

Each finished run is kept as JSON under `--out`, so a run that was stopped picks up where it was;
`--jobs 2` runs two at a time, each on its own core with one thread (on a 2-core machine that
finishes sooner than one run on two threads; the step-time column is then one core's).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from queue import SimpleQueue
from typing import Any

from loraforge.bench import append_section, figure_name, peak_rss_mb, save_figure
from loraforge.core.errors import LoraforgeError
from loraforge.core.files import atomic_write_text

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
    from loraforge.training.data import read_rows

    if run.data == "advising":
        from loraforge.demo import SYSTEM
        from loraforge.demo.advising import build_knowledge_base, phase1_examples

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

    from loraforge.adapters.inject import trainable_parameters
    from loraforge.core.models import load_model
    from loraforge.training.config import TrainConfig
    from loraforge.training.data import from_records
    from loraforge.training.evaluate import evaluate_dataset
    from loraforge.training.loop import train

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
    pad_id = tokenizer.pad_token_id or 0
    result = train(config, model=model, tokenizer=tokenizer, train_data=train_data, progress=False)
    rows = [r for r in result.history if "loss" in r]
    metrics = evaluate_dataset(model, dev_data, batch_size=64, pad_id=pad_id)
    return {
        "method": run.method, "init": run.init, "rule": run.rule, "lr": run.lr, "trainable_params": trainable_parameters(model),
        "step_s": statistics.median(run.batch_size / r["samples_per_s"] for r in rows),
        "peak_rss_mb": peak_rss_mb() - rss_before, "init_s": result.setup_seconds,
        "first_loss": rows[0]["loss"], "final_loss": statistics.mean(r["loss"] for r in rows[-10:]),
        "dev_loss": metrics["loss"], "dev_accuracy": metrics.get("accuracy"),
        "losses": [r["loss"] for r in rows],
        "selection": selection_summary(model.loraforge_config.provenance.get("selection")),
    }


def selection_summary(selection: dict[str, Any] | None) -> str | None:
    """What a selector chose, in a few words: Flexora's layers, DiffoRA's modules, CoLoRA's ranks."""
    if not selection:
        return None
    if "layers" in selection:
        return f"layers {selection['layers']}"
    if "modules" in selection:
        return f"{len(selection['modules'])} modules: " + ", ".join(selection["modules"])
    ranks = selection["ranks"]  # CoLoRA
    top = sorted(ranks, key=lambda m: -ranks[m])[:3]
    return (f"ranks {min(ranks.values())} to {max(ranks.values())} over {len(ranks)} modules, highest: "
            + ", ".join(f"{m} ({ranks[m]})" for m in top))


def rule_fields(rule: str) -> dict[str, str]:
    """The TrainConfig field a rule name sets: optimizer, regularizer or select."""
    from loraforge.core.plugins import OPTIMIZERS, REGULARIZERS, SELECTORS

    for field_name, names in (("optimizer", OPTIMIZERS.names()), ("regularizer", REGULARIZERS.names()), ("select", SELECTORS.names())):
        if rule in names:
            return {field_name: rule}
    raise LoraforgeError(f"unknown rule {rule!r}: not an optimizer, regularizer or selector of loraforge")


def all_runs(base: BenchRun, methods: list[str] | None, rules: list[str] | None = None,
             lrs: list[float] | None = None, inits: list[str] | None = None,
             method_lrs: dict[str, float] | None = None,
             pairs: list[tuple[str, str]] | None = None) -> list[BenchRun]:
    """Every (method, init) x rule x rate, or, with `pairs`, just those (method, rule) pairs x rate
    (a sweep of chosen combinations rather than the full cross). `inits` None: each initialiser that
    starts plain LoRA, when every method runs; with `lrs` (a sweep) `method_lrs` is ignored."""
    from loraforge.core.registry import get_method, initializers
    from loraforge.core.registry import methods as registered

    if pairs and (methods or rules or inits):
        raise LoraforgeError("give either METHOD/RULE pairs or methods, rules and initialisers to cross, not both")
    names = [method for method, _ in pairs] if pairs else methods or [m.name for m in registered()]
    for name in names:
        get_method(name)  # refuse a typo before hours of runs
    for rule in [rule for _, rule in pairs] if pairs else rules or []:
        rule_fields(rule)
    own = method_lrs or {}
    # An initialiser's run looks up the initialiser's name first (pissa=5e-4), then the method's.
    rates = (lambda name, init: lrs) if lrs else (lambda name, init: [own.get(init, own.get(name, base.lr))])
    if pairs:
        return [dataclasses.replace(base, method=method, rule=rule, lr=lr) for method, rule in pairs
                for lr in rates(method, base.init)]
    if inits is None:
        inits = [] if methods else [i.name for i in initializers() if "lora" in i.methods]
    starts = [(name, base.init) for name in names] + [("lora", init) for init in inits]
    return [dataclasses.replace(base, method=name, init=init, rule=rule, lr=lr) for name, init in starts
            for rule in rules or [base.rule] for lr in rates(name, init)]


def run_in_process(run: BenchRun, core: int | None = None) -> dict[str, Any]:
    """`run_one` in a fresh process (its own peak memory), on one core with one thread when `core`
    is given; a failure is a row, not a crash. A finished run is kept under run.out and not redone."""
    spec = dataclasses.asdict(run)
    key = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    kept = Path(run.out) / "results" / f"{run.method}-{run.init}-{run.rule}-{run.lr:g}-{key}.json"
    if kept.exists():
        return json.loads(kept.read_text())
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    env = os.environ | ({"OMP_NUM_THREADS": "1"} if core is not None else {})
    pin = (lambda: os.sched_setaffinity(0, {core})) if core is not None else None
    proc = subprocess.run([sys.executable, "-m", "loraforge.bench.methods", f.name], capture_output=True, text=True,
                          env=env, preexec_fn=pin)
    os.unlink(f.name)
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        return {"method": run.method, "init": run.init, "rule": run.rule, "lr": run.lr, "error": reason[:160]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    kept.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(kept, json.dumps(result))
    return result


def run_all(runs: list[BenchRun], jobs: int = 1, desc: str = "bench methods") -> list[dict[str, Any]]:
    """Every run, `jobs` at a time (each then pinned to a core of its own); results in run order."""
    from tqdm.auto import tqdm

    if jobs <= 1:
        return [run_in_process(run) for run in tqdm(runs, desc=desc, unit="run")]
    cores = sorted(os.sched_getaffinity(0))
    if jobs > len(cores):
        raise LoraforgeError(f"--jobs {jobs} needs {jobs} cores; this process may use {len(cores)}")
    free: SimpleQueue[int] = SimpleQueue()
    for core in cores[:jobs]:
        free.put(core)

    def on_a_free_core(run: BenchRun) -> dict[str, Any]:
        core = free.get()
        try:
            return run_in_process(run, core)
        finally:
            free.put(core)

    with ThreadPoolExecutor(jobs) as pool:
        return list(tqdm(pool.map(on_a_free_core, runs), total=len(runs), desc=desc, unit="run"))


def bench_methods(base: BenchRun, methods: list[str] | None = None, command: str = "",
                  rules: list[str] | None = None, inits: list[str] | None = None,
                  method_lrs: dict[str, float] | None = None, jobs: int = 1,
                  pairs: list[tuple[str, str]] | None = None) -> list[dict[str, Any]]:
    results = run_all(all_runs(base, methods, rules, inits=inits, method_lrs=method_lrs, pairs=pairs), jobs)
    write_report(base, results, command, one_core=jobs > 1)
    return results


def write_report(base: BenchRun, results: list[dict[str, Any]], command: str, one_core: bool = False) -> None:
    metric = "dev accuracy" if base.data == "sst2" or base.data.endswith((".tsv", ".csv")) else "held-out loss"
    step = "step on 1 core (s)" if one_core else "step (s)"
    lines = [f"| method | init | rule | lr | trainable params | {step} | peak RSS (MB) | init (s) | final train loss | {metric} |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['init']} | {r['rule']} | {r['lr']:g} | | | | | | n/a: {r['error']} |")
            continue
        score = r["dev_accuracy"] if r["dev_accuracy"] is not None else r["dev_loss"]
        lines.append(f"| {r['method']} | {r['init']} | {r['rule']} | {r['lr']:g} | {r['trainable_params']:,} | {r['step_s']:.3f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['init_s']:.2f} | {r['final_loss']:.4f} | {score:.4f} |")
    chosen = [f"- {r['method']} + {r['rule']} @ {r['lr']:g} chose {r['selection']}" for r in results if r.get("selection")]
    if chosen:
        lines += ["", "What the selectors chose:", ""] + chosen
    plot = Path("docs") / figure_name(f"bench-methods-{base.model}-{Path(base.data).stem}")
    window = plot_loss_curves(results, f"{base.model} on {Path(base.data).stem}, {base.steps} steps of {base.batch_size}", plot)
    body = "\n".join(lines) + f"\n\nTraining loss (mean of every {window} steps): ![]({plot.name})\n"
    append_section(f"bench methods: {base.model} on {Path(base.data).stem}", command, body)
    print("\n".join(lines))


def plot_loss_curves(results: list[dict[str, Any]], title: str, path: Path) -> int:
    """Training loss per run, averaged over windows of about 1/30 of the run (single batches are
    too noisy to tell runs apart). Returns the window, in steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results if "error" not in r]
    window = max(1, max((len(r["losses"]) for r in runs), default=0) // 30)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colours = plt.get_cmap("tab20").colors
    for i, r in enumerate(runs):
        losses = r["losses"]
        starts = range(0, len(losses), window)
        ax.plot([min(j + window, len(losses)) for j in starts], [statistics.mean(losses[j:j + window]) for j in starts],
                color=colours[i % len(colours)], label=f"{r['method']}/{r['init']}/{r['rule']} @ {r['lr']:g}", linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (mean of {window} steps)" if window > 1 else "training loss")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    save_figure(fig, path)
    return window


if __name__ == "__main__":  # one run, in its own process: python -m loraforge.bench.methods RUN.json
    spec = BenchRun(**json.loads(Path(sys.argv[1]).read_text()))
    print(json.dumps(run_one(spec)))
