"""`loraforge bench methods --lrs 1e-5,...,1e-2`: how sensitive each method and rule is to the learning rate.

The unified study of LoRA variants found most variants very sensitive to the learning rate, and
plain LoRA with a well-chosen rate hard to beat. Every (method, rule) trains at every rate of the
sweep with the same budget (`bench methods`' runner, one process per run), and the report gives,
per (method, rule): the best held-out score, the rate that reached it, and the width of the rate
range within one point of the best (accuracy: 0.01; loss: 0.01 nats), in decades of the sweep's
rates (log10 of the largest over the smallest rate inside that range; 0 when only one rate is),
plus a plot of the score against the rate, one line per (method, rule), in the section `--report`
appends.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from loraforge.bench import append_section, figure_line
from loraforge.bench.methods import BenchRun, all_runs, check_data, run_all

ONE_POINT = 0.01


def summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Best score, its rate and the within-one-point width per (method, rule); higher is better for
    accuracy, lower for loss."""
    rows = []
    keys = list(dict.fromkeys((r["method"], r["rule"]) for r in results))
    for method, rule in keys:
        runs = [r for r in results if (r["method"], r["rule"]) == (method, rule) and "error" not in r]
        if not runs:
            rows.append({"method": method, "rule": rule, "error": next(r["error"] for r in results
                                                                         if (r["method"], r["rule"]) == (method, rule))})
            continue
        accuracy = runs[0]["dev_accuracy"] is not None
        score = {r["lr"]: (r["dev_accuracy"] if accuracy else -r["dev_loss"]) for r in runs}
        finite = {lr: s for lr, s in score.items() if math.isfinite(s)}
        best_lr = max(finite, key=finite.get) if finite else min(score)
        best = finite.get(best_lr, math.nan)
        near = [lr for lr, s in finite.items() if s >= best - ONE_POINT]
        rows.append({"method": method, "rule": rule, "best": best if accuracy else -best, "best_lr": best_lr,
                     "step_s": statistics.median(r["step_s"] for r in runs),
                     "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
                     "width_decades": math.log10(max(near) / min(near)) if near else 0.0, "metric": "accuracy" if accuracy else "loss",
                     "scores": {lr: (s if accuracy else -s) for lr, s in sorted(score.items())}})
    return rows


def bench_sweep(base: BenchRun, methods: list[str] | None, rules: list[str] | None, lrs: list[float],
                command: str = "", inits: list[str] | None = None, jobs: int = 1,
                pairs: list[tuple[str, str]] | None = None, report: Path | None = None) -> list[dict[str, Any]]:
    runs = all_runs(base, methods, rules, lrs, inits=inits, pairs=pairs)
    check_data(base)
    summary = summarise(run_all(runs, jobs, desc="lr sweep"))
    write_sweep_report(base, summary, lrs, command, report)
    return summary


def write_sweep_report(base: BenchRun, summary: list[dict[str, Any]], lrs: list[float], command: str,
                       report: Path | None = None) -> None:
    """Print the table; with a report, append it there with the plot beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["| method | rule | best | at lr | lr range within 1 point (decades) | step (s) | peak RSS (MB) | "
             + " | ".join(f"{lr:g}" for lr in lrs) + " |", "|---|---|---|---|---|---|---|" + "---|" * len(lrs)]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colours, styles = plt.get_cmap("tab20").colors, ("-", "--", ":")
    metric = "score"
    for i, row in enumerate(summary):
        if "error" in row:
            lines.append(f"| {row['method']} | {row['rule']} | n/a: {row['error']} |")
            continue
        metric = "dev accuracy" if row["metric"] == "accuracy" else "held-out loss"
        cells = " | ".join(f"{row['scores'][lr]:.4f}" if lr in row["scores"] else "" for lr in lrs)
        lines.append(f"| {row['method']} | {row['rule']} | {row['best']:.4f} | {row['best_lr']:g} | "
                     f"{row['width_decades']:.2f} | {row['step_s']:.3f} | {row['peak_rss_mb']:.0f} | {cells} |")
        rates = sorted(row["scores"])
        ax.plot(rates, [row["scores"][lr] for lr in rates], marker="o", linestyle=styles[(i // 10) % 3],
                color=colours[(2 * i) % 20 + (i // 10) % 2], label=f"{row['method']}/{row['rule']}", linewidth=1.2)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(metric)
    ax.set_title(f"{base.model} on {Path(base.data).stem}, {base.steps} steps of {base.batch_size}")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    print("\n".join(lines))
    body = "\n".join(lines) + figure_line(fig, f"bench-lr-sweep-{base.model}-{Path(base.data).stem}",
                                          f"{metric} against the learning rate", report.parent if report else None)
    if report:
        append_section(report, f"bench methods lr sweep: {base.model} on {Path(base.data).stem}", command, body)
