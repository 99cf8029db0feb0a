"""Error messages, built in one place.

Every message names the argument, what was expected, what came, and how to fix it.
"""

from __future__ import annotations

import numbers
from typing import Any

__all__ = [
    "check_positive_int",
    "describe",
    "shape_error",
    "type_error",
    "value_error",
]


def describe(value: Any) -> str:
    """A short description of ``value`` for error messages: type and shape."""
    cls = type(value)
    name = f"{cls.__module__}.{cls.__qualname__}"
    for prefix in ("builtins.", "numpy.", "torch.", "jaxlib._jax.", "jaxlib.xla_extension."):
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    if shape is not None and dtype is not None:
        return f"{name} of shape {tuple(shape)} and dtype {dtype}"
    if isinstance(value, (str, int, float, bool)) or value is None:
        return f"{name} {value!r}"
    return name


def _join(parts: list[str]) -> str:
    return " ".join(p for p in parts if p)


def type_error(argument: str, expected: str, got: Any, fix: str = "") -> TypeError:
    """``TypeError`` for an argument of the wrong kind."""
    return TypeError(_join([f"{argument}: expected {expected}, got {describe(got)}.", fix]))


def value_error(argument: str, expected: str, got: str, fix: str = "") -> ValueError:
    """``ValueError`` for an argument of the wrong value; ``got`` is already text."""
    return ValueError(_join([f"{argument}: expected {expected}, got {got}.", fix]))


def shape_error(argument: str, expected: str, got_shape: tuple, fix: str = "") -> ValueError:
    """``ValueError`` for an array of the wrong shape."""
    return value_error(argument, expected, f"shape {tuple(got_shape)}", fix)


def check_positive_int(value: Any, argument: str) -> int:
    """``value`` as an ``int`` if it is a positive integer (not a bool), else raise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise type_error(argument, "a positive int", value)
    if value <= 0:
        raise value_error(argument, "a positive int", str(value))
    return int(value)
