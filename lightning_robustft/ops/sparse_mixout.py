"""Tensor ops of sparse GMixout: draw a period's free entries, gather / scatter them, build ``w~`` one layer at a time.

Sparse GMixout trains, in each period, only an exact-size uniform subset ``I`` of ``m = round((1 - p) * n)`` entries
of each target tensor (``n`` entries), held in a *packed* tensor ``v`` of ``m`` values (``v = w[I]`` when the period
starts). The mixed weight the layer computes with is

``w~ = a`` where the entry is held, ``w~[I] = lerp(a[I], v, s)`` where it is free, ``s = 1/(1-p)``,

which is dense GMixout's ``w~ = a + M*(w - a)/(1-p)`` with the mask ``M`` that is 1 exactly on ``I``. Its gradient
with respect to ``v`` is ``s * g[I]`` (``g`` the gradient of ``w~``), dense GMixout's ``M*g/(1-p)`` at the free
entries. Every function here works on the target's entries in memory order (the element index of a dense tensor's
flat view), like `lightning_robustft.ops.mixout`, so channels-last weights are served as they lie.

Two backends, the same semantics:

* ``"torch"`` (any device): ``index_select`` / ``scatter_`` and eager arithmetic in fp32, with reused scratch
  (`Workspace`);
* ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``): one kernel per op
  (`lightning_robustft.ops.sparse_mixout_triton`, imported lazily), which reads the int32 indices directly and
  computes in registers (no scratch). Gathers, scatters and gradients are bitwise those of the torch path; the free
  entries of ``w~`` agree with it to fp32 rounding (the same ``lerp`` formula, with or without a fused multiply-add).

The free entries are drawn on the target's device from a `torch.Generator` seeded with
`stream_seed` ``(seed, period, tensor index)``: the same on every rank and after
a resume (CPU and CUDA generators differ, so a run keeps its subsets on one device type).
"""

from __future__ import annotations

from typing import Literal

import torch

from lightning_robustft.ops.mixout import flat_view, stream_seed

__all__ = [
    "Backend",
    "Workspace",
    "draw_free_indices",
    "free_count",
    "gather",
    "mix",
    "packed_grad",
    "scatter_",
    "update_anchor_",
]

Backend = Literal["triton", "torch"]


def free_count(numel: int, p: float) -> int:
    """``m = round((1 - p) * numel)``: how many entries of a tensor of ``numel`` entries are free in every period.

    Raises:
        ValueError: ``m`` would be 0 (``p`` too close to 1 for so small a tensor: nothing would train).
    """
    count = round((1.0 - p) * numel)
    if count < 1:
        raise ValueError(
            f"Sparse GMixout with p={p} leaves round((1 - p) * {numel}) = 0 free entries in a tensor of {numel} "
            "entries, so it would never train. Lower `p` or leave the tensor out of the targets (`exclude`)."
        )
    return count


def draw_free_indices(numel: int, count: int, seed: int, period: int, index: int, device: torch.device) -> torch.Tensor:
    """The sorted memory-order positions of the ``count`` free entries of target ``index`` in period ``period``.

    A uniform random ``count``-subset of ``range(numel)``, exactly: every entry gets a random key and the ``count``
    smallest keys win. A key is one random byte (eight entries per 64-bit draw, the generator's cheapest output),
    and only the entries whose byte ties the byte at the cut (about ``numel / 256``) draw a second, 63-bit key, in
    entry order, that orders them. Taking the smallest keys of i.i.d. keys is exchangeable, so every subset of the
    size is equally likely; and the result is a boolean mask's ``nonzero``, sorted without a sort.

    Args:
        numel: Entries of the tensor.
        count: Free entries, ``1 <= count <= numel`` (`free_count`).
        seed: The run's mask seed.
        period: Mask period.
        index: Position of the tensor in the target list.
        device: Where the generator runs and the indices live.

    Returns:
        int32 indices (int64 for tensors of ``2**31`` entries or more), ascending, shape ``(count,)``.
    """
    if not 1 <= count <= numel:
        raise ValueError(f"`count`={count} must be in [1, numel={numel}].")
    dtype = torch.int32 if numel < 2**31 else torch.int64
    if count == numel:
        return torch.arange(numel, dtype=dtype, device=device)
    generator = torch.Generator(device=device).manual_seed(stream_seed(seed, period, index))
    words = torch.empty(-(-numel // 8), dtype=torch.int64, device=device).random_(-(1 << 63), None, generator=generator)
    key = words.view(torch.uint8)[:numel]
    cut = _cut_byte(key, count)
    chosen = (key <= cut).nonzero().squeeze(1)  # sorted; every tie at the cut is in, `extra` of them too many
    extra = chosen.numel() - count
    if extra:
        ties = (key[chosen] == cut).nonzero().squeeze(1)  # positions of the ties within `chosen`, ascending
        fine = torch.empty(ties.numel(), dtype=torch.int64, device=device).random_(0, None, generator=generator)
        keep = torch.ones(chosen.numel(), dtype=torch.bool, device=device)
        keep[ties[torch.argsort(fine, stable=True)[ties.numel() - extra :]]] = False  # the largest fine keys lose
        chosen = chosen[keep]
    return chosen.to(dtype)


def _cut_byte(key: torch.Tensor, count: int) -> int:
    """The byte ``b`` with ``#(key < b) < count <= #(key <= b)``, stepped to from its expected value ``256*m/n``.

    The bytes are uniform, so the expected value is off by at most one or two for any tensor worth drawing: two or
    three counting passes, where a 256-bin histogram of the bytes costs several times more on CPU.
    """
    cut = min(256 * count // key.numel(), 255)
    below = int((key < cut).count_nonzero())
    while below >= count:  # terminates: nothing is below 0
        cut -= 1
        below = int((key < cut).count_nonzero())
    while True:  # terminates: everything is at or below 255
        through = int((key <= cut).count_nonzero())
        if through >= count:
            return cut
        cut, below = cut + 1, through


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.view(-1) if t.is_contiguous() else flat_view(t)


class Workspace:
    """Reusable scratch of the torch path, so that a step's per-layer ops allocate nothing but their results.

    ``Tensor.scatter_`` is the fast CPU scatter (several times ``index_put_``) but takes int64 indices only, while
    the indices are stored as int32 (half the bytes, for every period of every target): each op widens them into one
    reused int64 buffer. The lerp of the free entries runs in one reused fp32 buffer. Both grow to the largest
    target's ``m`` and stay: one layer's worth of scratch (12 bytes per free entry of the largest target).
    """

    def __init__(self) -> None:
        self._buffers: dict[torch.dtype, torch.Tensor] = {}

    def take(self, count: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A scratch vector of ``count`` elements of ``dtype`` (contents undefined), reused across calls."""
        buffer = self._buffers.get(dtype)
        if buffer is None or buffer.numel() < count or buffer.device != device:
            buffer = self._buffers[dtype] = torch.empty(count, dtype=dtype, device=device)
        return buffer[:count]

    def wide(self, indices: torch.Tensor) -> torch.Tensor:
        """``indices`` as int64 (a view of the scratch when they are int32)."""
        if indices.dtype == torch.int64:
            return indices
        return self.take(indices.numel(), torch.int64, indices.device).copy_(indices)


def gather(w: torch.Tensor, indices: torch.Tensor, out: torch.Tensor, backend: Backend = "torch") -> torch.Tensor:
    """``out[j] <- w.flat[indices[j]]`` (memory order): the packed values of a period; returns ``out``."""
    if backend == "triton":
        from lightning_robustft.ops.sparse_mixout_triton import triton_gather

        triton_gather(_flat(w), indices, out.view(-1))
        return out
    torch.index_select(_flat(w), 0, indices, out=out.view(-1))
    return out


def scatter_(
    w: torch.Tensor,
    indices: torch.Tensor,
    values: torch.Tensor,
    backend: Backend = "torch",
    workspace: Workspace | None = None,
) -> torch.Tensor:
    """``w.flat[indices[j]] <- values[j]`` in place: the packed values written back into the weight; returns ``w``."""
    if backend == "triton":
        from lightning_robustft.ops.sparse_mixout_triton import triton_scatter

        triton_scatter(_flat(w), indices, values.view(-1))
        return w
    workspace = workspace or Workspace()
    _flat(w).scatter_(0, workspace.wide(indices), values.view(-1))
    return w


def mix(
    anchor: torch.Tensor,
    packed: torch.Tensor,
    indices: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    backend: Backend = "torch",
    workspace: Workspace | None = None,
) -> torch.Tensor:
    """``out <- a`` (rounded to ``out``'s dtype), then ``out.flat[I] <- lerp(a[I], v, s)`` in fp32: the mixed weight.

    Args:
        anchor: fp32 anchor, laid out like ``out``.
        packed: the packed free values ``v`` (``m`` entries, any shape).
        indices: the free entries ``I``.
        scale: ``s = 1/(1-p)`` as fp32 (`mix_scale`).
        out: the weight-shaped output (the target's dtype and layout).
        backend: ``"torch"`` or ``"triton"``.
        workspace: scratch reused across calls (torch path); ``None`` allocates.

    Returns:
        ``out``.
    """
    if backend == "triton":
        from lightning_robustft.ops.sparse_mixout_triton import triton_mix

        triton_mix(_flat(anchor), packed.view(-1), indices, scale, _flat(out))
        return out
    workspace = workspace or Workspace()
    flat, a = _flat(out), _flat(anchor)
    flat.copy_(a)
    free = torch.index_select(a, 0, indices, out=workspace.take(indices.numel(), torch.float32, a.device))
    v = packed.view(-1)
    torch.lerp(free, v if v.dtype == torch.float32 else v.float(), scale, out=free)
    flat.scatter_(0, workspace.wide(indices), free if out.dtype == torch.float32 else free.to(out.dtype))
    return out


def packed_grad(grad: torch.Tensor, indices: torch.Tensor, scale: float, backend: Backend = "torch") -> torch.Tensor:
    """The gradient of the packed values: ``s * g.flat[I]`` in fp32, rounded to ``g``'s dtype, shape ``(m,)``.

    ``grad`` is the gradient of ``w~``, in the layout of the weight (the caller relays it out when autograd gives
    other strides).
    """
    if backend == "triton":
        from lightning_robustft.ops.sparse_mixout_triton import triton_packed_grad

        return triton_packed_grad(_flat(grad), indices, scale)
    selected = torch.index_select(_flat(grad), 0, indices)
    if selected.dtype == torch.float32:
        return selected.mul_(scale)
    return (selected.float() * scale).to(grad.dtype)


def update_anchor_(anchor: torch.Tensor, w: torch.Tensor, decay: float) -> torch.Tensor:
    """``a <- lerp(a, w, 1 - decay)`` in fp32: the anchor EMA of dense GMixout (exact at decay 0 and 1); returns a."""
    if decay == 1.0:
        return anchor
    return anchor.lerp_(w if w.dtype == torch.float32 else w.float(), 1.0 - decay)
