"""A dataset for timing and memory benchmarks: one random batch, handed out for every step."""

from __future__ import annotations

import torch


class RepeatedBatch(torch.utils.data.Dataset):
    """The same random batch ``steps`` times, so data loading costs nothing in a timing (use ``batch_size=None``)."""

    def __init__(self, batch: int, image_size: int, steps: int, num_classes: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(batch, 3, image_size, image_size, generator=generator)
        self.y = torch.randint(0, num_classes, (batch,), generator=generator)
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x, self.y
