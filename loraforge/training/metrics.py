"""A run's metrics: metrics.jsonl (one JSON object per logged step), TensorBoard events, the loss plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loraforge.core.files import atomic_write_text


class MetricsLogger:
    """metrics.jsonl (one JSON object per logged step) + TensorBoard events. In a distributed run
    only rank 0 writes (write=False elsewhere keeps the rows in memory): one metrics stream."""

    def __init__(self, out: Path, history: list[dict[str, Any]], write: bool = True):
        self.path = out / "metrics.jsonl"
        self.history = history
        self.file = self.tensorboard = None
        if not write:
            return
        from torch.utils.tensorboard import SummaryWriter

        # Rewrite the file from the kept history: a killed run may have logged past its checkpoint.
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in history))
        self.file = self.path.open("a")
        self.tensorboard = SummaryWriter(str(out / "tensorboard"))

    def log(self, row: dict[str, Any]) -> None:
        self.history.append(row)
        if self.file is None:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tensorboard.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.tensorboard.close()



def read_metrics(out: Path, upto: int) -> list[dict[str, Any]]:
    path = out / "metrics.jsonl"
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

