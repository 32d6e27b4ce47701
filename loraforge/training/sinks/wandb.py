"""`--log wandb`: a Weights & Biases run in out/wandb, offline unless WANDB_MODE says otherwise (the
machines this runs on often have no network; `wandb sync out/wandb/offline-run-*` uploads it later).
Optional: pip install 'loraforge[wandb]'."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from loraforge.core.errors import LoraforgeError
from loraforge.core.plugins import SINKS


@SINKS.register("wandb")
class WandbSink:
    def __init__(self, out: Path, history: list[dict[str, Any]]):
        try:
            import wandb
        except ImportError as e:
            raise LoraforgeError("--log wandb needs the wandb package: pip install 'loraforge[wandb]'") from e
        # A resumed run starts a new wandb run from the kept history: wandb cannot drop the steps a
        # killed run logged past its checkpoint, so replaying keeps the series the one --resume trains on.
        self.run = wandb.init(dir=str(out), project="loraforge", name=out.name,
                              mode=os.environ.get("WANDB_MODE", "offline"), reinit="create_new")
        for row in history:
            self.log(row)

    def log(self, row: dict[str, Any]) -> None:
        self.run.log({k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}, step=row["step"])

    def close(self) -> None:
        self.run.finish()
