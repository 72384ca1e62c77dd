"""Sparse GMixout under DDP (2 CPU processes, gloo): identical replicas, and only the packed gradients all-reduced."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from _gmixout_helpers import make_loader, make_model, make_trainer, params_of
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from lightning_robustft.callbacks.gmixout import GMixoutCallback

TARGETS = ["backbone.0.weight", "backbone.3.weight"]

#: Bytes the comm hook all-reduced since the last optimizer step, in this process.
_REDUCED = [0]


def counting_allreduce(state, bucket):
    """DDP's default all-reduce, counting the bytes of every bucket it reduces.

    Unannotated: DDP checks a hook's annotations against ``dist.GradBucket``, and this module's postponed annotations
    would be strings.
    """
    _REDUCED[0] += bucket.buffer().numel() * bucket.buffer().element_size()
    return allreduce_hook(state, bucket)


class RankDependentSeed(Callback):
    """Seeds each rank differently before GMixout's setup, so a seed that is not broadcast would differ by rank."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        torch.manual_seed(1000 + trainer.global_rank)


class SaveRank(Callback):
    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.reduced: list[int] = []
        self.trainable = 0

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Lightning registers `ddp_comm_hook` on CUDA only; the DDP wrapper exists by now.
        trainer.strategy.model.register_comm_hook(None, counting_allreduce)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.trainable = sum(p.numel() * p.element_size() for p in pl_module.parameters() if p.requires_grad)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        self.reduced.append(_REDUCED[0])
        _REDUCED[0] = 0

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        gmixout = next(cb for cb in trainer.callbacks if isinstance(cb, GMixoutCallback))
        state = {
            "params": params_of(pl_module),
            "seed": gmixout.seed,
            "step": gmixout.step,
            "reduced": self.reduced,
            "trainable": self.trainable,
            "indices": [t.indices.clone() for t in gmixout.sparse_mixout.targets],
        }
        torch.save(state, Path(self.directory) / f"rank{trainer.global_rank}.pt")


@pytest.mark.ddp
def test_ddp_replicas_identical_and_only_packed_gradients_reduced(tmp_path: Path) -> None:
    p = 0.7
    callbacks = [
        RankDependentSeed(),
        GMixoutCallback(p=p, resample_every=2, anchor_decay=0.5, targets=TARGETS, sparse=True),
        SaveRank(str(tmp_path)),
    ]
    trainer = make_trainer(callbacks, max_steps=4, strategy="ddp_spawn", devices=2)
    trainer.fit(make_model(), make_loader(8))
    rank0, rank1 = (torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in (0, 1))
    assert rank0["seed"] == rank1["seed"] and rank0["step"] == rank1["step"] == 4
    for got, want in zip(rank0["indices"], rank1["indices"], strict=True):
        assert torch.equal(got, want)
    initial = params_of(make_model())
    assert list(rank0["params"]) == list(initial)
    for name, value in rank0["params"].items():
        assert torch.equal(value, rank1["params"][name]), name
        assert not torch.equal(value, initial[name]), name

    full = sum(value.numel() * 4 for value in initial.values())
    targets = sum(initial[name].numel() for name in TARGETS)
    packed = sum(round((1 - p) * initial[name].numel()) for name in TARGETS)
    expected = full - 4 * targets + 4 * packed  # every trainable non-target tensor, and the packed free entries
    assert rank0["trainable"] == expected
    assert rank0["reduced"] == rank1["reduced"] == [expected] * 4
