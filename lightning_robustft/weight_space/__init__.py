"""Weight-space tools used after (or at the end of) fine-tuning: interpolation, WiSE-FT and model soups.

Plain functions over state dicts, checkpoints and dataloaders, no callback: ``WiSEFTCallback`` calls them at the end
of a fit, user scripts call them on saved checkpoints, and both get the same numbers. The state-dict arithmetic itself
lives in `lightning_robustft.ops.interpolate` (pure tensors), the scoring and the files in
`lightning_robustft.evaluation`.
"""

from lightning_robustft.ops.interpolate import average_state_dicts, interpolate_state_dicts
from lightning_robustft.weight_space.soup import SoupResult, greedy_soup, run_soup, uniform_soup
from lightning_robustft.weight_space.wise_ft import (
    DEFAULT_ALPHAS,
    apply_alpha,
    run_wiseft,
    select_alpha,
    sweep_alphas,
    wiseft_sweep,
)

__all__ = [
    "DEFAULT_ALPHAS",
    "SoupResult",
    "apply_alpha",
    "average_state_dicts",
    "greedy_soup",
    "interpolate_state_dicts",
    "run_soup",
    "run_wiseft",
    "select_alpha",
    "sweep_alphas",
    "uniform_soup",
    "wiseft_sweep",
]
