"""GMixoutCallback checkpoints: a run resumed from a checkpoint is bitwise the run that never stopped (CPU)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L
import pytest
import torch
from _gmixout_helpers import make_loader, make_model
from _helpers import Recorder, assert_states_equal, make_trainer, params_of
from lightning.pytorch import Callback, LightningModule, Trainer

from lightning_robustft.callbacks.gmixout import ANCHORS_CHECKPOINT_KEY, GMixoutCallback
from lightning_robustft.errors import RobustFTConfigError

TARGETS = ["backbone.0.weight", "backbone.3.weight"]


def _callback(resample_every: int, targets: list[str] = TARGETS) -> GMixoutCallback:
    return GMixoutCallback(p=0.7, resample_every=resample_every, anchor_decay=0.5, targets=targets)


def _run(
    callback: GMixoutCallback,
    steps: int,
    global_seed: int,
    ckpt_path: Path | None = None,
    extra: Sequence[Callback] = (),
) -> torch.nn.Module:
    model = make_model()
    L.seed_everything(global_seed, verbose=False)  # after make_model, which seeds its own initialisation
    # One full batch per epoch, so that every checkpoint is at an epoch boundary and the data resume exactly.
    make_trainer([callback, *extra], max_steps=steps).fit(model, make_loader(1), ckpt_path=ckpt_path)
    return model


@pytest.mark.parametrize("resample_every", [2, 3], ids=["mid-period", "period-boundary"])
def test_resumed_run_is_bitwise_the_straight_run(tmp_path: Path, resample_every: int) -> None:
    straight_cb = _callback(resample_every)
    straight = _run(straight_cb, 7, global_seed=0)

    first_cb = _callback(resample_every)
    first = _run(first_cb, 3, global_seed=0)
    first.trainer.save_checkpoint(tmp_path / "step3.ckpt")
    checkpoint = torch.load(tmp_path / "step3.ckpt", weights_only=False)
    assert list(checkpoint[ANCHORS_CHECKPOINT_KEY]) == TARGETS

    # A different global seed: the checkpoint's mask seed, counters and anchors must win over what setup derives.
    resumed_cb = _callback(resample_every)
    resumed = _run(resumed_cb, 7, global_seed=123, ckpt_path=tmp_path / "step3.ckpt")

    assert resumed_cb.seed == first_cb.seed == straight_cb.seed
    assert resumed_cb.step == straight_cb.step == 7
    assert_states_equal(params_of(resumed), params_of(straight))
    for got, want in zip(resumed_cb.passes.anchors, straight_cb.passes.anchors, strict=True):
        assert torch.equal(got, want)
    assert not torch.equal(straight_cb.passes.anchors[0], params_of(make_model())[TARGETS[0]])


def test_resuming_with_other_targets_is_refused(tmp_path: Path) -> None:
    first = _run(_callback(1), 2, global_seed=0)
    first.trainer.save_checkpoint(tmp_path / "step2.ckpt")
    with pytest.raises(RobustFTConfigError, match=r"anchors do not match the current targets.*unexpected \['backbone"):
        _run(_callback(1, targets=TARGETS[:1]), 3, global_seed=0, ckpt_path=tmp_path / "step2.ckpt")


def test_resuming_with_other_levers_warns(tmp_path: Path) -> None:
    first = _run(_callback(2), 2, global_seed=0)
    first.trainer.save_checkpoint(tmp_path / "step2.ckpt")
    with pytest.warns(UserWarning, match=r"trained with \{'p': 0.7, 'resample_every': 2, 'anchor_decay': 0.5\}"):
        _run(_callback(3), 3, global_seed=0, ckpt_path=tmp_path / "step2.ckpt")


def gmixout_anchors(trainer: Trainer, pl_module: LightningModule) -> list[torch.Tensor]:
    """A ``Recorder`` probe: copies of GMixout's anchors."""
    gmixout = next(cb for cb in trainer.callbacks if isinstance(cb, GMixoutCallback))
    return [anchor.clone() for anchor in gmixout.passes.anchors]


def test_resuming_from_a_plain_checkpoint_anchors_at_its_weights(tmp_path: Path) -> None:
    plain = make_model()
    make_trainer([], max_steps=2).fit(plain, make_loader(1))
    plain.trainer.save_checkpoint(tmp_path / "plain.ckpt")
    callback, recorder = _callback(1), Recorder(gmixout_anchors)
    with pytest.warns(UserWarning, match="no 'gmixout_anchors'.*checkpoint's weights"):
        _run(callback, 3, global_seed=0, ckpt_path=tmp_path / "plain.ckpt", extra=[recorder])
    assert callback.step == 1
    for name, anchor in zip(TARGETS, recorder.start, strict=True):
        assert torch.equal(anchor, params_of(plain)[name])
