"""`--log tensorboard`: TensorBoard event files in out/tensorboard, one scalar series per numeric
metric. Optional: pip install 'loraforge[tensorboard]'."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loraforge.core.errors import LoraforgeError
from loraforge.core.plugins import SINKS


@SINKS.register("tensorboard")
class TensorBoardSink:
    def __init__(self, out: Path, history: list[dict[str, Any]]):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise LoraforgeError("--log tensorboard needs the tensorboard package: "
                                 "pip install 'loraforge[tensorboard]'") from e
        # Like metrics.jsonl, a resumed run drops the events a killed run wrote past its checkpoint.
        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=history[-1]["step"] + 1 if history else None)

    def log(self, row: dict[str, Any]) -> None:
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, row["step"])

    def close(self) -> None:
        self.writer.close()
