"""Weight penalties toward an anchor (the pretrained weights): L2-SP and L1, added to the gradient in place.

L2-SP (Li et al., ICML 2018) regularises fine-tuning with ``strength/2 * ||w - a||^2`` instead of plain weight decay
``strength/2 * ||w||^2``: the weights are pulled toward the pretrained ``a`` (the "starting point"), not toward zero,
so fine-tuning keeps what pretraining learned unless the data insists. The L1 variant ``strength * ||w - a||_1``
pulls with a constant force, so most entries stay exactly at (or oscillate around) their pretrained values.

Adding the penalty to the loss would make autograd build and differentiate a graph over every parameter each
micro-batch. Its gradient is known in closed form, so it is added to the gradients once per optimizer step instead:

* L2-SP: ``g <- g + strength * (w - a)``;
* L1: ``g <- g + strength * sign(w - a)`` (the subgradient that is 0 at ``w == a``, as autograd's ``abs`` gives).

Floating-point contract: anchors are kept in fp32 (fp64 for fp64 parameters); arithmetic runs in that precision
whatever the parameter dtype (fp32 / bf16 / fp16), with multi-tensor ``torch._foreach_*`` ops, and the gradients are
rounded back to their own dtype once. Low-precision temporaries are bounded by `BUCKET_NUMEL` elements.

Pure tensor functions without Lightning: bad input raises ``TypeError`` (not a tensor, not floating point) or
``ValueError`` (mismatched lists, shapes, devices; a bad ``strength`` or ``norm``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal

import torch

from lightning_robustft._validation import check_number

__all__ = [
    "BUCKET_NUMEL",
    "NORMS",
    "STRENGTH_HINT",
    "Norm",
    "add_penalty_grad_",
    "check_norm",
    "check_strength",
    "compute_dtype",
    "make_anchors",
    "penalty_grad_reference",
    "penalty_value",
]

Norm = Literal["l2", "l1"]

NORMS: tuple[str, ...] = ("l2", "l1")

#: What ``strength`` means, appended to the error for a bad one (here and in ``WeightPenaltyCallback``).
STRENGTH_HINT = "the penalty coefficient; 0 disables the penalty, L2-SP's usual values are 1e-4 to 1e-1"

#: At most this many elements are processed per multi-tensor call, so the fp32 temporaries of a low-precision model
#: (the difference ``w - a`` and the upcast gradient) stay at a few hundred MiB, not a full copy of the model.
BUCKET_NUMEL = 1 << 25


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision the penalty is computed and anchored in: fp32, or fp64 for fp64 parameters."""
    return torch.promote_types(dtype, torch.float32)


def make_anchors(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Detached copies of ``params`` in `compute_dtype`, on their devices and with their strides.

    Only the target tensors are copied (never a module), and in fp32, so a bf16 / fp16 model's anchors hold its
    pretrained values exactly.

    Raises:
        TypeError: a parameter is not a floating-point tensor.
    """
    params = _check_tensors("params", params)
    with torch.no_grad():
        return [torch.empty_like(w, dtype=compute_dtype(w.dtype)).copy_(w) for w in params]


def add_penalty_grad_(
    params: Sequence[torch.Tensor],
    anchors: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor | None],
    strength: float,
    norm: Norm = "l2",
) -> None:
    """Add the gradient of the penalty toward ``anchors`` to ``grads``, in place.

    ``norm="l2"``: ``g += strength * (w - a)``, the gradient of ``strength/2 * ||w - a||^2`` (L2-SP).
    ``norm="l1"``: ``g += strength * sign(w - a)``, the subgradient of ``strength * ||w - a||_1`` (0 at ``w == a``).

    Computed in fp32 (fp64 for fp64 gradients) with multi-tensor ops, tensors grouped by device and dtype; each
    gradient is rounded to its dtype once. ``strength == 0`` returns without touching anything.

    Args:
        params: the current weights ``w``.
        anchors: one anchor ``a`` per parameter (same shape and device; any floating dtype, fp32 from
            `make_anchors`).
        grads: one gradient per parameter (same shape, dtype and device), or ``None`` where a parameter got no
            gradient (frozen, or unused in this step): it gets no penalty either.
        strength: the penalty coefficient, finite and ``>= 0``.
        norm: ``"l2"`` or ``"l1"``.

    Raises:
        TypeError: a parameter or anchor is not a floating-point tensor, ``strength`` is not a number, or a
            gradient is sparse.
        ValueError: mismatched lists, shapes, dtypes or devices, or a bad ``strength`` / ``norm``.
    """
    strength = check_strength(strength)
    norm = check_norm(norm)
    params = _check_tensors("params", params)
    _check_companions(params, anchors, grads)
    if strength == 0.0:
        return
    chosen = [i for i, g in enumerate(grads) if g is not None]
    with torch.no_grad():
        for bucket in _buckets(chosen, params, grads):
            w = [params[i] for i in bucket]
            a = [anchors[i] for i in bucket]
            g = [grads[i] for i in bucket]
            dtype = compute_dtype(g[0].dtype)
            a = [x.to(dtype) for x in a]  # no copy for fp32 anchors
            if g[0].dtype == dtype:
                diff = torch._foreach_sub(w, a)
            else:
                diff = [x.to(dtype) for x in w]  # the upcast copy becomes w - a
                torch._foreach_sub_(diff, a)
            if norm == "l1":
                torch._foreach_sign_(diff)
            if g[0].dtype == dtype:
                torch._foreach_add_(g, diff, alpha=strength)
            else:
                total = [x.to(dtype) for x in g]
                torch._foreach_add_(total, diff, alpha=strength)
                torch._foreach_copy_(g, total)


def penalty_value(
    params: Sequence[torch.Tensor], anchors: Sequence[torch.Tensor], strength: float, norm: Norm = "l2"
) -> torch.Tensor:
    """The penalty itself, differentiable with respect to ``params``: the reference the gradients are checked against.

    ``"l2"``: ``strength/2 * sum ||w - a||^2``; ``"l1"``: ``strength * sum ||w - a||_1``, summed over the tensors in
    fp32 (fp64 for fp64 parameters). ``torch.autograd.grad`` of it gives what `add_penalty_grad_` adds.

    Returns:
        A 0-dim tensor on the first parameter's device (0 for an empty list).
    """
    strength = check_strength(strength)
    norm = check_norm(norm)
    params = list(params)
    anchors = list(anchors)
    if len(anchors) != len(params):
        raise ValueError(f"`anchors` needs {len(params)} tensors (one per parameter), got {len(anchors)}.")
    terms = []
    for w, a in zip(params, anchors, strict=True):
        dtype = compute_dtype(w.dtype)
        diff = w.to(dtype) - a.to(device=w.device, dtype=dtype)
        terms.append(diff.abs().sum() if norm == "l1" else diff.square().sum() * 0.5)
    if not terms:
        return torch.zeros(())
    return strength * torch.stack([t.to(terms[0].device, torch.float64) for t in terms]).sum()


def penalty_grad_reference(
    w: torch.Tensor, a: torch.Tensor, g: torch.Tensor, strength: float, norm: Norm = "l2"
) -> torch.Tensor:
    """Reference penalised gradient of one tensor, ``g + strength * (w - a)`` or ``g + strength * sign(w - a)``.

    Computed in float64 and rounded to ``g``'s dtype, for tests.
    """
    diff = w.double() - a.double()
    step = diff.sign() if check_norm(norm) == "l1" else diff
    return (g.double() + strength * step).to(g.dtype)


def check_strength(strength: float) -> float:
    """Return ``strength`` as a float, or raise naming the argument if it is not a finite number ``>= 0``."""
    return check_number("strength", strength, "[0, inf)", hint=STRENGTH_HINT)


def check_norm(norm: str) -> Norm:
    """Return ``norm``, or raise naming the argument if it is neither ``"l2"`` nor ``"l1"``."""
    if norm not in NORMS:
        raise ValueError(
            f"`norm`={norm!r} must be one of {list(NORMS)}: 'l2' is L2-SP (strength/2 * ||w - w0||^2), 'l1' is "
            "strength * ||w - w0||_1."
        )
    return norm  # type: ignore[return-value]


def _check_tensors(name: str, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    tensors = list(tensors)
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(
                f"`{name}[{i}]` must be a floating-point tensor, got {got}: leave integer tensors out of the targets."
            )
    return tensors


def _check_companions(
    params: Sequence[torch.Tensor], anchors: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]
) -> None:
    for label, values in (("anchors", anchors), ("grads", grads)):
        if len(values) != len(params):
            raise ValueError(f"`{label}` needs {len(params)} entries (one per parameter), got {len(values)}.")
    for i, (w, a, g) in enumerate(zip(params, anchors, grads, strict=True)):
        if not isinstance(a, torch.Tensor) or not a.is_floating_point():
            got = a.dtype if isinstance(a, torch.Tensor) else type(a).__name__
            raise TypeError(f"`anchors[{i}]` must be a floating-point tensor, got {got}.")
        if a.shape != w.shape or a.device != w.device:
            raise ValueError(
                f"`anchors[{i}]` must be shaped and placed like its parameter (shape {tuple(w.shape)}, {w.device}), "
                f"got shape {tuple(a.shape)}, {a.device}."
            )
        if g is None:
            continue
        if g.is_sparse or g.layout != torch.strided:
            raise TypeError(
                f"`grads[{i}]` is a {g.layout} gradient (e.g. nn.Embedding(sparse=True)): the penalty gradient is "
                "dense. Use dense gradients for the penalised parameters, or leave them out of the targets."
            )
        if g.shape != w.shape or g.dtype != w.dtype or g.device != w.device:
            raise ValueError(
                f"`grads[{i}]` must match its parameter (shape {tuple(w.shape)}, {w.dtype}, {w.device}), got shape "
                f"{tuple(g.shape)}, {g.dtype}, {g.device}."
            )


def _buckets(
    chosen: Sequence[int], params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]
) -> Iterator[list[int]]:
    """Indices grouped by (device, gradient dtype), in order, each group cut at `BUCKET_NUMEL` elements.

    Multi-tensor kernels take one device and dtype per call; the cut bounds the temporaries.
    """
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i in chosen:
        g = grads[i]
        assert g is not None
        groups.setdefault((g.device, g.dtype), []).append(i)
    for indices in groups.values():
        bucket: list[int] = []
        size = 0
        for i in indices:
            if bucket and size + params[i].numel() > BUCKET_NUMEL:
                yield bucket
                bucket, size = [], 0
            bucket.append(i)
            size += params[i].numel()
        if bucket:
            yield bucket
