"""State-dict interpolation and averaging: exact endpoints, linear midpoints, integer buffers, mismatch errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_robustft.ops.interpolate import average_state_dicts, float_state_snapshot, interpolate_state_dicts


def _model(seed: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Linear(7, 3)).to(dtype)
    model[1].running_mean.normal_()
    model[1].num_batches_tracked.fill_(seed + 3)
    return model


def _pair(dtype: torch.dtype = torch.float32) -> tuple[dict, dict]:
    return _model(0, dtype).state_dict(), _model(1, dtype).state_dict()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_endpoints_are_exact_copies(dtype: torch.dtype) -> None:
    theta_0, theta_1 = _pair(dtype)
    at_0 = interpolate_state_dicts(theta_0, theta_1, 0.0)
    at_1 = interpolate_state_dicts(theta_0, theta_1, 1)
    for name, value in theta_1.items():
        expected_0 = theta_0[name] if value.is_floating_point() else value
        assert torch.equal(at_0[name], expected_0), name
        assert torch.equal(at_1[name], value), name
        assert at_1[name].data_ptr() != value.data_ptr(), "endpoints must be copies, not aliases"
        assert at_0[name].dtype == value.dtype


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, 1e-6), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("alpha", [0.25, 0.5, 0.9, 1.5, -0.5])
def test_midpoints_are_linear_and_keep_dtype(dtype: torch.dtype, atol: float, alpha: float) -> None:
    theta_0, theta_1 = _pair(dtype)
    mixed = interpolate_state_dicts(theta_0, theta_1, alpha)
    assert list(mixed) == list(theta_1)
    for name, value in theta_1.items():
        if not value.is_floating_point():
            continue
        expected = (1 - alpha) * theta_0[name].double() + alpha * value.double()
        assert mixed[name].dtype == dtype
        torch.testing.assert_close(mixed[name].double(), expected, atol=atol, rtol=atol)


def test_linear_in_alpha_between_three_points() -> None:
    theta_0, theta_1 = _pair()
    quarter, half, three_quarters = (interpolate_state_dicts(theta_0, theta_1, a) for a in (0.25, 0.5, 0.75))
    for name, value in theta_1.items():
        if value.is_floating_point():
            torch.testing.assert_close((quarter[name] + three_quarters[name]) / 2, half[name])


def test_integer_buffers_come_from_theta_1_even_when_theta_0_omits_them() -> None:
    theta_0, theta_1 = _pair()
    snapshot = float_state_snapshot(theta_0)
    assert "1.num_batches_tracked" not in snapshot
    mixed = interpolate_state_dicts(snapshot, theta_1, 0.5)
    assert mixed["1.num_batches_tracked"].item() == 4
    assert mixed["1.num_batches_tracked"].dtype == torch.long
    assert interpolate_state_dicts(theta_0, theta_1, 0.0)["1.num_batches_tracked"].item() == 4


def test_result_loads_into_the_model() -> None:
    theta_0, theta_1 = _pair()
    model = _model(2)
    model.load_state_dict(interpolate_state_dicts(theta_0, theta_1, 0.3))
    torch.testing.assert_close(model[0].weight, 0.7 * theta_0["0.weight"] + 0.3 * theta_1["0.weight"])


def test_snapshot_is_a_detached_cpu_copy_of_float_tensors() -> None:
    model = _model(0)
    snapshot = float_state_snapshot(model.state_dict())
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert not torch.equal(snapshot["0.weight"], model[0].weight)
    assert all(t.device.type == "cpu" and t.is_floating_point() for t in snapshot.values())
    assert set(snapshot) == {k for k, v in model.state_dict().items() if v.is_floating_point()}


def test_mismatches_list_every_key() -> None:
    theta_0, theta_1 = _pair()
    theta_0 = dict(theta_0)
    del theta_0["0.bias"]
    theta_0["extra.weight"] = torch.zeros(2)
    theta_0["2.weight"] = torch.zeros(4, 7)
    with pytest.raises(ValueError) as info:
        interpolate_state_dicts(theta_0, theta_1, 0.5)
    message = str(info.value)
    assert "missing from theta_0: 0.bias" in message
    assert "only in theta_0: extra.weight" in message
    assert "mismatched in theta_0: 2.weight ((4, 7) float32 vs (3, 7) float32 in theta_1)" in message


def test_float_versus_integer_entry_is_a_mismatch() -> None:
    theta_0, theta_1 = _pair()
    theta_0 = dict(theta_0, **{"0.bias": torch.zeros(7, dtype=torch.long)})
    with pytest.raises(ValueError, match=r"0\.bias \(\(7,\) int64 vs \(7,\) float32"):
        interpolate_state_dicts(theta_0, theta_1, 0.5)


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), True, "0.5", None])
def test_alpha_must_be_a_finite_number(alpha: object) -> None:
    theta_0, theta_1 = _pair()
    with pytest.raises(ValueError, match="`alpha`"):
        interpolate_state_dicts(theta_0, theta_1, alpha)  # type: ignore[arg-type]


def test_uniform_and_weighted_averages() -> None:
    dicts = [_model(seed).state_dict() for seed in range(3)]
    uniform = average_state_dicts(dicts)
    weighted = average_state_dicts(dicts, weights=[2.0, 0.0, 2.0])
    for name, first in dicts[0].items():
        if first.is_floating_point():
            torch.testing.assert_close(uniform[name], sum(d[name] for d in dicts) / 3)
            torch.testing.assert_close(weighted[name], (dicts[0][name] + dicts[2][name]) / 2)
        else:
            assert torch.equal(uniform[name], first)
    pair = average_state_dicts(dicts[:2], weights=[0.25, 0.75])
    torch.testing.assert_close(pair["0.weight"], interpolate_state_dicts(dicts[0], dicts[1], 0.75)["0.weight"])


@pytest.mark.parametrize(
    ("weights", "match"), [([1.0], "`weights`"), ([1.0, -1.0, 1.0], "`weights`"), ([0, 0, 0], "`weights`")]
)
def test_average_rejects_bad_weights(weights: list[float], match: str) -> None:
    dicts = [_model(seed).state_dict() for seed in range(3)]
    with pytest.raises(ValueError, match=match):
        average_state_dicts(dicts, weights=weights)


def test_average_rejects_empty_and_mismatched() -> None:
    with pytest.raises(ValueError, match="empty"):
        average_state_dicts([])
    other = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Linear(7, 4)).state_dict()
    with pytest.raises(ValueError, match=r"mismatched in state_dicts\[1\]: 2\.weight"):
        average_state_dicts([_model(0).state_dict(), other])
