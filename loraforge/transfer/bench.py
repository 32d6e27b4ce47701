"""`bench transfer`: does Trans-LoRA (arXiv 2405.17258) move an adapter to another base losslessly?

Per task (a `BenchTask`: rows and a grader given by the caller, since this stage imports neither the generate
nor the demo stage), five systems graded on the task's held-out rows, by exact match unless the task says:

    target base                    the new base, no adapter
    source + adapter               the adapter to transfer, trained on the real rows
    target + real-data adapter     the upper bound: the same training on the real rows, on the target
    target + Trans-LoRA            from the kit alone, the discriminator's filter on
    target + Trans-LoRA, no filter the same candidate pool, every distinct candidate kept

The paper's criterion (and the issue's target on offset): Trans-LoRA >= max(source + adapter, target base) - 0.05
(`lossless`); `share_of_source` is Trans-LoRA's score over the source's (the advisor's target: >= 0.8).
Acceptance rate, discriminator accuracy and the seconds of every stage are reported beside the scores.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from torch import nn

from loraforge.adapters.io import load_pretrained
from loraforge.core.configs import opt
from loraforge.core.errors import LoraforgeError
from loraforge.core.files import atomic_write_text, write_jsonl
from loraforge.core.models import load_model
from loraforge.training.config import TrainConfig
from loraforge.training.evaluate import exact_match
from loraforge.training.loop import train
from loraforge.transfer.pipeline import PrepareConfig, TransferConfig, candidate_pool, prepare, transfer

SYSTEMS = ("target base", "source + adapter", "target + real-data adapter", "target + Trans-LoRA",
           "target + Trans-LoRA, no filter")
@dataclass
class TransferBench:
    """Settings of `bench transfer`; --quick shrinks the runs to fit in 15 minutes on a 2-core CPU."""

    source_model: str = opt("smollm2-135m", "the base the adapter is trained on")
    target_model: str = opt("gemma3-270m", "the base it moves to")
    n_train: int = opt(600, "real training rows of each task")
    n_test: int = opt(100, "held-out rows every system is graded on")
    steps: int = opt(60, "training steps of every adapter (source, upper bound, Trans-LoRA); offset's source "
                         "reaches 0.98 exact match in 60")
    rank: int = opt(4, "adapter rank")
    alpha: float = opt(8.0, "adapter alpha")
    lr: float = opt(2e-3, "learning rate")
    batch_size: int = opt(16, "rows per step")
    targets: str = opt("q_proj,v_proj", "the adapters' target modules, on both bases")
    seeds: int = opt(5, "real seed rows in the kit")
    seed_choice: str = opt("random", "how the kit's seeds are chosen: random (the paper) | cover (`transfer prepare`)")
    samples: int = opt(600, "candidates the target synthesises (the paper: until the set reaches the real "
                            "training set's size, n_train)")
    threshold: float = opt(0.5, "the discriminator's threshold P")
    disc_steps: int = opt(60, "discriminator training steps")
    disc_real: int = opt(600, "real inputs the discriminator learns from, and as many synthetic ones (`transfer "
                              "prepare --real`); on offset, 128 left it at chance on held-out rows (0.49), 600 "
                              "reach 0.82")
    quick: bool = opt(False, "fewer test rows (n_test 50) and steps (at most 60)")
    json: str | None = opt(None, "write the results here too")
    work: str | None = opt(None, "keep every run (kit, adapters, candidates.jsonl, synthetic.jsonl) in this folder "
                                 "instead of a temporary one")
    seed: int = opt(0, "seeds every run")

    def resolved(self) -> "TransferBench":
        if not self.quick:
            return self
        return TransferBench(**{**asdict(self), "n_test": min(self.n_test, 50), "steps": min(self.steps, 60)})


Grader = Callable[[nn.Module, Any, Path], dict[str, float]]  # (model, tokenizer, test JSONL) -> {metric: value}


def exact_match_grader(model: nn.Module, tokenizer: Any, test: Path) -> dict[str, float]:
    """The default grade: greedy answers equal to the references (`training.evaluate.exact_match`)."""
    return {"exact_match": exact_match(model, tokenizer, test, max_new_tokens=16)["exact_match"]}


@dataclass
class BenchTask:
    """One task of the bench. `grade`'s first metric is the headline; `source_adapter`, when given, is an
    adapter already trained on `train_rows` (the demo's), so the source is not trained again; `settings`
    overrides the bench's for this task alone (field names of TransferBench)."""

    name: str
    train_rows: list[dict]
    test_rows: list[dict]
    grade: Grader = exact_match_grader
    source_adapter: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)


def bench_task(settings: TransferBench, task: BenchTask, work: Path) -> dict[str, Any]:
    """One task through the five systems; `work` holds its runs."""
    settings = dataclasses.replace(settings, **task.settings)
    real = write_jsonl(work / "train.jsonl", task.train_rows[:settings.n_train])
    test = write_jsonl(work / "test.jsonl", task.test_rows[:settings.n_test])
    seconds: dict[str, float] = {}
    common = {"rank": settings.rank, "alpha": settings.alpha, "steps": settings.steps, "lr": settings.lr,
              "batch_size": settings.batch_size, "targets": settings.targets, "seed": settings.seed}

    def trained(model: str, out: str) -> Path:
        t0 = time.perf_counter()
        train(TrainConfig(model=model, data=str(real), out=str(work / out), **common))
        seconds[f"train {out}"] = time.perf_counter() - t0
        return work / out / "adapter"

    source_adapter = Path(task.source_adapter) if task.source_adapter else trained(settings.source_model, "source")
    upper = trained(settings.target_model, "upper")
    t0 = time.perf_counter()
    kit = prepare(PrepareConfig(adapter=str(source_adapter), data=str(real), out=str(work / "kit"),
                                model=settings.source_model, seeds=settings.seeds, seed_choice=settings.seed_choice,
                                real=settings.disc_real, disc_steps=settings.disc_steps, seed=settings.seed))
    seconds["prepare"] = time.perf_counter() - t0
    run = TransferConfig(kit=str(work / "kit"), out="", target_model=settings.target_model, samples=settings.samples,
                         threshold=settings.threshold, **common)
    target, tokenizer = load_model(settings.target_model, task="causal-lm")
    pool = candidate_pool(run, target, tokenizer)  # one pool: the filter's effect is measured on the same candidates
    del target
    reports = {}
    for system, keep in (("target + Trans-LoRA", True), ("target + Trans-LoRA, no filter", False)):
        out = work / ("filtered" if keep else "unfiltered")
        reports[system] = transfer(dataclasses.replace(run, out=str(out), filter=keep), pool=pool)
    t0 = time.perf_counter()
    adapters = {"target base": (settings.target_model, None), "source + adapter": (settings.source_model, source_adapter),
                "target + real-data adapter": (settings.target_model, upper),
                "target + Trans-LoRA": (settings.target_model, work / "filtered" / "adapter"),
                "target + Trans-LoRA, no filter": (settings.target_model, work / "unfiltered" / "adapter")}
    details = {}
    for system, (model_name, adapter) in adapters.items():
        model, tokenizer = load_pretrained(model_name, adapter) if adapter else load_model(model_name, task="causal-lm")
        details[system] = task.grade(model, tokenizer, test)
    seconds["grade"] = time.perf_counter() - t0
    metric = next(iter(details["target base"]))
    scores = {system: values[metric] for system, values in details.items()}
    transferred, source = scores["target + Trans-LoRA"], scores["source + adapter"]
    return {"task": task.name, "metric": metric, "scores": scores, "details": details, "settings": task.settings,
            "lossless": transferred >= max(source, scores["target base"]) - 0.05,
            "share_of_source": transferred / source if source else None,
            "discriminator_accuracy": kit.discriminator_accuracy,
            "acceptance_rate": reports["target + Trans-LoRA"]["acceptance_rate"],
            "accepted": {s: r["accepted"] for s, r in reports.items()},
            "generated": reports["target + Trans-LoRA"]["generated"],
            "seconds": {**seconds, "synthesise + score": sum(pool.seconds.values()),
                        **{f"transfer {s}": r["stage_seconds"] for s, r in reports.items()}}}


def bench_transfer(settings: TransferBench, tasks: list[BenchTask]) -> dict[str, Any]:
    """Every task through `bench_task`. JSON keys: `tasks` (list of {task, scores: {system: metric}, ...}),
    `settings`, `seconds`; written to settings.json too when it names a file."""
    settings = settings.resolved()
    if not tasks:
        raise LoraforgeError("bench transfer: no task to run")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-transfer-") as scratch:
        root = Path(settings.work or scratch)
        results = []
        for task in tasks:
            (root / task.name).mkdir(parents=True, exist_ok=True)
            results.append(bench_task(settings, task, root / task.name))
    result = {"tasks": results, "settings": asdict(settings), "seconds": time.perf_counter() - start}
    if settings.json:
        atomic_write_text(settings.json, json.dumps(result, indent=2) + "\n")
    return result


def table(result: dict[str, Any]) -> str:
    """The Markdown table of a `bench_transfer` result: one row per system, one column per task."""
    names = [task["task"] for task in result["tasks"]]
    lines = ["| system | " + " | ".join(f"{task['task']} ({task['metric']})" for task in result["tasks"]) + " |",
             "|---|" + "---|" * len(names)]
    for system in SYSTEMS:
        lines.append(f"| {system} | " + " | ".join(f"{task['scores'][system]:.3f}" for task in result["tasks"]) + " |")
    for key in ("acceptance_rate", "discriminator_accuracy"):
        lines.append(f"| {key.replace('_', ' ')} | " + " | ".join(f"{task[key]:.3f}" for task in result["tasks"]) + " |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str | Path) -> None:
    """Bars of every system's headline score, one group per task; the lossless bar dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = result["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(7 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        values = [task["scores"][system] for system in SYSTEMS]
        ax.barh(range(len(SYSTEMS)), values, color=["0.6", "0.4", "0.2", "tab:blue", "tab:cyan"])
        ax.axvline(max(task["scores"]["source + adapter"], task["scores"]["target base"]) - 0.05, color="k",
                   linestyle="--", label="max(source + adapter, target base) - 0.05")
        ax.set(yticks=range(len(SYSTEMS)), yticklabels=SYSTEMS, xlim=(0, 1), xlabel=task["metric"],
               title=f"{task['task']}: acceptance {task['acceptance_rate']:.2f}, "
                     f"discriminator {task['discriminator_accuracy']:.2f}")
        ax.invert_yaxis()
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
