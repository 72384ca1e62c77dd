"""``robustft compare``: methods compared on the ID-OOD plane over any ``robustft fit`` config.

`compare` runs a grid of (method, learning rate, seed) fits, each trained
model's WiSE-FT curve, selection on ID validation only, and frontier gains against the envelope of full
fine-tuning's curves (``docs/compare.md``).

This package is itself callable: ``lightning_robustft.compare(config, methods, ...)`` is
`compare`. A function of that name in ``lightning_robustft`` would hide the
package (``import lightning_robustft.compare.frontier as frontier`` would then fail), so the module's class gets a
``__call__`` instead.
"""

import sys
import types
from typing import Any

from lightning_robustft.compare.api import compare
from lightning_robustft.compare.frontier import FrontierGain, envelope_at, frontier_gain, logit_fit
from lightning_robustft.compare.presets import BUILTIN_PRESETS, Preset

__all__ = ["BUILTIN_PRESETS", "FrontierGain", "Preset", "compare", "envelope_at", "frontier_gain", "logit_fit"]


class _CallableModule(types.ModuleType):
    """``lightning_robustft.compare(...)`` calls `compare`."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return compare(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
