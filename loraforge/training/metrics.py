"""A run's metrics: the rows it logs, handed to the sinks `--log` names (metrics.jsonl by default,
TensorBoard on request; plug-ins of `core.plugins.SINKS` in `training/sinks/`), and the loss plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

from loraforge.core.plugins import SINKS

METRICS_FILE = "metrics.jsonl"  # one JSON object per logged step: what a resumed run reads its history from


class MetricSink(Protocol):
    """Where logged rows go. A sink is built as `SINKS.get(name)(out, history)`, `history` being
    the rows a resumed run keeps (those up to its checkpoint)."""

    def log(self, row: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


def sink_names(log: str) -> list[str]:
    """The sinks of a `--log` value (comma-separated names); an unknown name is refused, naming the
    registered ones."""
    names = [name.strip() for name in log.split(",") if name.strip()]
    for name in names:
        SINKS.get(name)
    return names


class MetricsLogger:
    """The run's rows (`history`, what `TrainResult` reports) and its sinks, fed each row as it is
    logged. In a distributed run only rank 0 writes (write=False elsewhere keeps the rows in memory):
    one metrics stream."""

    def __init__(self, out: Path, history: list[dict[str, Any]], log: str = "jsonl", write: bool = True):
        self.history = history
        self.sinks: list[MetricSink] = [SINKS.get(name)(out, history) for name in sink_names(log)] if write else []

    def log(self, row: dict[str, Any]) -> None:
        self.history.append(row)
        for sink in self.sinks:
            sink.log(row)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def read_metrics(out: Path, upto: int) -> list[dict[str, Any]]:
    """The rows of out/metrics.jsonl up to step `upto`: a resumed run's history (none from step 0)."""
    path = out / METRICS_FILE
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
