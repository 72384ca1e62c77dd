"""DropoutHeadCallback: the rate at the head input, 1/(1-p) scaling, eval untouched, hook removal, errors."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from _helpers import make_trainer
from lightning.pytorch import LightningModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_robustft.callbacks.dropout_head import DropoutHeadCallback
from lightning_robustft.errors import RobustFTConfigError, RobustFTConfigTypeError

WIDTH = 512


class RecordingHead(nn.Linear):
    """A linear head that keeps what it received, so the test sees the features after the pre-hook."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().clone())
        return super().forward(x)

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.inputs: list[torch.Tensor] = []


class OnesFeatures(LightningModule):
    """Features are all ones, so every dropped entry is 0 and every survivor is exactly 1/(1-p)."""

    def __init__(self, fail_at_step: int | None = None) -> None:
        super().__init__()
        self.backbone = nn.Linear(4, WIDTH)
        self.head = RecordingHead(WIDTH, 2)
        self.fail_at_step = fail_at_step
        self.train_inputs: list[torch.Tensor] = []
        self.val_inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.ones(x.shape[0], WIDTH) + 0 * self.backbone(x)
        return self.head(features)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.fail_at_step is not None and self.global_step == self.fail_at_step:
            raise RuntimeError("boom")
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.train_inputs.append(self.head.inputs.pop())
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self(batch[0])
        self.val_inputs.append(self.head.inputs.pop())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _loader(n: int = 64) -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(n, 4), torch.randint(0, 2, (n,))), batch_size=32)


@pytest.mark.parametrize("p", [0.9, 0.5])
def test_training_drops_at_rate_p_and_scales_survivors(p: float) -> None:
    torch.manual_seed(0)
    model = OnesFeatures()
    make_trainer([DropoutHeadCallback(p=p)], max_steps=4).fit(model, _loader(), _loader())
    seen = torch.cat(model.train_inputs)
    dropped = (seen == 0).float().mean().item()
    # 4 steps x 32 x 512 = 65536 Bernoulli draws: the standard error of the rate is below 0.002.
    assert dropped == pytest.approx(p, abs=0.01)
    survivors = seen[seen != 0]
    torch.testing.assert_close(survivors, torch.full_like(survivors, 1 / (1 - p)))


def test_validation_and_the_final_model_are_untouched() -> None:
    model = OnesFeatures()
    make_trainer([DropoutHeadCallback(p=0.9)], max_steps=4, num_sanity_val_steps=1).fit(model, _loader(), _loader())
    assert len(model.val_inputs) == 1 + 2 * 2, "the sanity check and both epochs' validation ran"
    assert all(torch.equal(x, torch.ones_like(x)) for x in model.val_inputs)
    model.train()
    model(torch.randn(8, 4))
    assert torch.equal(model.head.inputs[-1], torch.ones(8, WIDTH)), "no dropout left after fit, even in train mode"


def _drops_in_train_mode(model: OnesFeatures) -> bool:
    """Whether the head's input is still dropped: a forward in train mode, outside any fit."""
    model.train()
    model(torch.randn(8, 4))
    return not torch.equal(model.head.inputs.pop(), torch.ones(8, WIDTH))


def test_no_dropout_left_after_fit_and_after_a_failed_fit() -> None:
    model = OnesFeatures()
    make_trainer([DropoutHeadCallback(p=0.9)], max_steps=2).fit(model, _loader())
    assert model.train_inputs and not _drops_in_train_mode(model)
    failing = OnesFeatures(fail_at_step=1)
    with pytest.raises(RuntimeError, match="boom"):
        make_trainer([DropoutHeadCallback(p=0.9)], max_steps=3).fit(failing, _loader())
    assert (failing.train_inputs[0] == 0).any(), "dropout was on while training"
    assert not _drops_in_train_mode(failing)


def test_p_zero_is_the_identity_in_training() -> None:
    model = OnesFeatures()
    make_trainer([DropoutHeadCallback(p=0.0)], max_steps=2).fit(model, _loader())
    assert all(torch.equal(x, torch.ones_like(x)) for x in model.train_inputs)


def test_dotted_head_path() -> None:
    class Nested(OnesFeatures):
        def __init__(self) -> None:
            super().__init__()
            self.model = nn.Module()
            self.model.fc = self.head

    model = Nested()
    make_trainer([DropoutHeadCallback(p=0.9, head="model.fc")], max_steps=2).fit(model, _loader())
    assert (torch.cat(model.train_inputs) == 0).float().mean().item() == pytest.approx(0.9, abs=0.02)


def test_missing_head_lists_the_submodules() -> None:
    with pytest.raises(RobustFTConfigError, match=r"`head`='classifier'.*\['backbone', 'head'\]"):
        make_trainer([DropoutHeadCallback(p=0.9, head="classifier")], max_steps=4).fit(OnesFeatures(), _loader())


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5, float("nan")])
def test_p_outside_unit_interval_is_an_error(p: object) -> None:
    with pytest.raises(RobustFTConfigError, match=r"`p`=.* must be a number in \[0, 1\) \(the dropout rate"):
        DropoutHeadCallback(p=p)  # type: ignore[arg-type]


@pytest.mark.parametrize(("head", "error"), [("", RobustFTConfigError), (3, RobustFTConfigTypeError)])
def test_head_must_be_a_dotted_name(head: object, error: type) -> None:
    with pytest.raises(error, match=rf"`head`={head!r} must be the dotted name of a submodule"):
        DropoutHeadCallback(head=head)  # type: ignore[arg-type]


def test_state_dict_round_trip_keeps_the_constructor_values() -> None:
    saved = DropoutHeadCallback(p=0.8).state_dict()
    assert saved == {"p": 0.8, "head": "head"}
    resumed = DropoutHeadCallback(p=0.9)
    with pytest.warns(UserWarning, match=r"trained with \{'p': 0.8, 'head': 'head'\}; resuming with \{'p': 0.9"):
        resumed.load_state_dict(saved)
    assert resumed.p == 0.9
