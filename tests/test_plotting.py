"""The method-comparison scatter: one point per method, error bars over seeds, distinct colours, errors."""

from pathlib import Path

import pytest
from matplotlib.colors import to_hex

from lightning_robustft.errors import RobustFTConfigError
from lightning_robustft.plotting import plot_method_comparison


def test_method_comparison_has_a_point_and_error_bars_per_method(tmp_path: Path) -> None:
    points = {f"method {i}": (0.80 + 0.01 * i, 0.01, 0.90 - 0.01 * i, 0.02) for i in range(12)}
    figure = plot_method_comparison(points, tmp_path / "sub" / "scatter.png", title="t")
    axes = figure.axes[0]
    assert [t.get_text() for t in axes.get_legend().get_texts()] == list(points)
    markers = [container.lines[0] for container in axes.containers]
    assert [line.get_xdata()[0] for line in markers] == pytest.approx([80.0 + i for i in range(12)])
    assert [line.get_ydata()[0] for line in markers] == pytest.approx([90.0 - i for i in range(12)])
    x_bar = axes.containers[0].lines[2][0].get_segments()[0]  # the ID error bar of the first method: 79 .. 81
    assert [x for x, _ in x_bar] == pytest.approx([79.0, 81.0])
    assert len({to_hex(line.get_color()) for line in markers}) == 12  # more methods than tab10 has colours
    assert axes.get_title() == "t"
    assert (tmp_path / "sub" / "scatter.png").stat().st_size > 1000


def test_method_comparison_needs_points() -> None:
    with pytest.raises(RobustFTConfigError, match="empty"):
        plot_method_comparison({})
