"""`AdapterConfig`: the one description of an adapter, and its round trip through PEFT's JSON.

The config is saved twice over, next to the weights: `adapter_config.json` in PEFT's schema (so
`peft.PeftModel.from_pretrained` reads it) and `loraforge_config.json`, the dataclass itself, which
may hold what PEFT's schema cannot (a method's options, the provenance). Reading back prefers the
latter, so a loraforge adapter comes back identically; an adapter written by PEFT is mapped field by
field, missing keys taking PEFT's defaults.

Two dicts hold what the fixed fields do not: `options`, the settings the method and its initialiser
need to rebuild the adapter (declared and checked by them: `registry.check_options`), and
`provenance`, a free record of what decided the structure (a selector's choice, a federated
aggregation, a conversion to plain LoRA), which nothing rebuilding the adapter reads.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraforge.core.errors import AdapterError
from loraforge.core.registry import check_options, get_method, initializer_names, resolve_initializer

CONFIG_NAME = "adapter_config.json"
LORAFORGE_CONFIG_NAME = "loraforge_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
INITS = ("default", "gaussian", "random")  # the layers' own; loraforge/methods/init/ registers the others
# PEFT inits whose saved tensors are relative to a base weight the init overwrote (W0 minus the start).
PEFT_RESIDUAL_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")
TASK_TYPES = {"causal-lm": "CAUSAL_LM", "classification": "SEQ_CLS"}
# Keys of the single `extras` dict of earlier loraforge_config.json files that were provenance; the
# others were the method's options.
PROVENANCE_KEYS = ("selection", "federated", "converted_from")


@dataclass
class AdapterConfig:
    method: str = "lora"  # a name from `loraforge methods`
    rank: int = 8
    alpha: float = 8.0  # scale s = alpha / rank (alpha / sqrt(rank) with use_rslora)
    dropout: float = 0.0  # on the adapter branch's input only, never on the frozen path
    # "all-linear" (every Linear/Conv1D but the output head), a list of names (a module matches
    # when its path equals a name or ends with "." + name), or one regex matched against the full path.
    target_modules: list[str] | str = "all-linear"
    use_rslora: bool = False
    # "default": A Kaiming-uniform (a=sqrt 5), B = 0; "gaussian": A ~ N(0, 1/r^2), B = 0;
    # "random": both non-zero (tests only: the adapter then changes the output at step 0);
    # or an initialiser registered in loraforge/init/ ("pissa", "lora-ga", "eva", ...).
    init: str = "default"
    seed: int | None = None  # seeds torch's RNG just before the adapter tensors are created
    modules_to_save: list[str] | None = None  # trained in full and saved (e.g. a classification head)
    # Per-module overrides, PEFT semantics: key is a regex matched against the end of the module path.
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    task_type: str | None = None  # "CAUSAL_LM" or "SEQ_CLS", as in PEFT
    base_model_name_or_path: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # the method's and initialiser's (`loraforge methods`)
    provenance: dict[str, Any] = field(default_factory=dict)  # e.g. {"selection": ...}: a record, never read back

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise AdapterError(f"rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise AdapterError(f"alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in INITS + initializer_names():
            raise AdapterError(f"init must be one of {', '.join(INITS + initializer_names())}, got {self.init!r}")
        resolve_initializer(self)  # refuses an initialiser that cannot start this method
        check_options(self)
        if self.rank_pattern and get_method(self.method).uniform_rank:
            raise AdapterError(f"{self.method} has one rank for every layer (its tensors are shared across layers): "
                               f"rank_pattern must be empty, got {self.rank_pattern}")
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            try:
                re.compile(self.target_modules)
            except re.error as exc:
                raise AdapterError(f"target_modules {self.target_modules!r} is not a valid regex: {exc}") from exc
        elif not isinstance(self.target_modules, str):
            self.target_modules = list(self.target_modules)
            if not self.target_modules:
                raise AdapterError("target_modules is empty: name at least one module, or use 'all-linear'")

    def rank_for(self, module_name: str) -> int:
        return _pattern_value(self.rank_pattern, module_name, self.rank)

    def alpha_for(self, module_name: str) -> float:
        return _pattern_value(self.alpha_pattern, module_name, self.alpha)

    # ---- JSON ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterConfig":
        if "extras" in data:  # a file written before options and provenance were apart
            extras = data["extras"] or {}
            data = {k: v for k, v in data.items() if k != "extras"} | {
                "options": {k: v for k, v in extras.items() if k not in PROVENANCE_KEYS},
                "provenance": {k: v for k, v in extras.items() if k in PROVENANCE_KEYS}}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise AdapterError(f"unknown adapter config keys: {', '.join(unknown)}")
        return cls(**data)

    def to_peft_dict(self, resolved_targets: list[str] | str, peft_type: str) -> dict[str, Any]:
        """PEFT's config fields for `peft_type`: those every PEFT config has, and LoraConfig's for a
        LORA adapter (another type adds its own through its method's `peft_config`). `resolved_targets`
        is what attach() actually wrapped, so PEFT rebuilds exactly the same structure whatever
        pattern the user wrote."""
        common = {
            "peft_type": peft_type,
            "task_type": self.task_type,
            "base_model_name_or_path": self.base_model_name_or_path,
            "revision": None,
            "inference_mode": True,
            "r": self.rank,
            "target_modules": resolved_targets,
            "bias": "none",
            "fan_in_fan_out": False,  # per-layer in loraforge; PEFT detects Conv1D itself
            "modules_to_save": self.modules_to_save,
            "layers_to_transform": None,
            "layers_pattern": None,
        }
        if peft_type != "LORA":
            return common
        return common | {
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "use_rslora": self.use_rslora,
            "use_dora": self.method == "dora",  # PEFT keeps DoRA inside its LORA type
            # Any other start is in the saved tensors already (PiSSA-like ones are converted on save).
            "init_lora_weights": {"gaussian": "gaussian", "random": False}.get(self.init, True),
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
        }

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> "AdapterConfig":
        peft_type = data.get("peft_type")
        if peft_type != "LORA":
            raise AdapterError(f"adapter_config.json has peft_type {peft_type!r}; loraforge reads LORA adapters")
        for key in ("layers_to_transform", "layers_pattern"):
            if data.get(key):
                raise AdapterError(f"adapter_config.json sets {key!r}, which loraforge does not read yet")
        init = data.get("init_lora_weights", True)
        if isinstance(init, str) and init.lower().startswith(PEFT_RESIDUAL_INITS):
            raise AdapterError(
                f"adapter_config.json has init_lora_weights={init!r}: its tensors are relative to the residual base "
                "weights that init left behind, not to the original model. Save it from PEFT with "
                "save_pretrained(..., path_initial_model_for_weight_conversion=...) to get a LoRA for the original base")
        return cls(
            method="dora" if data.get("use_dora") else "lora",
            rank=int(data.get("r", 8)),
            alpha=float(data.get("lora_alpha", 8)),
            dropout=float(data.get("lora_dropout", 0.0)),
            target_modules=data.get("target_modules") or "all-linear",
            use_rslora=bool(data.get("use_rslora", False)),
            init="gaussian" if init == "gaussian" else ("random" if init is False else "default"),
            modules_to_save=data.get("modules_to_save"),
            rank_pattern=dict(data.get("rank_pattern") or {}),
            alpha_pattern=dict(data.get("alpha_pattern") or {}),
            task_type=data.get("task_type"),
            base_model_name_or_path=data.get("base_model_name_or_path"),
        )


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise AdapterError(f"{path}: expected a JSON object")
    return data


def read_adapter_config(adapter_dir: str | Path) -> tuple[AdapterConfig, dict[str, Any]]:
    """The adapter's config, and PEFT's JSON (whose `target_modules` lists what was wrapped)."""
    peft_path = Path(adapter_dir) / CONFIG_NAME
    if not peft_path.is_file():
        raise AdapterError(f"{adapter_dir}: no {CONFIG_NAME} (is this an adapter folder?)")
    peft_json = read_json(peft_path)
    own_path = Path(adapter_dir) / LORAFORGE_CONFIG_NAME
    config = AdapterConfig.from_dict(read_json(own_path)) if own_path.is_file() else AdapterConfig.from_peft_dict(peft_json)
    return config, peft_json


def _pattern_value(patterns: dict[str, Any], module_name: str, default: Any) -> Any:
    # PEFT's rule: the first key whose regex matches a suffix of the module path (at a dot boundary).
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", module_name):
            return value
    return default
