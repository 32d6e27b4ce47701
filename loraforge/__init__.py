"""loraforge: low-rank adaptation of pretrained models under one interface.

    import loraforge as lf
    model, tokenizer = lf.load_model("smollm2-135m")
    lf.attach(model, lf.AdapterConfig(rank=16, alpha=32, target_modules="all-linear"))
    lf.initialize(model, data, batches=8)       # only for starts that need data (lora-ga, eva, lora-sb)
    ...train...
    lf.save_adapter(model, "out/adapter")      # PEFT's format
"""

from loraforge.adapters.inject import (
    adapter_state_dict,
    attach,
    detach,
    merge,
    merge_and_unload,
    trainable_parameters,
    unmerge,
)
from loraforge.adapters.io import load_adapter, save_adapter
from loraforge.core.config import AdapterConfig
from loraforge.core.errors import AdapterError, DataError, LoraforgeError, ModelNotFoundError
from loraforge.core.modules import find_targets
from loraforge.core.registry import get_method, methods
from loraforge.methods.base import adapter_disabled, adapter_layers
from loraforge.training.components import make_optimizer
from loraforge.training.initialize import initialize

__all__ = [
    "AdapterConfig", "AdapterError", "DataError", "LoraforgeError", "ModelNotFoundError", "adapter_disabled",
    "adapter_layers", "adapter_state_dict", "attach", "detach", "find_targets", "get_method", "initialize",
    "load_adapter", "make_optimizer", "merge", "merge_and_unload", "methods", "save_adapter", "trainable_parameters",
    "unmerge", "load_model", "train", "build_run", "fit", "TrainConfig", "evaluate", "generate", "merge_to_folder",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Heavier entry points import lazily so that `import loraforge` stays fast for the CLI's --help.
    lazy = {
        "load_model": ("core.models", "load_model"),
        "train": ("training.loop", "train"),
        "build_run": ("training.setup", "build_run"),
        "fit": ("training.loop", "fit"),
        "TrainConfig": ("training.config", "TrainConfig"),
        "evaluate": ("training.evaluate", "evaluate_dataset"),
        "generate": ("training.evaluate", "generate"),
        "merge_to_folder": ("training.evaluate", "merge_to_folder"),
    }
    if name in lazy:
        import importlib

        module, attr = lazy[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module 'loraforge' has no attribute {name!r}")
