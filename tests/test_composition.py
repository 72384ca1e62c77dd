"""Callbacks in one Trainer: they compose whatever their order, or are refused with a message that says what to do.

Each combination is run in every order of ``trainer.callbacks``: a callback that reads the final weights (WiSE-FT)
must see the learned weights ``w`` even when it is listed before a callback that swaps weights (GMixout's ``w~``),
and the combinations that cannot work (LoRA with WiSE-FT or GMixout) fail before the model is touched.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from _helpers import Recorder, TinyNet, assert_states_equal, make_trainer, state_copy
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from torch.utils.data import DataLoader, TensorDataset

from lightning_robustft.callbacks import (
    DropoutHeadCallback,
    GMixoutCallback,
    LoRACallback,
    LPFTCallback,
    WeightPenaltyCallback,
    WiSEFTCallback,
)
from lightning_robustft.errors import RobustFTConfigError
from lightning_robustft.ops.interpolate import interpolate_state_dicts


def _data() -> tuple[DataLoader, dict[str, DataLoader]]:
    generator = torch.Generator().manual_seed(0)
    rule = torch.randn(6, 3, generator=generator)
    x = torch.randn(160, 6, generator=generator)
    y = (x @ rule).argmax(-1)
    train = DataLoader(TensorDataset(x[:96], y[:96]), batch_size=16, shuffle=True)
    val = {
        "id": DataLoader(TensorDataset(x[96:128], y[96:128]), batch_size=16),
        "shifted": DataLoader(TensorDataset(2 * x[128:] + 1, y[128:]), batch_size=16),
    }
    return train, val


def _accuracy(state: dict[str, torch.Tensor], loader: DataLoader) -> float:
    model = TinyNet()
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        return torch.cat([(model(x).argmax(-1) == y).float() for x, y in loader]).mean().item()


def test_gmixout_dropout_head_and_wiseft_together(tmp_path: Path) -> None:
    seed_everything(0)
    train, val = _data()
    model = TinyNet()
    module_types = [type(m) for m in model.modules()]
    recorder = Recorder()
    wise = WiSEFTCallback(alphas=[0.0, 0.5, 1.0])
    callbacks = [recorder, GMixoutCallback(p=0.9, seed=0), DropoutHeadCallback(p=0.5), wise]
    make_trainer(callbacks, max_epochs=2, root=tmp_path).fit(model, train, val)

    start, theta_1 = recorder.start, recorder.end
    assert not torch.equal(start["backbone.0.weight"], theta_1["backbone.0.weight"]), "the backbone trained"
    assert all(torch.equal(wise.theta_0[k], v) for k, v in start.items() if v.is_floating_point())
    expected = interpolate_state_dicts(start, theta_1, 0.5)
    final = model.state_dict()
    assert list(final) == list(start), "no parameters or buffers added"
    assert all(torch.equal(final[k], v) for k, v in expected.items())
    assert [type(m) for m in model.modules()] == module_types, "no module replaced"

    rows = json.loads((tmp_path / "wiseft.json").read_text())["rows"]
    for row, state in ((rows[0], start), (rows[-1], theta_1)):
        for name, loader in val.items():
            assert abs(row[name] - _accuracy(state, loader)) < 1e-6

    plain = TinyNet()
    plain.load_state_dict(torch.load(tmp_path / "wiseft_alpha0.50.ckpt", weights_only=True)["state_dict"])
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in final.items())
    # No dropout hook left on the head: in train mode the model computes what a plain copy of its weights computes.
    model.train()
    plain.train()
    x = torch.randn(64, 6)
    torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------------------
# Order must not matter: every combination in both orders
# ----------------------------------------------------------------------------------------------------------------------


def both_orders(first: type, second: type) -> pytest.MarkDecorator:
    """Parametrise ``order`` over ``[first, second]`` and ``[second, first]``, named after the order."""
    orders = [(first, second), (second, first)]
    return pytest.mark.parametrize("order", orders, ids=[f"{a.__name__}-first" for a, _ in orders])


class StopInsideAStep(Callback):
    """Stops fit after the first micro-batch of the second optimizer step, as a ``Timer(duration=...)`` may."""

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        if i == 2:
            trainer.should_stop = True


def _train_loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(48, 6, generator=generator)
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()), batch_size=8)


def _fit(callbacks: list[Callback], tmp_path: Path, epochs: int = 1, **kwargs: Any) -> TinyNet:
    seed_everything(0, verbose=False)
    model = TinyNet()
    make_trainer(callbacks, max_epochs=epochs, root=tmp_path, **kwargs).fit(model, _train_loader())
    return model


def _wiseft(tmp_path: Path) -> WiSEFTCallback:
    return WiSEFTCallback(alphas=[0.5], alpha=0.5, dirpath=str(tmp_path), save_model=False)


@pytest.mark.parametrize(
    "order",
    [
        pytest.param(
            (WiSEFTCallback, GMixoutCallback),
            id="WiSEFTCallback-first",
        ),
        pytest.param((GMixoutCallback, WiSEFTCallback), id="GMixoutCallback-first"),
    ],
)
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.filterwarnings("ignore:WiSEFTCallback. no validation sets")
@pytest.mark.filterwarnings("ignore:GMixoutCallback.sparse=True. resets the optimizer state")
def test_wiseft_interpolates_w_never_the_mixed_weights_whatever_its_place(
    order: tuple[type, type], sparse: bool, tmp_path: Path
) -> None:
    # Fit stops inside an optimizer step (accumulation of 2), while GMixout's parameters hold w~.
    stop = {"accumulate_grad_batches": 2}
    gmixout = lambda: GMixoutCallback(p=0.9, seed=0, sparse=sparse)  # noqa: E731
    learned = state_copy(_fit([gmixout(), StopInsideAStep()], tmp_path, **stop))
    start = state_copy(_fit([], tmp_path, epochs=0))
    assert not torch.equal(learned["backbone.0.weight"], start["backbone.0.weight"]), "one optimizer step was taken"

    made = {GMixoutCallback: gmixout, WiSEFTCallback: lambda: _wiseft(tmp_path)}
    model = _fit([*(made[cls]() for cls in order), StopInsideAStep()], tmp_path, **stop)
    assert_states_equal(state_copy(model), interpolate_state_dicts(start, learned, 0.5))


@pytest.mark.parametrize("other", [WiSEFTCallback, GMixoutCallback])
@pytest.mark.parametrize("lora_first", [True, False], ids=["LoRACallback-first", "LoRACallback-last"])
def test_lora_with_wiseft_or_gmixout_is_refused_in_either_order(other: type, lora_first: bool, tmp_path: Path) -> None:
    callbacks = [LoRACallback(r=2), other()]
    model = TinyNet()
    before = state_copy(model)
    with pytest.raises(
        RobustFTConfigError,
        match=rf"^LoRACallback and {other.__name__} cannot share a Trainer: .+ Use"
        if other is GMixoutCallback
        else rf"^LoRACallback and {other.__name__} cannot share .+run_wiseft",
    ):
        make_trainer(callbacks if lora_first else callbacks[::-1], max_epochs=1, root=tmp_path).fit(
            model, _train_loader()
        )
    assert_states_equal(state_copy(model), before)  # refused before the adapters were injected


def test_lora_with_the_weight_penalty_works_in_either_order_and_keeps_the_update_small(tmp_path: Path) -> None:
    finals, targets = [], []
    for lora_first in (True, False):
        penalty, lora = WeightPenaltyCallback(strength=1.0), LoRACallback(r=2, alpha=4)
        model = _fit([lora, penalty] if lora_first else [penalty, lora], tmp_path, epochs=3)
        finals.append(state_copy(model))
        targets.append(penalty.target_names)
    # The penalty acts on what trains: the LoRA factors (the base weights are frozen), whichever callback is first.
    assert targets == [["backbone.0.lora_A.default.weight", "backbone.0.lora_B.default.weight"]] * 2
    assert_states_equal(finals[0], finals[1])
    start = state_copy(_fit([], tmp_path, epochs=0))
    assert list(finals[0]) == list(start), "the plain model after fit: adapters merged"
    lora_alone = state_copy(_fit([LoRACallback(r=2, alpha=4)], tmp_path, epochs=3))
    update = {
        name: (state["backbone.0.weight"] - start["backbone.0.weight"]).norm()
        for name, state in (("penalised", finals[0]), ("plain", lora_alone))
    }
    assert 0 < update["penalised"] < 0.5 * update["plain"], update


@both_orders(WiSEFTCallback, LPFTCallback)
def test_wiseft_and_lp_ft_in_either_order_interpolate_the_lp_ft_weights(
    order: tuple[type, type], tmp_path: Path
) -> None:
    learned = state_copy(_fit([LPFTCallback(probe_epochs=1)], tmp_path, epochs=2))
    start = state_copy(_fit([], tmp_path, epochs=0))
    made = {LPFTCallback: lambda: LPFTCallback(probe_epochs=1), WiSEFTCallback: lambda: _wiseft(tmp_path)}
    with pytest.warns(UserWarning, match="no validation sets"):
        model = _fit([made[cls]() for cls in order], tmp_path, epochs=2)
    assert_states_equal(state_copy(model), interpolate_state_dicts(start, learned, 0.5))
    assert all(param.requires_grad for param in model.parameters()) and model.backbone[1].training
