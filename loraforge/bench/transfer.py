"""`loraforge bench transfer`: Trans-LoRA (arXiv 2405.17258) SmolLM2-135M -> Gemma-3-270M on the issue's two
tasks, built here because this layer sits above both stages that own them:

    offset   the generation stage's family (`loraforge.generate.families`), k = 9, a value the zoo does not use
    advisor  `loraforge demo --no-rag`'s adapter, moved without the knowledge base: the kit keeps only its seeds
             of the demo's phase-1 rows; graded on the demo's held-out questions by the demo's own fact grader
             (fact accuracy, then the Markdown rate). Its adapters take the demo's recipe (rank, alpha,
             targets, rows per step) and their own budget of steps and candidates, a Gemma step being
             4-8x a SmolLM2 one; its kit's seeds are chosen to cover the task (`--seed-choice cover`).
             The default demo's adapter is refused: trained on prompts that carry retrieved pages, it
             reads facts and holds none, and without pages it states no fact (its `lora` condition:
             0.00), so there would be nothing to move.

`--quick` runs offset only; `--tasks` names the tasks to run. The runs themselves are
`loraforge.transfer.bench.bench_transfer`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from loraforge.core.configs import opt
from loraforge.core.errors import LoraforgeError
from loraforge.transfer.bench import BenchTask, TransferBench, bench_transfer, plot, table


@dataclass
class TransferTasks:
    """Which tasks `bench transfer` builds."""

    tasks: str | None = opt(None, "comma-separated tasks, of offset and advisor (default: both; --quick: offset)")
    offset: int = opt(9, "the offset task's k (the zoo trains 1-30 but not 9; 7, 13 and 22 are generate's held out)")
    demo: str = opt("runs/demo-norag", "the folder `loraforge demo --no-rag --out` wrote: adapter is transferred, "
                                 "data/phase1.jsonl is the real data, data/heldout.jsonl the graded questions")
    advisor_steps: int = opt(60, "training steps of the advisor's target adapters (upper bound, Trans-LoRA)")
    advisor_samples: int = opt(256, "candidates the target synthesises for the advisor")
    advisor_seeds: int = opt(24, "the advisor kit's seeds, chosen to cover the most words (--seed-choice cover): "
                                 "5 sampled ones name 5 of the demo's 19 universities at most")
    advisor_disc_real: int = opt(128, "real questions the advisor's discriminator learns from: 128 reach 0.86-0.88 on "
                                      "held-out rows, and the source writes a batch of question lists in 20 s")


def offset_task(k: int, n_train: int, n_test: int) -> BenchTask:
    from loraforge.generate.families import make_task

    train_rows, test_rows = make_task("offset", str(k)).rows(n_train, n_test)
    return BenchTask(f"offset-{k}", train_rows, test_rows)


def advisor_grade(model: nn.Module, tokenizer: Any, test: Path) -> dict[str, float]:
    """The demo's grade of its held-out questions (`loraforge.demo.ask`): fact accuracy, Markdown rate."""
    from loraforge.demo import DemoSettings, ask
    from loraforge.demo.advising import EvalItem

    items = [EvalItem(**json.loads(line)) for line in test.read_text().splitlines() if line.strip()]
    _, metrics = ask(model, tokenizer, items, DemoSettings())
    return {"fact_accuracy": metrics["fact_accuracy"], "markdown_rate": metrics["markdown_rate"]}


def advisor_task(tasks: TransferTasks) -> BenchTask:
    """The advisor of `tasks.demo`, with the advisor's own budget (`tasks.advisor_*`)."""
    folder = Path(tasks.demo)
    paths = {"adapter": folder / "adapter" / "adapter_config.json",
             "real data": folder / "data" / "phase1.jsonl", "held-out questions": folder / "data" / "heldout.jsonl"}
    missing = [f"{name} ({path})" for name, path in paths.items() if not path.is_file()]
    if missing:
        raise LoraforgeError(f"--demo {folder}: no {', '.join(missing)}; run `loraforge demo --no-rag --out {folder}` "
                             "first, or --quick for the offset task alone")
    results = folder / "results.json"
    recipe = json.loads(results.read_text()).get("settings", {}) if results.is_file() else {}
    if recipe.get("rag"):
        raise LoraforgeError(f"--demo {folder} is a retrieval run: its adapter reads the facts from the pages in its "
                             f"prompt and holds none, so there is nothing to move without them; run "
                             f"`loraforge demo --no-rag --out {folder}-norag` and pass that folder")

    def rows(path: Path) -> list[dict]:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    settings = {"steps": tasks.advisor_steps, "samples": tasks.advisor_samples, "seeds": tasks.advisor_seeds,
                "seed_choice": "cover", "disc_real": tasks.advisor_disc_real,
                **{key: recipe[key] for key in ("rank", "alpha", "targets", "batch_size") if key in recipe}}
    return BenchTask("advisor", rows(paths["real data"]), rows(paths["held-out questions"]), grade=advisor_grade,
                     source_adapter=str(folder / "adapter"), settings=settings)


def run(bench: TransferBench, tasks: TransferTasks, command: str, report: Path | None) -> dict[str, Any]:
    """The tasks (both, or offset only with --quick, unless --tasks names them); the table printed, and with
    `report` appended there with its plot."""
    from loraforge.bench import append_section, figure_name

    settings = bench.resolved()
    names = tasks.tasks.split(",") if tasks.tasks else ["offset"] if bench.quick else ["offset", "advisor"]
    unknown = sorted(set(names) - {"offset", "advisor"})
    if unknown:
        raise LoraforgeError(f"--tasks takes offset and advisor, comma-separated; got {tasks.tasks!r}")
    chosen = [offset_task(tasks.offset, settings.n_train, settings.n_test) if name == "offset" else
              advisor_task(tasks)
              for name in dict.fromkeys(names)]
    result = bench_transfer(bench, chosen)
    body = table(result) + "\n\n" + held(result)
    if report:
        report.parent.mkdir(parents=True, exist_ok=True)
        name = figure_name("transfer", report.parent)
        plot(result, report.parent / name)
        append_section(report, f"bench transfer{' --quick' if bench.quick else ''}: Trans-LoRA "
                               f"{settings.source_model} -> {settings.target_model}", command,
                       body + f"\n\nEvery system's score per task: ![]({name})\n")
    print(body)
    return result


def held(result: dict[str, Any]) -> str:
    """One line per task: the issue's targets, met or not, and the filter's effect."""
    lines = []
    for task in result["tasks"]:
        s = task["scores"]
        filtered, unfiltered = s["target + Trans-LoRA"], s["target + Trans-LoRA, no filter"]
        bar = max(s["source + adapter"], s["target base"]) - 0.05
        share = task["share_of_source"]
        lines.append(f"- {task['task']}: Trans-LoRA {filtered:.3f} vs max(source + adapter, target base) - 0.05 = "
                     f"{bar:.3f}: {'met' if task['lossless'] else 'NOT met'}; share of the source's "
                     f"{task['metric']} {'n/a' if share is None else f'{share:.2f}'}; the filter: {filtered:.3f} with, "
                     f"{unfiltered:.3f} without ({task['accepted']['target + Trans-LoRA']} of {task['generated']} "
                     f"candidates kept, {task['accepted']['target + Trans-LoRA, no filter']} distinct); seconds: "
                     + ", ".join(f"{stage} {_seconds(v)}" for stage, v in task["seconds"].items()))
        for metric in list(task["details"]["target base"])[1:]:  # the advisor's Markdown rate
            lines.append(f"- {task['task']}, {metric}: " + ", ".join(f"{system} {values[metric]:.3f}"
                                                                     for system, values in task["details"].items()))
    lines.append(f"- the whole bench: {result['seconds'] / 60:.1f} min")
    return "\n".join(lines)


def _seconds(value: float | dict[str, float]) -> str:
    if isinstance(value, dict):
        return "(" + ", ".join(f"{k} {v:.0f}" for k, v in value.items()) + ")"
    return f"{value:.0f}"
