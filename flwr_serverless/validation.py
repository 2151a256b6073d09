"""Checks for the options a user gives: one wording everywhere, and every error names the option.

``name`` is what the message calls the option (``"timeout"``, or ``"option alpha (--alpha)"`` when a
command-line flag sets it). ``bool`` is refused wherever a number is expected: Python counts ``True`` as 1,
a user who passes it made a mistake. numpy scalars count as numbers. ``error`` picks the exception class
(a store raises ``StoreConfigurationError``); each check returns the value, converted, for assignment.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection
from typing import Any

__all__ = [
    "check_bool",
    "check_choice",
    "check_fraction",
    "check_int",
    "check_number",
    "check_positive",
    "check_positive_int",
    "parse_number",
]


def _fail(name: str, expected: str, value: Any, none: bool, error: type[Exception]) -> Exception:
    return error(f"{name} must be {expected}{' or None' if none else ''}, got {value!r}")


def parse_number(text: str) -> int | float:
    """``"5"`` -> 5, ``"0.1"`` -> 0.1 (a flag's text), so the option's check says which kind it needs."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"expected a number, got {text!r}") from None


def check_int(
    name: str,
    value: Any,
    low: int | None = None,
    high: int | None = None,
    *,
    none: bool = False,
    error: type[Exception] = ValueError,
) -> Any:
    """An integer in ``[low, high]`` (either bound optional); ``None`` passes when ``none``."""
    if value is None and none:
        return None
    if low == 1 and high is None:
        expected = "a positive integer"
    elif low is not None and high is not None:
        expected = f"an integer in [{low}, {high}]"
    elif low is not None:
        expected = f"an integer >= {low}"
    else:
        expected = "an integer" if high is None else f"an integer <= {high}"
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise _fail(name, expected, value, none, error)
    number = int(value)
    if (low is not None and number < low) or (high is not None and number > high):
        raise _fail(name, expected, value, none, error)
    return number


def check_positive_int(name: str, value: Any, *, none: bool = False, error: type[Exception] = ValueError) -> Any:
    """An integer >= 1 (counts, sizes, steps)."""
    return check_int(name, value, 1, none=none, error=error)


def check_number(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    open_low: bool = False,
    open_high: bool = False,
    none: bool = False,
    error: type[Exception] = ValueError,
) -> Any:
    """A finite real number between the bounds (closed unless ``open_*``); NaN and infinities never pass."""
    if value is None and none:
        return None
    left, right = "(" if open_low else "[", ")" if open_high else "]"
    if low is not None and high is not None:
        expected = f"in {left}{low:g}, {high:g}{right}"
    elif low is not None:
        expected = f"{'>' if open_low else '>='} {low:g}"
    elif high is not None:
        expected = f"{'<' if open_high else '<='} {high:g}"
    else:
        expected = "a finite number"
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise _fail(name, expected, value, none, error)
    number = float(value)
    if (
        not math.isfinite(number)
        or (low is not None and (number <= low if open_low else number < low))
        or (high is not None and (number >= high if open_high else number > high))
    ):
        raise _fail(name, expected, value, none, error)
    return number


def check_positive(
    name: str, value: Any, *, unit: str = "", none: bool = False, error: type[Exception] = ValueError
) -> Any:
    """A finite number > 0; ``unit`` ("seconds") goes into the message."""
    if value is None and none:
        return None
    expected = f"a positive number{f' of {unit}' if unit else ''}"
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise _fail(name, expected, value, none, error)
    number = float(value)
    if not (math.isfinite(number) and number > 0):
        raise _fail(name, expected, value, none, error)
    return number


def check_fraction(name: str, value: Any, *, none: bool = False, error: type[Exception] = ValueError) -> Any:
    """A number in (0, 1]: a probability that is not zero, a mixing weight."""
    return check_number(name, value, 0.0, 1.0, open_low=True, none=none, error=error)


def check_choice(name: str, value: Any, choices: Collection[Any], *, error: type[Exception] = ValueError) -> Any:
    """One of ``choices`` (listed in the message)."""
    if value not in choices:
        raise error(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def check_bool(name: str, value: Any, *, none: bool = False, error: type[Exception] = ValueError) -> Any:
    """``True`` or ``False`` (not a truthy string or number)."""
    if value is None and none:
        return None
    if not isinstance(value, bool):
        raise _fail(name, "True, False" if none else "True or False", value, none, error)
    return value
