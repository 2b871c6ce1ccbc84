"""Config values from a YAML/JSON file and `--set FIELD=VALUE`, checked by type.

`read_config(path, overrides)` returns the field values, each converted to its
field's declared type (`config_schema`): a bad value names the field, the type
wanted and what was given; an unknown field gets a "did you mean"; a missing
required field is named. No torch, no sae-lens: a typo answers in a fraction of a
second. The values then build the real config (which checks cross-field rules).
"""

from __future__ import annotations

import difflib
import json
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from sae_cache_ext.config_schema import FieldSpec, fields_by_name

TEMPLATE_HINT = "`sae-cache-ext init` writes a template with every field"


class ConfigError(ValueError):
    """A config the command line refuses, with the field and the fix."""


# -- reading ----------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a field given twice (YAML keeps the last)."""

    def construct_mapping(self, node, deep=False):  # type: ignore[override]
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[arg-type]
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(
                    f"{key!r} is set twice (lines {seen[key]} and {line}): keep one."
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping a YAML or JSON config file holds."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"config file {path} does not exist ({TEMPLATE_HINT}: "
            f"`sae-cache-ext init {path}`)."
        )
    text = path.read_text(encoding="utf-8")
    try:
        values = (
            json.loads(text)
            if path.suffix == ".json"
            else yaml.load(text, Loader=_UniqueKeyLoader)
        )
    except ConfigError as error:
        raise ConfigError(f"config file {path}: {error}") from None
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise ConfigError(
            f"config file {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: "
            f"{error}"
        ) from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of `field: value` lines, not a "
            f"{type(values).__name__} ({TEMPLATE_HINT})."
        )
    return values


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """`FIELD=VALUE` pairs, each VALUE read as YAML (`3`, `true`, `[1, 2]`, `null`)."""
    values: dict[str, Any] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or not name.strip():
            raise ConfigError(
                f"--set {item!r} is not of the form FIELD=VALUE "
                "(e.g. --set training_tokens=1_000_000)."
            )
        try:
            values[name.strip()] = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            values[name.strip()] = raw
    return values


def read_config(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The file's values with the `--set` overrides, each checked and converted to
    its field's type. Raises `ConfigError`."""
    from_file = load_config_file(path)
    from_set = parse_overrides(overrides)
    values: dict[str, Any] = {}
    for source, given in ((str(path), from_file), ("--set", from_set)):
        for name, value in given.items():
            values[name] = convert_field(_spec(name, source), value, source)
    missing = [s.name for s in fields_by_name().values() if s.required]
    missing = [name for name in missing if values.get(name) is None]
    if missing:
        raise ConfigError(
            f"{path} is missing the required field(s) {', '.join(missing)}: set "
            f"{'them' if len(missing) > 1 else 'it'} in the file or with --set "
            f"{missing[0]}=... ({TEMPLATE_HINT}, required ones first)."
        )
    return values


def _spec(name: object, source: str) -> FieldSpec:
    specs = fields_by_name()
    if isinstance(name, str) and name in specs:
        return specs[name]
    close = difflib.get_close_matches(str(name), list(specs), n=3, cutoff=0.6)
    hint = (
        f"did you mean {' or '.join(repr(c) for c in close)}?"
        if close
        else f"{TEMPLATE_HINT} and its meaning."
    )
    raise ConfigError(f"unknown config field {name!r} (in {source}): {hint}")


# -- conversion --------------------------------------------------------------------


class _Refused(Exception):
    pass


def convert_field(spec: FieldSpec, value: Any, source: str = "config") -> Any:
    """`value` as `spec`'s type, or a `ConfigError` naming field, type and value."""
    try:
        return _convert(spec.type, value)
    except _Refused:
        shown = f"{value!r} ({type(value).__name__})"
        fix = _fix(spec.type, value)
        raise ConfigError(
            f"{spec.name} wants {describe_type(spec.type)}, got {shown} "
            f"(in {source}).{fix}"
        ) from None


def _convert(kind: Any, value: Any) -> Any:
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if kind is Any:
        return value
    if kind is type(None):
        if value is None or value == "None":
            return None
        raise _Refused
    if origin in (typing.Union, types.UnionType):
        for member in args:
            try:
                return _convert(member, value)
            except _Refused:
                continue
        raise _Refused
    if origin is Literal:
        if value in args and not isinstance(value, bool):
            return value
        raise _Refused
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise _Refused
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Refused
    if kind is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads `1e-3` (no dot) as text
            except ValueError:
                raise _Refused from None
        raise _Refused
    if kind is str:
        if isinstance(value, str):
            return value
        raise _Refused
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise _Refused
        member = args[0] if args else Any
        items = [_convert(member, item) for item in value]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise _Refused
        return dict(value)
    return value  # a type this module does not know: the config checks it


def describe_type(kind: Any) -> str:
    """A type in words: `a whole number (int)`, `one of 'warn', 'error'`."""
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_type(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple):
        member = describe_type(args[0]) if args else "values"
        return f"a list of {member.removeprefix('a ').removeprefix('an ')}"
    if origin is dict:
        return "a mapping (key: value)"
    return {
        bool: "true or false",
        int: "a whole number (int)",
        float: "a number",
        str: "a string",
        type(None): "null",
    }.get(kind, getattr(kind, "__name__", str(kind)))


def _fix(kind: Any, value: Any) -> str:
    if kind is int and isinstance(value, str | float):
        try:
            number = float(value)
        except ValueError:
            return ""
        if number.is_integer():
            return f" Write {int(number)} (or {int(number):_})."
    if typing.get_origin(kind) is Literal and isinstance(value, str):
        close = difflib.get_close_matches(
            value, [str(a) for a in typing.get_args(kind)]
        )
        if close:
            return f" Did you mean {close[0]!r}?"
    if kind is bool and isinstance(value, str):
        return " Write true or false."
    return ""
