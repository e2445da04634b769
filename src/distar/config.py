"""Dataclass configs and `key=value` overrides, shared by every step and the 2-D lab."""

from __future__ import annotations

import argparse
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
        hint = hints[f.name]
        if typing.get_origin(hint) in (typing.Union, types.UnionType) and value is not None:  # Literal | None
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        if dataclasses.is_dataclass(value):
            check_choices(value, f"{prefix}{f.name}.")
        elif typing.get_origin(hint) is typing.Literal:
            _choice(value, hint, prefix + f.name)
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
    for key, value in flat_keys(config, mapping):
        try:
            target, name = _resolve(config, key)
            setattr(target, name, _from_value(value, typing.get_type_hints(type(target))[name], key))
        except UserError as err:
            raise UserError(f"{source}: {err}") from None
    return config


def flat_keys(config: Any, mapping: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """The (dotted key, value) pairs a nested mapping sets on a (nested) dataclass."""
    items = []
    for key, value in mapping.items():
        child = getattr(config, key, None) if dataclasses.is_dataclass(config) else None
        if isinstance(value, dict) and dataclasses.is_dataclass(child):
            items.extend(flat_keys(child, value, f"{prefix}{key}."))
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
        try:
            return float(value)
        except OverflowError:
            raise UserError(f"config key {key!r}: {str(value)[:20]}… is beyond any floating-point number") from None
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
        if origin is typing.Literal:
            return _choice(raw, annotation, key)
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


# -- command-line flags from a config dataclass -------------------------------------------------------


def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string literal under it in the class body), read from the source."""
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if (
                isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def add_config_arguments(parser, cls: type, flags: dict[str, str] | None = None) -> None:
    """One flag per field of the dataclass `cls`: --NAME (or `flags[name]`), typed from its annotation, its default
    shown, its help from the field's docstring. A list of strings is repeated flags (or, for a list with a
    default, several values after one flag), a dict of strings repeated NAME=VALUE flags, a bool a switch, a
    Literal its choices; a field without a default is required."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + (flags or {}).get(f.name, f.name).replace("_", "-")
        annotation = hints[f.name]
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else (f.default if f.default is not dataclasses.MISSING else f.default_factory())
        shown = "" if required or default in (None, "", [], {}, False) else f" (default: {_shown(default)})"
        kwargs: dict[str, Any] = {"dest": f.name, "help": (docs.get(f.name, "") + shown).strip() or None}
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        if origin in (typing.Union, types.UnionType):
            annotation = next(a for a in args if a is not type(None))
            origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        if annotation is bool:  # a switch that is on by default is turned off by --no-NAME
            kwargs.update(action=argparse.BooleanOptionalAction if default else "store_true", default=default)
        elif origin is typing.Literal:
            kwargs.update(choices=list(args), default=default)
        elif origin is list:
            if required:
                kwargs.update(action="append", metavar=f.name.upper().rstrip("S"))
            else:
                kwargs.update(nargs="*", default=default)
        elif origin is dict:
            kwargs.update(action="append", type=_pair(flag), default=[], metavar="NAME=VALUE")
        else:
            kwargs.update(type=annotation, default=default)
        parser.add_argument(flag, required=required, **kwargs)


def config_from_args(cls: type, args) -> Any:
    """The dataclass `cls` from the flags `add_config_arguments` added (dict fields from their NAME=VALUE pairs)."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name)
        if typing.get_origin(hints[f.name]) is dict:
            value = dict(value)
        values[f.name] = value
    return cls(**values)


def _pair(flag: str):
    import argparse

    def parse(text: str) -> tuple[str, str]:
        name, sep, value = text.partition("=")
        if not sep or not name:
            raise argparse.ArgumentTypeError(f"{text!r}: write NAME=VALUE")
        return name, value

    return parse


def _shown(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)
