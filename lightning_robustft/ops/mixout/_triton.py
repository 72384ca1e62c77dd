"""Triton kernels of the GMixout passes: the ``"triton"`` backend, imported only when a run selects it.

Few launches: all targets of one parameter dtype are covered by **one launch per pass**. Each group keeps, on the
device, a table of per-tensor base addresses (int64, cast in the kernel with ``.to(tl.pointer_type(...))``), numels and
per-period Philox keys, plus a block table mapping each program to ``(tensor, block within tensor)``; the tables are
built once and rebuilt only if a tensor's storage moves.

The mask is never stored: ``M = 1`` iff ``u >= p`` with ``u`` a Philox uniform regenerated in every pass from the key
`stream_seed` ``(seed, period, tensor)`` and the element's index. One Philox call yields four uniforms (``tl.rand4x``),
so element ``e`` of a tensor uses output ``(e // COLS) % 4`` of counter ``(e // (4*COLS))*COLS + e % COLS`` with
``COLS = PHILOX_COLS``: a fixed definition, independent of the launch's block size, so the interpreted kernels (large
blocks) draw the bits the compiled ones (small blocks) draw.

Compiled-code notes (checked by compiling for sm_90 without a GPU, see the tests): base addresses carry an alignment
hint when every address in the launch is 16-byte aligned, block starts are multiples of the block size, and blocks that
lie entirely inside their tensor take an unmasked branch, so loads and stores are 128-bit vectors; indices are int64.
"""

# Upper-case kernel arguments are compile-time constants (tl.constexpr), as Triton code names them.
# ruff: noqa: N803

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from lightning_robustft.ops.mixout._law import as_int64, flat_view, mix_scale, stream_seed

__all__ = ["PHILOX_COLS", "TritonPasses", "block_rows", "kernels_interpreted"]

PHILOX_COLS = 512
"""Columns of the Philox counter layout: part of the mask's definition (changing it changes every mask)."""

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_NUM_WARPS = 4


def block_rows() -> int:
    """Rows of ``4*PHILOX_COLS`` elements per program: 1 compiled (2048 elements), 16 interpreted.

    Each interpreted program costs milliseconds of Python whatever its size, so the interpreter gets large blocks.
    """
    return 16 if kernels_interpreted() else 1


def kernels_interpreted() -> bool:
    """Whether this module's kernels were defined for the interpreter (TRITON_INTERPRET=1 when it was imported)."""
    return isinstance(_mask_kernel, InterpretedFunction)


# ----------------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------------


@triton.jit
def _ptr(table, t, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Base pointer of tensor ``t`` from an int64 address table, with a 16-byte alignment hint when known."""
    ptr = tl.load(table + t).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _offsets(start, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Element offsets ``start + r*4*COLS + c`` of quarter 0 of each row of a block (quarter j adds ``j*COLS``)."""
    return start + tl.arange(0, ROWS)[:, None] * (4 * COLS) + tl.arange(0, COLS)[None, :]


@triton.jit
def _uniforms(key, start, ROWS: tl.constexpr, COLS: tl.constexpr):
    """The four Philox uniforms of a block (``start`` is a multiple of ``4*COLS``).

    Element ``start + r*4*COLS + j*COLS + c`` uses output ``j`` of counter ``start//4 + r*COLS + c``.
    """
    counters = start // 4 + tl.arange(0, ROWS)[:, None] * COLS + tl.arange(0, COLS)[None, :]
    return tl.rand4x(key, counters)


@triton.jit
def _lerp(start, end, weight):
    """``torch.lerp``'s formula: exactly ``start`` at weight 0 and exactly ``end`` at weight 1."""
    diff = end - start
    return tl.where(weight < 0.5, start + weight * diff, end - diff * (1.0 - weight))


@triton.jit
def _round_to(x, DTYPE: tl.constexpr):
    """Round fp32 ``x`` to ``DTYPE`` to nearest-even.

    bf16 is rounded with integer ops (as ``c10::BFloat16`` does) because the Triton interpreter truncates
    fp32 -> bf16 while compiled code rounds: the explicit form gives the same bits in both.
    """
    if DTYPE == tl.bfloat16:  # noqa: SIM300 - DTYPE is a constexpr argument, not a constant
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)  # NaN stays a (quiet) NaN instead of rounding to inf
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def _mix_in_part(w_ptr, m_ptr, a_ptr, offs, n, keep, scale, MASKED: tl.constexpr):
    inside = offs < n if MASKED else None
    w = tl.load(w_ptr + offs, mask=inside)
    a = tl.load(a_ptr + offs, mask=inside)
    mixed = tl.where(keep, _lerp(a, w.to(tl.float32), scale), a)
    tl.store(m_ptr + offs, _round_to(mixed, m_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _mix_in_block(
    w_ptr, m_ptr, a_ptr, key, start, n, p, scale, MASKED: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr
):
    offs = _offsets(start, ROWS, COLS)
    u0, u1, u2, u3 = _uniforms(key, start, ROWS, COLS)
    _mix_in_part(w_ptr, m_ptr, a_ptr, offs, n, u0 >= p, scale, MASKED)
    _mix_in_part(w_ptr, m_ptr, a_ptr, offs + COLS, n, u1 >= p, scale, MASKED)
    _mix_in_part(w_ptr, m_ptr, a_ptr, offs + 2 * COLS, n, u2 >= p, scale, MASKED)
    _mix_in_part(w_ptr, m_ptr, a_ptr, offs + 3 * COLS, n, u3 >= p, scale, MASKED)


@triton.jit
def _mix_in_kernel(
    w_table, m_table, a_table, numels, keys, block_tensor, block_index, p, scale,
    DTYPE: tl.constexpr, ALIGNED: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
):  # fmt: skip
    """``m <- where(M, lerp(a, w, scale), a)`` for one block of one tensor (``w`` only read)."""
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(block_tensor + pid).to(tl.int64)
    start = tl.load(block_index + pid).to(tl.int64) * (ROWS * 4 * COLS)
    n = tl.load(numels + t)
    key = tl.load(keys + t)
    w_ptr = _ptr(w_table, t, DTYPE, ALIGNED)
    m_ptr = _ptr(m_table, t, DTYPE, ALIGNED)
    a_ptr = _ptr(a_table, t, tl.float32, ALIGNED)
    if start + ROWS * 4 * COLS <= n:
        _mix_in_block(w_ptr, m_ptr, a_ptr, key, start, n, p, scale, False, ROWS, COLS)
    else:
        _mix_in_block(w_ptr, m_ptr, a_ptr, key, start, n, p, scale, True, ROWS, COLS)


@triton.jit
def _grad_part(g_ptr, offs, n, keep, scale, MASKED: tl.constexpr):
    inside = offs < n if MASKED else None
    g = tl.load(g_ptr + offs, mask=inside).to(tl.float32)
    tl.store(g_ptr + offs, _round_to(tl.where(keep, g * scale, g * 0.0), g_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _grad_block(g_ptr, key, start, n, p, scale, MASKED: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    offs = _offsets(start, ROWS, COLS)
    u0, u1, u2, u3 = _uniforms(key, start, ROWS, COLS)
    _grad_part(g_ptr, offs, n, u0 >= p, scale, MASKED)
    _grad_part(g_ptr, offs + COLS, n, u1 >= p, scale, MASKED)
    _grad_part(g_ptr, offs + 2 * COLS, n, u2 >= p, scale, MASKED)
    _grad_part(g_ptr, offs + 3 * COLS, n, u3 >= p, scale, MASKED)


@triton.jit
def _grad_kernel(
    g_table, numels, keys, block_tensor, block_index, p, scale,
    DTYPE: tl.constexpr, ALIGNED: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
):  # fmt: skip
    """``g <- M*g*scale`` for one block, where the tensor has a gradient (address != 0)."""
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(block_tensor + pid).to(tl.int64)
    if tl.load(g_table + t) != 0:
        start = tl.load(block_index + pid).to(tl.int64) * (ROWS * 4 * COLS)
        n = tl.load(numels + t)
        key = tl.load(keys + t)
        g_ptr = _ptr(g_table, t, DTYPE, ALIGNED)
        if start + ROWS * 4 * COLS <= n:
            _grad_block(g_ptr, key, start, n, p, scale, False, ROWS, COLS)
        else:
            _grad_block(g_ptr, key, start, n, p, scale, True, ROWS, COLS)


@triton.jit
def _anchor_part(a_ptr, w_ptr, offs, n, weight, MASKED: tl.constexpr):
    inside = offs < n if MASKED else None
    a = tl.load(a_ptr + offs, mask=inside)
    w = tl.load(w_ptr + offs, mask=inside).to(tl.float32)
    tl.store(a_ptr + offs, _lerp(a, w, weight), mask=inside)


@triton.jit
def _anchor_kernel(
    a_table, w_table, numels, block_tensor, block_index, weight,
    DTYPE: tl.constexpr, ALIGNED: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
):  # fmt: skip
    """``a <- lerp(a, w, weight)`` (``weight = 1 - decay``) for one block."""
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(block_tensor + pid).to(tl.int64)
    start = tl.load(block_index + pid).to(tl.int64) * (ROWS * 4 * COLS)
    n = tl.load(numels + t)
    a_ptr = _ptr(a_table, t, tl.float32, ALIGNED)
    w_ptr = _ptr(w_table, t, DTYPE, ALIGNED)
    offs = _offsets(start, ROWS, COLS)
    if start + ROWS * 4 * COLS <= n:
        for j in tl.static_range(4):
            _anchor_part(a_ptr, w_ptr, offs + j * COLS, n, weight, False)
    else:
        for j in tl.static_range(4):
            _anchor_part(a_ptr, w_ptr, offs + j * COLS, n, weight, True)


@triton.jit
def _mask_kernel(out_ptr, n, key, p, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Materialise the keep-mask (int8) of one tensor, with the same bits as the passes."""
    start = tl.program_id(0).to(tl.int64) * (ROWS * 4 * COLS)
    offs = _offsets(start, ROWS, COLS)
    u0, u1, u2, u3 = _uniforms(key, start, ROWS, COLS)
    tl.store(out_ptr + offs, (u0 >= p).to(tl.int8), mask=offs < n)
    tl.store(out_ptr + offs + COLS, (u1 >= p).to(tl.int8), mask=offs + COLS < n)
    tl.store(out_ptr + offs + 2 * COLS, (u2 >= p).to(tl.int8), mask=offs + 2 * COLS < n)
    tl.store(out_ptr + offs + 3 * COLS, (u3 >= p).to(tl.int8), mask=offs + 3 * COLS < n)


# ----------------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------------


def _addresses(tensors: Sequence[torch.Tensor | None]) -> tuple[int, ...]:
    return tuple(0 if t is None else t.data_ptr() for t in tensors)


def _aligned(*addresses: tuple[int, ...]) -> bool:
    return all(address % 16 == 0 for group in addresses for address in group)


class _Group:
    """The targets of one dtype: their indices, block table and cached address / key tables on the device."""

    def __init__(self, indices: list[int], numels: list[int], device: torch.device, rows: int) -> None:
        block = rows * 4 * PHILOX_COLS
        blocks = [(local, j) for local, n in enumerate(numels) for j in range(triton.cdiv(n, block))]
        self.indices = indices
        self.num_blocks = len(blocks)
        self.numels = torch.tensor(numels, dtype=torch.int64, device=device)
        self.block_tensor = torch.tensor([b[0] for b in blocks], dtype=torch.int32, device=device)
        self.block_index = torch.tensor([b[1] for b in blocks], dtype=torch.int32, device=device)
        self._device = device
        self._tables: dict[str, tuple[tuple[int, ...], torch.Tensor]] = {}
        self._keys: tuple[int, torch.Tensor] | None = None

    def table(self, name: str, tensors: Sequence[torch.Tensor | None]) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Device table of the group's addresses in ``tensors`` (0 for None), rebuilt only when an address moved."""
        addresses = _addresses([tensors[i] for i in self.indices])
        cached = self._tables.get(name)
        if cached is None or cached[0] != addresses:
            values = [as_int64(a) for a in addresses]
            cached = (addresses, torch.tensor(values, dtype=torch.int64, device=self._device))
            self._tables[name] = cached
        return cached[1], addresses

    def keys(self, seed: int, period: int) -> torch.Tensor:
        """Device table of the Philox keys of ``period`` (cached: a mix-in and its mix-out share the period)."""
        if self._keys is None or self._keys[0] != period:
            values = [as_int64(stream_seed(seed, period, i)) for i in self.indices]
            self._keys = (period, torch.tensor(values, dtype=torch.int64, device=self._device))
        return self._keys[1]


class TritonPasses:
    """The passes as Triton kernels: one launch per pass and parameter dtype.

    Args:
        buffers: Buffers for ``w~``, ``torch.empty_like`` of the targets (dense, one device; contiguity is not
            required, memory order is used).
        anchors: fp32 anchors, ``torch.empty_like`` of the targets.
        p: Probability of holding an entry at the anchor.
        seed: Mask seed.
    """

    def __init__(self, buffers: Sequence[torch.Tensor], anchors: Sequence[torch.Tensor], p: float, seed: int) -> None:
        self._buffers, self._anchors = buffers, anchors
        self._p, self._seed, self._scale = p, seed, mix_scale(p)
        self._device = anchors[0].device
        if kernels_interpreted() != (self._device.type == "cpu"):
            mode, env = ("interpreted", "1") if kernels_interpreted() else ("compiled", "not 1")
            raise ValueError(
                f"The GMixout Triton kernels were defined {mode} (TRITON_INTERPRET was {env} when they were first "
                f"imported) but the targets are on {self._device}: interpreted kernels take CPU tensors, compiled "
                "ones CUDA tensors. Set TRITON_INTERPRET before the first use in the process, or use backend='torch'."
            )
        self._rows = block_rows()
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, t in enumerate(buffers):
            if t.numel():
                by_dtype.setdefault(t.dtype, []).append(i)
        self._groups = {
            dtype: _Group(indices, [buffers[i].numel() for i in indices], self._device, self._rows)
            for dtype, indices in by_dtype.items()
        }

    def mix(self, period: int, learned: Sequence[torch.Tensor]) -> None:
        """Mixed weights into the buffers, one launch per dtype."""
        for dtype, group in self._groups.items():
            w, w_addr = group.table("w", learned)
            m, m_addr = group.table("m", self._buffers)
            a, a_addr = group.table("a", self._anchors)
            _run(
                _mix_in_kernel, group, self._device,
                (w, m, a, group.numels, group.keys(self._seed, period), group.block_tensor, group.block_index,
                 self._p, self._scale),
                dtype=dtype, aligned=_aligned(w_addr, m_addr, a_addr), rows=self._rows,
            )  # fmt: skip

    def scale_grads(self, period: int, grads: Sequence[torch.Tensor | None]) -> None:
        """Scale the gradients by ``M*s``, one launch per dtype that has any."""
        for i, g in enumerate(grads):
            if g is not None and g.stride() != self._buffers[i].stride():
                raise ValueError(
                    f"`grads[{i}]` has strides {g.stride()} but its parameter {self._buffers[i].stride()}: the Triton "
                    "path needs gradients laid out like their parameters; use backend='torch'."
                )
        for dtype, group in self._groups.items():
            g, g_addr = group.table("g", grads)
            if not any(g_addr):
                continue
            _run(
                _grad_kernel, group, self._device,
                (g, group.numels, group.keys(self._seed, period), group.block_tensor, group.block_index,
                 self._p, self._scale),
                dtype=dtype, aligned=_aligned(tuple(x for x in g_addr if x)), rows=self._rows,
            )  # fmt: skip

    def update_anchor(self, weight: float, learned: Sequence[torch.Tensor]) -> None:
        """``a <- lerp(a, w, weight)`` for every target, one launch per dtype."""
        for dtype, group in self._groups.items():
            a, a_addr = group.table("a", self._anchors)
            w, w_addr = group.table("w", learned)
            _run(
                _anchor_kernel, group, self._device,
                (a, w, group.numels, group.block_tensor, group.block_index, weight),
                dtype=dtype, aligned=_aligned(a_addr, w_addr), rows=self._rows,
            )  # fmt: skip

    def mask(self, period: int, index: int) -> torch.Tensor:
        """Materialised keep-mask of target ``index`` (bool, shaped and laid out like it)."""
        param = self._buffers[index]
        flat = torch.empty(param.numel(), dtype=torch.int8, device=self._device)
        out = torch.empty_like(param, dtype=torch.bool)
        if param.numel():
            key = as_int64(stream_seed(self._seed, period, index))
            grid = (triton.cdiv(param.numel(), self._rows * 4 * PHILOX_COLS),)
            with _on_device(self._device):
                _mask_kernel[grid](flat, param.numel(), key, self._p, ROWS=self._rows, COLS=PHILOX_COLS)
        flat_view(out).copy_(flat)
        return out


def _on_device(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """Make ``device`` current for the launch (Triton launches on the current CUDA device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _run(
    kernel: triton.JITFunction,
    group: _Group,
    device: torch.device,
    args: tuple[object, ...],
    *,
    dtype: torch.dtype,
    aligned: bool,
    rows: int,
) -> None:
    with _on_device(device):
        kernel[(group.num_blocks,)](
            *args, DTYPE=_TL_DTYPES[dtype], ALIGNED=aligned, ROWS=rows, COLS=PHILOX_COLS, num_warps=_NUM_WARPS
        )
