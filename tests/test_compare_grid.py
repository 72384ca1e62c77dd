"""``robustft compare`` running real (tiny) grids: outputs, resuming, failures, shards, and a demo smoke grid."""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from _compare_fixtures import Blobs, blobs_config
from lightning.pytorch import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_robustft.compare import compare
from lightning_robustft.compare import grid as grid_module
from lightning_robustft.errors import RobustFTConfigError

LRS = [0.01, 0.1]
METHODS = ["ft", "wiseft", "lpft", "greedy_soup"]


def _quiet(_: str) -> None:
    pass


def _count_cells(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the key of every cell that starts."""
    started: list[str] = []
    original = grid_module.run_cell

    def counting(grid: Any, cell: Any) -> Any:
        started.append(cell.key)
        return original(grid, cell)

    monkeypatch.setattr(grid_module, "run_cell", counting)
    return started


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One grid over two seeds: ft, its WiSE-FT point, LP-FT and the greedy soup; the OOD set explodes if read while
    the soup is chosen."""
    tmp = tmp_path_factory.mktemp("grid")
    config = blobs_config(tmp, explode=True)
    original = grid_module.greedy_soup

    def armed_soup(*args: Any, **kwargs: Any) -> Any:
        Blobs.armed = True
        try:
            return original(*args, **kwargs)
        finally:
            Blobs.armed = False

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(grid_module, "greedy_soup", armed_soup)
        lines: list[str] = []
        summary = compare(
            config, METHODS, seeds=[0, 1], lrs=LRS, out=tmp / "out", alphas=[0, 0.5, 1], echo=lines.append
        )
    return {"config": config, "out": tmp / "out", "summary": summary, "lines": lines}


def _runs(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]


def test_grid_writes_every_output_and_selects_on_id_validation(finished: dict[str, Any]) -> None:
    out = finished["out"]
    runs = _runs(out)
    assert len(runs) == 2 * (2 * len(LRS) + 1)  # ft and lpft at each lr and seed, plus a soup per seed
    assert {r["method"] for r in runs} == {"ft", "lpft", "greedy_soup"}
    assert all([row["alpha"] for row in r["curve"]] == [0.0, 0.5, 1.0] for r in runs)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["methods"]) == {*METHODS, "zero-shot"}
    for name, entry in finished["summary"]["methods"].items():
        assert summary["methods"][name]["ood_avg"] == pytest.approx(entry["ood_avg"], abs=1e-3)  # rounded in the file
    for name in [*METHODS, "zero-shot"]:
        entry = summary["methods"][name]
        for key in ("id_acc", "ood_avg", "frontier_gain", "best_frontier_gain", "selected", "seeds"):
            assert key in entry, (name, key)
        assert f"{'id_acc'}_std" in entry and "ood_avg_std" in entry
    # the selected lr of each trained method is the one with the best mean ID *validation* accuracy
    for method, alpha in (("ft", 1.0), ("ft", 0.5), ("lpft", 1.0)):
        name = "wiseft" if alpha == 0.5 else method

        def mean_id_val(lr: float, method: str = method, alpha: float = alpha) -> float:
            rows = [r for r in runs if r["method"] == method and r["lr"] == lr]
            return statistics.fmean(next(p["id_val"] for p in r["curve"] if p["alpha"] == alpha) for r in rows)

        best = max(LRS, key=lambda lr: (mean_id_val(lr), -lr))
        assert summary["methods"][name]["selected"]["lr"] == pytest.approx(best)
        chosen = [r for r in runs if r["method"] == method and r["lr"] == best]
        reported = statistics.fmean(next(p["id_test"] for p in r["curve"] if p["alpha"] == alpha) for r in chosen)
        assert summary["methods"][name]["id_acc"] == pytest.approx(100 * reported, abs=1e-3)
    assert summary["methods"]["ft"]["frontier_gain"] <= 1e-6  # ft's endpoint is on or under its own envelope
    assert summary["id_metric"] == "id_test"
    assert (out / "frontier.png").stat().st_size > 10_000
    table = (out / "summary.md").read_text()
    assert "| wiseft |" in table and "Δ OOD vs ft" in table
    assert any(line.startswith(f"[{len(runs)}/{len(runs)}]") and "ETA" in line for line in finished["lines"])


def test_lpft_curve_starts_at_the_probed_model_and_soup_never_read_ood(finished: dict[str, Any]) -> None:
    runs = _runs(finished["out"])
    ft = next(r for r in runs if r["method"] == "ft" and r["seed"] == 0)
    lpft = next(r for r in runs if r["method"] == "lpft" and r["seed"] == 0)
    assert (ft["start"], lpft["start"]) == ("init", "probe")
    assert lpft["curve"][0]["sets"] != ft["curve"][0]["sets"]  # a trained head, not the random one
    soups = [r for r in runs if r["method"] == "greedy_soup"]
    assert len(soups) == 2 and all(r["soup"] for r in soups)  # chosen while reading the OOD set would raise
    config = yaml.safe_load((finished["out"] / "cells" / "lpft-lr0.1-seed1" / "config.yaml").read_text())
    assert config["seed_everything"] == 1 and config["data"]["init_args"]["seed"] == 1
    assert config["model"]["init_args"]["lr"] == 0.1
    lpft = config["trainer"]["callbacks"][-1]
    assert lpft["class_path"] == "lightning_robustft.LPFTCallback"
    assert lpft["init_args"]["probe_epochs"] == 1  # 30% of max_epochs=2, at least one


def test_rerun_skips_finished_cells_and_resumes_a_killed_one(
    finished: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = finished["out"]
    killed = out / "cells" / "lpft-lr0.1-seed1"
    (killed / "result.json").unlink()
    (killed / "leftover.ckpt").write_text("from the killed run")
    started = _count_cells(monkeypatch)
    summary = compare(finished["config"], METHODS, seeds=[0, 1], lrs=LRS, out=out, alphas=[0, 0.5, 1], echo=_quiet)
    assert started == ["lpft-lr0.1-seed1"]
    assert not (killed / "leftover.ckpt").exists()
    assert summary["methods"]["ft"] == finished["summary"]["methods"]["ft"]
    assert compare(finished["config"], METHODS, seeds=[0, 1], lrs=LRS, out=out, alphas=[0, 0.5, 1], echo=_quiet)
    assert started == ["lpft-lr0.1-seed1"]  # nothing left to run
    with pytest.raises(RobustFTConfigError, match="written by a different grid"):
        compare(
            finished["config"],
            METHODS,
            seeds=[0, 1],
            lrs=LRS,
            out=out,
            alphas=[0, 0.5, 1],
            overrides={"trainer.max_epochs": 3},
            echo=_quiet,
        )
    assert started == ["lpft-lr0.1-seed1"]


class Boom(Callback):
    """A method that fails during training."""

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        raise RuntimeError("boom in training")


def test_failed_cell_is_reported_and_the_grid_goes_on(tmp_path: Path) -> None:
    presets = tmp_path / "presets.yaml"
    presets.write_text(
        f"boom:\n  callbacks:\n    - class_path: {__name__}.Boom\n"
        "badtype:\n  model: {label_smoothing: high}\n"  # a name the model takes, a value its type refuses
    )
    lines: list[str] = []
    summary = compare(
        blobs_config(tmp_path, max_epochs=1),
        ["boom", "badtype", "ft"],
        lrs=[0.1],
        out=tmp_path / "out",
        presets=presets,
        alphas=[0, 1],
        echo=lines.append,
    )
    assert any("boom-lr0.1-seed0 FAILED (RuntimeError: boom in training)" in line for line in lines)
    assert "boom in training" in (tmp_path / "out" / "cells" / "boom-lr0.1-seed0" / "error.txt").read_text()
    assert any(
        "badtype-lr0.1-seed0 FAILED (RobustFTConfigError:" in line and "label_smoothing" in line for line in lines
    )
    assert summary["unfinished"] == ["boom-lr0.1-seed0", "badtype-lr0.1-seed0"]
    assert "boom" not in summary["methods"] and "ft" in summary["methods"]
    assert "Failed cells" in (tmp_path / "out" / "summary.md").read_text()


class Preempted(Callback):
    """Stands for a SIGTERM (a preempted job) while :attr:`armed`: Lightning's loops raise ``SIGTERMException``."""

    armed = True

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if Preempted.armed:
            raise SIGTERMException


def test_sigterm_stops_the_grid_and_a_rerun_resumes_from_that_cell(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    presets = tmp_path / "presets.yaml"
    presets.write_text(f"preempted:\n  callbacks:\n    - class_path: {__name__}.Preempted\n")
    config, out = blobs_config(tmp_path, max_epochs=1), tmp_path / "out"
    started = _count_cells(monkeypatch)
    run: Callable[[], Any] = lambda: compare(  # noqa: E731
        config, ["ft", "preempted"], seeds=[0, 1], lrs=[0.1], out=out, presets=presets, alphas=[0, 1], echo=_quiet
    )
    with pytest.raises(SystemExit) as stopped:
        run()
    assert stopped.value.code == 143  # what a shell reports for SIGTERM, so a scheduler sees the job did not finish
    assert started == ["ft-lr0.1-seed0", "preempted-lr0.1-seed0"]  # seed 1 never started
    assert not (out / "cells" / "preempted-lr0.1-seed0" / "result.json").exists()
    monkeypatch.setattr(Preempted, "armed", False)
    summary = run()
    assert started[2:] == ["preempted-lr0.1-seed0", "ft-lr0.1-seed1", "preempted-lr0.1-seed1"]
    assert summary["methods"]["preempted"]["seeds"] == [0, 1]


def test_shards_share_one_folder_and_summarize_merges_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config, out = blobs_config(tmp_path, max_epochs=1), tmp_path / "out"
    started = _count_cells(monkeypatch)
    run: Callable[..., Any] = lambda **kw: compare(  # noqa: E731
        config, ["ft", "greedy_soup"], lrs=LRS, out=out, alphas=[0, 1], echo=_quiet, **kw
    )
    assert run(shard=(0, 2)) is None  # ft at lr 0.01; its soup waits for the other shard's cell
    assert started == ["ft-lr0.01-seed0"]
    assert run(shard=(1, 2)) is None
    assert started == ["ft-lr0.01-seed0", "ft-lr0.1-seed0"]
    summary = run(summarize_only=True)  # makes the soup (evaluation only), then summarises
    assert started[-1] == "greedy_soup-seed0"
    assert set(summary["methods"]) == {"zero-shot", "ft", "greedy_soup"}
    assert len(_runs(out)) == 3


def test_demo_smoke_grid_through_the_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped demo config, as a user runs it (shortened): `robustft compare` end to end."""
    from lightning_robustft.console import main

    out = tmp_path / "demo"
    argv = [
        "robustft", "compare", "--config", "configs/demo.yaml", "--methods", "ft", "wiseft", "--lrs", "3e-4",
        "--out", str(out), "--alphas", "0", "1", "--set", "trainer.max_epochs=1",
        "--set", "trainer.limit_train_batches=2", "--set", "trainer.limit_val_batches=0",
        "--set", "trainer.callbacks=[]",
        "--set", "data.init_args.ood_sets=[rotated]", "--set", "data.init_args.eval_batch_size=100",
        "--eval-batches", "2",
    ]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    main()
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["methods"]) == {"zero-shot", "ft", "wiseft"}
    run = _runs(out)[0]
    assert set(run["curve"][0]["sets"]) == {"id", "rotated"}
    for accuracy in run["curve"][-1]["sets"].values():  # --eval-batches 2 of 100 images: multiples of 1/200
        assert 200 * accuracy == pytest.approx(round(200 * accuracy), abs=1e-3)
    assert run["curve"][0]["id_test"] != run["curve"][-1]["id_test"]  # two steps of fine-tuning moved the model
    assert "robustft compare --config configs/demo.yaml" in (out / "summary.md").read_text()
