"""Dataclass configs and `key=value` overrides, shared by every step and the 2-D lab."""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from typing import Any

from distar.errors import UserError


def field_names(config: Any, prefix: str = "") -> list[str]:
    """Every settable dotted key of a (nested) dataclass instance."""
    names = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            names.extend(field_names(value, f"{prefix}{f.name}."))
        else:
            names.append(prefix + f.name)
    return names


def check_choices(config: Any, prefix: str = "") -> Any:
    """Every Literal field of a (nested) dataclass holds one of its choices; the error names the key and the
    closest valid value (for configs built in code, which the loader did not see)."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            check_choices(value, f"{prefix}{f.name}.")
        elif typing.get_origin(hints[f.name]) is typing.Literal:
            _choice(value, hints[f.name], prefix + f.name)
    return config


def apply_overrides(config: Any, overrides: list[str]) -> Any:
    """Set `a.b=value` pairs on a (nested) dataclass, coercing each value to its field's type.

    An unknown key fails naming the key and the closest valid one; a value that does not parse as the
    field's type fails naming the key, the value and the type.
    """
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"override {item!r} is not of the form key=value (for example steps=100)")
        target, name = _resolve(config, key)
        hints = typing.get_type_hints(type(target))
        setattr(target, name, _coerce(raw.strip(), hints[name], key))
    return config


def apply_mapping(config: Any, mapping: dict, source: str = "config") -> Any:
    """Set the values of a nested mapping (a parsed TOML/JSON file) on a (nested) dataclass.

    Tables map to nested dataclasses; an unknown key fails naming the file, the key and the closest valid one.
    """
    for key, value in _flatten(config, mapping):
        try:
            target, name = _resolve(config, key)
            setattr(target, name, _from_value(value, typing.get_type_hints(type(target))[name], key))
        except UserError as err:
            raise UserError(f"{source}: {err}") from None
    return config


def _flatten(config: Any, mapping: dict, prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for key, value in mapping.items():
        child = getattr(config, key, None) if dataclasses.is_dataclass(config) else None
        if isinstance(value, dict) and dataclasses.is_dataclass(child):
            items.extend(_flatten(child, value, f"{prefix}{key}."))
        else:
            items.append((prefix + key, value))
    return items


def _choice(value: Any, annotation: Any, key: str) -> Any:
    """A value of a Literal field: one of its choices, or an error naming the closest one."""
    choices = typing.get_args(annotation)
    if value in choices:
        return value
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.0)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise UserError(f"config key {key!r}: {value!r} is not one of {', '.join(map(repr, choices))}{hint}")


def _from_value(value: Any, annotation: Any, key: str) -> Any:
    """A value parsed from a file, checked against the field's type (ints widen to floats)."""
    if typing.get_origin(annotation) is typing.Literal:
        return _choice(value, annotation, key)
    if isinstance(value, str):
        return _coerce(value, annotation, key)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        origin = typing.get_origin(annotation)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin in (list, tuple) and isinstance(value, list):
        return origin(value)
    expected = origin or annotation
    if isinstance(expected, type) and not isinstance(value, expected):
        raise UserError(f"config key {key!r}: {value!r} is not a valid {expected.__name__}")
    return value


def _resolve(config: Any, key: str) -> tuple[Any, str]:
    parts = key.split(".")
    target = config
    for i, part in enumerate(parts):
        names = {f.name for f in dataclasses.fields(target)}
        if part not in names:
            valid = field_names(config)
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"
            raise UserError(f"unknown config key {key!r}{hint}")
        if i < len(parts) - 1:
            target = getattr(target, part)
            if not dataclasses.is_dataclass(target):
                raise UserError(f"config key {'.'.join(parts[: i + 1])!r} is a value, not a section")
    return target, parts[-1]


def _coerce(raw: str, annotation: Any, key: str) -> Any:
    if typing.get_origin(annotation) is typing.Literal:
        return _choice(raw, annotation, key)
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if raw.lower() in ("none", "null", "") and type(None) in args:
            return None
        annotation = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    try:
        if annotation is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if annotation in (int, float, str):
            return annotation(raw)
        if origin in (list, tuple):
            items = json.loads(raw) if raw.startswith("[") else [x for x in raw.split(",") if x.strip()]
            item_type = args[0] if args else str
            return origin(_coerce(str(x), item_type, key) for x in items)
        if origin is dict:
            return dict(json.loads(raw))
    except (ValueError, TypeError, json.JSONDecodeError):
        pass
    else:
        raise UserError(f"config key {key!r} has a type ({annotation}) that cannot be set from the command line")
    raise UserError(f"config key {key!r}: {raw!r} is not a valid {getattr(annotation, '__name__', annotation)}")
