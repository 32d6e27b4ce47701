"""Name -> method, name -> initialiser. A parametrisation registers itself with `@register(...)` in
its own file of `loraforge.methods`, an initialiser with `@register_init(...)` in its file of
`loraforge.methods.init`; the CLI, the saver and the tests look them up here and never by class.

The registry sits below the methods it lists: the first lookup imports their package by name
(`importlib`), so that every file's decorator has run, and nothing here imports a method.

Typed options: a method or initialiser that takes settings beyond AdapterConfig's fields declares
them as a frozen dataclass in its own file, each field an `option(default, help)`, and registers it
(`options=`). `AdapterConfig.options` may set the fields of its method's class and of its
initialiser's; `check_options` refuses any other name or a value of the wrong type or range, and a
layer reads its values, typed and defaulted, with `read_options(ItsOptions, config)`.
"""

from __future__ import annotations

import dataclasses
import importlib
import types
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal, TypeVar

import torch
from torch import nn

from loraforge.core.errors import AdapterError

if TYPE_CHECKING:
    from loraforge.core.config import AdapterConfig
    from loraforge.methods.base import AdapterLayer
    from loraforge.methods.init import InitContext


@dataclass(frozen=True)
class Method:
    name: str
    axis: str  # the unified study's taxonomy: rank | init | optimisation | mixture
    paper: str  # title and arXiv id
    layer: type["AdapterLayer"] | None  # None: no layer wraps anything (full fine-tuning trains W itself)
    merges: bool  # the update folds exactly into the frozen weight
    peft_type: str | None  # PEFT can load the saved adapter as this type (None: it cannot)
    # Methods that adapt whole blocks rather than single Linear layers (a mixture of experts in the
    # FFN) bring their own attach(model, config) -> paths they replaced; None: wrap each target Linear.
    attach: Callable[[nn.Module, "AdapterConfig"], list[str]] | None = None
    # The saved and checkpointed state is every base parameter (full fine-tuning, the baseline the
    # analysis compares LoRA against), not tensors the method added.
    trains_base: bool = False
    options: type | None = None  # the frozen dataclass of what `AdapterConfig.options` may set
    uniform_rank: bool = False  # one rank for every layer (tensors shared across layers): rank_pattern is refused
    # False where a section of the paper could not be read and the docstring records the reading taken.
    verified: bool = True
    # The keys PEFT's config class for `peft_type` reads beyond LoraConfig's (RandLoRA's randlora_alpha, ...).
    peft_config: Callable[["AdapterConfig"], dict[str, Any]] | None = None

    def trainable_params(self, d_in: int, d_out: int, config: "AdapterConfig") -> int:
        """Count by building the layer on the meta device: no formula to keep in sync."""
        if self.layer is None:  # the layer's own weight trains
            return d_in * d_out
        with torch.device("meta"):
            layer = self.layer(nn.Linear(d_in, d_out, bias=False), config, "layer")
        return sum(p.numel() for n, p in layer.named_parameters() if not n.startswith("base_layer."))


_METHODS: dict[str, Method] = {}


def register(name: str, *, axis: str, paper: str, merges: bool = True, peft_type: str | None = None,
             attach: Callable[[nn.Module, "AdapterConfig"], list[str]] | None = None, trains_base: bool = False,
             options: type | None = None, uniform_rank: bool = False, verified: bool = True,
             peft_config: Callable[["AdapterConfig"], dict[str, Any]] | None = None):
    """Decorates a method's AdapterLayer class; with trains_base=True it decorates the method's
    attach(model, config) instead, since a method that trains the base weights wraps no layer."""
    def wrap(obj):
        if name in _METHODS:
            raise ValueError(f"method {name!r} registered twice")
        layer, hook = (None, obj) if trains_base else (obj, attach)
        _METHODS[name] = Method(name, axis, paper, layer, merges, peft_type, hook, trains_base, options, uniform_rank,
                                verified, peft_config)
        return obj

    return wrap


def get_method(name: str) -> Method:
    _load_builtin_methods()
    if name not in _METHODS:
        raise AdapterError(f"unknown method {name!r}; registered: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def methods() -> list[Method]:
    _load_builtin_methods()
    return sorted(_METHODS.values(), key=lambda m: m.name)


def _load_builtin_methods() -> None:
    # Importing the package runs every method and initialiser file's decorator (once).
    importlib.import_module("loraforge.methods")


@dataclass(frozen=True)
class Initializer:
    name: str
    paper: str
    needs_data: bool
    methods: tuple[str, ...]  # the parametrisations whose tensors it knows how to fill
    fills: str  # what it writes: the reason another method cannot take it
    run: Callable[[nn.Module, "InitContext"], dict[str, Any] | None]  # fills every adapter layer of the model
    layer: type["AdapterLayer"] | None = None  # built instead of the method's own layer
    default_for: tuple[str, ...] = ()
    options: type | None = None  # as Method.options: its settings, beside the method's


_INITIALIZERS: dict[str, Initializer] = {}


def register_init(name: str, *, paper: str, needs_data: bool, methods: tuple[str, ...], fills: str,
                  layer: type["AdapterLayer"] | None = None, default_for: tuple[str, ...] = (),
                  options: type | None = None):
    def wrap(run):
        if name in _INITIALIZERS:
            raise ValueError(f"initialiser {name!r} registered twice")
        _INITIALIZERS[name] = Initializer(name, paper, needs_data, tuple(methods), fills, run, layer,
                                          tuple(default_for), options)
        return run

    return wrap


def initializers() -> list[Initializer]:
    _load_builtin_methods()
    return sorted(_INITIALIZERS.values(), key=lambda i: i.name)


def initializer_names() -> tuple[str, ...]:
    _load_builtin_methods()
    return tuple(sorted(_INITIALIZERS))


def resolve_initializer(config: "AdapterConfig") -> Initializer | None:
    """The initialiser `config` asks for (None: the layer's own init), after checking it can start
    `config.method`."""
    _load_builtin_methods()
    init = _INITIALIZERS.get(config.init)
    if init is None:
        if config.init != "default":
            return None
        return next((i for i in _INITIALIZERS.values() if config.method in i.default_for), None)
    if config.method not in init.methods:
        raise AdapterError(
            f"init {init.name!r} cannot start method {config.method!r}: {init.name} {init.fills}, which fits "
            f"only method {', '.join(repr(m) for m in init.methods)}")
    return init



# ---- typed options ---------------------------------------------------------------------------------

Options = TypeVar("Options")


def option(default: Any, help: str, *, check: Callable[[Any], bool] | None = None, want: str | None = None) -> Any:
    """A field of an options dataclass: its default, the help text `loraforge methods` shows, and a
    range `check` on a given value (None is never range-checked) with `want` saying in words what
    passes (else the field's type says it)."""
    return dataclasses.field(default=default, metadata={"help": help, "check": check, "want": want})


def describe_options(cls: type | None) -> list[dict[str, Any]]:
    """[{name, type, default, help}] of an options dataclass, in declaration order ([] for None)."""
    if cls is None:
        return []
    hints = typing.get_type_hints(cls)
    return [{"name": f.name, "type": _type_name(hints[f.name]), "default": f.default, "help": f.metadata.get("help", "")}
            for f in dataclasses.fields(cls)]


def check_options(config: "AdapterConfig") -> None:
    """Refuse an option that neither the method nor the initialiser of `config` declares, or a value
    its declaration refuses; the error names the method and lists what it takes."""
    classes = _option_classes(config)
    known = {f.name for cls in classes for f in dataclasses.fields(cls)}
    unknown = sorted(set(config.options) - known)
    if unknown:
        raise AdapterError(f"{_owner(config)}: unknown option{'s' if len(unknown) > 1 else ''} "
                           f"{', '.join(map(repr, unknown))}; {_listing(config)}")
    for cls in classes:
        read_options(cls, config)


def read_options(cls: type[Options], config: "AdapterConfig") -> Options:
    """`config.options` as an instance of `cls`: the fields it sets, checked, and defaults for the rest
    (names of other classes, the initialiser's for a method, are skipped)."""
    hints = typing.get_type_hints(cls)
    values = {f.name: config.options[f.name] for f in dataclasses.fields(cls) if f.name in config.options}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        value, check = values[f.name], f.metadata.get("check")
        if not _fits(value, hints[f.name]) or (value is not None and check is not None and not check(value)):
            want = f.metadata.get("want") or _wanted(hints[f.name])
            raise AdapterError(f"{_owner(config)}: option {f.name!r} must be {want}, got {value!r}; {_listing(config)}")
    try:
        return cls(**values)
    except ValueError as exc:  # a rule across fields, from the class's __post_init__
        raise AdapterError(f"{_owner(config)}: {exc}; {_listing(config)}") from exc


def _option_classes(config: "AdapterConfig") -> list[type]:
    init = resolve_initializer(config)
    return [cls for cls in (get_method(config.method).options, init.options if init else None) if cls is not None]


def _owner(config: "AdapterConfig") -> str:
    init = resolve_initializer(config)
    return f"{config.method} with init {init.name!r}" if init is not None and init.options else config.method


def _listing(config: "AdapterConfig") -> str:
    fields = [f for cls in _option_classes(config) for f in describe_options(cls)]
    if not fields:
        return f"{_owner(config)} takes no options"
    return "valid options: " + ", ".join(f"{f['name']} ({f['type']}, default {f['default']!r})" for f in fields)


def _union_args(hint: Any) -> tuple[Any, ...] | None:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return typing.get_args(hint)
    return None


def _fits(value: Any, hint: Any) -> bool:
    if (members := _union_args(hint)) is not None:
        return any(_fits(value, member) for member in members)
    if typing.get_origin(hint) is Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint in (int, float):  # bool is an int to Python, never to a user; an int is a fine float
        return isinstance(value, (int, float) if hint is float else int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    if (members := _union_args(hint)) is not None:
        return " | ".join(_type_name(member) for member in members)
    if typing.get_origin(hint) is Literal:
        return " | ".join(repr(v) for v in typing.get_args(hint))
    return "None" if hint is type(None) else hint.__name__


def _wanted(hint: Any) -> str:
    if (members := _union_args(hint)) is not None:
        return " or ".join(_wanted(member) for member in members)
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(hint))
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            type(None): "null"}.get(hint, hint.__name__)
