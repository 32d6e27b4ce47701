"""`bench transfer`: does Trans-LoRA (arXiv 2405.17258) move an adapter to another base losslessly?

Per task (rows given by the caller: this stage does not import the generate or demo stages), five systems
graded on the task's held-out rows by exact match:

    target base                    the new base, no adapter
    source + adapter               the adapter to transfer, trained on the real rows
    target + real-data adapter     the upper bound: the same training on the real rows, on the target
    target + Trans-LoRA            from the kit alone, the discriminator's filter on
    target + Trans-LoRA, no filter the same candidate pool, every distinct candidate kept

The paper's criterion (and the issue's target): Trans-LoRA >= max(source + adapter, target base) - 0.05.
Acceptance rate, discriminator accuracy and the seconds of every stage are reported beside the scores.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loraforge.adapters.io import load_pretrained
from loraforge.core.configs import opt
from loraforge.core.errors import LoraforgeError
from loraforge.core.files import atomic_write_text
from loraforge.core.models import load_model
from loraforge.training.config import TrainConfig
from loraforge.training.evaluate import exact_match
from loraforge.training.loop import train
from loraforge.transfer.pipeline import PrepareConfig, TransferConfig, prepare, transfer

SYSTEMS = ("target base", "source + adapter", "target + real-data adapter", "target + Trans-LoRA",
           "target + Trans-LoRA, no filter")


@dataclass
class TransferBench:
    """Settings of `bench transfer`; --quick shrinks the runs to fit in 15 minutes on a 2-core CPU."""

    source_model: str = opt("smollm2-135m", "the base the adapter is trained on")
    target_model: str = opt("gemma3-270m", "the base it moves to")
    n_train: int = opt(600, "real training rows of each task")
    n_test: int = opt(100, "held-out rows every system is graded on")
    steps: int = opt(150, "training steps of every adapter (source, upper bound, Trans-LoRA)")
    rank: int = opt(4, "adapter rank")
    alpha: float = opt(8.0, "adapter alpha")
    lr: float = opt(2e-3, "learning rate")
    batch_size: int = opt(16, "rows per step")
    targets: str = opt("q_proj,v_proj", "the adapters' target modules, on both bases")
    seeds: int = opt(5, "real seed rows in the kit")
    samples: int = opt(192, "candidates the target synthesises")
    threshold: float = opt(0.5, "the discriminator's threshold P")
    disc_steps: int = opt(60, "discriminator training steps")
    quick: bool = opt(False, "fewer rows and steps: n_test 50, steps 100, samples 128")
    json: str | None = opt(None, "write the results here too")
    seed: int = opt(0, "seeds every run")

    def resolved(self) -> "TransferBench":
        if not self.quick:
            return self
        return TransferBench(**{**asdict(self), "n_test": min(self.n_test, 50), "steps": min(self.steps, 100),
                                "samples": min(self.samples, 128), "quick": False})


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _score(model_name: str, adapter: Path | None, test: Path) -> float:
    model, tokenizer = load_pretrained(model_name, adapter) if adapter else load_model(model_name, task="causal-lm")
    return exact_match(model, tokenizer, test, max_new_tokens=16)["exact_match"]


def bench_task(settings: TransferBench, name: str, train_rows: list[dict], test_rows: list[dict],
               work: Path) -> dict[str, Any]:
    """One task through the five systems; `work` holds its runs."""
    real, test = _write_jsonl(work / "train.jsonl", train_rows), _write_jsonl(work / "test.jsonl", test_rows)
    seconds: dict[str, float] = {}
    common = {"rank": settings.rank, "alpha": settings.alpha, "steps": settings.steps, "lr": settings.lr,
              "batch_size": settings.batch_size, "targets": settings.targets, "seed": settings.seed}

    def trained(model: str, out: str) -> Path:
        t0 = time.perf_counter()
        train(TrainConfig(model=model, data=str(real), out=str(work / out), **common))
        seconds[f"train {out}"] = time.perf_counter() - t0
        return work / out / "adapter"

    source_adapter, upper = trained(settings.source_model, "source"), trained(settings.target_model, "upper")
    t0 = time.perf_counter()
    kit = prepare(PrepareConfig(adapter=str(source_adapter), data=str(real), out=str(work / "kit"),
                                model=settings.source_model, seeds=settings.seeds, disc_steps=settings.disc_steps,
                                seed=settings.seed))
    seconds["prepare"] = time.perf_counter() - t0
    reports = {}
    for system, keep in (("target + Trans-LoRA", True), ("target + Trans-LoRA, no filter", False)):
        reports[system] = transfer(TransferConfig(
            kit=str(work / "kit"), out=str(work / ("filtered" if keep else "unfiltered")),
            target_model=settings.target_model, samples=settings.samples, threshold=settings.threshold, filter=keep,
            **common))
    t0 = time.perf_counter()
    adapters = {"target base": (settings.target_model, None), "source + adapter": (settings.source_model, source_adapter),
                "target + real-data adapter": (settings.target_model, upper),
                "target + Trans-LoRA": (settings.target_model, work / "filtered" / "adapter"),
                "target + Trans-LoRA, no filter": (settings.target_model, work / "unfiltered" / "adapter")}
    scores = {system: _score(model, adapter, test) for system, (model, adapter) in adapters.items()}
    seconds["grade"] = time.perf_counter() - t0
    bar = max(scores["source + adapter"], scores["target base"]) - 0.05
    return {"task": name, "metric": "exact_match", "scores": scores, "target_met": scores["target + Trans-LoRA"] >= bar,
            "discriminator_accuracy": kit.discriminator_accuracy,
            "acceptance_rate": reports["target + Trans-LoRA"]["acceptance_rate"],
            "accepted": {s: r["accepted"] for s, r in reports.items()},
            "generated": reports["target + Trans-LoRA"]["generated"],
            "seconds": {**seconds, **{f"transfer {s}": r["stage_seconds"] for s, r in reports.items()}}}


def bench_transfer(settings: TransferBench, tasks: dict[str, tuple[list[dict], list[dict]]],
                   work: str | Path | None = None) -> dict[str, Any]:
    """Every task of `tasks` (name -> (train rows, test rows), chat form) through `bench_task`. JSON keys:
    `tasks` (list of {task, scores: {system: metric}, ...}), `settings`, `seconds`."""
    settings = settings.resolved()
    if not tasks:
        raise LoraforgeError("bench transfer: no task to run")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-transfer-") as scratch:
        root = Path(work or scratch)
        results = []
        for name, (train_rows, test_rows) in tasks.items():
            (root / name).mkdir(parents=True, exist_ok=True)
            results.append(bench_task(settings, name, train_rows[:settings.n_train], test_rows[:settings.n_test],
                                      root / name))
    result = {"tasks": results, "settings": asdict(settings), "seconds": time.perf_counter() - start}
    if settings.json:
        atomic_write_text(settings.json, json.dumps(result, indent=2) + "\n")
    return result


def table(result: dict[str, Any]) -> str:
    """The Markdown table of a `bench_transfer` result: one row per system, one column per task."""
    names = [task["task"] for task in result["tasks"]]
    lines = ["| system | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for system in SYSTEMS:
        lines.append(f"| {system} | " + " | ".join(f"{task['scores'][system]:.3f}" for task in result["tasks"]) + " |")
    for key in ("acceptance_rate", "discriminator_accuracy"):
        lines.append(f"| {key.replace('_', ' ')} | " + " | ".join(f"{task[key]:.3f}" for task in result["tasks"]) + " |")
    return "\n".join(lines)
