"""The fused passes of GMixout: mix-in, mix-out and the anchor EMA, over a fixed list of target tensors.

GMixout trains with mixed weights ``w~ = a + M*(w - a)/(1-p)`` (``a`` the fp32 anchor, ``M ~ Bernoulli(1-p)``
elementwise) while the optimizer steps the learned weights ``w``. Per optimizer step that takes two passes over the
targets, wrapped around the user's forward/backward:

* **mix-in**: keep ``w`` in a backup buffer and write ``w~`` into the parameters in place;
* **mix-out**: restore ``w`` from the backup and turn the gradient of ``w~`` into the gradient of ``w``,
  ``g <- M*g/(1-p)`` (the exact chain rule), in the same pass;

plus, at every mask redraw, the anchor EMA ``a <- decay*a + (1-decay)*w``.

Two backends implement them with the same semantics but different mask bits (each path is deterministic):

* ``"triton"`` (:mod:`lightning_robustft.ops.mixout_triton`, imported lazily): one launch per pass and parameter dtype,
  the mask regenerated inside the kernel from ``(seed, period, tensor, element)`` with Philox, never stored;
* ``"torch"``: masks drawn from a seeded :class:`torch.Generator`, kept for the current period (so ``resample_every >
  1`` does not redraw), arithmetic chunked on CPU so each chunk's temporaries stay in cache.

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
from collections.abc import Iterator, Sequence
from functools import lru_cache
from typing import Literal, Protocol

import torch

from lightning_robustft.errors import RobustFTConfigError

Backend = Literal["auto", "triton", "torch"]

_BACKENDS = ("auto", "triton", "torch")
_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MASK64 = (1 << 64) - 1
# CPU chunk length (elements) of the torch path: a chunk's operands (about 4 x 2 MiB in fp32) stay in the L3 cache
# between the eager ops of a pass, which then costs about one trip to memory instead of four, while each op is large
# enough that dispatch overhead stays small (measured: 40% faster than 32K-element chunks).
_CPU_CHUNK = 1 << 19


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


def draw_keep_mask(
    numel: int, p: float, key: int, device: torch.device, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Draw the torch path's flat boolean keep-mask (True = kept) from a Generator seeded with ``key``.

    Uniform 32-bit integers are drawn as full-range int64 (the generator's fastest path, two draws per 64-bit word)
    and compared with :func:`keep_threshold`: about 4x faster than ``bernoulli_`` on CPU.

    Args:
        numel: Number of elements.
        p: Probability of holding an entry at the anchor (``M = 0``).
        key: Generator seed, from :func:`stream_seed`.
        device: Device of the mask (and of the generator).
        out: Optional flat bool tensor of ``numel`` elements to write into.

    Returns:
        The flat bool mask (``out`` when given).
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(key)
    words = torch.empty((numel + 1) // 2, dtype=torch.int64, device=device)
    words.random_(-(1 << 63), None, generator=generator)
    if out is None:
        out = torch.empty(numel, dtype=torch.bool, device=device)
    return torch.ge(words.view(torch.int32)[:numel], keep_threshold(p), out=out)


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
    def mix_in(self, period: int) -> None: ...
    def mix_out(self, period: int, grads: Sequence[torch.Tensor | None]) -> None: ...
    def restore(self) -> None: ...
    def update_anchor(self, weight: float) -> None: ...
    def mask(self, period: int, index: int) -> torch.Tensor: ...


def _mix_in_chunk(w: torch.Tensor, b: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, tmp: torch.Tensor) -> None:
    """``w <- lerp(a, b, weight)`` in fp32 (``weight = M*s``: 0 gives ``a`` exactly), rounded to ``w``'s dtype."""
    if w.dtype == torch.float32:
        torch.lerp(a, b, weight, out=w)
    else:
        b32 = tmp[: b.numel()].copy_(b)
        w.copy_(torch.lerp(a, b32, weight, out=b32))


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


class _TorchPasses:
    """The passes with PyTorch ops: CPU, and CUDA without Triton.

    Masks are drawn once per period into a cache of flat bool tensors (1 byte per element), reused while the period
    does not change. On CPU every op runs on chunks of ``_CPU_CHUNK`` elements with an fp32 scratch buffer, so the ops
    of a pass re-read their operands from cache rather than memory, with the process's intra-op threads (on an idle
    2-core machine two threads run the passes about twice as fast as one). On CUDA a chunk is a whole tensor.
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        backups: Sequence[torch.Tensor],
        anchors: Sequence[torch.Tensor],
        p: float,
        seed: int,
    ) -> None:
        self._params, self._backups, self._anchors = params, backups, anchors
        self._p, self._seed, self._scale = p, seed, mix_scale(p)
        self._device = params[0].device
        self._chunk = _CPU_CHUNK if self._device.type == "cpu" else max(1, *(t.numel() for t in params))
        self._masks: list[torch.Tensor] = []
        self._mask_period: int | None = None

    def _spans(self, numel: int) -> Iterator[slice]:
        return (slice(lo, min(lo + self._chunk, numel)) for lo in range(0, numel, self._chunk))

    def _scratch(self) -> torch.Tensor:
        return torch.empty(2, self._chunk, dtype=torch.float32, device=self._device)

    def _weight(self, keep: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
        # M*s in fp32; converting from a uint8 view of the bool mask is about 4x faster on CPU than from bool.
        return scratch[: keep.numel()].copy_(keep.view(torch.uint8)).mul_(self._scale)

    def _period_masks(self, period: int) -> list[torch.Tensor]:
        if self._mask_period != period:
            if not self._masks:
                self._masks = [torch.empty(t.numel(), dtype=torch.bool, device=self._device) for t in self._params]
            for index, out in enumerate(self._masks):
                draw_keep_mask(out.numel(), self._p, stream_seed(self._seed, period, index), self._device, out=out)
            self._mask_period = period
        return self._masks

    def mix_in(self, period: int) -> None:
        masks = self._period_masks(period) if self._p else None  # p = 0: w~ = w, only the backup is written
        scratch = self._scratch()
        for i, (w, b, a) in enumerate(zip(self._params, self._backups, self._anchors, strict=True)):
            w, b, a = flat_view(w), flat_view(b), flat_view(a)
            for s in self._spans(w.numel()):
                b[s].copy_(w[s])
                if masks:
                    _mix_in_chunk(w[s], b[s], a[s], self._weight(masks[i][s], scratch[0]), scratch[1])

    def mix_out(self, period: int, grads: Sequence[torch.Tensor | None]) -> None:
        masks = self._period_masks(period) if self._p else None  # p = 0: g <- 1*g/1 = g
        scratch = self._scratch()
        for i, (w, b, g) in enumerate(zip(self._params, self._backups, grads, strict=True)):
            target = _in_layout_of(g, w) if g is not None and masks else None
            flat_w, flat_b = flat_view(w), flat_view(b)
            flat_g = None if target is None else flat_view(target)
            for s in self._spans(flat_w.numel()):
                flat_w[s].copy_(flat_b[s])
                if flat_g is not None:
                    _scale_grad_chunk(flat_g[s], self._weight(masks[i][s], scratch[0]), scratch[1])
            if target is not None and target is not g:
                g.copy_(target)

    def restore(self) -> None:
        for w, b in zip(self._params, self._backups, strict=True):
            w, b = flat_view(w), flat_view(b)
            for s in self._spans(w.numel()):
                w[s].copy_(b[s])

    def update_anchor(self, weight: float) -> None:
        scratch = self._scratch()
        for a, w in zip(self._anchors, self._params, strict=True):
            a, w = flat_view(a), flat_view(w)
            for s in self._spans(w.numel()):
                _anchor_chunk(a[s], w[s], weight, scratch[0])

    def mask(self, period: int, index: int) -> torch.Tensor:
        param = self._params[index]
        if self._p == 0.0:
            return torch.ones_like(param, dtype=torch.bool)
        if self._mask_period == period:
            flat = self._masks[index]
        else:
            flat = draw_keep_mask(param.numel(), self._p, stream_seed(self._seed, period, index), self._device)
        out = torch.empty_like(param, dtype=torch.bool)
        flat_view(out).copy_(flat)
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

    Owns the fp32 anchors and the backup of the learned weights ``w``. Mask ``M_r`` for tensor ``i`` is a pure function
    of ``(seed, period r, tensor index i, element index)`` for a given backend; ``M = 1`` with probability ``1 - p``
    ("kept"), ``0`` with probability ``p`` ("held at the anchor").

    Memory: anchors (fp32) + backups (parameter dtype) + on the torch path one period's masks (1 byte per element);
    nothing else persists.

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
        self._backups = [torch.empty_like(t) for t in self._params]
        self._mixed = False
        self._impl: _Impl
        if self.backend == "triton":
            from lightning_robustft.ops.mixout_triton import TritonPasses

            self._impl = TritonPasses(self._params, self._backups, self._anchors, self._p, self._seed)
        else:
            self._impl = _TorchPasses(self._params, self._backups, self._anchors, self._p, self._seed)

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
        return self._mixed

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
        """Back up ``w`` (the parameters' current values) and write ``w~ = a + M_period*(w - a)/(1-p)`` into them.

        Raises:
            RuntimeError: Already mixed (a second mix-in would overwrite the backup of ``w`` with ``w~``).
        """
        _check_int("period", period, 0)
        if self._mixed:
            raise RuntimeError(
                "mix_in() called while the parameters already hold w~: call mix_out() or restore() first."
            )
        with torch.no_grad():
            self._impl.mix_in(period)
        self._mixed = True

    def mix_out(self, period: int, grads: Sequence[torch.Tensor | None]) -> None:
        """Restore ``w`` into the parameters and, in the same pass, ``g <- M_period*g/(1-p)`` in place.

        Args:
            period: The period given to the matching :meth:`mix_in`.
            grads: One gradient per target (same shape and dtype), or ``None`` where a target got no gradient.

        Raises:
            RuntimeError: Not mixed.
        """
        _check_int("period", period, 0)
        grads = self._check_grads(grads)
        if not self._mixed:
            raise RuntimeError("mix_out() called while the parameters hold w: there was no mix_in() to undo.")
        with torch.no_grad():
            self._impl.mix_out(period, grads)
        self._mixed = False

    def restore(self) -> None:
        """Restore ``w`` into the parameters without touching gradients; a no-op when not mixed.

        For leaving a step early: validation in the middle of a step, exceptions, checkpoints.
        """
        if self._mixed:
            with torch.no_grad():
                self._impl.restore()
            self._mixed = False

    def update_anchor(self, decay: float) -> None:
        """``a <- decay*a + (1-decay)*w``, with the parameters holding ``w`` (outside a mix-in).

        ``decay = 1`` leaves the anchors untouched (bitwise); ``decay = 0`` copies ``w``.

        Raises:
            RuntimeError: Called while mixed (the parameters hold ``w~``, not ``w``).
        """
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
            raise RobustFTConfigError(f"`decay` (the anchor EMA factor) must be a float in [0, 1], got {decay!r}.")
        if self._mixed:
            raise RuntimeError(
                "update_anchor() called while the parameters hold w~: call mix_out() or restore() first."
            )
        if decay == 1.0:
            return
        with torch.no_grad():
            self._impl.update_anchor(1.0 - float(decay))

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
