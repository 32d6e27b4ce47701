"""Federated fine-tuning: aggregation of clients' adapters (aggregate.py and one file per strategy in
strategies/, pure torch) and the `loraforge fed` command (cli.py). Flower is only ever imported by
flower.py and app.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from loraforge.adapters.io import PEFT_PREFIX, read_adapter
from loraforge.core.config import CONFIG_NAME, LORAFORGE_CONFIG_NAME, WEIGHTS_NAME
from loraforge.core.files import atomic_dir
from loraforge.federated.aggregate import Aggregate, ClientAdapter, check_clients, lora_modules
from loraforge.federated.strategies import STRATEGIES, Strategy

__all__ = ["STRATEGIES", "Aggregate", "ClientAdapter", "Strategy", "aggregate", "lora_modules", "read_client",
           "write_adapter"]


def read_client(adapter_dir: str | Path) -> ClientAdapter:
    config, targets, tensors = read_adapter(adapter_dir)  # refuses NaN / inf tensors
    return ClientAdapter(str(adapter_dir), config, targets, tensors)


def write_adapter(adapter: ClientAdapter, out: str | Path) -> Path:
    """Write in PEFT's format (the files io.save_adapter writes), atomically."""
    peft_json = adapter.config.to_peft_dict(adapter.targets, "LORA")
    tensors = {PEFT_PREFIX + k: v.contiguous() for k, v in adapter.tensors.items()}
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(peft_json, indent=2) + "\n")
        (tmp / LORAFORGE_CONFIG_NAME).write_text(json.dumps(adapter.config.to_dict(), indent=2) + "\n")
    return Path(out)


def aggregate(strategy: str, adapters: list[str | Path | ClientAdapter], weights: list[float] | None = None,
              out: str | Path | None = None, **options: Any) -> Aggregate:
    """Aggregate adapter folders (or read ClientAdapters) with the registered `strategy` (`STRATEGIES.names()`);
    weights default to equal. `options` are the strategy's settings (`STRATEGIES.settings(strategy)`, such
    as pad= or lam=). Everything is checked before anything is written to `out`."""
    rule = STRATEGIES.get(strategy)  # refuses an unknown name, listing the registered ones
    clients = [a if isinstance(a, ClientAdapter) else read_client(a) for a in adapters]
    weights = [1.0 / len(clients)] * len(clients) if weights is None else [float(w) for w in weights]
    check_clients(clients, weights)
    result = rule(**options).aggregate(clients, weights)
    if out is not None:
        write_adapter(result, out)
    return result
