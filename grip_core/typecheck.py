"""Field type checks for the JSON-loaded config dataclasses (RunConfig, GRIPConfig, ScopeConfig).

A config read from a file can hold anything JSON can: `"steps": "60"`, `"lr": null`, `"grip": 5`.
`check_fields` turns each of those into one ConfigError naming the field, before the value is used.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Literal, Union, get_args, get_origin, get_type_hints

from .moe.errors import ConfigError


def _ok(value, hint) -> bool:
    origin = get_origin(hint)
    if hint is typing.Any:
        return True
    if hint is type(None):
        return value is None
    if origin is Literal:
        return isinstance(value, str) and value in get_args(hint)   # our Literals are all strings
    if origin in (Union, getattr(__import__("types"), "UnionType", Union)):
        return any(_ok(value, h) for h in get_args(hint))
    if origin in (list, tuple):
        args = get_args(hint)
        return isinstance(value, (list, tuple)) and (not args or all(_ok(v, args[0]) for v in value))
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)   # NaN: checked where it matters
    if hint is str:
        return isinstance(value, str)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, (hint, dict))
    return True


def _describe(hint) -> str:
    if get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(hint))
    s = str(hint).replace("typing.", "")
    return getattr(hint, "__name__", s) if get_origin(hint) is None else s


def check_fields(obj, what: str | None = None) -> None:
    """ConfigError naming the first field of dataclass `obj` whose value does not have its declared type."""
    hints = get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        hint = hints.get(f.name, typing.Any)
        if not _ok(value, hint):
            raise ConfigError(f"{what or type(obj).__name__}.{f.name} must be {_describe(hint)}, "
                              f"got {type(value).__name__} {_short(value)}")


def _short(value) -> str:
    r = repr(value)
    return r if len(r) <= 40 else r[:37] + "..."


def build(cls, data, what: str, strict: bool = True):
    """cls(**data) from a JSON object: ConfigError (never TypeError) for a non-object, unknown or mistyped fields."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{what} must be a JSON object of {cls.__name__} fields, got {type(data).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(str(k) for k in data if k not in names)
    if unknown and strict:
        raise ConfigError(f"unknown {what} field(s) {unknown}; known: {sorted(names)}")
    kwargs = {k: v for k, v in data.items() if k in names}
    hints = get_type_hints(cls)
    for k, v in kwargs.items():            # before __post_init__ compares them with numbers
        if not _ok(v, hints.get(k, typing.Any)):
            raise ConfigError(f"{what}.{k} must be {_describe(hints[k])}, got {type(v).__name__} {_short(v)}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{what}: {exc}") from None
