"""Optional dependencies: import them when a feature needs them, with an error that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str, feature: str | None = None) -> ModuleType:
    """Import an optional dependency, or say which ``pip install lightning-robustft[extra]`` provides it.

    Optional packages (``datasets``, ``wilds``, ...) are imported only where a feature uses them, so that the core
    package stays light and a missing one fails at the point of use with the fix, not with a bare
    ``ModuleNotFoundError``.

    Args:
        module: the import name, e.g. ``"datasets"``.
        extra: the extra of this package that installs it, e.g. ``"hf"``.
        feature: what needs it, for the message (default: the module name).

    Returns:
        The imported module.

    Raises:
        ImportError: if the module cannot be imported; the message names the extra to install.
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"{feature or module} needs the optional package `{module}`, which is not installed. Install it with "
            f"`pip install lightning-robustft[{extra}]` (or `pip install {module}`)."
        ) from err
