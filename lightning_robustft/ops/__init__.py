"""Pure tensor functions (no Lightning): fused Mixout passes and state-dict interpolation."""
