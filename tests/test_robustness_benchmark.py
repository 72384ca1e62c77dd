"""The robustness benchmark's bookkeeping: lr selection on ID validation only, paired differences, the table."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "robustness.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("robustness_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def _row(bench, id_val, ood, id_test=0.5):
    row = {name: ood for name in bench.DEMO_OOD_SETS}
    return {"id": id_val, "id_test": id_test, "ood_avg": ood, **row}


def test_lr_is_chosen_on_id_validation_never_on_ood(bench):
    runs = {
        1e-4: [_row(bench, 0.80, 0.99), _row(bench, 0.82, 0.99)],  # best OOD, worse ID val
        3e-4: [_row(bench, 0.85, 0.50), _row(bench, 0.84, 0.50)],  # best ID val
        1e-3: [_row(bench, 0.83, 0.70), _row(bench, 0.85, 0.70)],
    }
    assert bench.select_lr(runs) == 3e-4


def test_lr_ties_go_to_the_smaller_rate(bench):
    runs = {1e-3: [_row(bench, 0.8, 0.1)], 1e-4: [_row(bench, 0.8, 0.9)]}
    assert bench.select_lr(runs) == 1e-4


def test_paired_difference_cancels_the_shared_seed_shift(bench):
    baseline = [_row(bench, 0.8, 0.90), _row(bench, 0.8, 0.80)]
    method = [_row(bench, 0.8, 0.91), _row(bench, 0.8, 0.81)]
    mean, std = bench.paired_difference(method, baseline, "ood_avg")
    assert math.isclose(mean, 0.01, abs_tol=1e-12)
    assert std < 1e-12
    # The raw spread the paired difference removes: the sample standard deviation, 0.1 / sqrt(2).
    assert bench.mean_std([0.90, 0.80]) == pytest.approx((0.85, 0.1 / math.sqrt(2)))
    assert bench.mean_std([0.9]) == (0.9, 0.0)


def test_markdown_table_has_a_row_per_method_and_every_set(bench):
    results = {
        "zero-shot": {"lr": None, "settings": "zs", "rows": [_row(bench, 0.7, 0.9), _row(bench, 0.72, 0.92)]},
        "full fine-tuning": {"lr": 3e-4, "settings": "ft", "rows": [_row(bench, 0.9, 0.8), _row(bench, 0.9, 0.84)]},
    }
    table = bench.markdown_table(results, [0, 1], baseline="full fine-tuning")
    lines = [line for line in table.splitlines() if line.startswith("|")]
    assert len(lines) == 2 + len(results)
    header = lines[0]
    for name in bench.DEMO_OOD_SETS:
        assert name in header
    assert "| zero-shot | – | zs | 71.0 ± 1.4 |" in table
    assert "+9.0 ± 1.4 |" in lines[2]  # zero-shot minus fine-tuning on the OOD average, per seed: +10, +8
    assert "| full fine-tuning | 0.0003 | ft |" in table
