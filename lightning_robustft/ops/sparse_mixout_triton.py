"""Triton kernels of sparse GMixout's ops (imported lazily by `lightning_robustft.ops.sparse_mixout`).

One launch per op and tensor, each a flat 1-D grid over the ``m`` free entries (or, for the anchor copy, the ``n``
entries) in blocks of `block_size` elements. The int32 indices are read as they are stored (no int64 copy, as
the torch path's ``scatter_`` needs), and the fp32 arithmetic and the rounding to the weight's dtype happen in
registers:

* gather ``out[j] = w[I[j]]`` and scatter ``w[I[j]] = v[j]`` (the packed values of a period, and their write-back);
* the mixed weight in two launches: the anchor rounded to the weight's dtype (``n`` entries), then the free entries
  ``out[I[j]] = lerp(a[I[j]], v[j], s)`` (``m`` entries), no scratch;
* the packed gradient ``s * g[I[j]]``, rounded once to the gradient's dtype.

Arithmetic follows the torch path: `torch.lerp`'s two-branch formula in fp32 (exactly the anchor at weight 0,
exactly ``v`` at weight 1), bf16 rounded to nearest-even with integer ops (the interpreter would otherwise truncate).
Gathers, scatters, the anchor copy and the packed gradient give the torch path's bits; a free entry of ``w~`` agrees
with it to fp32 rounding, since CPU ``torch.lerp`` fuses its multiply-add in its vectorised loop and not in its
scalar tail, and compiled Triton may contract it too (tested against a float64 reference).
"""

# Upper-case kernel arguments are compile-time constants (tl.constexpr), as Triton code names them.
# ruff: noqa: N803

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from lightning_robustft.ops.mixout._triton import _round_to  # one rounding rule for both kernel files

__all__ = ["block_size", "kernels_interpreted", "triton_gather", "triton_mix", "triton_packed_grad", "triton_scatter"]

_NUM_WARPS = 4


def kernels_interpreted() -> bool:
    """Whether this module's kernels were defined for the interpreter (TRITON_INTERPRET=1 when it was imported)."""
    return isinstance(_gather_kernel, InterpretedFunction)


def block_size() -> int:
    """Elements per program: 1024 compiled (four warps, 8 per thread), 1 << 16 interpreted (Python per program)."""
    return 1 << 16 if kernels_interpreted() else 1024


@triton.jit
def _lerp(start, end, weight):
    """``torch.lerp``'s formula: exactly ``start`` at weight 0 and exactly ``end`` at weight 1."""
    diff = end - start
    return tl.where(weight < 0.5, start + weight * diff, end - diff * (1.0 - weight))


@triton.jit
def _gather_kernel(src_ptr, idx_ptr, out_ptr, m, BLOCK: tl.constexpr):
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = j < m
    i = tl.load(idx_ptr + j, mask=inside)
    tl.store(out_ptr + j, tl.load(src_ptr + i, mask=inside), mask=inside)


@triton.jit
def _scatter_kernel(dst_ptr, idx_ptr, val_ptr, m, BLOCK: tl.constexpr):
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = j < m
    i = tl.load(idx_ptr + j, mask=inside)
    tl.store(dst_ptr + i, tl.load(val_ptr + j, mask=inside), mask=inside)


@triton.jit
def _anchor_copy_kernel(a_ptr, out_ptr, n, BLOCK: tl.constexpr):
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = e < n
    tl.store(out_ptr + e, _round_to(tl.load(a_ptr + e, mask=inside), out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _mix_free_kernel(a_ptr, v_ptr, idx_ptr, out_ptr, m, scale, BLOCK: tl.constexpr):
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = j < m
    i = tl.load(idx_ptr + j, mask=inside)
    a = tl.load(a_ptr + i, mask=inside)
    v = tl.load(v_ptr + j, mask=inside).to(tl.float32)
    tl.store(out_ptr + i, _round_to(_lerp(a, v, scale), out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _packed_grad_kernel(g_ptr, idx_ptr, out_ptr, m, scale, BLOCK: tl.constexpr):
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = j < m
    i = tl.load(idx_ptr + j, mask=inside)
    g = tl.load(g_ptr + i, mask=inside).to(tl.float32)
    tl.store(out_ptr + j, _round_to(g * scale, out_ptr.dtype.element_ty), mask=inside)


def _check(*tensors: torch.Tensor) -> None:
    """Refuse tensors the kernels cannot reach: CPU ones with compiled kernels, CUDA ones in the interpreter."""
    devices = {t.device.type for t in tensors}
    if kernels_interpreted() and devices != {"cpu"}:
        raise ValueError(
            f"The sparse GMixout kernels were defined for the Triton interpreter (TRITON_INTERPRET=1 at import) and "
            f"got tensors on {sorted(devices)}: unset TRITON_INTERPRET before the first import, or use backend='torch'."
        )
    if not kernels_interpreted() and devices != {"cuda"}:
        raise ValueError(
            f"The sparse GMixout kernels were defined compiled and got tensors on {sorted(devices)}: compiled Triton "
            "runs on CUDA tensors; set TRITON_INTERPRET=1 before the first import to interpret them on CPU."
        )


def _grid(count: int) -> tuple[int]:
    return (triton.cdiv(count, block_size()),)


def triton_gather(src: torch.Tensor, indices: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out[j] = src[indices[j]]`` over flat tensors; returns ``out``."""
    _check(src, indices, out)
    if indices.numel():
        _gather_kernel[_grid(indices.numel())](
            src, indices, out, indices.numel(), BLOCK=block_size(), num_warps=_NUM_WARPS
        )
    return out


def triton_scatter(dst: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``dst[indices[j]] = values[j]`` over flat tensors (distinct indices); returns ``dst``."""
    _check(dst, indices, values)
    if indices.numel():
        _scatter_kernel[_grid(indices.numel())](
            dst, indices, values, indices.numel(), BLOCK=block_size(), num_warps=_NUM_WARPS
        )
    return dst


def triton_mix(
    anchor: torch.Tensor, packed: torch.Tensor, indices: torch.Tensor, scale: float, out: torch.Tensor
) -> torch.Tensor:
    """``out = round(a)``, then ``out[I[j]] = round(lerp(a[I[j]], v[j], scale))`` over flat tensors; returns ``out``."""
    _check(anchor, packed, indices, out)
    n, m = out.numel(), indices.numel()
    if n:
        _anchor_copy_kernel[_grid(n)](anchor, out, n, BLOCK=block_size(), num_warps=_NUM_WARPS)
    if m:
        _mix_free_kernel[_grid(m)](anchor, packed, indices, out, m, scale, BLOCK=block_size(), num_warps=_NUM_WARPS)
    return out


def triton_packed_grad(grad: torch.Tensor, indices: torch.Tensor, scale: float) -> torch.Tensor:
    """A new vector ``round(scale * grad[indices[j]])`` in ``grad``'s dtype (``grad`` flat)."""
    out = torch.empty(indices.numel(), dtype=grad.dtype, device=grad.device)
    _check(grad, indices, out)
    if indices.numel():
        _packed_grad_kernel[_grid(indices.numel())](
            grad, indices, out, indices.numel(), scale, BLOCK=block_size(), num_warps=_NUM_WARPS
        )
    return out
