"""GMixoutCallback under DDP (2 CPU processes, gloo): one mask seed for all ranks, so the replicas stay identical."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from _gmixout_helpers import make_loader, make_model
from _helpers import make_trainer, params_of
from lightning.pytorch import Callback, LightningModule, Trainer

from lightning_robustft.callbacks.gmixout import GMixoutCallback


class RankDependentSeed(Callback):
    """Seeds each rank differently before GMixout's setup, so a seed that is not broadcast would differ by rank."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        torch.manual_seed(1000 + trainer.global_rank)


class SaveRankParams(Callback):
    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        gmixout = next(cb for cb in trainer.callbacks if isinstance(cb, GMixoutCallback))
        state: dict[str, Any] = {"params": params_of(pl_module), "seed": gmixout.seed, "step": gmixout.step}
        torch.save(state, Path(self.directory) / f"rank{trainer.global_rank}.pt")


@pytest.mark.ddp
def test_ddp_replicas_stay_identical(tmp_path: Path) -> None:
    callbacks = [
        RankDependentSeed(),
        GMixoutCallback(p=0.7, resample_every=2, anchor_decay=0.5, targets=["backbone.*.weight"]),
        SaveRankParams(str(tmp_path)),
    ]
    trainer = make_trainer(callbacks, max_steps=4, strategy="ddp_spawn", devices=2)
    trainer.fit(make_model(), make_loader(8))
    rank0, rank1 = (torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in (0, 1))
    assert rank0["seed"] == rank1["seed"] and rank0["step"] == rank1["step"] == 4
    initial = params_of(make_model())
    for name, value in rank0["params"].items():
        assert torch.equal(value, rank1["params"][name]), name
        assert not torch.equal(value, initial[name]), name
