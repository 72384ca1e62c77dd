"""``robustft compare``: methods compared on the ID-OOD plane over any ``robustft fit`` config.

:func:`compare` runs a grid of (method, learning rate, seed) fits, each trained model's WiSE-FT curve, selection on
ID validation only, and frontier gains against the envelope of full fine-tuning's curves (``docs/compare.md``).
"""

from lightning_robustft.compare.api import compare
from lightning_robustft.compare.frontier import FrontierGain, envelope_at, frontier_gain, logit_fit
from lightning_robustft.compare.presets import BUILTIN_PRESETS, Preset

__all__ = ["BUILTIN_PRESETS", "FrontierGain", "Preset", "compare", "envelope_at", "frontier_gain", "logit_fit"]
