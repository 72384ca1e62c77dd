"""Frontier arithmetic on the ID-OOD plane: the baseline envelope, frontier gains and effective robustness.

Everything here is plain arithmetic on ``(ID accuracy, OOD-average accuracy)`` points, so it is tested on hand-made
curves and reused by `lightning_robustft.compare.summary` for every seed.

The **baseline frontier** is the upper envelope of the WiSE-FT curves of every baseline run (full fine-tuning at
every learning rate of the grid, optionally LP-FT too): a lower learning rate followed by interpolation is what any
user can do, so a method earns no credit for it. A curve is a polyline over alpha; it is not always monotone in ID
near ``alpha = 1`` (the last steps of interpolation can lose ID accuracy), so the envelope at an ID accuracy ``x`` is
the highest OOD value of **any** segment of **any** baseline curve whose ID span contains ``x`` (linear interpolation
inside the segment; a vertical segment contributes its higher end).

Points outside the envelope's ID range are handled explicitly (`FrontierGain.status`):

* ``"in_range"``: some segment spans ``x``; the gain is ``ood - envelope(x)``.
* ``"below"``: ``x`` is below every baseline point's ID accuracy (or falls in a gap between curves): every baseline
  point with at least that ID accuracy dominates on ID, so the reference is the best OOD accuracy among them. A
  method gets no credit for giving up ID accuracy.
* ``"above"``: ``x`` is above every baseline point's ID accuracy: no baseline model reaches it, so there is nothing
  to compare with at matched ID. The gain is ``None`` (JSON ``null``), and summaries say how many seeds were so.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "MIN_FIT_POINTS",
    "FrontierGain",
    "LogitFit",
    "Point",
    "Status",
    "best_frontier_gain",
    "envelope_at",
    "frontier_gain",
    "logit_fit",
]

Point = tuple[float, float]
"""``(ID accuracy, OOD-average accuracy)``, both in the same unit (fractions or percent)."""

Status = Literal["in_range", "below", "above", "no_baseline"]

_LOGIT_EPS = 1e-4  # accuracies of exactly 0 or 1 have no logit; they are clipped this far inside (0, 1)


@dataclass(frozen=True)
class FrontierGain:
    """The frontier gain of one point and how it was obtained.

    Attributes:
        gain: ``ood - reference`` (``None`` when ``status == "above"``).
        reference: the baseline's OOD accuracy that the point is compared with (``None`` when ``"above"``).
        status: ``"in_range"``, ``"below"`` or ``"above"`` (see the module docstring); ``"no_baseline"`` in
            summaries of a seed whose baseline cells all failed.
    """

    gain: float | None
    reference: float | None
    status: Status


def envelope_at(curves: Sequence[Sequence[Point]], x: float) -> float | None:
    """The upper envelope of the polylines ``curves`` at ID accuracy ``x``; ``None`` where no segment spans ``x``.

    Args:
        curves: each curve a sequence of points in alpha order (consecutive points are joined); a one-point curve
            covers only its own ID value.
        x: the ID accuracy.
    """
    best: float | None = None
    for curve in curves:
        points = list(curve)
        segments = list(zip(points, points[1:] or points, strict=False))  # a one-point curve: a zero-length segment
        for (x0, y0), (x1, y1) in segments:
            if not min(x0, x1) <= x <= max(x0, x1):
                continue
            y = max(y0, y1) if x0 == x1 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
            best = y if best is None else max(best, y)
    return best


def frontier_gain(point: Point, curves: Sequence[Sequence[Point]]) -> FrontierGain:
    """OOD accuracy of ``point`` above the baseline envelope at the same ID accuracy.

    Args:
        point: ``(id, ood)`` of the method.
        curves: the baseline curves (see `envelope_at`); at least one point in all.

    Raises:
        ValueError: no baseline point at all.
    """
    points = [p for curve in curves for p in curve]
    if not points:
        raise ValueError("frontier_gain needs at least one baseline point (did every baseline run fail?).")
    x, y = point
    if x > max(px for px, _ in points):
        return FrontierGain(None, None, "above")
    reference = envelope_at(curves, x)
    if reference is not None:
        return FrontierGain(y - reference, reference, "in_range")
    dominating = max(py for px, py in points if px >= x)
    return FrontierGain(y - dominating, dominating, "below")


def best_frontier_gain(curve: Sequence[Point], baseline: Sequence[Sequence[Point]]) -> tuple[FrontierGain, int] | None:
    """The point of ``curve`` with the largest frontier gain, and its index; ``None`` if no point has a gain.

    Ties go to the earliest point (the smaller alpha, the one closer to the starting model).
    """
    best: tuple[FrontierGain, int] | None = None
    for index, point in enumerate(curve):
        result = frontier_gain(point, baseline)
        if result.gain is not None and (best is None or result.gain > best[0].gain):  # type: ignore[operator]
            best = (result, index)
    return best


def _logit(p: float) -> float:
    p = min(max(p, _LOGIT_EPS), 1.0 - _LOGIT_EPS)
    return math.log(p / (1.0 - p))


@dataclass(frozen=True)
class LogitFit:
    """``logit(ood) = slope * logit(id) + intercept``, fitted on baseline models (accuracies as fractions)."""

    slope: float
    intercept: float
    n_points: int

    def predict(self, id_acc: float) -> float:
        """The OOD accuracy the fit expects at ID accuracy ``id_acc`` (fractions)."""
        return 1.0 / (1.0 + math.exp(-(self.slope * _logit(id_acc) + self.intercept)))

    def effective_robustness(self, point: Point) -> float:
        """Taori et al.'s effective robustness: OOD accuracy above the fit's prediction at the same ID accuracy."""
        return point[1] - self.predict(point[0])


MIN_FIT_POINTS = 3
"""Fewer baseline models than this (with distinct ID accuracies) give no effective-robustness fit."""


def logit_fit(points: Sequence[Point]) -> LogitFit | None:
    """Least-squares line through ``(logit(id), logit(ood))`` of the baseline models (fractions).

    As in Taori et al. (2020). ``None`` when fewer than `MIN_FIT_POINTS` distinct ID accuracies exist (no
    meaningful line).
    """
    if len({x for x, _ in points}) < MIN_FIT_POINTS:
        return None
    slope, intercept = statistics.linear_regression([_logit(x) for x, _ in points], [_logit(y) for _, y in points])
    return LogitFit(slope, intercept, len(points))
