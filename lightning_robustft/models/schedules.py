"""The default learning-rate schedule of CLIP fine-tuning: linear warm-up, then cosine decay to zero."""

from __future__ import annotations

import math
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["WarmupCosineLR"]


class WarmupCosineLR(LambdaLR):
    """Linear warm-up from ``lr / (warmup_steps + 1)`` over ``warmup_steps`` steps, then cosine decay to zero.

    One torch ``LambdaLR`` whatever the warm-up, so its checkpointed state has the same keys for every run length.
    That state is the step count (the multiplier and the run's length stay out of it): a fit resumed with a
    different ``max_epochs`` rebuilds the schedule for the new total and continues it from the checkpoint's step.
    A longer resumed run therefore picks up where the longer cosine is at that step (a higher learning rate than the
    shorter run ended with) and decays to zero at its new end. Past ``total_steps`` the rate stays at zero.

    Args:
        optimizer: the optimizer whose groups' ``lr`` is the peak rate.
        warmup_steps: optimizer steps of linear warm-up (``0``: start at the peak).
        total_steps: optimizer steps of the whole run, warm-up included.
    """

    def __init__(self, optimizer: Optimizer, warmup_steps: int, total_steps: int) -> None:
        self.warmup_steps = warmup_steps
        self.decay_steps = max(total_steps - warmup_steps, 1)
        super().__init__(optimizer, self.factor)

    def factor(self, step: int) -> float:
        """The multiplier of the peak rate at optimizer step ``step``."""
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        progress = min(step - self.warmup_steps, self.decay_steps) / self.decay_steps
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def state_dict(self) -> dict[str, Any]:
        """``LambdaLR``'s state without the multiplier and the lengths, which the rebuilt schedule supplies."""
        state = super().state_dict()
        state["lr_lambdas"] = [None] * len(self.lr_lambdas)
        state.pop("warmup_steps", None)
        state.pop("decay_steps", None)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Take the checkpoint's step count, then set the rates of this schedule at that step.

        Lightning restores the optimizer (with the rates of the checkpointed schedule) before the scheduler; without
        this, the first step after resuming a longer run would still use the shorter run's last rate.
        """
        state = {key: value for key, value in state_dict.items() if key not in ("warmup_steps", "decay_steps")}
        super().load_state_dict(state)
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base_lr * self.factor(self.last_epoch)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]
