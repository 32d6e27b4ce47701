"""ABMLL (abmll.py) on a zoo's tasks: meta-train theta, adapt to a new task's examples, predict with S samples.

    META/meta.json            algo, zoo, base model, targets, ABMLLConfig, the zoo tasks, the training log
    META/theta.safetensors    theta's four factors per target
    ADAPTER/                  a PEFT-format LoRA: the posterior mean mu_phi = B_mu A_mu (alpha = rank: scale 1),
                              loadable anywhere; plus abmll.safetensors (phi's four factors) and abmll.json,
                              which `load_adapted` reads for the Bayesian prediction (S weight samples)
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from loraforge.core.config import AdapterConfig
from loraforge.core.errors import LoraforgeError
from loraforge.core.files import atomic_dir
from loraforge.generate.abmll import (
    ABMLLConfig,
    BayesLoRALinear,
    adapt,
    attach_bayes,
    factor_tensors,
    load_factors,
    meta_train,
    set_mode,
)
from loraforge.generate.flat import write_lora
from loraforge.generate.zoo import Zoo
from loraforge.training.data import collate, from_records, load_dataset, read_rows
from loraforge.training.loss import mean_batch_loss

ALGOS = ("abmll",)


def _nll(model: Any, pad_id: int):
    return lambda examples: mean_batch_loss(model, collate(examples, pad_id), "causal-lm")


def _load_base(name: str, model: Any, tokenizer: Any) -> tuple[Any, Any]:
    if model is None:
        from loraforge.core.models import default_device, load_model

        model, tokenizer = load_model(name, task="causal-lm")
        model.to(default_device())
    model.eval()  # dropout off: the only noise is the weights' sample
    return model, tokenizer


def train_meta(zoo: Zoo, out: str | Path, config: ABMLLConfig | None = None, family: str | None = None,
               model: Any = None, tokenizer: Any = None, progress: bool = True) -> Path:
    """Meta-train theta over the zoo's tasks (of `family`, or all) on their training data."""
    config = config or ABMLLConfig(rank=zoo.rank)
    tasks = zoo.family(family) if family else zoo.tasks
    if len(tasks) < 2:
        raise LoraforgeError(f"zoo {zoo.root}: meta-learning needs at least two tasks, found {len(tasks)}")
    model, tokenizer = _load_base(zoo.model, model, tokenizer)
    data = [list(load_dataset(t.train, tokenizer, max_length=config.max_length)) for t in tasks]
    layers = attach_bayes(model, zoo.targets, config)
    history = meta_train(layers, _nll(model, tokenizer.pad_token_id or 0), data, config, progress=progress)
    record = {"algo": "abmll", "zoo": str(zoo.root.resolve()), "base_model": zoo.model, "targets": zoo.targets,
              "config": dataclasses.asdict(config), "tasks": [t.id for t in tasks], "history": history}
    with atomic_dir(out) as tmp:
        save_file(factor_tensors(layers, zoo.targets, "theta"), str(tmp / "theta.safetensors"))
        (tmp / "meta.json").write_text(json.dumps(record, indent=2) + "\n")
    return Path(out)


def read_meta(meta: str | Path, model: str | None = None) -> dict[str, Any]:
    path = Path(meta) / "meta.json"
    if not path.is_file() or not (Path(meta) / "theta.safetensors").is_file():
        raise LoraforgeError(f"{meta}: not a meta-learnt prior (train one with `loraforge meta train`)")
    record = json.loads(path.read_text())
    if model is not None and model != record["base_model"]:
        raise LoraforgeError(f"{meta}: this prior is for {record['base_model']!r}, not {model!r}")
    return record


@dataclass
class Adapted:
    """An adapted posterior: its folder, and the model carrying it (phi loaded, sampling on) for prediction."""

    path: Path
    layers: list[BayesLoRALinear]
    model: Any
    tokenizer: Any
    config: ABMLLConfig


def adapt_meta(meta: str | Path, examples: str | list[dict], out: str | Path, steps: int | None = None,
               model: Any = None, tokenizer: Any = None) -> Adapted:
    """Adapt phi from theta on `examples` (a chat JSONL file or rows) and write the adapter."""
    record = read_meta(meta)
    config = ABMLLConfig(**record["config"])
    model, tokenizer = _load_base(record["base_model"], model, tokenizer)
    rows = read_rows(examples) if isinstance(examples, (str, Path)) else examples
    support = list(from_records([{"messages": r["messages"]} for r in rows], tokenizer, max_length=config.max_length))
    layers = attach_bayes(model, record["targets"], config)
    load_factors(layers, record["targets"], load_file(str(Path(meta) / "theta.safetensors")), "theta", str(meta))
    torch.manual_seed(config.seed)
    adapt(layers, _nll(model, tokenizer.pad_token_id or 0), support, config, steps or config.inner_steps)
    set_mode(layers, "phi")
    phi = factor_tensors(layers, record["targets"], "phi")
    mean = {}
    for name in record["targets"]:
        mean[f"{name}.lora_A.weight"], mean[f"{name}.lora_B.weight"] = phi[f"{name}.mu_A"], phi[f"{name}.mu_B"]
    adapter = AdapterConfig(rank=config.rank, alpha=float(config.rank), target_modules=record["targets"],
                            task_type="CAUSAL_LM", base_model_name_or_path=record["base_model"])

    def bayes_files(folder: Path) -> None:
        save_file(phi, str(folder / "abmll.safetensors"))
        (folder / "abmll.json").write_text(json.dumps({"meta": str(Path(meta).resolve()), "config": record["config"],
                                                       "targets": record["targets"]}, indent=2) + "\n")

    path = write_lora(out, adapter, record["targets"], mean, {"abmll": {"meta": str(meta), "examples": len(rows)}},
                      extra=bayes_files)
    return Adapted(path, layers, model, tokenizer, config)


def load_adapted(model: Any, adapter: str | Path) -> list[BayesLoRALinear]:
    """Attach an adapted ABMLL posterior (phi) to `model` for Bayesian prediction."""
    path = Path(adapter) / "abmll.json"
    if not path.is_file():
        raise LoraforgeError(f"{adapter}: no abmll.json: not an adapter written by `loraforge meta adapt`")
    saved = json.loads(path.read_text())
    config = ABMLLConfig(**saved["config"])
    layers = attach_bayes(model, saved["targets"], config)
    load_factors(layers, saved["targets"], load_file(str(Path(adapter) / "abmll.safetensors")), "phi", str(adapter))
    set_mode(layers, "phi")
    return layers
