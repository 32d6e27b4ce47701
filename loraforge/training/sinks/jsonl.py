"""`--log jsonl` (the default): out/metrics.jsonl, one JSON object per logged step, flushed as it is
written; a resumed run reads its history back from it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loraforge.core.files import atomic_write_text
from loraforge.core.plugins import SINKS
from loraforge.training.metrics import METRICS_FILE


@SINKS.register("jsonl")
class JsonlSink:
    def __init__(self, out: Path, history: list[dict[str, Any]]):
        path = out / METRICS_FILE
        # Rewrite the file from the kept history: a killed run may have logged past its checkpoint.
        atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in history))
        self.file = path.open("a")

    def log(self, row: dict[str, Any]) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()
