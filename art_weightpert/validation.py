"""
Argument validators shared by every public object: each raises ``TypeError`` (wrong kind) or ``ValueError`` (wrong
value) naming the argument, and returns the value converted to a plain Python type.

Validate *before* assigning: constructors and ``set_params`` call these on the new values first, so a rejected value
never stays on the object.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

_INTEGERS = (int, np.integer)
_NUMBERS = (int, float, np.integer, np.floating)


def check_int(value: Any, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """An integer (not a bool) in ``[minimum, maximum]`` (either end may be open)."""
    if isinstance(value, bool) or not isinstance(value, _INTEGERS):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__}.")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"`{name}` must be at least {minimum}, got {value}.")
    if maximum is not None and value > maximum:
        raise ValueError(f"`{name}` must be at most {maximum}, got {value}.")
    return value


def check_positive_int(value: Any, name: str) -> int:
    """An integer ≥ 1."""
    return check_int(value, name, minimum=1)


def check_non_negative_int(value: Any, name: str) -> int:
    """An integer ≥ 0."""
    return check_int(value, name, minimum=0)


def check_number(
    value: Any,
    name: str,
    minimum: float | None = None,
    maximum: float | None = None,
    strict_minimum: bool = False,
    strict_maximum: bool = False,
) -> float:
    """A finite real number (not a bool) in the interval given by the bounds (strict or not)."""
    if isinstance(value, bool) or not isinstance(value, _NUMBERS):
        raise TypeError(f"`{name}` must be a number, got {type(value).__name__}.")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be finite, got {value}.")
    if minimum is not None and (value <= minimum if strict_minimum else value < minimum):
        raise ValueError(f"`{name}` must be {'>' if strict_minimum else '≥'} {minimum}, got {value}.")
    if maximum is not None and (value >= maximum if strict_maximum else value > maximum):
        raise ValueError(f"`{name}` must be {'<' if strict_maximum else '≤'} {maximum}, got {value}.")
    return value


def check_positive(value: Any, name: str) -> float:
    """A finite number > 0."""
    return check_number(value, name, minimum=0.0, strict_minimum=True)


def check_non_negative(value: Any, name: str) -> float:
    """A finite number ≥ 0."""
    return check_number(value, name, minimum=0.0)


def check_optional_positive(value: Any, name: str) -> float | None:
    """``None`` or a finite number > 0 (``None`` usually selects a schedule or a default)."""
    return None if value is None else check_positive(value, name)


def check_probability(value: Any, name: str, open_interval: bool = False) -> float:
    """A number in ``[0, 1]`` (or ``(0, 1)`` with ``open_interval``)."""
    return check_number(value, name, 0.0, 1.0, strict_minimum=open_interval, strict_maximum=open_interval)


def check_bool(value: Any, name: str) -> bool:
    """A bool (numpy bools included)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"`{name}` must be a bool, got {type(value).__name__}.")
    return bool(value)


def check_choice(value: Any, name: str, choices: Iterable[Any]) -> Any:
    """One of ``choices`` (compared with ``==``), listed in the error."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {list(choices)}, got {value!r}.")
    return value
