"""The package's own exception types: configuration mistakes, as Lightning users and plain-Python users catch them.

Errors are raised by cause, as open_clip's factory does: a configuration mistake (an argument outside its domain, a
strategy or a combination of callbacks the package cannot serve, a name that does not exist, a checkpoint resumed
with other settings) raises `RobustFTConfigError`; a configuration value of the wrong type raises
`RobustFTConfigTypeError`; a missing file raises ``FileNotFoundError``; a missing optional package raises
``ImportError`` naming the extra to install (``lightning_robustft._optional.require``). ``ops/`` holds pure tensor
functions without Lightning, so it raises plain ``ValueError`` / ``TypeError``.
"""

from __future__ import annotations

from typing import Any

from lightning.fabric.utilities.exceptions import MisconfigurationException

from lightning_robustft._validation import check_number

__all__ = ["RobustFTConfigError", "RobustFTConfigTypeError", "check_config_number"]


class RobustFTConfigError(MisconfigurationException, ValueError):
    """A configuration mistake: a bad argument value, an unsupported strategy or combination, an unknown name.

    It is both a Lightning ``MisconfigurationException`` (so Lightning users catch it as they catch Lightning's own
    configuration errors) and a ``ValueError`` (so plain-Python users catch it as the usual bad-value error). Every
    message names what was wrong, the value it got, and what is allowed or how to fix it.
    """


class RobustFTConfigTypeError(RobustFTConfigError, TypeError):
    """A configuration value of the wrong type (e.g. ``p="0.9"`` or ``p=True`` where a number is expected).

    Also a ``TypeError``, as Python raises for a value of the wrong type, and a `RobustFTConfigError`, so one
    ``except RobustFTConfigError`` catches every configuration mistake.
    """


def check_config_number(name: str, value: Any, interval: str, *, integer: bool = False, hint: str = "") -> Any:
    """`lightning_robustft._validation.check_number` for a configuration argument (a constructor's).

    Returns:
        ``float(value)``, or ``value`` itself with ``integer=True``.

    Raises:
        RobustFTConfigTypeError: ``value`` is not a number (or not an integer when ``integer``), or is a ``bool``.
        RobustFTConfigError: ``value`` is NaN or outside ``interval``.
    """
    return check_number(
        name,
        value,
        interval,
        integer=integer,
        hint=hint,
        type_error=RobustFTConfigTypeError,
        value_error=RobustFTConfigError,
    )
