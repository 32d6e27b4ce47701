"""One registry class for the plug-ins a run names by a string, and the registries themselves:
optimisation rules (`--optimizer`), regularisers (`--regularizer`), selectors (`--select`),
quantised bases (`--quant`), and the runtime and launcher of multi-process runs.

Each plug-in is a builder function in its own module of one package, registered on import:

    @OPTIMIZERS.register("lora-plus")
    def build(model, lr, weight_decay, loraplus_lr_ratio=16.0): ...

The registries live here, at the bottom of the package, and import their plug-in package by name on
first lookup: the trainer asks `OPTIMIZERS.get(name)` and imports no plug-in, so a new one is a new
file and the plug-in packages sit above the trainer. A builder's keyword settings are named like the
`TrainConfig` fields that carry them, so the trainer passes
`{name: getattr(config, name) for name in OPTIMIZERS.settings(name)}` and knows no plug-in by name.
(Adapter methods and initialisers carry more than a builder: `registry.py`.)
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Callable, Generic, TypeVar

from loraforge.core.errors import LoraforgeError

Builder = TypeVar("Builder", bound=Callable)


class Plugins(Generic[Builder]):
    def __init__(self, kind: str, package: str, aliases: dict[str, str] | None = None,
                 fixed: tuple[str, ...] = ()):
        self.kind = kind  # what the error messages call one: "optimizer", "regularizer", "selector"
        self.package = package  # every module in it is imported before the first lookup
        self.aliases = aliases or {}
        self.fixed = fixed  # arguments every builder takes from the caller, not from the run's settings
        self._builders: dict[str, Builder] = {}

    def register(self, name: str) -> Callable[[Builder], Builder]:
        def wrap(build: Builder) -> Builder:
            if name in self._builders:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._builders[name] = build
            return build

        return wrap

    def names(self) -> list[str]:
        self._load()
        return sorted(self._builders)

    def get(self, name: str) -> Builder:
        self._load()
        name = self.aliases.get(name, name)
        if name not in self._builders:
            raise LoraforgeError(f"unknown {self.kind} {name!r}; registered: {', '.join(sorted(self._builders))}")
        return self._builders[name]

    def settings(self, name: str) -> list[str]:
        """The keyword settings builder `name` reads, beyond the fixed arguments."""
        return [p for p in inspect.signature(self.get(name)).parameters if p not in self.fixed]

    def _load(self) -> None:
        package = importlib.import_module(self.package)
        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{self.package}.{module.name}")


OPTIMIZERS = Plugins("optimizer", "loraforge.optim", fixed=("model", "lr", "weight_decay"),
                     aliases={"loraplus": "lora-plus", "lora+": "lora-plus", "lorapro": "lora-pro"})
REGULARIZERS = Plugins("regularizer", "loraforge.regularizers")
SELECTORS = Plugins("selector", "loraforge.select")
QUANTIZERS = Plugins("quantizer", "loraforge.quant", fixed=("model",))
RUNTIMES = Plugins("runtime", "loraforge.distributed")
LAUNCHERS = Plugins("launcher", "loraforge.distributed")

