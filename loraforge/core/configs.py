"""Dataclass configs from the outside world, one mechanism for every command.

A config dataclass's fields are at once its command-line flags, the keys of its YAML file and the
keys of a flat key=value map (Flower's run config):

    --batch-size 8 --use-rslora / --no-use-rslora     flags: tyro, help from the field's "help" metadata
    batch-size: 8   (or batch_size: 8)                 YAML: `--config run.yaml`, flags given with it win
    {"batch-size": 8}                                  flat maps: the same fields, typed by their annotations

A dict field is a repeatable `--NAME KEY=VALUE` flag whose values are YAML scalars (`n_blocks=4` is
an int, `sparse=true` a bool, as the same key in a YAML file). A plug-in field (`component(...)`: the
optimizer, the selector) is picked by name (`--optimizer lora-plus`, or `optimizer: lora-plus`), and
every setting of its registry's builders is a flag of its own (`--loraplus-lr-ratio 8`) that lands in
its settings; a YAML file may also nest them (`optimizer: {name: lora-plus, settings: {...}}`), which
is how `--print-config` writes them. Unknown keys are refused, naming the known ones: a misspelt
setting would otherwise keep its default silently.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Annotated, Any, Mapping, TypeVar

import tyro
import yaml

from loraforge.core.errors import LoraforgeError
from loraforge.core.plugins import Component, Plugins

Config = TypeVar("Config")


def opt(default: Any, help: str = "", **metadata: Any) -> Any:
    """A config field whose help text becomes its flag's help (and `--help`'s line)."""
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def component(default: str | None, help: str, registry: Plugins) -> Any:
    """A plug-in field: a `Component` of `registry`, by default the plug-in named `default` (None: none)."""
    return dataclasses.field(default_factory=lambda: Component.of(default),
                             metadata={"help": help, "registry": registry})


def nest_settings(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """`values` with each plug-in field a `Component`, and flat setting keys (`loraplus_lr_ratio: 8`,
    the form of the flags and of older config files, which held every plug-in's settings) moved into
    the settings of the chosen plug-in where it takes them; the others are dropped, as the flat
    fields of another plug-in always went unread."""
    values = dict(values)
    for f in dataclasses.fields(cls):
        registry = f.metadata.get("registry")
        if registry is None:
            continue
        given = {setting: values.pop(setting) for setting in registry.all_settings() if setting in values}
        if f.name not in values and not given:
            continue
        chosen = Component.of(values[f.name]) if f.name in values else _default(f)
        if chosen is not None:
            takes = registry.settings(chosen.name)
            chosen = Component(chosen.name, {**chosen.settings, **{k: v for k, v in given.items() if k in takes}})
        values[f.name] = chosen
    return values


def parse_flags(cls: type[Config], args: list[str], *, prog: str, description: str = "",
                defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The field values that `args` give `cls`, on top of `defaults` (a YAML file's, say) and the
    fields' own defaults. A parse error prints tyro's message and exits with status 2, as argparse does."""
    defaults = nest_settings(cls, defaults or {})
    unknown = sorted(set(defaults) - set(field_names(cls)))
    if unknown:
        raise LoraforgeError(f"unknown settings {', '.join(unknown)}; known: {', '.join(field_names(cls))}")
    flags = tyro.cli(_flag_class(cls, defaults), args=args, prog=prog, description=description)
    values = {name: getattr(flags, name) for name in field_names(cls)}
    for name in _dict_fields(cls):
        values[name] = _key_values(values[name], _flag_name(cls, name))
    for f, registry in _component_fields(cls):
        # The file's settings go with the plug-in it chose, unless the flags choose another one.
        before = Component.of(defaults[f.name]) if f.name in defaults else _default(f)
        keep = before is not None and values[f.name] == before.name
        values[f.name] = Component(values[f.name], dict(before.settings) if keep else {}) if values[f.name] else None
        values.update({s: getattr(flags, s) for s in registry.all_settings() if getattr(flags, s) is not None})
    return nest_settings(cls, values)


def parse_flat(cls: type[Config], values: Mapping[str, Any], *, source: str) -> dict[str, Any]:
    """The field values of a flat key=value map (keys hyphenated or not; typed scalars or their text,
    as Flower's run config holds them). Unlike flags it raises, never exits: a server reads it."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    parsed = {}
    for key, value in values.items():
        name = _key(key)
        if name not in fields:
            raise LoraforgeError(f"{source} key {key!r} is not a setting; known: "
                                 f"{', '.join(sorted(n.replace('_', '-') for n in fields))}")
        parsed[name] = _coerce(value, _strip_optional(hints[name]), optional=hints[name] != _strip_optional(hints[name]),
                               where=f"{source} {key!r}")
    missing = [name for name, f in fields.items() if _default(f) is dataclasses.MISSING and name not in parsed]
    if missing:
        raise LoraforgeError(f"the {source} lacks {', '.join(missing)}")
    return parsed


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML config file's top-level mapping, keys with underscores."""
    path = Path(path)
    if not path.is_file():
        raise LoraforgeError(f"{path}: config file not found")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise LoraforgeError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(loaded, dict):
        raise LoraforgeError(f"{path}: expected a mapping of keys to values")
    return {_key(k): v for k, v in loaded.items()}


def to_yaml(values: Mapping[str, Any]) -> str:
    """The YAML a config file holds (`read_yaml` reads it back to the same values)."""
    return yaml.safe_dump(dict(values), sort_keys=False)


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def yaml_scalar(text: str) -> Any:
    """`4` -> 4, `0.5` -> 0.5, `1e-3` -> 0.001, `true` -> True, `null` -> None, anything else a string."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string; a float is what anyone means
        try:
            return float(value)
        except ValueError:
            return value
    return value


# ---- the tyro-facing class ----------------------------------------------------------------------

def _flag_class(cls: type, defaults: Mapping[str, Any]) -> type:
    """`cls` as tyro reads it: each field annotated with its help text, a dict field as a repeatable
    `KEY=VALUE` list, a plug-in field as its name plus one flag per setting of its registry's
    builders; defaults taken from `defaults` where given."""
    hints = typing.get_type_hints(cls)
    dict_fields = _dict_fields(cls)
    fields = []
    for f in dataclasses.fields(cls):
        default = defaults[f.name] if f.name in defaults else _default(f)
        help_text = f.metadata.get("help", "")
        registry = f.metadata.get("registry")
        if f.name in dict_fields:
            kind: Any = Annotated[list[str], tyro.conf.UseAppendAction, tyro.conf.arg(
                name=_flag_name(cls, f.name), metavar="KEY=VALUE",
                help=f"{help_text}; repeatable, VALUE read as YAML (4, 0.5, true, null)")]
            default = [f"{k}={v}" for k, v in (default or {}).items()]
        elif registry is not None:
            kind = Annotated[str | None, tyro.conf.arg(help=f"{help_text}: {' | '.join(registry.names())}")]
            default = None if Component.of(default) is None else Component.of(default).name
        else:
            kind = Annotated[hints[f.name], tyro.conf.arg(help=help_text or None)]
        required = default is dataclasses.MISSING
        fields.append((f.name, kind, dataclasses.field() if required else dataclasses.field(default_factory=lambda d=default: d)))
    for _, registry in _component_fields(cls):
        for setting, (kind, owners) in registry.all_settings().items():
            said = ", ".join(f"{owner}'s default {registry.defaults(owner)[setting]!r}" for owner in owners)
            fields.append((setting, Annotated[kind | None, tyro.conf.arg(help=f"{registry.kind} setting; {said}")],
                           dataclasses.field(default=None)))
    return dataclasses.make_dataclass(cls.__name__, fields, kw_only=True)


def _component_fields(cls: type) -> list[tuple[dataclasses.Field, Plugins]]:
    return [(f, f.metadata["registry"]) for f in dataclasses.fields(cls) if "registry" in f.metadata]


def _dict_fields(cls: type) -> set[str]:
    return {name for name, hint in typing.get_type_hints(cls).items() if typing.get_origin(_strip_optional(hint)) is dict}


def _flag_name(cls: type, name: str) -> str:
    """A dict field's flag: its metadata's "flag" (`options` is given as `--option`), else its name."""
    return next(f for f in dataclasses.fields(cls) if f.name == name).metadata.get("flag", name).lstrip("-")


def _key_values(items: list[str], flag: str) -> dict[str, Any]:
    pairs = {}
    for item in items:
        name, equals, text = item.partition("=")
        if not equals or not name.strip():
            raise LoraforgeError(f"--{flag} takes KEY=VALUE, got {item!r}")
        pairs[name.strip()] = yaml_scalar(text)
    return pairs


def _strip_optional(hint: Any) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if len(args) == 1 and type(None) in typing.get_args(hint) else hint


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _coerce(value: Any, kind: Any, optional: bool, where: str) -> Any:
    """`value` as the field's scalar type (a str "8" or a TOML int for an int field, "true" for a bool)."""
    if optional and (value is None or value in ("None", "null")):
        return None
    if kind not in (bool, int, float, str):
        return value
    if kind is bool and isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if not (isinstance(value, bool) and kind is not bool):
        try:
            return kind(value)
        except (TypeError, ValueError):
            pass
    raise LoraforgeError(f"{where} = {value!r} is not a {kind.__name__}")


def _key(key: str) -> str:
    return key.replace("-", "_")
