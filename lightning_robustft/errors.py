"""The one error type the package raises for bad input."""

from __future__ import annotations

from lightning.fabric.utilities.exceptions import MisconfigurationException


class RobustFTConfigError(MisconfigurationException, ValueError):
    """Bad argument, path, shape or configuration.

    It is both a Lightning ``MisconfigurationException`` (so Lightning users catch it as they catch Lightning's own
    configuration errors) and a ``ValueError`` (so plain-Python users catch it as the usual bad-value error). Every
    message names what was wrong, the value it got, and what is allowed or how to fix it.
    """
