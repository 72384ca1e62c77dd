"""The documented benchmark (benchmarks/frontier.py + frontier.yaml): every study is a valid `robustft compare` grid.

The benchmark itself takes half an hour; these checks run compare's own validation (presets, rates, baseline) on each
study with ``--dry-run``, so a typo in the spec fails here rather than twenty minutes into `make benchmark`.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from lightning_robustft.compare.cli import compare_main

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "frontier.py"
SPEC = yaml.safe_load(SCRIPT.with_suffix(".yaml").read_text())


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("frontier_benchmark", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.mark.parametrize("name", list(SPEC["studies"]))
def test_every_study_is_a_valid_compare_grid(
    bench: ModuleType, name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(ROOT)
    study = SPEC["studies"][name]
    argv = bench.compare_argv(SPEC, study, tmp_path / name, SPEC["seeds"])
    assert argv[0] == "compare"
    compare_main([*argv[1:], "--dry-run"])
    lines = capsys.readouterr().out.splitlines()
    cells = [line.strip() for line in lines[1:]]
    rates = study.get("method_lrs") or {}
    for method in ("ft", *rates):
        expected = len(rates.get(method, study["lrs"])) * len(SPEC["seeds"])
        assert sum(cell.startswith(f"{method}-lr") for cell in cells) == expected, method
    assert lines[0].startswith(f"compare: {len(cells)} cells, 0 finished")
    assert not (tmp_path / name).exists()  # a dry run writes nothing
    for group in (study.get("levers") or {}).values():
        assert set(group) <= set(study["methods"])


def test_a_typo_in_a_study_fails_before_training(
    bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(ROOT)
    study = {**SPEC["studies"]["mirrored"], "method_lrs": {"gmixout_p7": [1e-3]}}
    with pytest.raises(SystemExit) as exit_info:
        compare_main([*bench.compare_argv(SPEC, study, tmp_path, [0])[1:], "--dry-run"])
    assert exit_info.value.code == 2
    assert "--method-lrs names 'gmixout_p7'" in capsys.readouterr().err
