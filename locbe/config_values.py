"""Values of config fields, parsed and checked by the field's annotated type.

``--set key=value`` arrives as text and ``config.json`` as JSON; both go through ``coerce`` so a typo
(``lr=abc``, ``use_loc=maybe``, ``betas=[0.9]``) is refused with one line naming the key, the value and
what the field takes, instead of failing as a TypeError deep in training. Supported annotations: ``str``,
``int``, ``float``, ``bool``, ``Literal[...]``, ``tuple[T, T]``, ``tuple[T, ...]`` and ``X | None``.
"""

from __future__ import annotations

import json
import math
import types
import typing
from typing import Any, Literal


class ValueTypeError(ValueError):
    """A value that the annotated type does not take; ``expected`` says what it takes."""

    def __init__(self, expected: str):
        super().__init__(expected)
        self.expected = expected


def parse_text(raw: str) -> Any:
    """A ``--set`` value as JSON where it parses (numbers, true/false, null, lists, quoted strings), else
    the text itself; ``None`` reads as null, as a Python user would write it."""
    if raw.strip() == "None":
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def describe(annotation) -> str:
    """What a field of this type takes, in words (the end of an error message)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if _is_optional(annotation):
        inner = [a for a in args if a is not type(None)]
        return f"{describe(inner[0])} or null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a non-empty list of {_plural(args[0])}"
        return f"a list of {len(args)} {_plural(args[0])}"
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}.get(
        annotation, getattr(annotation, "__name__", str(annotation)))


def coerce(value: Any, annotation) -> Any:
    """``value`` (from JSON or ``parse_text``) as the annotated type; raises ``ValueTypeError`` otherwise.

    Lossless conversions only: an int where a float is expected, a float with an integral value
    (``1e4``) where an int is, a list where a tuple is, a number where a string is (``train_split=2007``)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if _is_optional(annotation):
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        try:
            return coerce(value, inner[0])
        except ValueTypeError:
            raise ValueTypeError(describe(annotation)) from None
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        raise ValueTypeError(describe(annotation))
    if origin is tuple:
        return _coerce_tuple(value, args, annotation)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise ValueTypeError(describe(bool))
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        raise ValueTypeError(describe(int))
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise ValueTypeError(describe(float))
    if annotation is str:
        if isinstance(value, str) and value:
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return json.dumps(value)
        raise ValueTypeError("a non-empty string" if value == "" else describe(str))
    raise TypeError(f"no parser for config annotation {annotation!r}")  # a new field type: add it above


def _coerce_tuple(value, args, annotation) -> tuple:
    variadic = len(args) == 2 and args[1] is Ellipsis
    if isinstance(value, str) and "," in value:  # 1.0,0.5,1.5 as well as [1.0, 0.5, 1.5]
        value = [parse_text(part) for part in value.split(",")]
    elif variadic and not isinstance(value, (list, tuple)):
        value = [value]  # cam_scales=1.0
    if not isinstance(value, (list, tuple)) or not value or (not variadic and len(value) != len(args)):
        raise ValueTypeError(describe(annotation))
    types_ = [args[0]] * len(value) if variadic else list(args)
    try:
        return tuple(coerce(v, t) for v, t in zip(value, types_))
    except ValueTypeError:
        raise ValueTypeError(describe(annotation)) from None


def _is_optional(annotation) -> bool:
    origin = typing.get_origin(annotation)
    return origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(annotation)


def _plural(annotation) -> str:
    return {float: "numbers", int: "integers", str: "strings", bool: "booleans"}.get(annotation, str(annotation))
