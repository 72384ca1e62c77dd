"""State-dict interpolation: WiSE-FT's ``(1 - alpha) * theta_0 + alpha * theta_1`` and weighted averages (soups).

Pure functions over ``{name: tensor}`` mappings, no Lightning. Only floating-point tensors are mixed: integer
buffers (BatchNorm's ``num_batches_tracked``, index tables) have no meaningful midpoint, so they are taken from the
model being deployed (``theta_1``, or the first state dict of a soup). Arithmetic runs in at least fp32, whatever the
storage dtype, so fp16/bf16 weights do not lose the small differences between two nearby models, and the result is
cast back to ``theta_1``'s dtype and device so it loads into the fine-tuned model unchanged. Bad input raises a
plain ``ValueError`` (this layer does not import Lightning).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "average_state_dicts",
    "check_compatible",
    "float_state_snapshot",
    "interpolate_state_dicts",
]

_MAX_LISTED = 20


def interpolate_state_dicts(theta_0: Mapping[str, Any], theta_1: Mapping[str, Any], alpha: float) -> dict[str, Any]:
    """Weight-space interpolation ``theta(alpha) = (1 - alpha) * theta_0 + alpha * theta_1`` (WiSE-FT).

    The endpoints are exact copies, not the result of float arithmetic: ``alpha=0`` returns clones of ``theta_0``'s
    tensors (cast to ``theta_1``'s dtype) and ``alpha=1`` clones of ``theta_1``'s, so the sweep's endpoints are
    bitwise the zero-shot and the fine-tuned models.

    Args:
        theta_0: the start point (the zero-shot model). It must hold every floating-point entry of ``theta_1`` with
            the same shape; it may omit the non-floating entries (a snapshot of the float tensors is enough).
        theta_1: the end point (the fine-tuned model); defines the keys, key order, dtypes and devices of the result.
        alpha: the mixing coefficient; ``0`` gives ``theta_0``, ``1`` gives ``theta_1``; values outside ``[0, 1]``
            extrapolate.

    Returns:
        A new state dict with every key of ``theta_1``: floating-point tensors interpolated, every other entry
        (integer buffers, non-tensor extra state) taken from ``theta_1``.

    Raises:
        ValueError: ``alpha`` is not a finite number, or the state dicts disagree (the message lists the
            missing, extra and mismatched keys).

    Example::

        theta_0 = {k: v.clone() for k, v in model.state_dict().items()}
        ...  # fine-tune
        model.load_state_dict(interpolate_state_dicts(theta_0, model.state_dict(), 0.5))
    """
    alpha = _check_coefficient("alpha", alpha)
    check_compatible("theta_1", theta_1, {"theta_0": theta_0})
    result: dict[str, Any] = {}
    for name, end in theta_1.items():
        if not _is_float(end):
            result[name] = end.clone() if isinstance(end, Tensor) else end
        elif alpha == 0.0:
            result[name] = theta_0[name].to(device=end.device, dtype=end.dtype, copy=True)
        elif alpha == 1.0:
            result[name] = end.clone()
        else:
            dtype = _compute_dtype(end.dtype)
            start = theta_0[name].to(device=end.device, dtype=dtype)
            mixed = start.mul(1.0 - alpha).add_(end.to(dtype), alpha=alpha)
            result[name] = mixed.to(end.dtype)
    return result


def average_state_dicts(
    state_dicts: Sequence[Mapping[str, Any]], weights: Sequence[float] | None = None
) -> dict[str, Any]:
    """Weighted average of several state dicts (a model soup); weights are normalised to sum to one.

    Args:
        state_dicts: the models to average; the first one defines keys, dtypes and devices, and gives the
            non-floating entries (which are not averaged).
        weights: one non-negative weight per state dict (default: uniform, the "uniform soup").

    Returns:
        A new state dict with every key of the first one.

    Raises:
        ValueError: no state dicts, a bad weight list, or state dicts that disagree (keys listed).
    """
    if len(state_dicts) == 0:
        raise ValueError("`state_dicts` is empty: give at least one state dict to average.")
    coefficients = _normalised_weights(weights, len(state_dicts))
    reference = state_dicts[0]
    others = {f"state_dicts[{i}]": sd for i, sd in enumerate(state_dicts[1:], start=1)}
    check_compatible("state_dicts[0]", reference, others)
    result: dict[str, Any] = {}
    for name, first in reference.items():
        if not _is_float(first):
            result[name] = first.clone() if isinstance(first, Tensor) else first
            continue
        dtype = _compute_dtype(first.dtype)
        total = torch.zeros(first.shape, dtype=dtype, device=first.device)
        for weight, state_dict in zip(coefficients, state_dicts, strict=True):
            total.add_(state_dict[name].to(device=first.device, dtype=dtype), alpha=weight)
        result[name] = total.to(first.dtype)
    return result


def float_state_snapshot(state_dict: Mapping[str, Any]) -> dict[str, Tensor]:
    """A detached CPU copy of the floating-point tensors of a state dict: all that interpolation needs of theta_0.

    Copying only tensors (never the module) keeps the snapshot cheap and independent of the module's class.
    """
    return {name: value.detach().to("cpu", copy=True) for name, value in state_dict.items() if _is_float(value)}


def _is_float(value: Any) -> bool:
    return isinstance(value, Tensor) and value.is_floating_point()


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _check_coefficient(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"`{name}`={value!r} must be a finite number (0 gives theta_0, 1 gives theta_1).")
    return float(value)


def _normalised_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    if weights is None:
        return [1.0 / count] * count
    values = [_check_coefficient(f"weights[{i}]", w) for i, w in enumerate(weights)]
    if len(values) != count or any(w < 0 for w in values) or sum(values) <= 0:
        raise ValueError(
            f"`weights`={list(weights)} must hold {count} non-negative numbers (one per state dict) with a "
            "positive sum."
        )
    total = sum(values)
    return [w / total for w in values]


def check_compatible(
    reference_label: str, reference: Mapping[str, Any], others: Mapping[str, Mapping[str, Any]]
) -> None:
    """Raise one error listing every disagreement between ``reference`` and each of ``others``.

    Every floating-point entry of ``reference`` must exist in the other with the same shape and a floating dtype;
    the other may omit non-floating entries but may not hold keys that ``reference`` lacks. Public because the soups
    check each checkpoint against the first as it is loaded, before any averaging, and must refuse it the same way.

    Args:
        reference_label: how the error names ``reference`` (e.g. ``"theta_1"`` or a checkpoint path).
        reference: the state dict that defines the expected floating-point keys and shapes.
        others: ``{label: state dict}`` to compare with ``reference``; each label names its state dict in the error.

    Raises:
        ValueError: a state dict misses, adds or mismatches an entry (all problems listed in one message).
    """
    problems = []
    for label, other in others.items():
        missing = [k for k, v in reference.items() if _is_float(v) and k not in other]
        extra = [k for k in other if k not in reference]
        mismatched = [
            f"{k} ({_describe(other[k])} vs {_describe(v)} in {reference_label})"
            for k, v in reference.items()
            if _is_float(v) and k in other and not (_is_float(other[k]) and other[k].shape == v.shape)
        ]
        for kind, keys in (("missing from", missing), ("only in", extra), ("mismatched in", mismatched)):
            if keys:
                problems.append(f"{kind} {label}: {_list_keys(keys)}")
    if problems:
        raise ValueError(
            "The state dicts do not describe the same model (floating-point entries must match in name and shape): "
            + "; ".join(problems)
            + ". Load both from the same architecture (and the same head size)."
        )


def _list_keys(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > _MAX_LISTED else "")


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"{tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    return type(value).__name__
