"""ID-vs-OOD accuracy plots: the picture in which robust fine-tuning methods are compared.

Effective robustness is read off a plane with in-distribution accuracy on one axis and the average over the
distribution-shifted sets on the other: fine-tuning moves a model right (better ID) and often down (less robust);
WiSE-FT's weight-space interpolation traces a curve between the two endpoints that usually bows above the straight
line. The figure is built with ``matplotlib.figure.Figure`` on the Agg canvas, never through ``pyplot``, so it
needs no display, keeps no global state, and is safe to draw in a training process.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lightning_robustft.errors import RobustFTConfigError

__all__ = ["DEFAULT_ENDPOINT_LABELS", "plot_id_vs_ood", "plot_method_comparison"]

DEFAULT_ENDPOINT_LABELS: dict[float, str] = {0.0: "zero-shot", 1.0: "fine-tuned"}


def plot_id_vs_ood(
    rows: Sequence[Mapping[str, float]],
    path: str | Path | None = None,
    *,
    id_key: str,
    ood_key: str = "ood_avg",
    label_key: str = "alpha",
    endpoint_labels: Mapping[float, str] | None = None,
    selected: float | None = None,
    reference_points: Mapping[str, tuple[float, float]] | None = None,
    title: str | None = None,
    percent: bool = True,
) -> Figure:
    """Plot a curve of (ID accuracy, OOD-average accuracy), one point per row, and optionally save it.

    Args:
        rows: one mapping per point, e.g. WiSE-FT's ``{"alpha": 0.5, "<id set>": 0.91, "ood_avg": 0.84, ...}``;
            accuracies as fractions in ``[0, 1]``. Points are joined in order of ``label_key``.
        path: where to write the image (format from the suffix, e.g. ``.png``); ``None`` only returns the figure.
        id_key: the key of the in-distribution accuracy (the ID set's name).
        ood_key: the key of the OOD-average accuracy.
        label_key: the key that tells the points apart (annotated next to each point).
        endpoint_labels: text for special points by their ``label_key`` value (default: ``0`` is "zero-shot",
            ``1`` is "fine-tuned").
        selected: the ``label_key`` value to highlight (the alpha applied to the model).
        reference_points: other methods to mark on the same axes, ``{name: (id_accuracy, ood_accuracy)}``
            (e.g. a Mixout run beside the WiSE-FT curve).
        title: the axes title.
        percent: show accuracies in percent.

    Returns:
        The figure (the caller may hand it to a logger); it is not registered with ``pyplot``.

    Raises:
        RobustFTConfigError: no rows, or a row without ``id_key`` / ``ood_key`` / ``label_key``.
    """
    points = _points(rows, id_key, ood_key, label_key)
    scale = 100.0 if percent else 1.0
    labels = DEFAULT_ENDPOINT_LABELS if endpoint_labels is None else endpoint_labels

    figure = Figure(figsize=(5.5, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    xs = [x * scale for _, x, _ in points]
    ys = [y * scale for _, _, y in points]
    axes.plot(xs, ys, "-o", color="tab:blue", markersize=4, label=f"{label_key} sweep")
    axes.plot([xs[0], xs[-1]], [ys[0], ys[-1]], ":", color="gray", linewidth=1, label="linear between endpoints")
    for (value, _, _), x, y in zip(points, xs, ys, strict=True):
        text = labels.get(value, f"{value:g}")
        axes.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        if selected is not None and value == selected:
            axes.plot([x], [y], "*", color="tab:red", markersize=14, label=f"selected {label_key}={value:g}")
    for name, (x, y) in (reference_points or {}).items():
        axes.plot([x * scale], [y * scale], "s", markersize=6, label=name)

    unit = " (%)" if percent else ""
    axes.set_xlabel(f"ID accuracy: {id_key}{unit}")
    axes.set_ylabel(f"OOD accuracy: {ood_key}{unit}")
    _finish(figure, axes, path, title, legend={"loc": "best"})
    return figure


def plot_method_comparison(
    points: Mapping[str, tuple[float, float, float, float]],
    path: str | Path | None = None,
    *,
    id_label: str = "ID accuracy",
    ood_label: str = "OOD-average accuracy",
    title: str | None = None,
    percent: bool = True,
) -> Figure:
    """Scatter methods on the ID-vs-OOD plane, each with its spread over seeds as error bars.

    Methods that sit up and to the right of full fine-tuning keep more robustness for the same ID accuracy; the
    error bars show whether a gap is larger than the seed-to-seed noise.

    Args:
        points: ``{method: (id_mean, id_std, ood_mean, ood_std)}``, accuracies as fractions in ``[0, 1]``.
        path: where to write the image (format from the suffix); ``None`` only returns the figure.
        id_label: the x-axis label.
        ood_label: the y-axis label.
        title: the axes title.
        percent: show accuracies in percent.

    Returns:
        The figure, not registered with ``pyplot``.

    Raises:
        RobustFTConfigError: no points.
    """
    if not points:
        raise RobustFTConfigError("`points` is empty: give at least one method to plot.")
    scale = 100.0 if percent else 1.0
    figure = Figure(figsize=(7.5, 5.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    markers = "osD^vP*Xh<>p"
    colors = colormaps["tab20"].colors  # 20 distinct colours: a full comparison has more methods than tab10 has
    for index, (name, (id_mean, id_std, ood_mean, ood_std)) in enumerate(points.items()):
        axes.errorbar(
            id_mean * scale,
            ood_mean * scale,
            xerr=id_std * scale,
            yerr=ood_std * scale,
            fmt=markers[index % len(markers)],
            color=colors[(2 * index) % len(colors) + (2 * index) // len(colors) % 2],
            markersize=7,
            capsize=3,
            label=name,
        )
    unit = " (%)" if percent else ""
    axes.set_xlabel(id_label + unit)
    axes.set_ylabel(ood_label + unit)
    _finish(figure, axes, path, title, legend={"loc": "center left", "bbox_to_anchor": (1.01, 0.5)})
    return figure


def _finish(figure: Figure, axes: Axes, path: str | Path | None, title: str | None, legend: dict[str, Any]) -> None:
    """Grid, legend and title, then write the image when a path is given (creating its folder)."""
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8, **legend)
    if title:
        axes.set_title(title)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=120)


def _points(
    rows: Sequence[Mapping[str, float]], id_key: str, ood_key: str, label_key: str
) -> list[tuple[float, float, float]]:
    if not rows:
        raise RobustFTConfigError("`rows` is empty: give at least one row to plot.")
    for index, row in enumerate(rows):
        missing = [key for key in (label_key, id_key, ood_key) if key not in row]
        if missing:
            raise RobustFTConfigError(
                f"`rows[{index}]` lacks {missing}; its keys are {sorted(row)}. Pass the matching `id_key`, "
                "`ood_key` and `label_key`."
            )
    return sorted((float(row[label_key]), float(row[id_key]), float(row[ood_key])) for row in rows)
