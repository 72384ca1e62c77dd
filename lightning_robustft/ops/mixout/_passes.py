"""The front end of the GMixout passes: `MixoutPasses`, its argument checks and the choice of backend.

It imports the torch backend and the mask law; the Triton backend is imported only when a run selects it, so that
importing the package never needs Triton (and so that ``TRITON_INTERPRET`` can still be set before the kernels are
defined). Neither backend imports this module.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import lru_cache
from typing import Literal, Protocol

import torch

from lightning_robustft.ops.mixout._law import is_dense
from lightning_robustft.ops.mixout._torch import TorchPasses

__all__ = ["Backend", "MixoutPasses", "resolve_backend"]

Backend = Literal["auto", "triton", "torch"]

_BACKENDS = ("auto", "triton", "torch")
_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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
        ValueError: Unknown backend, or ``"triton"`` on tensors where its kernels cannot run (says why and what to do).
        ImportError: ``"triton"`` without the ``triton`` package.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"`backend` must be one of {_BACKENDS}, got {backend!r}.")
    if backend == "torch":
        return "torch"
    devices = {t.device.type for t in tensors}
    if backend == "auto":
        return "triton" if devices == {"cuda"} and _triton_importable() and not _interpreting() else "torch"
    if not _triton_importable():
        raise ImportError(
            "`backend='triton'` needs the `triton` package, which does not import here: install it "
            "(`pip install triton`, Linux) or use `backend='torch'` / `backend='auto'`."
        )
    if devices - {"cpu", "cuda"}:
        raise ValueError(
            f"`backend='triton'` runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got tensors on "
            f"{sorted(devices)}: use `backend='torch'`."
        )
    if "cpu" in devices and not _interpreting():
        raise ValueError(
            "`backend='triton'` got CPU tensors: Triton kernels run on CPU only in the interpreter, which needs the "
            "environment variable TRITON_INTERPRET=1 set before the kernels are first imported. Set it (tests), or "
            "move the model to a GPU, or use `backend='torch'`."
        )
    if "cuda" in devices and _interpreting():
        raise ValueError(
            "`backend='triton'` got CUDA tensors while TRITON_INTERPRET=1: the interpreter cannot follow the kernels' "
            "device pointer tables. Unset TRITON_INTERPRET, or use `backend='torch'`."
        )
    return "triton"


class _Impl(Protocol):
    def mix(self, period: int, learned: Sequence[torch.Tensor]) -> None: ...
    def scale_grads(self, period: int, grads: Sequence[torch.Tensor | None]) -> None: ...
    def update_anchor(self, weight: float, learned: Sequence[torch.Tensor]) -> None: ...
    def mask(self, period: int, index: int) -> torch.Tensor: ...


# ----------------------------------------------------------------------------------------------------------------------
# Argument checks and the passes
# ----------------------------------------------------------------------------------------------------------------------


def _check_number(value: object, *, integer: bool, low: float, high: float | None, closed: bool, message: str) -> None:
    """Refuse a number of the wrong type (``TypeError``; bools too) or out of range (``ValueError``; NaN too).

    ``high`` is an exclusive bound, inclusive when ``closed``; both errors carry ``message``.
    """
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise TypeError(message)
    if not (low <= value and (high is None or value < high or (closed and value == high))):
        raise ValueError(message)


def _check_p(p: float) -> float:
    message = (
        f"`p` (the probability of holding an entry at the anchor) must be a float in [0, 1), got {p!r}. "
        "p = 0 disables the mask; Mixout's usual value is 0.9."
    )
    _check_number(p, integer=False, low=0.0, high=1.0, closed=False, message=message)
    return float(p)


def _check_int(name: str, value: int, low: int, high: int | None = None) -> int:
    allowed = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high})"
    message = f"`{name}` must be {allowed}, got {value!r}."
    _check_number(value, integer=True, low=low, high=high, closed=False, message=message)
    return value


def _check_params(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    params = list(params)
    if not params:
        raise ValueError("`params` is empty: MixoutPasses needs at least one target tensor.")
    for i, t in enumerate(params):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"`params[{i}]` must be a torch.Tensor, got {type(t).__name__}.")
        if t.dtype not in _PARAM_DTYPES:
            raise ValueError(
                f"`params[{i}]` has dtype {t.dtype}; GMixout targets floating-point weights in "
                f"{[str(d) for d in _PARAM_DTYPES]}: leave integer / float64 tensors out of the targets."
            )
        if t.device != params[0].device:
            raise ValueError(
                f"`params[{i}]` is on {t.device} but `params[0]` is on {params[0].device}: all targets must share one "
                "device (create MixoutPasses after the model is moved to its training device)."
            )
        if not is_dense(t):
            raise ValueError(
                f"`params[{i}]` (shape {tuple(t.shape)}, strides {t.stride()}) is not dense in memory: the passes "
                "treat each target as one flat block. Target whole parameters, not slices of them."
            )
    return params


class MixoutPasses:
    r"""The two fused passes of GMixout and the anchor EMA over a fixed list of target tensors.

    Owns the fp32 anchors and one buffer per target for the mixed weights ``w~``. Mask ``M_r`` for tensor ``i`` is a
    pure function of ``(seed, period r, tensor index i, element index)`` for a given backend; ``M = 1`` with
    probability ``1 - p`` ("kept"), ``0`` with probability ``p`` ("held at the anchor").

    Between [`mix_in`][lightning_robustft.ops.mixout.MixoutPasses.mix_in] and
    [`mix_out`][lightning_robustft.ops.mixout.MixoutPasses.mix_out] /
    [`restore`][lightning_robustft.ops.mixout.MixoutPasses.restore] each target tensor's ``.data`` is the ``w~`` buffer;
    its own storage, holding ``w``, is untouched and comes back on mix-out. Code that keeps a separate alias of a
    target's storage (``t.data``, a view) sees ``w`` throughout; the tensor object itself sees ``w~``.

    Memory: anchors (fp32) + ``w~`` buffers (parameter dtype) + on the torch path one period's mask (1 bit per
    element) and a fixed scratch: a few kB where Inductor compiles the passes (CPU), else one block (about 2.3 MB,
    twice that with 16-bit targets); nothing else persists.

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
        backend: ``"auto"``, ``"triton"`` or ``"torch"``, see `resolve_backend`.

    Raises:
        TypeError: An argument of the wrong type (a target that is not a tensor, a ``p`` or ``seed`` that is not a
            number).
        ValueError: An argument out of range, targets of another dtype, on several devices or not dense, or a backend
            that cannot run here (says why and what to do).
        ImportError: ``backend="triton"`` without the ``triton`` package.
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
            # Imported here, not above: importing the package must not need Triton, and TRITON_INTERPRET must be
            # readable until a run first selects the kernels (their decorators decide interpreted or compiled).
            from lightning_robustft.ops.mixout._triton import TritonPasses

            self._impl = TritonPasses(self._buffers, self._anchors, self._p, self._seed)
        else:
            self._impl = TorchPasses(self._buffers, self._anchors, self._p, self._seed)

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
        """Whether the parameters hold ``w~``.

        True between [`mix_in`][lightning_robustft.ops.mixout.MixoutPasses.mix_in] and
        [`mix_out`][lightning_robustft.ops.mixout.MixoutPasses.mix_out] /
        [`restore`][lightning_robustft.ops.mixout.MixoutPasses.restore].
        """
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
            raise ValueError(f"`anchors` needs {len(self._anchors)} tensors (one per target), got {len(values)}.")
        for i, (mine, new) in enumerate(zip(self._anchors, values, strict=True)):
            if not isinstance(new, torch.Tensor):
                raise TypeError(
                    f"`anchors[{i}]` must be a float tensor of shape {tuple(mine.shape)}, got {type(new).__name__}."
                )
            if new.shape != mine.shape or not new.is_floating_point():
                raise ValueError(
                    f"`anchors[{i}]` must be a float tensor of shape {tuple(mine.shape)}, got {tuple(new.shape)}."
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
            period: The period given to the matching [`mix_in`][lightning_robustft.ops.mixout.MixoutPasses.mix_in].
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
        message = f"`decay` (the anchor EMA factor) must be a float in [0, 1], got {decay!r}."
        _check_number(decay, integer=False, low=0.0, high=1.0, closed=True, message=message)
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
            raise ValueError(f"`grads` needs {len(self._params)} entries (one per target), got {len(grads)}.")
        for i, (g, w) in enumerate(zip(grads, self._params, strict=True)):
            if g is not None and (g.shape != w.shape or g.dtype != w.dtype or g.device != w.device):
                raise ValueError(
                    f"`grads[{i}]` must match its target (shape {tuple(w.shape)}, {w.dtype}, {w.device}), got shape "
                    f"{tuple(g.shape)}, {g.dtype}, {g.device}."
                )
        return grads
