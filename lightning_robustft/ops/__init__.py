"""Pure tensor functions (no Lightning): fused Mixout passes and state-dict interpolation."""

from lightning_robustft.ops.interpolate import average_state_dicts, interpolate_state_dicts
from lightning_robustft.ops.mixout import MixoutPasses

__all__ = ["MixoutPasses", "average_state_dicts", "interpolate_state_dicts"]
