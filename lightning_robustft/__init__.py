"""lightning-robustft."""
