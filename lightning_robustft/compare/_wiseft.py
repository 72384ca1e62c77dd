"""The one place where ``robustft compare`` imports the WiSE-FT evaluation helpers (they may move; fix it here)."""

from lightning_robustft.callbacks.model_soup import greedy_soup
from lightning_robustft.callbacks.wise_ft import (
    DEFAULT_ALPHAS,
    apply_alpha,
    evaluate_accuracy,
    named_dataloaders,
    resolve_id_set,
)
from lightning_robustft.ops.interpolate import float_state_snapshot

__all__ = [
    "DEFAULT_ALPHAS",
    "apply_alpha",
    "evaluate_accuracy",
    "float_state_snapshot",
    "greedy_soup",
    "named_dataloaders",
    "resolve_id_set",
]
