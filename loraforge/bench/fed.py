"""`loraforge bench fed`: FedAvg (FedIT) vs FLoRA (heterogeneous ranks) vs LoRA-FAIR vs centralised
training on the pooled data, at the same total number of optimizer steps.

    minilm-l6 + SST-2          accuracy on a held-out split after every round
    smollm2-135m + advising    held-out loss after every round

Each registered federated strategy is one `loraforge fed run` in Flower's simulation engine
(flower.run): N clients, Dirichlet label skew, R rounds of S local steps. Centralised training is the
trainer on the union of the clients' rows for R x N x S steps (what the clients did in all,
sequentially), evaluated every N x S steps so that its points line up with the rounds.
Communication is what `fed run` logs: bytes of adapter tensors sent down and up per round.

FLoRA (arXiv 2409.05976) reports FLoRA above FedIT; LoRA-FAIR (arXiv 2411.14961) reports LoRA-FAIR
above both (each strategy's `reported_above`). The closing lines of the section say which orderings
held here.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from loraforge.bench import append_section, figure_line
from loraforge.bench.methods import BenchRun, load_rows
from loraforge.core.configs import opt
from loraforge.core.errors import LoraforgeError
from loraforge.core.files import atomic_write_text, write_jsonl
from loraforge.federated.strategies import STRATEGIES
from loraforge.training.data import data_path

TASKS = {"minilm-l6": "sst2", "smollm2-135m": "advising"}
CENTRALISED = "centralised"  # the baseline's curve, beside one per strategy


@dataclass
class FedBench:
    models: str = opt("minilm-l6", "comma-separated: minilm-l6 (SST-2), smollm2-135m (advising)")
    data: str | None = opt(None, "a TSV/CSV (classification) or JSONL (causal LM) instead of the model's own task")
    clients: int = opt(10, "clients in the federation")
    partition: str = opt("dirichlet:0.5", "iid or dirichlet:ALPHA over the labels")
    rounds: int = opt(6, "federated rounds")
    local_steps: int = opt(5, "local steps per client per round (20 steps on a Dirichlet-0.5 shard drift every strategy to its clients' labels (~0.55))")
    batch_size: int = opt(16, "sequences per local step")
    lr: float = opt(2e-3, "learning rate of every client")
    rank: int = opt(8, "rank of strategies whose clients train the global adapter (fedavg, lora-fair), and centralised")
    flora_ranks: str = opt("4,8,16", "cycled over the clients of strategies whose clients start fresh (flora)")
    rows: int = opt(2000, "SST-2 rows used (the last 10% held out); the advising set is used whole")
    max_length: int = opt(64, "tokens per sequence")
    seed: int = opt(0, "seed of the partition, data order and initialisation")
    cpus: int = opt(2, "CPUs Flower's simulation engine may use")
    out: str = opt("runs/bench-fed", "folder for the runs")


def write_data(bench: FedBench, model: str, folder: Path) -> tuple[Path, str]:
    """The benchmark's data file (what every client reads) and its task."""
    if bench.data:
        return data_path(bench.data), "classification" if bench.data.endswith((".tsv", ".csv")) else "causal-lm"
    if model not in TASKS:
        raise LoraforgeError(f"bench fed knows {', '.join(TASKS)}; got {model!r} (give --data for another model)")
    task, train_rows, dev_rows = load_rows(BenchRun(model=model, data=TASKS[model], dev_size=0, seed=bench.seed))
    rows = (train_rows + dev_rows)
    folder.mkdir(parents=True, exist_ok=True)
    if task == "classification":
        rows = rows[:bench.rows]
        path = folder / "data.tsv"
        path.write_text("sentence\tlabel\n" + "".join(f"{r['text']}\t{r['label']}\n" for r in rows))
    else:
        path = folder / "data.jsonl"
        write_jsonl(path, rows)
    return path, task


def ranks(bench: FedBench, curve: str) -> str:
    """A curve's --ranks: one per client where the strategy's clients start fresh, else one rank."""
    fresh = curve != CENTRALISED and STRATEGIES.get(curve).fresh_clients
    return bench.flora_ranks if fresh else str(bench.rank)


def run_config(bench: FedBench, model: str, data: Path, task: str, strategy: str, out: Path):
    from loraforge.federated.flower import FedRunConfig

    return FedRunConfig(model=model, data=str(data), out=str(out), task=task, clients=bench.clients,
                        partition=bench.partition, rounds=bench.rounds, local_steps=bench.local_steps,
                        strategy=strategy, ranks=ranks(bench, strategy), lr=bench.lr, batch_size=bench.batch_size,
                        max_length=bench.max_length, seed=bench.seed)


def flower_simulation(cfg: Any, cpus: int) -> Path:
    """One `fed run` in Flower's simulation engine."""
    from loraforge.federated.flower import run

    return run(cfg, num_cpus=cpus)


def centralised(bench: FedBench, cfg: Any) -> list[dict[str, Any]]:
    """The trainer on the pooled client rows, evaluated on the same held-out split once per round's worth of steps."""
    from loraforge.federated.flower import base_model, prepare, rows_dataset, split_rows
    from loraforge.training.config import TrainConfig
    from loraforge.training.loop import train

    prepare(cfg)  # fixes num_labels as the federated runs see it, and makes the folder
    held_out, parts = split_rows(cfg)
    model, tokenizer = base_model(cfg)
    pooled = rows_dataset([r for part in parts for r in part], tokenizer, cfg)
    per_round = bench.clients * bench.local_steps
    config = TrainConfig(model=cfg.model, task=cfg.task, out=cfg.out, steps=bench.rounds * per_round, lr=bench.lr,
                         rank=bench.rank, alpha=2.0 * bench.rank, batch_size=bench.batch_size,
                         max_length=bench.max_length, seed=bench.seed, eval_every=per_round, warmup=0.0)
    result = train(config, model=model, tokenizer=tokenizer, train_data=pooled,
                   eval_data=rows_dataset(held_out, tokenizer, cfg), progress=False)
    evals = [r for r in result.history if "eval_loss" in r]
    return [{"round": i + 1, "eval_loss": r["eval_loss"], "eval_accuracy": r.get("eval_accuracy"),
             "bytes_up": 0, "bytes_down": 0} for i, r in enumerate(evals[:bench.rounds])]


def bench_model(bench: FedBench, model: str, runner: Callable[[Any, int], Path] = flower_simulation) -> dict[str, Any]:
    """Every strategy and the centralised baseline on one model: {name: per-round rows}. The result
    is kept as `results.json` in the model's folder; the same command again re-renders the report
    from it instead of training."""
    root = Path(bench.out) / Path(model).name
    kept, settings = root / "results.json", _settings(bench)
    if kept.is_file():
        saved = json.loads(kept.read_text())
        if saved.get("settings") != settings:
            raise LoraforgeError(f"{kept} holds a run with other settings: choose another --out for a new benchmark run")
        return saved["result"]
    data, task = write_data(bench, model, root)
    curves = {}
    for strategy in STRATEGIES.names():
        out = root / strategy
        if out.exists() and any(out.iterdir()):
            raise LoraforgeError(f"{out} is not empty: choose another --out for a new benchmark run")
        runner(run_config(bench, model, data, task, strategy, out), bench.cpus)
        curves[strategy] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    from loraforge.federated.flower import FedRunConfig, split_rows

    # centralised training uses no strategy: the default one's settings give it the data split and one rank
    baseline = run_config(bench, model, data, task, FedRunConfig.strategy, root / CENTRALISED)
    curves[CENTRALISED] = centralised(bench, baseline)
    result = {"model": model, "task": task, "curves": curves, "held_out": len(split_rows(baseline)[0])}
    atomic_write_text(kept, json.dumps({"settings": settings, "result": result}))
    return result


def _settings(bench: FedBench) -> dict[str, Any]:
    """What decides a model's curves (not which models run, where, or on how many CPUs)."""
    return {k: v for k, v in dataclasses.asdict(bench).items() if k not in ("models", "cpus", "out")}


def last_third(rounds: int) -> int:
    """How many final rounds a verdict averages: a third of them, at least one."""
    return max(1, rounds // 3)


def final_scores(result: dict[str, Any]) -> dict[str, float]:
    """Each curve's mean over its `last_third` rounds: on a few hundred held-out rows, one round's
    score moves by several points from the next."""
    key = "eval_accuracy" if result["task"] == "classification" else "eval_loss"
    tail = last_third(len(next(iter(result["curves"].values()))))
    return {name: sum(r[key] for r in rows[-tail:]) / tail for name, rows in result["curves"].items()}


def orderings(result: dict[str, Any]) -> list[str]:
    """The papers' orderings on `final_scores`: held, did not hold, or a tie when two scores are
    closer than one standard error of an accuracy on the held-out rows (sqrt(1/4n), its largest),
    or than 0.01 nats of held-out loss (the sweep's "one point" for a loss)."""
    final, accuracy = final_scores(result), result["task"] == "classification"
    noise = math.sqrt(0.25 / result["held_out"]) if accuracy else 0.01

    def verdict(a: str, b: str) -> str:
        gain = (final[a] - final[b]) * (1 if accuracy else -1)
        if abs(gain) < noise:
            return f"a tie ({final[a]:.3f} vs {final[b]:.3f}, {'within one standard error, ' if accuracy else 'within '}{noise:.3f})"
        return "held" if gain > 0 else "did not hold"

    federated = [name for name in result["curves"] if name != CENTRALISED]
    checks = [(f"{STRATEGIES.get(a).title} above {STRATEGIES.get(b).title} ({STRATEGIES.get(a).title} paper)",
               verdict(a, b)) for a in federated for b in STRATEGIES.get(a).reported_above if b in federated]
    checks.append(("centralised above every federated strategy (the usual upper bound)",
                   "held" if all(verdict(CENTRALISED, s) == "held" for s in federated) else "did not hold"))
    return [f"{claim}: {outcome}." for claim, outcome in checks]


def write_section(bench: FedBench, results: list[dict[str, Any]], command: str, plot_dir: Path | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    parts = []
    for ax, result in zip(axes.flat, results):
        key = "eval_accuracy" if result["task"] == "classification" else "eval_loss"
        metric = "held-out accuracy" if key == "eval_accuracy" else "held-out loss"
        lines = [f"### {result['model']} ({metric} after each round)", "",
                 "| strategy | ranks | " + " | ".join(f"round {i + 1}" for i in range(bench.rounds)) +
                 " | MB down / round | MB up / round |", "|---|---|" + "---:|" * (bench.rounds + 2)]
        for name, rows in result["curves"].items():
            down = sum(r["bytes_down"] for r in rows) / len(rows) / 1e6
            up = sum(r["bytes_up"] for r in rows) / len(rows) / 1e6
            lines.append(f"| {name} | {ranks(bench, name)} | " + " | ".join(f"{r[key]:.4f}" for r in rows) +
                         f" | {down:.2f} | {up:.2f} |")
            ax.plot([r["round"] for r in rows], [r[key] for r in rows], "o-", label=name)
        ax.set(xlabel="round", ylabel=metric, title=result["model"])
        ax.legend()
        tail = last_third(len(result["curves"][CENTRALISED]))
        lines += ["", f"Against the papers (mean of the last {tail} round{'s' if tail > 1 else ''}, "
                      f"{result['held_out']} held-out rows):", ""] + [f"- {line}" for line in orderings(result)]
        parts.append("\n".join(lines))
    return (f"{bench.clients} clients, {bench.partition}, {bench.rounds} rounds of {bench.local_steps} local steps "
            f"(batch {bench.batch_size}, lr {bench.lr}); centralised: {bench.rounds * bench.clients * bench.local_steps}"
            f" steps on the pooled rows. Flower's simulation engine.\n\n" + "\n\n".join(parts) +
            figure_line(fig, "bench-fed", "Score per round", plot_dir, dpi=110))


def bench_fed(bench: FedBench, command: str = "", runner: Callable[[Any, int], Path] = flower_simulation,
              report: Path | None = None) -> list[dict[str, Any]]:
    results = [bench_model(bench, m.strip(), runner) for m in bench.models.split(",") if m.strip()]
    body = write_section(bench, results, command, report.parent if report else None)
    if report:
        titles = [STRATEGIES.get(name).title for name in STRATEGIES.names()]
        append_section(report, f"bench fed: {' vs '.join(titles)} vs centralised", command, body)
    print(body)
    return results
