"""One registry class for the plug-ins a run names by a string, and the registries themselves:
optimisation rules (`--optimizer`), regularisers (`--regularizer`), selectors (`--select`),
quantised bases (`--quant`), the runtime and launcher of multi-process runs, and metric sinks (`--log`).

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

import dataclasses
import importlib
import inspect
import pkgutil
import typing
from typing import Any, Callable, Generic, TypeVar

from loraforge.core.errors import LoraforgeError

Builder = TypeVar("Builder", bound=Callable)


@dataclasses.dataclass
class Component:
    """A plug-in chosen by name, with the settings its builder takes. The builder's signature is the
    one place its settings and their defaults are written: `Plugins.check` refuses any other."""

    name: str
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, value: "Component | str | dict[str, Any] | None") -> "Component | None":
        """A component from its name, its `{name, settings}` mapping (a YAML file's), or itself."""
        if value is None or isinstance(value, Component):
            return value
        if isinstance(value, str):
            return cls(value)
        if isinstance(value, dict) and set(value) <= {"name", "settings"} and "name" in value:
            return cls(value["name"], dict(value.get("settings") or {}))
        raise LoraforgeError(f"a plug-in is a name or a mapping {{name, settings}}, got {value!r}")


class Plugins(Generic[Builder]):
    def __init__(self, kind: str, package: str, aliases: dict[str, str] | None = None,
                 fixed: tuple[str, ...] = (), context: tuple[str, ...] = ()):
        self.kind = kind  # what the error messages call one: "optimizer", "regularizer", "selector"
        self.package = package  # every module in it is imported before the first lookup
        self.aliases = aliases or {}
        self.fixed = fixed  # arguments every builder takes from the caller, not from the run's settings
        # Arguments a builder may take from the run rather than from its settings (a selector's `lr`
        # and `seed` are the run's): the caller passes them to `build`, each builder takes what it names.
        self.context = context
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
        """The keyword settings builder `name` reads, beyond the fixed and context arguments."""
        return list(self.defaults(name))

    def defaults(self, name: str) -> dict[str, Any]:
        """Builder `name`'s settings and their defaults, from its signature."""
        return {p.name: p.default for p in inspect.signature(self.get(name)).parameters.values()
                if p.name not in self.fixed + self.context}

    def setting_types(self, name: str) -> dict[str, Any]:
        hints = typing.get_type_hints(self.get(name))
        return {setting: hints.get(setting, Any) for setting in self.settings(name)}

    def all_settings(self) -> dict[str, tuple[Any, list[str]]]:
        """Every setting of every builder: its type, and the plug-ins that take it."""
        found: dict[str, tuple[Any, list[str]]] = {}
        for name in self.names():
            for setting, kind in self.setting_types(name).items():
                found.setdefault(setting, (kind, []))[1].append(name)
        return found

    def check(self, component: Component) -> None:
        """Refuse a setting the builder does not take, or a value of another type, naming what it takes."""
        types = self.setting_types(component.name)
        takes = ", ".join(f"{s} ({_type_name(types[s])}, default {d!r})" for s, d in self.defaults(component.name).items())
        for setting, value in component.settings.items():
            if setting not in types:
                raise LoraforgeError(f"{self.kind} {component.name!r} takes no setting {setting!r}; "
                                     f"it takes: {takes or 'none'}")
            if not _fits(value, types[setting]):
                raise LoraforgeError(f"{self.kind} {component.name!r}: setting {setting!r} must be a "
                                     f"{_type_name(types[setting])}, got {value!r}; it takes: {takes}")

    def build(self, component: Component, *args: Any, **context: Any) -> Any:
        """The plug-in: its builder called with `args` (the fixed arguments), the context arguments it
        names, and the component's settings (the rest keep their defaults)."""
        self.check(component)
        build = self.get(component.name)
        named = inspect.signature(build).parameters
        return build(*args, **{k: v for k, v in context.items() if k in named}, **component.settings)

    def _load(self) -> None:
        package = importlib.import_module(self.package)
        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{self.package}.{module.name}")


OPTIMIZERS = Plugins("optimizer", "loraforge.optim", fixed=("model", "lr", "weight_decay"),
                     aliases={"loraplus": "lora-plus", "lora+": "lora-plus", "lorapro": "lora-pro"})
REGULARIZERS = Plugins("regularizer", "loraforge.regularizers")
SELECTORS = Plugins("selector", "loraforge.select", context=("lr", "seed"))
QUANTIZERS = Plugins("quantizer", "loraforge.quant", fixed=("model",))
RUNTIMES = Plugins("runtime", "loraforge.distributed")
LAUNCHERS = Plugins("launcher", "loraforge.distributed")
SINKS = Plugins("metric sink", "loraforge.training.sinks", fixed=("out", "history"))


def _fits(value: Any, kind: Any) -> bool:
    if kind is Any:
        return True
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind) if isinstance(kind, type) else True


def _type_name(kind: Any) -> str:
    return kind.__name__ if isinstance(kind, type) else str(kind)

