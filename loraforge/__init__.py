"""loraforge: low-rank adaptation of pretrained models under one interface.

    import loraforge as lf
    model, tokenizer = lf.load_model("smollm2-135m")
    lf.attach(model, lf.AdapterConfig(rank=16, alpha=32, target_modules="all-linear"))
    lf.initialize(model, data, batches=8)       # only for starts that need data (lora-ga, eva, lora-sb)
    ...train...
    lf.save_adapter(model, "out/adapter")      # PEFT's format
"""

from .config import AdapterConfig
from .errors import AdapterError, DataError, LoraforgeError, ModelNotFoundError
from .inject import (
    adapter_disabled,
    adapter_layers,
    adapter_state_dict,
    attach,
    detach,
    find_targets,
    merge,
    merge_and_unload,
    trainable_parameters,
    unmerge,
)
from .init import initialize
from .io import load_adapter, save_adapter
from .optim import make_optimizer
from .registry import get_method, methods

__version__ = "0.1.0"


def __getattr__(name: str):
    # Heavier entry points import lazily so that `import loraforge` stays fast for the CLI's --help.
    lazy = {
        "load_model": ("models", "load_model"),
        "train": ("train", "train"),
        "TrainConfig": ("train", "TrainConfig"),
        "evaluate": ("evaluate", "evaluate"),
        "generate": ("evaluate", "generate"),
        "merge_to_folder": ("evaluate", "merge_to_folder"),
    }
    if name in lazy:
        import importlib

        module, attr = lazy[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module 'loraforge' has no attribute {name!r}")
