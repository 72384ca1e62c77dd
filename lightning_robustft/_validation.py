"""The one check of a numeric argument, shared by ``ops/`` (plain errors) and the Lightning layers (config errors).

Every constructor and op that takes a number refuses the same things the same way: a non-number, a ``bool`` (which
Python counts as an ``int``, so ``p=True`` would silently read as ``1``), a float where an integer is needed, NaN,
and a value outside the allowed interval. The interval is written as in mathematics (``"[0, 1)"``), so the call site
reads like the docs and the error message shows exactly what is allowed. No Lightning import: ``ops/`` uses it.
"""

from __future__ import annotations

import math
import re
from typing import Any

__all__ = ["check_number"]

_INTERVAL = re.compile(r"^\s*([\[(])\s*([^,\s]+)\s*,\s*([^\]\)\s]+)\s*([\])])\s*$")


def check_number(
    name: str,
    value: Any,
    interval: str,
    *,
    integer: bool = False,
    hint: str = "",
    type_error: type[Exception] = TypeError,
    value_error: type[Exception] = ValueError,
) -> Any:
    """Return ``value`` (as ``float``, or ``int`` with ``integer=True``) if it is a number inside ``interval``.

    Args:
        name: the argument's name, quoted in the message.
        value: what the caller was given.
        interval: the allowed values, e.g. ``"[0, 1)"``, ``"(0, inf)"``, ``"[1, inf)"``; ``[``/``]`` include the
            bound, ``(``/``)`` exclude it. Values outside it, and NaN, are refused; ``inf`` only where a bound
            includes it (never, in practice: write ``inf)``).
        integer: require an ``int`` (a ``float`` such as ``1.0`` is refused, as it would be in a YAML config).
        hint: what the number means or a usual value, appended to the message in parentheses.
        type_error: the exception for a value that is not a number (``TypeError``; configuration layers pass their
            own subclass).
        value_error: the exception for a number outside ``interval`` (``ValueError``, or a subclass).

    Returns:
        ``float(value)``, or ``value`` itself when ``integer`` is set.

    Raises:
        type_error: ``value`` is not an ``int`` / ``float`` (or not an ``int`` when ``integer``), or is a ``bool``.
        value_error: ``value`` is NaN or outside ``interval``.
    """
    match = _INTERVAL.match(interval)
    if match is None:
        raise ValueError(f"interval {interval!r} is not of the form '[low, high)'.")
    left, low_text, high_text, right = match.groups()
    low, high = float(low_text), float(high_text)
    kind = "an integer" if integer else "a number"
    if math.isinf(high) and right == ")":  # a half-line reads better as a comparison: "an integer >= 1"
        finite = kind if integer else "a finite number"
        allowed = f"{finite} {'>=' if left == '[' else '>'} {low_text}"
    else:
        allowed = f"{kind} in {interval.strip()}"
    suffix = f" ({hint})" if hint else ""
    wanted = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, wanted):
        raise type_error(f"`{name}`={value!r} must be {allowed}{suffix}, not {type(value).__name__}.")
    above_low = value >= low if left == "[" else value > low
    below_high = value <= high if right == "]" else value < high
    if math.isnan(value) or not (above_low and below_high):
        raise value_error(f"`{name}`={value!r} must be {allowed}{suffix}.")
    return value if integer else float(value)
