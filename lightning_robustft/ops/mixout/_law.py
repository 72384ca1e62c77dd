"""The mask law of GMixout, shared by every backend: seeds, keep threshold, scale, and the flat view of a target.

A leaf module (it imports nothing from the package), so that the front end and each backend can import it without
importing each other. Everything here is a pure function: the mask of tensor ``i`` in period ``r`` depends only on
``(seed, r, i, element index)``, identical on every rank and after a resume.
"""

from __future__ import annotations

import torch

__all__ = [
    "as_int64",
    "block_key",
    "flat_view",
    "is_dense",
    "keep_threshold",
    "mix_scale",
    "splitmix64",
    "stream_seed",
]

_MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """One round of SplitMix64 (Steele et al.): a cheap bijective 64-bit mixer with good avalanche.

    Args:
        x: Any non-negative integer; only its low 64 bits matter.

    Returns:
        An integer in ``[0, 2**64)``.
    """
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def stream_seed(seed: int, period: int, index: int) -> int:
    """The 64-bit seed of the mask stream of tensor ``index`` in period ``period``.

    A pure function, so every rank, every resumed run and both backends derive the same stream key without
    communication: the torch path seeds a `torch.Generator` with it, the Triton path uses it as the Philox key.
    Chained SplitMix64 rounds make neighbouring ``(period, index)`` pairs give unrelated keys.

    Args:
        seed: The run's mask seed (any non-negative integer below 2**64).
        period: Mask period ``r = step // resample_every``.
        index: Position of the tensor in the target list.

    Returns:
        An integer in ``[0, 2**64)``.
    """
    return splitmix64(splitmix64(splitmix64(seed & _MASK64) ^ period) ^ index)


def block_key(seed: int, period: int, index: int, block: int) -> int:
    """The generator seed of one block of the torch path's mask: one more SplitMix64 round over `stream_seed`.

    Block ``block`` covers elements ``[block*MASK_BLOCK, (block+1)*MASK_BLOCK)`` of tensor ``index`` in period
    ``period``; its own key makes a block's bits independent of how the others are drawn (order, chunking).
    """
    return splitmix64(stream_seed(seed, period, index) ^ block)


def as_int64(value: int) -> int:
    """Reinterpret an unsigned 64-bit integer as a signed one (two's complement), for int64 tensors and kernels."""
    return value - (1 << 64) if value >= (1 << 63) else value


def mix_scale(p: float) -> float:
    """``1/(1-p)`` rounded to fp32: the scale every path multiplies by, so both paths scale by the same number."""
    return float(torch.tensor(1.0 / (1.0 - p), dtype=torch.float32))


def keep_threshold(p: float) -> int:
    """Threshold ``t`` such that a uniform unsigned 32-bit ``x`` is kept (``M = 1``) iff ``x >= t``.

    ``P(keep) = 1 - t / 2**32`` with ``t = round(p * 2**32)``: the law ``Bernoulli(1-p)`` to within 2**-33, finer
    than a float32 uniform could resolve (capped at ``2**32 - 1`` so that ``p`` just below 1 still keeps something).
    """
    return min(round(p * (1 << 32)), (1 << 32) - 1)


def is_dense(t: torch.Tensor) -> bool:
    """True when ``t`` covers a gap-free, non-overlapping block of memory (any dimension order, e.g. channels_last).

    The passes treat such a tensor as a flat array in memory order; companion buffers made with
    ``torch.empty_like`` share its strides, so element ``e`` of each refers to the same logical entry.
    """
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride(), strict=True) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def flat_view(t: torch.Tensor) -> torch.Tensor:
    """1-D view of a dense tensor in memory order."""
    return t.as_strided((t.numel(),), (1,), t.storage_offset())
