"""``robustft compare`` without training: frontier arithmetic, selection, presets and checks before training."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from _compare_fixtures import blobs_config

from lightning_robustft.compare import compare, envelope_at, frontier_gain, logit_fit
from lightning_robustft.compare import grid as grid_module
from lightning_robustft.compare.cli import compare_main, parser
from lightning_robustft.compare.frontier import best_frontier_gain
from lightning_robustft.compare.grid import Cell, shard_cells
from lightning_robustft.compare.presets import BUILTIN_PRESETS, Method, check_preset, load_presets, resolve_methods
from lightning_robustft.compare.summary import select_setting, summarize
from lightning_robustft.errors import RobustFTConfigError


# ------------------------------------------------------------------------------------------ frontier arithmetic
def test_interpolates_linearly_along_a_curve() -> None:
    curve = [(0.5, 0.6), (0.7, 0.7), (0.9, 0.5)]
    assert envelope_at([curve], 0.6) == pytest.approx(0.65)
    assert envelope_at([curve], 0.8) == pytest.approx(0.6)
    result = frontier_gain((0.6, 0.70), [curve])
    assert result.status == "in_range"
    assert result.reference == pytest.approx(0.65)
    assert result.gain == pytest.approx(0.05)


def test_envelope_is_the_upper_one_over_every_baseline_curve() -> None:
    low_lr = [(0.5, 0.6), (0.9, 0.62)]
    high_lr = [(0.5, 0.6), (0.7, 0.7), (0.9, 0.5)]
    assert envelope_at([low_lr, high_lr], 0.8) == pytest.approx(0.615)  # low lr's curve is higher there
    assert envelope_at([low_lr, high_lr], 0.6) == pytest.approx(0.65)  # high lr's curve is higher there
    assert frontier_gain((0.8, 0.615), [low_lr, high_lr]).gain == pytest.approx(0.0)


def test_points_above_the_range_have_no_gain_and_below_compare_with_dominating_points() -> None:
    curve = [(0.5, 0.6), (0.7, 0.7), (0.9, 0.5)]
    above = frontier_gain((0.95, 0.9), [curve])
    assert (above.gain, above.reference, above.status) == (None, None, "above")
    below = frontier_gain((0.4, 0.65), [curve])  # every baseline point has more ID; the best of them has 0.7 OOD
    assert below.status == "below"
    assert below.reference == pytest.approx(0.7)
    assert below.gain == pytest.approx(-0.05)
    gap = frontier_gain((0.75, 0.55), [[(0.5, 0.6), (0.6, 0.65)], [(0.8, 0.5), (0.9, 0.4)]])  # between two curves
    assert gap.status == "below"
    assert gap.reference == pytest.approx(0.5)  # only the second curve's points reach that ID


def test_ties_vertices_and_vertical_segments() -> None:
    curve = [(0.5, 0.6), (0.7, 0.7), (0.7, 0.72), (0.9, 0.5)]  # two alphas with the same ID accuracy
    assert envelope_at([curve], 0.7) == pytest.approx(0.72)  # the higher end of the vertical segment
    assert frontier_gain((0.7, 0.72), [curve]).gain == pytest.approx(0.0)
    assert frontier_gain((0.9, 0.5), [curve, curve]).gain == pytest.approx(0.0)  # a duplicated curve changes nothing
    assert envelope_at([[(0.6, 0.6)]], 0.6) == pytest.approx(0.6)  # a one-point curve covers its own ID only
    assert envelope_at([[(0.6, 0.6)]], 0.61) is None


def test_non_monotone_curve_near_alpha_one_uses_its_upper_branch() -> None:
    # ID rises, peaks at alpha 0.9 (0.82) and falls back at alpha 1 (0.81): the curve folds back.
    curve = [(0.5, 0.6), (0.7, 0.65), (0.8, 0.6), (0.82, 0.55), (0.81, 0.58)]
    # At 0.815 two segments overlap: 0.8->0.82 gives 0.5625, 0.82->0.81 gives 0.565; the envelope is the higher.
    assert envelope_at([curve], 0.815) == pytest.approx(0.565)
    # The curve's own endpoint is on the envelope (gain 0), not credited against the lower branch (0.575 at 0.81).
    assert envelope_at([curve], 0.81) == pytest.approx(0.58)
    assert frontier_gain(curve[-1], [curve]).gain == pytest.approx(0.0)


def test_best_frontier_gain_takes_the_best_point_ties_to_the_smaller_alpha() -> None:
    baseline = [[(0.5, 0.5), (0.9, 0.5)]]
    best = best_frontier_gain([(0.5, 0.55), (0.7, 0.6), (0.8, 0.6), (0.95, 0.9)], baseline)
    assert best is not None
    gain, index = best
    assert index == 1  # 0.7 and 0.8 tie at +0.1; 0.95 is above the range and has no gain
    assert gain.gain == pytest.approx(0.1)
    assert best_frontier_gain([(0.95, 0.9)], baseline) is None


def test_logit_fit_recovers_a_line_and_needs_three_points() -> None:
    def sigmoid(z: float) -> float:
        return 1 / (1 + math.exp(-z))

    def logit(p: float) -> float:
        return math.log(p / (1 - p))

    points = [(x, sigmoid(0.5 * logit(x) - 0.2)) for x in (0.6, 0.7, 0.8, 0.9)]
    fit = logit_fit(points)
    assert fit is not None
    assert (fit.slope, fit.intercept) == (pytest.approx(0.5), pytest.approx(-0.2))
    assert fit.effective_robustness((0.7, sigmoid(0.5 * logit(0.7) - 0.2) + 0.03)) == pytest.approx(0.03)
    assert logit_fit(points[:2]) is None
    assert logit_fit([(0.6, 0.5), (0.6, 0.55), (0.7, 0.5)]) is None  # two distinct ID values only


# ---------------------------------------------------------------------------------------------------- selection
class _IdOnlyRow(Mapping[str, Any]):
    """A curve row that fails the test when anything but ``alpha`` or ``id_val`` is read."""

    def __init__(self, **values: Any) -> None:
        self._values = values

    def __getitem__(self, key: str) -> Any:
        if key not in ("alpha", "id_val"):
            raise AssertionError(f"selection read {key!r}: it must read ID validation accuracy only")
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


def _run(lr: float, id_val: float, ood: float) -> dict[str, Any]:
    return {
        "lr": lr,
        "curve": [_IdOnlyRow(alpha=0.5, id_val=id_val, ood_avg=ood), _IdOnlyRow(alpha=1.0, id_val=id_val, ood_avg=ood)],
    }


def test_selection_reads_id_validation_only_and_ties_go_to_the_smaller_lr() -> None:
    runs = {
        1e-4: [_run(1e-4, 0.80, 0.95), _run(1e-4, 0.82, 0.95)],  # best OOD, worse ID
        3e-4: [_run(3e-4, 0.85, 0.50), _run(3e-4, 0.85, 0.50)],  # best mean ID val
        1e-3: [_run(1e-3, 0.84, 0.60), _run(1e-3, 0.86, 0.60)],  # same mean ID val: the smaller lr wins
    }
    assert select_setting(runs, alpha=1.0) == 3e-4
    assert select_setting({0.1: runs[3e-4], 0.01: runs[1e-3]}, alpha=0.5) == 0.01


def test_wiseft_row_mixes_the_method_selected_on_its_own_endpoint() -> None:
    results = [
        _result("ft", 0.1, 0, [(0.5, 0.9, 0), (0.80, 0.80, 0), (0.90, 0.5, 0)]),  # best endpoint on ID
        _result("ft", 1.0, 0, [(0.5, 0.9, 0), (0.85, 0.60, 0), (0.70, 0.4, 0)]),  # best alpha-0.5 point on ID
    ]
    summary = summarize(results, [Method("ft", "ft"), Method("wiseft", "ft", wiseft=True)], ["ft"], wiseft_alpha=0.5)
    assert summary["methods"]["ft"]["selected"] == {"lr": 0.1}
    assert summary["methods"]["wiseft"]["selected"] == {"lr": 0.1, "wiseft_alpha": 0.5}
    assert summary["methods"]["wiseft"]["ood_avg"] == pytest.approx(80.0)


def _result(method: str, lr: float | None, seed: int, curve: list[tuple[float, float, float]]) -> dict[str, Any]:
    rows = [
        {"alpha": a, "id_val": x, "id_test": x, "ood_avg": y, "sets": {"id": x, "ood": y}}
        for a, (x, y) in zip((0.0, 0.5, 1.0), [(x, y) for x, y, _ in curve], strict=True)
    ]
    return {
        "cell": f"{method}-{lr}-{seed}",
        "method": method,
        "lr": lr,
        "seed": seed,
        "hparams": {"lr": lr},
        "curve": rows,
    }


def test_summary_frontier_gains_per_seed_and_paired_differences() -> None:
    ft = [(0.5, 0.6, 0), (0.7, 0.66, 0), (0.8, 0.6, 0)]
    results = [
        _result("ft", 0.1, 0, ft),
        _result("ft", 0.1, 1, [(x + 0.02, y, 0) for x, y, _ in ft]),
        _result("mixout", 0.1, 0, [(0.5, 0.6, 0), (0.65, 0.7, 0), (0.75, 0.66, 0)]),
        _result("mixout", 0.1, 1, [(0.52, 0.6, 0), (0.67, 0.7, 0), (0.77, 0.62, 0)]),
    ]
    methods = [Method("ft", "ft"), Method("mixout", "mixout"), Method("mixout+wiseft", "mixout", wiseft=True)]
    summary = summarize(results, methods, ["ft"], wiseft_alpha=0.5)["methods"]
    # seed 0: ft at 0.75 is 0.63 -> +3.0; seed 1: ft curve shifted by 0.02, at 0.77 it is 0.63 -> -1.0
    assert summary["mixout"]["frontier_gain"] == pytest.approx(1.0)
    assert summary["mixout"]["frontier_gain_std"] == pytest.approx(math.sqrt(8))
    assert summary["mixout"]["id_acc"] == pytest.approx(76.0)
    assert summary["mixout"]["paired_vs_ft"]["d_id_acc"] == pytest.approx(-5.0)
    assert summary["mixout"]["paired_vs_ft"]["d_ood_avg"] == pytest.approx(4.0)
    assert summary["ft"]["frontier_gain"] == pytest.approx(0.0)
    # the +wiseft point is alpha 0.5: (0.65, 0.70) vs ft at 0.65 (0.645) -> +5.5; seed 1 (0.67, 0.70) vs 0.645
    assert summary["mixout+wiseft"]["frontier_gain"] == pytest.approx(5.5)
    assert summary["mixout+wiseft"]["selected"] == {"lr": 0.1, "wiseft_alpha": 0.5}
    assert summary["zero-shot"]["ood_avg"] == pytest.approx(60.0)


# ------------------------------------------------------------------------------------------------------ presets
def test_unknown_method_lists_the_known_ones() -> None:
    with pytest.raises(RobustFTConfigError, match=r"Unknown method 'gmixoot'.*'gmixout'.*--presets"):
        resolve_methods(["ft", "gmixoot"], BUILTIN_PRESETS)
    methods = resolve_methods(["wiseft", "gmixout+wiseft", "greedy_soup"], BUILTIN_PRESETS)
    assert [(m.trained, m.wiseft) for m in methods] == [("ft", True), ("gmixout", True), (None, False)]


def test_every_builtin_preset_builds_or_says_what_is_missing() -> None:
    import inspect

    from lightning_robustft import GMixoutCallback, ImageClassifier

    for name, preset in BUILTIN_PRESETS.items():
        if name == "gmixout_sparse" and "sparse" not in inspect.signature(GMixoutCallback).parameters:
            with pytest.raises(RobustFTConfigError, match=r"takes no argument\(s\) \['sparse'\].*gmixout_sparse"):
                check_preset(preset, ImageClassifier)
        else:
            check_preset(preset, ImageClassifier)


def test_user_presets_are_checked(tmp_path: Path) -> None:
    from lightning_robustft import ImageClassifier

    file = tmp_path / "presets.yaml"
    file.write_text(
        "gmixout_p97:\n  callbacks:\n    - class_path: lightning_robustft.GMixoutCallback\n      init_args: {p: 0.97}\n"
    )
    presets = load_presets(file)
    check_preset(presets["gmixout_p97"], ImageClassifier)
    assert presets["gmixout_p97"].callbacks[0]["init_args"] == {"p": 0.97}
    shipped = load_presets(Path(__file__).parents[1] / "configs" / "compare_presets.yaml")
    for name in (
        "gmixout_p70",
        "gmixout_p97",
        "gmixout_k1",
        "gmixout_k10",
        "gmixout_k100",
        "gmixout_beta1",
        "gmixout_beta99",
        "gmixout_beta90",
    ):
        check_preset(shipped[name], ImageClassifier)
    file.write_text(
        "bad:\n  callbacks:\n    - class_path: lightning_robustft.GMixoutCallback\n      init_args: {p: 1.5}\n"
    )
    with pytest.raises(RobustFTConfigError, match=r"preset 'bad'.*`p`=1.5"):
        check_preset(load_presets(file)["bad"], ImageClassifier)
    file.write_text("typo:\n  model: {distil: logits}\n")
    with pytest.raises(RobustFTConfigError, match=r"preset 'typo': model ImageClassifier takes no argument.*distil"):
        check_preset(load_presets(file)["typo"], ImageClassifier)
    file.write_text("x:\n  callback: []\n")
    with pytest.raises(RobustFTConfigError, match=r"unknown keys \['callback'\]"):
        load_presets(file)
    file.write_text("greedy_soup: {}\n")
    with pytest.raises(RobustFTConfigError, match="reserved"):
        load_presets(file)


# ----------------------------------------------------------------------------------- errors before any training
@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a cell started although the grid is invalid")

    monkeypatch.setattr(grid_module, "run_cell", refuse)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"methods": ["ft", "nope"]}, "Unknown method 'nope'"),
        ({"lrs": [1e-3, -1e-3]}, r"--lrs: -0.001 is not a learning rate"),
        ({"lrs": [0.0]}, "is not a learning rate"),
        ({"seeds": [0, 0]}, "distinct integer seeds"),
        ({"wiseft_alpha": 1.5}, r"alpha 1.5 must be a number in \[0, 1\]"),
        ({"baseline": ["lpft"]}, "must include `ft`"),
        ({"shard": (2, 2)}, r"--shard 2/2"),
        ({"eval_batches": 0}, r"eval_batches=0"),
        ({"method_lrs": {"gmixout": [1e-3]}}, r"--method-lrs names 'gmixout', which this grid does not train"),
        ({"method_lrs": {"ft": [1e-3, 1e-3]}}, r"--method-lrs ft \[0.001, 0.001\] repeats a value"),
        ({"method_lrs": {"ft": []}}, r"--method-lrs ft: give at least one rate"),
        ({"overrides": {"model.init_args.lr": None, "model": 3}}, "no `model.class_path`"),
    ],
)
def test_bad_grid_is_refused_before_training(
    tmp_path: Path, no_training: None, kwargs: dict[str, Any], message: str
) -> None:
    arguments: dict[str, Any] = {"methods": ["ft"], "lrs": [1e-3], "out": tmp_path / "out", **kwargs}
    with pytest.raises(RobustFTConfigError, match=message):
        compare(blobs_config(tmp_path), **arguments)


def test_missing_config_file_is_named_through_the_callable_package(tmp_path: Path, no_training: None) -> None:
    import lightning_robustft

    with pytest.raises(RobustFTConfigError, match=r"nowhere\.yaml"):
        lightning_robustft.compare(tmp_path / "nowhere.yaml", ["ft"])


def test_command_line_error_is_one_line_and_status_2(
    tmp_path: Path, no_training: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning_robustft.console import main

    monkeypatch.setattr(sys, "argv", ["robustft", "compare", "--config", blobs_config(tmp_path), "--methods", "l2-sp"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    assert "robustft compare: error: Unknown method 'l2-sp'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare_main(["--config", "x.yaml", "--shard", "one/two"])
    assert "is not i/N" in capsys.readouterr().err


def test_shards_partition_the_cells() -> None:
    cells = [Cell("ft", seed, lr) for seed in (0, 1) for lr in (1e-4, 3e-4, 1e-3)]
    shards = [shard_cells(cells, (i, 4)) for i in range(4)]
    assert sorted((c for s in shards for c in s), key=cells.index) == cells
    assert shards[1] == [cells[1], cells[5]]
    assert shard_cells(cells, None) == cells


def test_learning_rate_goes_where_the_config_takes_it(tmp_path: Path) -> None:
    from lightning_robustft.compare.grid import Grid, load_base_config

    def cell_model_args(overrides: dict[str, Any]) -> dict[str, Any]:
        grid = Grid(
            config=load_base_config(blobs_config(tmp_path), overrides),
            config_path=tmp_path,
            methods=resolve_methods(["lora"], BUILTIN_PRESETS),
            presets=BUILTIN_PRESETS,
            seeds=[3],
            lrs=[0.01],
            out=tmp_path / "out",
            baseline=["ft"],
        )
        return grid.cell_config(Cell("lora", 3, 0.01))["model"]["init_args"]

    assert cell_model_args({})["lr"] == pytest.approx(0.03)  # LoRA trains at 3x each rate of the grid
    optimizer = cell_model_args({"model.init_args.optimizer": "torch.optim.SGD"})["optimizer"]
    assert optimizer == {"class_path": "torch.optim.SGD", "init_args": {"lr": pytest.approx(0.03)}}
    with_args = {"model.init_args.optimizer": {"class_path": "torch.optim.SGD", "init_args": {"momentum": 0.9}}}
    assert cell_model_args(with_args)["optimizer"]["init_args"] == {"momentum": 0.9, "lr": pytest.approx(0.03)}


def test_a_seed_without_baseline_cells_has_no_frontier_gain() -> None:
    results = [
        _result("ft", 0.1, 0, [(0.5, 0.6, 0), (0.7, 0.66, 0), (0.8, 0.6, 0)]),
        _result("mixout", 0.1, 0, [(0.5, 0.6, 0), (0.65, 0.7, 0), (0.75, 0.66, 0)]),
        _result("mixout", 0.1, 1, [(0.52, 0.6, 0), (0.67, 0.7, 0), (0.77, 0.62, 0)]),  # seed 1's ft failed
    ]
    summary = summarize(results, [Method("ft", "ft"), Method("mixout", "mixout")], ["ft"], wiseft_alpha=0.5)
    assert summary["per_seed"]["mixout"]["1"]["frontier_status"] == "no_baseline"
    assert summary["methods"]["mixout"]["frontier_gain"] == pytest.approx(3.0)  # seed 0 only
    assert summary["methods"]["mixout"]["paired_vs_ft"]["seeds"] == [0]


def test_best_frontier_gain_leaves_out_the_start_of_the_curve() -> None:
    ft = [(0.5, 0.6, 0), (0.7, 0.66, 0), (0.8, 0.6, 0)]
    worse = [(0.5, 0.6, 0), (0.6, 0.55, 0), (0.7, 0.6, 0)]  # starts on the frontier (zero-shot), then falls below
    results = [_result("ft", 0.1, 0, ft), _result("mixout", 0.1, 0, worse)]
    summary = summarize(results, [Method("ft", "ft"), Method("mixout", "mixout")], ["ft"], wiseft_alpha=0.5)
    seed = summary["per_seed"]["mixout"]["0"]
    assert seed["best_frontier_gain"] == pytest.approx(-6.0)  # alpha 1: 0.60 vs 0.66; alpha 0.5: 0.55 vs 0.63
    assert seed["best_alpha"] == 1.0


def test_methods_with_their_own_rates_train_at_them_unscaled(tmp_path: Path) -> None:
    from lightning_robustft.compare.grid import Grid, load_base_config

    grid = Grid(
        config=load_base_config(blobs_config(tmp_path)),
        config_path=tmp_path,
        methods=resolve_methods(["ft", "lora", "gmixout", "greedy_soup"], BUILTIN_PRESETS),
        presets=BUILTIN_PRESETS,
        seeds=[0],
        lrs=[0.01],
        out=tmp_path / "out",
        baseline=["ft"],
        method_lrs={"ft": [0.001, 0.01, 0.1], "lora": [0.05]},
    )
    assert [cell.key for cell in grid.cells()] == [
        "ft-lr0.001-seed0",
        "ft-lr0.01-seed0",
        "ft-lr0.1-seed0",
        "lora-lr0.05-seed0",
        "gmixout-lr0.01-seed0",
        "greedy_soup-seed0",  # a soup of the three ft cells
    ]
    rates = {cell.key: grid.cell_config(cell)["model"]["init_args"].get("lr") for cell in grid.cells()}
    assert rates["lora-lr0.05-seed0"] == pytest.approx(0.05)  # its own rate, not x3 like a rate of --lrs
    assert rates["gmixout-lr0.01-seed0"] == pytest.approx(0.01)
    assert grid_module._hparams(grid, Cell("lora", 0, 0.05)) == {"lr": pytest.approx(0.05)}
    assert [c.key for c in grid_module._soup_ingredients(grid, Cell("greedy_soup", 0))][::2] == [
        "ft-lr0.001-seed0",
        "ft-lr0.1-seed0",
    ]
    parsed = parser().parse_args(["--method-lrs", "ft=1e-4,3e-4", "lora=3e-3"])
    assert dict(parsed.method_lrs) == {"ft": [1e-4, 3e-4], "lora": [3e-3]}
