"""The fused passes of GMixout: mix-in, mix-out and the anchor EMA, over a fixed list of target tensors.

GMixout trains with mixed weights ``w~ = a + M*(w - a)/(1-p)`` (``a`` the fp32 anchor, ``M ~ Bernoulli(1-p)``
elementwise) while the optimizer steps the learned weights ``w``. Per optimizer step that takes two passes over the
targets, wrapped around the user's forward/backward:

* **mix-in**: compute ``w~`` into a second buffer per target and point the parameter at it (``param.data = w~``);
  ``w`` stays untouched in its own storage;
* **mix-out**: point the parameter back at ``w`` (free) and turn the gradient of ``w~`` into the gradient of ``w``,
  ``g <- M*g/(1-p)`` (the exact chain rule), in place;

plus, at every mask redraw, the anchor EMA ``a <- decay*a + (1-decay)*w``.

Why a storage swap rather than writing ``w~`` into the parameter and ``w`` into a backup: the swap keeps the same
memory (anchor + one buffer) but moves far fewer bytes. Mix-in reads ``w`` and ``a`` and writes ``w~`` (no backup
write), and mix-out only rescales the gradient (no copy of ``w`` back); restoring ``w`` for validation, a checkpoint
or an exception is a pointer swap. ``param.data = ...`` is how ``nn.Module._apply`` moves parameters: the
``Parameter`` object, its autograd identity and version counter, its optimizer state and DDP's hooks are unchanged.

Two backends implement them with the same semantics but different mask bits (each path is deterministic):

* ``"triton"`` (:mod:`lightning_robustft.ops.mixout_triton`, imported lazily): one launch per pass and parameter dtype,
  the mask regenerated inside the kernel from ``(seed, period, tensor, element)`` with Philox, never stored;
* ``"torch"``: the mask of each block of :data:`MASK_BLOCK` elements drawn from its own seeded
  :class:`torch.Generator`, kept for the current period as packed bits (1 bit per element) so that
  ``resample_every > 1`` does not redraw; arithmetic in blocks whose temporaries stay in cache.

The mask of tensor ``i`` in period ``r`` depends only on ``(seed, r, i, element index)``; the element index is the
position in memory order (row-major for contiguous tensors). Identical on every rank, reproducible after a resume.

Floating-point contract: arithmetic in fp32 whatever the parameter dtype (fp32 / bf16 / fp16), results rounded to
the parameter dtype, anchors fp32. Mixed weights use :func:`torch.lerp`'s formula, ``lerp(a, w, s)`` with
``s = fp32(1/(1-p))``, which is exactly ``w`` at ``p = 0``; held entries are exactly ``a``; restored weights are
bitwise ``w``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from functools import lru_cache
from typing import Literal, Protocol

import torch

from lightning_robustft.errors import RobustFTConfigError
from lightning_robustft.ops.mixout_inductor import ROW, FusedRows, rows_of

Backend = Literal["auto", "triton", "torch"]

_BACKENDS = ("auto", "triton", "torch")
_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MASK64 = (1 << 64) - 1

MASK_BLOCK = 1 << 19
"""Elements per block of the torch path: the unit of its mask draws (each block has its own generator, seeded by
:func:`block_key`) and of its arithmetic (a block's operands, about 4 x 2 MiB in fp32, stay in the L3 cache between
the eager ops of a pass, which then costs about one trip to memory). A multiple of 8 (the bits are packed by 8) and
part of the torch path's mask definition."""


# ----------------------------------------------------------------------------------------------------------------------
# Pure functions shared by both paths and by the tests
# ----------------------------------------------------------------------------------------------------------------------


def _splitmix64(x: int) -> int:
    """One round of SplitMix64 (Steele et al.): a cheap bijective 64-bit mixer with good avalanche."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def stream_seed(seed: int, period: int, index: int) -> int:
    """The 64-bit seed of the mask stream of tensor ``index`` in period ``period``.

    A pure function, so every rank, every resumed run and both backends derive the same stream key without
    communication: the torch path seeds a :class:`torch.Generator` with it, the Triton path uses it as the Philox key.
    Chained SplitMix64 rounds make neighbouring ``(period, index)`` pairs give unrelated keys.

    Args:
        seed: The run's mask seed (any non-negative integer below 2**64).
        period: Mask period ``r = step // resample_every``.
        index: Position of the tensor in the target list.

    Returns:
        An integer in ``[0, 2**64)``.
    """
    return _splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ period) ^ index)


def as_int64(value: int) -> int:
    """Reinterpret an unsigned 64-bit integer as a signed one (two's complement), for int64 tensors and kernels."""
    return value - (1 << 64) if value >= (1 << 63) else value


def mix_scale(p: float) -> float:
    """``1/(1-p)`` rounded to fp32: the scale every path multiplies by, so both paths scale by the same number."""
    return float(torch.tensor(1.0 / (1.0 - p), dtype=torch.float32))


def keep_threshold(p: float) -> int:
    """Signed 32-bit threshold ``t`` such that a uniform int32 ``x`` is kept (``M = 1``) iff ``x >= t``.

    ``P(keep) = 1 - round(p * 2**32) / 2**32``: the law ``Bernoulli(1-p)`` to within 2**-33, finer than a float32
    uniform could resolve.
    """
    return min(-(1 << 31) + round(p * (1 << 32)), (1 << 31) - 1)


def block_key(seed: int, period: int, index: int, block: int) -> int:
    """The generator seed of one block of the torch path's mask: one more SplitMix64 round over :func:`stream_seed`.

    Block ``block`` covers elements ``[block*MASK_BLOCK, (block+1)*MASK_BLOCK)`` of tensor ``index`` in period
    ``period``; its own key makes a block's bits independent of how the others are drawn (order, chunking).
    """
    return _splitmix64(stream_seed(seed, period, index) ^ block)


def draw_keep_mask(
    numel: int,
    p: float,
    key: int,
    device: torch.device,
    out: torch.Tensor | None = None,
    words: torch.Tensor | None = None,
) -> torch.Tensor:
    """Draw a flat boolean keep-mask (True = kept) from a Generator seeded with ``key``.

    Uniform 32-bit integers are drawn as full-range int64 (the generator's fastest path, two draws per 64-bit word)
    and compared with :func:`keep_threshold`: about 4x faster than ``bernoulli_`` on CPU. The torch path draws each
    block of its masks this way.

    Args:
        numel: Number of elements.
        p: Probability of holding an entry at the anchor (``M = 0``).
        key: Generator seed, from :func:`block_key`.
        device: Device of the mask (and of the generator).
        out: Optional flat bool tensor of ``numel`` elements to write into.
        words: Optional int64 scratch of at least ``(numel + 1) // 2`` elements for the random words.

    Returns:
        The flat bool mask (``out`` when given).
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(key)
    size = (numel + 1) // 2
    words = torch.empty(size, dtype=torch.int64, device=device) if words is None else words[:size]
    words.random_(-(1 << 63), None, generator=generator)
    if out is None:
        out = torch.empty(numel, dtype=torch.bool, device=device)
    return torch.ge(words.view(torch.int32)[:numel], keep_threshold(p), out=out)


def pack_bits(keep: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Pack a contiguous bool tensor of ``8*n`` elements into ``n`` bytes: bit ``k`` of byte ``j`` is element ``8j+k``.

    Eight 0/1 bytes are read as one int64 word (little-endian, as on every platform PyTorch supports) and folded
    with three shift-ors, which moves the byte at bit ``8k`` to bit ``k``; about 3x faster than a weighted sum.
    """
    words = keep.view(torch.int64)
    folded = words | (words >> 7)
    folded |= folded >> 14
    folded |= folded >> 28
    return out.copy_(folded.bitwise_and_(0xFF))


def unpack_bits(bits: torch.Tensor, numel: int) -> torch.Tensor:
    """The flat bool tensor of ``numel`` elements that :func:`pack_bits` packed into ``bits``."""
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    return ((bits.unsqueeze(1) >> shifts) & 1).bool().flatten()[:numel]


def bit_weights(value: float, device: torch.device) -> torch.Tensor:
    """Lookup table ``(256, 8)`` fp32: row ``b`` holds ``value`` where bit ``k`` of ``b`` is set, else 0.

    Gathering its rows by packed mask bytes turns one byte of mask into the eight fp32 weights ``M*s`` in one op.
    """
    codes = torch.arange(256, device=device).unsqueeze(1) >> torch.arange(8, device=device)
    return (codes & 1).to(torch.float32) * value


def mixin_reference(w: torch.Tensor, a: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
    """Reference mixed weight ``w~ = a + M*(w - a)/(1-p)``, computed in float64 and rounded to ``w``'s dtype."""
    w64, a64 = w.double(), a.double()
    return torch.where(mask, a64 + (w64 - a64) / (1.0 - p), a64).to(w.dtype)


def mixout_grad_reference(g: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
    """Reference gradient of ``w``: ``M*g/(1-p)``, computed in float64 and rounded to ``g``'s dtype."""
    return torch.where(mask, g.double() / (1.0 - p), 0.0).to(g.dtype)


def anchor_reference(a: torch.Tensor, w: torch.Tensor, decay: float) -> torch.Tensor:
    """Reference anchor EMA ``decay*a + (1-decay)*w``, computed in float64 and rounded to fp32."""
    return (decay * a.double() + (1.0 - decay) * w.double()).float()


# ----------------------------------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: Backend, tensors: Sequence[torch.Tensor]) -> Literal["triton", "torch"]:
    """Pick the implementation that runs the passes on ``tensors``.

    ``"auto"`` takes Triton when every tensor is on CUDA, Triton imports and the interpreter is off, else torch.
    ``"triton"`` on CPU tensors runs the kernels in the Triton interpreter and needs ``TRITON_INTERPRET=1`` (that is
    how the kernels are tested without a GPU); the interpreter cannot follow the kernels' device pointer tables, so
    CUDA tensors need it off.

    Args:
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.
        tensors: The target tensors.

    Returns:
        ``"triton"`` or ``"torch"``.

    Raises:
        RobustFTConfigError: Unknown backend, or ``"triton"`` where it cannot run (says why and what to do).
    """
    if backend not in _BACKENDS:
        raise RobustFTConfigError(f"`backend` must be one of {_BACKENDS}, got {backend!r}.")
    if backend == "torch":
        return "torch"
    devices = {t.device.type for t in tensors}
    if backend == "auto":
        return "triton" if devices == {"cuda"} and _triton_importable() and not _interpreting() else "torch"
    if not _triton_importable():
        raise RobustFTConfigError(
            "`backend='triton'` needs the `triton` package, which does not import here: install it "
            "(`pip install triton`, Linux) or use `backend='torch'` / `backend='auto'`."
        )
    if devices - {"cpu", "cuda"}:
        raise RobustFTConfigError(
            f"`backend='triton'` runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got tensors on "
            f"{sorted(devices)}: use `backend='torch'`."
        )
    if "cpu" in devices and not _interpreting():
        raise RobustFTConfigError(
            "`backend='triton'` got CPU tensors: Triton kernels run on CPU only in the interpreter, which needs the "
            "environment variable TRITON_INTERPRET=1 set before the kernels are first imported. Set it (tests), or "
            "move the model to a GPU, or use `backend='torch'`."
        )
    if "cuda" in devices and _interpreting():
        raise RobustFTConfigError(
            "`backend='triton'` got CUDA tensors while TRITON_INTERPRET=1: the interpreter cannot follow the kernels' "
            "device pointer tables. Unset TRITON_INTERPRET, or use `backend='torch'`."
        )
    return "triton"


# ----------------------------------------------------------------------------------------------------------------------
# Layout helpers
# ----------------------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------------------
# The torch path
# ----------------------------------------------------------------------------------------------------------------------


class _Impl(Protocol):
    def mix(self, period: int, learned: Sequence[torch.Tensor]) -> None: ...
    def scale_grads(self, period: int, grads: Sequence[torch.Tensor | None]) -> None: ...
    def update_anchor(self, weight: float, learned: Sequence[torch.Tensor]) -> None: ...
    def mask(self, period: int, index: int) -> torch.Tensor: ...


def _mix_chunk(out: torch.Tensor, w: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, tmp: torch.Tensor) -> None:
    """``out <- lerp(a, w, weight)`` in fp32 (``weight = M*s``: 0 gives ``a`` exactly), rounded to ``out``'s dtype."""
    if w.dtype == torch.float32:
        torch.lerp(a, w, weight, out=out)
    else:
        w32 = tmp[: w.numel()].copy_(w)
        out.copy_(torch.lerp(a, w32, weight, out=w32))


def _scale_grad_chunk(g: torch.Tensor, weight: torch.Tensor, tmp: torch.Tensor) -> None:
    """``g <- g*weight`` in fp32 (``weight = M*s``: one rounding of ``g*s`` where kept, ``g*0`` where held)."""
    if g.dtype == torch.float32:
        g.mul_(weight)
    else:
        g.copy_(tmp[: g.numel()].copy_(g).mul_(weight))


def _anchor_chunk(a: torch.Tensor, w: torch.Tensor, weight: float, tmp: torch.Tensor) -> None:
    """``a <- lerp(a, w, weight)`` in fp32 (exact at weight 0 and 1)."""
    a.lerp_(w if w.dtype == torch.float32 else tmp[: w.numel()].copy_(w), weight)


def _in_layout_of(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``g`` itself when laid out like ``w``, else a copy in ``w``'s layout (rare; the caller copies it back).

    The passes walk tensors in memory order, so element ``e`` of the gradient must be element ``e`` of the mask.
    """
    return g if g.stride() == w.stride() else torch.empty_like(w).copy_(g)


def _blocks(numel: int, start: int = 0) -> Iterator[tuple[int, slice]]:
    """``(block number, element slice)`` of each :data:`MASK_BLOCK` block of a flat tensor of ``numel`` elements.

    ``start`` (a multiple of 8) skips the elements before it: the first slice then begins inside its block.
    """
    first = start // MASK_BLOCK if start < numel else -(-numel // MASK_BLOCK)
    for j in range(first, -(-numel // MASK_BLOCK)):
        yield j, slice(max(j * MASK_BLOCK, start), min((j + 1) * MASK_BLOCK, numel))


def _padded(n: int) -> int:
    """``n`` rounded up to a multiple of 8 (whole bytes of packed mask)."""
    return -(-n // 8) * 8


class _TorchPasses:
    """The passes with PyTorch ops: CPU, and CUDA without Triton.

    The period's mask is kept as packed bits (1 bit per element, padded to whole int32 words). On CPU each pass is
    one loop per tensor generated by TorchInductor (:mod:`lightning_robustft.ops.mixout_inductor`) over the tensor's
    whole 32-entry rows; the remaining entries (and everything where Inductor cannot run) take eager ops block by
    block: each block's mask bytes become the fp32 weights ``M*s`` with one gather from :func:`bit_weights`' table.
    """

    def __init__(self, buffers: Sequence[torch.Tensor], anchors: Sequence[torch.Tensor], p: float, seed: int) -> None:
        self._buffers, self._anchors = buffers, anchors
        self._p, self._seed = p, seed
        self._device = anchors[0].device
        self._weights = bit_weights(mix_scale(p), self._device)
        self._bits = [torch.empty(-(-t.numel() // ROW) * 4, dtype=torch.uint8, device=self._device) for t in buffers]
        self._bits_period: int | None = None
        self._fused = FusedRows(self._device)
        self._rows = [t.numel() // ROW if t.numel() >= 2 * ROW else 0 for t in buffers]
        self._row_views = [
            (rows_of(out, n), rows_of(a, n), rows_of(bits, n, torch.int32)) if n else None
            for out, a, bits, n in zip(buffers, anchors, self._bits, self._rows, strict=True)
        ]
        s = torch.tensor(mix_scale(p), dtype=torch.float32, device=self._device)
        self._scale, self._one_minus_scale = s, torch.ones_like(s) - s
        # Scratch of the eager ops, kept (and grown once to a whole block if they must do whole tensors): allocating
        # megabytes twice per step perturbs glibc's heap (mmap and trim thresholds), which was measured to slow the
        # rest of the training step by more than the passes cost.
        self._narrow = any(t.dtype != torch.float32 for t in buffers)
        self._weight = self._codes = self._wide = torch.empty(0, device=self._device)
        self._eager_scratch(ROW if self._fused.enabled else MASK_BLOCK)

    def _eager_scratch(self, n: int) -> None:
        """Make the eager scratch hold ``n`` entries (at least a tail's; else a whole block)."""
        if self._weight.numel() < n:
            n = ROW if n <= ROW else MASK_BLOCK
            self._weight = torch.empty(n, dtype=torch.float32, device=self._device)
            self._codes = torch.empty(n // 8, dtype=torch.int32, device=self._device)
            self._wide = torch.empty(n if self._narrow else 0, dtype=torch.float32, device=self._device)

    def _draw_blocks(
        self, period: int, jobs: Sequence[tuple[int, int, slice]], bits: Mapping[int, torch.Tensor] | list[torch.Tensor]
    ) -> None:
        """Draw the blocks ``(tensor, block, slice)`` of ``period`` into the packed ``bits`` of each tensor."""
        keep = torch.empty(MASK_BLOCK, dtype=torch.bool, device=self._device)
        words = torch.empty(MASK_BLOCK // 2, dtype=torch.int64, device=self._device)
        for index, block, span in jobs:
            n = _padded(span.stop - span.start)
            key = block_key(self._seed, period, index, block)
            draw_keep_mask(n, self._p, key, self._device, out=keep[:n], words=words)
            pack_bits(keep[:n], bits[index][span.start // 8 : span.start // 8 + n // 8])

    def _period_bits(self, period: int) -> list[torch.Tensor]:
        if self._bits_period != period:
            self._bits_period = None  # a failed draw leaves no half-drawn mask behind
            jobs = [(i, j, span) for i, t in enumerate(self._buffers) for j, span in _blocks(t.numel())]
            self._draw_blocks(period, jobs, self._bits)
            self._bits_period = period
        return self._bits

    def _block_weights(self, bits: torch.Tensor, span: slice) -> torch.Tensor:
        """The fp32 weights ``M*s`` of the elements in ``span`` (in the scratch), gathered by their mask bytes."""
        n = _padded(span.stop - span.start)
        self._eager_scratch(n)
        codes = self._codes[: n // 8].copy_(bits[span.start // 8 : span.start // 8 + n // 8])
        torch.index_select(self._weights, 0, codes, out=self._weight[:n].view(-1, 8))
        return self._weight[: span.stop - span.start]

    def _fused_entries(self, done: list[bool]) -> list[int]:
        """Entries of each target done by the fused loops (its whole rows), 0 where they did not run."""
        flags = iter(done)
        return [ROW * n if n and next(flags) else 0 for n in self._rows]

    def mix(self, period: int, learned: Sequence[torch.Tensor]) -> None:
        bits = self._period_bits(period)
        views = zip(learned, self._row_views, self._rows, strict=True)
        jobs = [(v[0], rows_of(w, n), v[1], v[2]) for w, v, n in views if v]
        starts = self._fused_entries(self._fused.mix(jobs, self._one_minus_scale))
        for i, (w, out, a) in enumerate(zip(learned, self._buffers, self._anchors, strict=True)):
            w, out, a = flat_view(w), flat_view(out), flat_view(a)
            for _, s in _blocks(w.numel(), starts[i]):
                _mix_chunk(out[s], w[s], a[s], self._block_weights(bits[i], s), self._wide)

    def scale_grads(self, period: int, grads: Sequence[torch.Tensor | None]) -> None:
        bits = self._period_bits(period)
        targets = [None if g is None else _in_layout_of(g, like) for g, like in zip(grads, self._buffers, strict=True)]
        fused = [v is not None and t is not None for v, t in zip(self._row_views, targets, strict=True)]
        views = zip(targets, self._row_views, self._rows, fused, strict=True)
        jobs = [(rows_of(t, n), v[2]) for t, v, n, f in views if f]
        done = iter(self._fused.scale_grads(jobs, self._scale))
        for i, (g, target) in enumerate(zip(grads, targets, strict=True)):
            if g is None or target is None:
                continue
            flat = flat_view(target)
            start = ROW * self._rows[i] if fused[i] and next(done) else 0
            for _, s in _blocks(flat.numel(), start):
                _scale_grad_chunk(flat[s], self._block_weights(bits[i], s), self._wide)
            if target is not g:
                g.copy_(target)

    def update_anchor(self, weight: float, learned: Sequence[torch.Tensor]) -> None:
        if self._narrow:
            self._eager_scratch(MASK_BLOCK)
        for a, w in zip(self._anchors, learned, strict=True):
            a, w = flat_view(a), flat_view(w)
            for _, s in _blocks(w.numel()):
                _anchor_chunk(a[s], w[s], weight, self._wide)

    def mask(self, period: int, index: int) -> torch.Tensor:
        like = self._buffers[index]
        if self._bits_period == period:
            bits = self._bits[index]
        else:
            bits = torch.empty_like(self._bits[index])
            self._draw_blocks(period, [(index, j, span) for j, span in _blocks(like.numel())], {index: bits})
        out = torch.empty_like(like, dtype=torch.bool)
        flat_view(out).copy_(unpack_bits(bits, like.numel()))
        return out


# ----------------------------------------------------------------------------------------------------------------------
# The public object
# ----------------------------------------------------------------------------------------------------------------------


def _check_p(p: float) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or not 0.0 <= p < 1.0:
        raise RobustFTConfigError(
            f"`p` (the probability of holding an entry at the anchor) must be a float in [0, 1), got {p!r}. "
            "p = 0 disables the mask; Mixout's usual value is 0.9."
        )
    return float(p)


def _check_int(name: str, value: int, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value >= high):
        allowed = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high})"
        raise RobustFTConfigError(f"`{name}` must be {allowed}, got {value!r}.")
    return value


def _check_params(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    params = list(params)
    if not params:
        raise RobustFTConfigError("`params` is empty: MixoutPasses needs at least one target tensor.")
    for i, t in enumerate(params):
        if not isinstance(t, torch.Tensor):
            raise RobustFTConfigError(f"`params[{i}]` must be a torch.Tensor, got {type(t).__name__}.")
        if t.dtype not in _PARAM_DTYPES:
            raise RobustFTConfigError(
                f"`params[{i}]` has dtype {t.dtype}; GMixout targets floating-point weights in "
                f"{[str(d) for d in _PARAM_DTYPES]}: leave integer / float64 tensors out of the targets."
            )
        if t.device != params[0].device:
            raise RobustFTConfigError(
                f"`params[{i}]` is on {t.device} but `params[0]` is on {params[0].device}: all targets must share one "
                "device (create MixoutPasses after the model is moved to its training device)."
            )
        if not is_dense(t):
            raise RobustFTConfigError(
                f"`params[{i}]` (shape {tuple(t.shape)}, strides {t.stride()}) is not dense in memory: the passes "
                "treat each target as one flat block. Target whole parameters, not slices of them."
            )
    return params


class MixoutPasses:
    r"""The two fused passes of GMixout and the anchor EMA over a fixed list of target tensors.

    Owns the fp32 anchors and one buffer per target for the mixed weights ``w~``. Mask ``M_r`` for tensor ``i`` is a
    pure function of ``(seed, period r, tensor index i, element index)`` for a given backend; ``M = 1`` with
    probability ``1 - p`` ("kept"), ``0`` with probability ``p`` ("held at the anchor").

    Between :meth:`mix_in` and :meth:`mix_out` / :meth:`restore` each target tensor's ``.data`` is the ``w~`` buffer;
    its own storage, holding ``w``, is untouched and comes back on mix-out. Code that keeps a separate alias of a
    target's storage (``t.data``, a view) sees ``w`` throughout; the tensor object itself sees ``w~``.

    Memory: anchors (fp32) + ``w~`` buffers (parameter dtype) + on the torch path one period's mask (1 bit per
    element) and one block of scratch (about 2.3 MB, twice that with 16-bit targets); nothing else persists.

    Example::

        passes = MixoutPasses([lin.weight], p=0.9, seed=0)
        passes.mix_in(period)               # params hold w~
        loss_fn(model(x)).backward()        # gradient of w~
        passes.mix_out(period, [lin.weight.grad])  # params hold w, grad is the gradient of w
        optimizer.step()

    Args:
        params: Target tensors (typically ``nn.Parameter``\\ s), dense, all on one device, fp32 / bf16 / fp16. Their
            current values become the anchors (the pretrained weights).
        p: Probability in ``[0, 1)`` of holding an entry at the anchor; ``0`` disables the mask.
        seed: Mask seed, an integer in ``[0, 2**64)``; the same on every rank.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``, see :func:`resolve_backend`.
    """

    def __init__(self, params: Sequence[torch.Tensor], p: float, seed: int, backend: Backend = "auto") -> None:
        self._params = _check_params(params)
        self._p = _check_p(p)
        self._seed = _check_int("seed", seed, 0, 1 << 64)
        self.backend: Literal["triton", "torch"] = resolve_backend(backend, self._params)
        with torch.no_grad():
            self._anchors = [torch.empty_like(t, dtype=torch.float32).copy_(t) for t in self._params]
        self._buffers = [torch.empty_like(t) for t in self._params]
        self._learned: list[torch.Tensor] | None = None  # aliases of the targets' own storage (w) while mixed
        self._impl: _Impl
        if self.backend == "triton":
            from lightning_robustft.ops.mixout_triton import TritonPasses

            self._impl = TritonPasses(self._buffers, self._anchors, self._p, self._seed)
        else:
            self._impl = _TorchPasses(self._buffers, self._anchors, self._p, self._seed)

    @property
    def p(self) -> float:
        """Probability of holding an entry at the anchor."""
        return self._p

    @property
    def seed(self) -> int:
        """The mask seed."""
        return self._seed

    @property
    def mixed(self) -> bool:
        """True between :meth:`mix_in` and :meth:`mix_out` / :meth:`restore`: the parameters hold ``w~``."""
        return self._learned is not None

    @property
    def anchors(self) -> list[torch.Tensor]:
        """The fp32 anchors, one per target, same shapes, strides and device as the targets."""
        return self._anchors

    @anchors.setter
    def anchors(self, values: Sequence[torch.Tensor]) -> None:
        # Copy into the existing buffers: the Triton path's pointer tables and the torch path keep referring to them.
        values = list(values)
        if len(values) != len(self._anchors):
            raise RobustFTConfigError(
                f"`anchors` needs {len(self._anchors)} tensors (one per target), got {len(values)}."
            )
        for i, (mine, new) in enumerate(zip(self._anchors, values, strict=True)):
            if not isinstance(new, torch.Tensor) or new.shape != mine.shape or not new.is_floating_point():
                got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
                raise RobustFTConfigError(
                    f"`anchors[{i}]` must be a float tensor of shape {tuple(mine.shape)}, got {got}."
                )
        with torch.no_grad():
            torch._foreach_copy_(self._anchors, values)

    def mix_in(self, period: int) -> None:
        """Write ``w~ = a + M_period*(w - a)/(1-p)`` into the buffers and point the targets at them (``w`` is kept).

        Raises:
            RuntimeError: Already mixed, or a target was moved to another device / dtype / layout since the passes
                were built.
        """
        _check_int("period", period, 0)
        if self.mixed:
            raise RuntimeError(
                "mix_in() called while the parameters already hold w~: call mix_out() or restore() first."
            )
        learned = self._own_storage()
        if self._p:  # p = 0: w~ = w, the targets keep their storage
            with torch.no_grad():
                self._impl.mix(period, learned)
            for t, buffer in zip(self._params, self._buffers, strict=True):
                t.data = buffer
        self._learned = learned

    def mix_out(self, period: int, grads: Sequence[torch.Tensor | None]) -> None:
        """Point the targets back at ``w`` and ``g <- M_period*g/(1-p)`` in place.

        Args:
            period: The period given to the matching :meth:`mix_in`.
            grads: One gradient per target (same shape and dtype), or ``None`` where a target got no gradient.

        Raises:
            RuntimeError: Not mixed.
        """
        _check_int("period", period, 0)
        grads = self._check_grads(grads)
        if not self.mixed:
            raise RuntimeError("mix_out() called while the parameters hold w: there was no mix_in() to undo.")
        self._swap_back()
        if self._p:  # p = 0: g <- 1*g/1 = g
            with torch.no_grad():
                self._impl.scale_grads(period, grads)

    def restore(self) -> None:
        """Point the targets back at ``w`` without touching gradients; a no-op when not mixed.

        For leaving a step early: validation in the middle of a step, exceptions, checkpoints.
        """
        if self.mixed:
            self._swap_back()

    def update_anchor(self, decay: float) -> None:
        """``a <- decay*a + (1-decay)*w``, with the parameters holding ``w`` (outside a mix-in).

        ``decay = 1`` leaves the anchors untouched (bitwise); ``decay = 0`` copies ``w``.

        Raises:
            RuntimeError: Called while mixed (the parameters hold ``w~``, not ``w``).
        """
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
            raise RobustFTConfigError(f"`decay` (the anchor EMA factor) must be a float in [0, 1], got {decay!r}.")
        if self.mixed:
            raise RuntimeError(
                "update_anchor() called while the parameters hold w~: call mix_out() or restore() first."
            )
        if decay == 1.0:
            return
        learned = self._own_storage()
        with torch.no_grad():
            self._impl.update_anchor(1.0 - float(decay), learned)

    def _swap_back(self) -> None:
        assert self._learned is not None
        if self._p:
            for t, w in zip(self._params, self._learned, strict=True):
                t.data = w
        self._learned = None

    def _own_storage(self) -> list[torch.Tensor]:
        """Aliases of the targets' current storage (``w``), after refusing targets moved since the passes were built.

        The buffers and anchors were made like the targets, so a target moved since (``model.to(...)``) cannot be
        mixed with them.
        """
        learned = [t.data for t in self._params]
        for i, (w, buffer) in enumerate(zip(learned, self._buffers, strict=True)):
            if (w.shape, w.stride(), w.dtype, w.device) != (buffer.shape, buffer.stride(), buffer.dtype, buffer.device):
                raise RuntimeError(
                    f"Target {i} is now {w.dtype} on {w.device} with strides {w.stride()}, but MixoutPasses was built "
                    f"for {buffer.dtype} on {buffer.device} with strides {buffer.stride()}: build the passes after "
                    "the model has its final device, dtype and memory format."
                )
        return learned

    def mask(self, period: int, index: int) -> torch.Tensor:
        """The boolean keep-mask ``M_period`` of target ``index``, shaped like it (diagnostics and tests only)."""
        _check_int("period", period, 0)
        _check_int("index", index, 0, len(self._params))
        with torch.no_grad():
            return self._impl.mask(period, index)

    def _check_grads(self, grads: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
        grads = list(grads)
        if len(grads) != len(self._params):
            raise RobustFTConfigError(f"`grads` needs {len(self._params)} entries (one per target), got {len(grads)}.")
        for i, (g, w) in enumerate(zip(grads, self._params, strict=True)):
            if g is not None and (g.shape != w.shape or g.dtype != w.dtype or g.device != w.device):
                raise RobustFTConfigError(
                    f"`grads[{i}]` must match its target (shape {tuple(w.shape)}, {w.dtype}, {w.device}), got shape "
                    f"{tuple(g.shape)}, {g.dtype}, {g.device}."
                )
        return grads
