"""The default learning-rate schedule of CLIP fine-tuning: linear warm-up, then cosine decay to zero."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR


def warmup_cosine(optimizer: Optimizer, warmup_steps: int, total_steps: int) -> LRScheduler:
    """Linear warm-up from ``lr / (warmup_steps + 1)`` over ``warmup_steps`` steps, then cosine decay to zero.

    Built from torch's own schedulers so that their state dicts checkpoint and resume as usual.
    """
    decay_steps = max(total_steps - warmup_steps, 1)
    cosine = CosineAnnealingLR(optimizer, T_max=decay_steps)
    if warmup_steps <= 0:
        return cosine
    warmup = LinearLR(optimizer, start_factor=1.0 / (warmup_steps + 1), end_factor=1.0, total_iters=warmup_steps)
    return SequentialLR(optimizer, schedulers=[warmup, cosine], milestones=[warmup_steps])
