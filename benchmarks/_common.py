"""What the GMixout timing and memory benchmarks share: a data-free dataset and counting the bytes tensors hold."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

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


def reachable_tensors(obj: Any) -> list[torch.Tensor]:
    """Every tensor reachable from ``obj`` through attributes, dicts, lists, tuples and sets (each object once)."""
    stack, found, visited = [obj], [], set()
    while stack:
        item = stack.pop()
        if id(item) in visited:
            continue
        visited.add(id(item))
        if isinstance(item, torch.Tensor):
            found.append(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set)):
            stack.extend(item)
        elif hasattr(item, "__dict__") and not isinstance(item, type):
            stack.extend(vars(item).values())
    return found


def storage_bytes(tensors: Iterable[Any], seen: set[int]) -> int:
    """Bytes of the distinct storages among ``tensors`` not yet in ``seen`` (which it updates); non-tensors skipped."""
    total = 0
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total
