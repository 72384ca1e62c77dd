"""Transition shim: the old home of the callbacks' shared checks, now `lightning_robustft.callbacks._shared`.

Kept only so that branches written against it (``gmixout.py``) still import while they are merged; it is deleted once
they import from ``_shared`` (the old ``refuse_unsupported(why=...)`` form and ``is_real`` live here until then).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import Strategy

from lightning_robustft.callbacks._shared import (
    HEAD_HINT,
    USE_DDP,
    check_selection,
    example_names,
    matching_names,
    no_match_message,
    resolve_submodule,
    select_parameters,
)
from lightning_robustft.callbacks._shared import SHARDED_STRATEGIES as _SHARDED
from lightning_robustft.errors import RobustFTConfigError

__all__ = [
    "HEAD_HINT",
    "SHARDED_STRATEGIES",
    "USE_DDP",
    "check_selection",
    "example_names",
    "is_real",
    "matching_names",
    "no_match_message",
    "refuse_unsupported",
    "resolve_submodule",
    "select_parameters",
]

SHARDED_STRATEGIES: tuple[type[Strategy], ...] = tuple(_SHARDED)


def is_real(value: Any) -> bool:
    """Whether ``value`` is an ``int`` or ``float`` but not a ``bool``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def refuse_unsupported(
    strategy: Strategy,
    pl_module: LightningModule | None,
    *,
    callback: str,
    why: Mapping[type[Strategy], str],
    fix: str = USE_DDP,
    manual_optimization: str | None = None,
) -> None:
    """The old form of `lightning_robustft.callbacks._shared.refuse_unsupported` (a reason per strategy)."""
    for cls, reason in why.items():
        if isinstance(strategy, cls):
            raise RobustFTConfigError(
                f"{callback} does not support strategy {type(strategy).__name__}: {reason}. {fix}"
            )
    if manual_optimization is not None and pl_module is not None and not pl_module.automatic_optimization:
        raise RobustFTConfigError(
            f"{callback} needs automatic optimization, but {type(pl_module).__name__}.automatic_optimization is "
            f"False: with manual optimization the module steps the optimizer itself, {manual_optimization}"
        )
