"""The baselines under DDP (2 CPU processes, gloo): each rank sees other batches, yet the replicas stay identical.

The weight penalty is added after the gradients are all-reduced, the distillation teacher is the same frozen copy on
every rank, the LoRA adapters are injected on every rank before DDP wraps the module, and LP-FT switches the
backbone on at the same epoch everywhere. A mistake in any of these makes the ranks' weights differ.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _helpers import TinyBackbone, make_image_loader, make_trainer, state_copy
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.multiprocessing import ProcessRaisedException

from lightning_robustft import ImageClassifier, LoRACallback, LPFTCallback, WeightPenaltyCallback


class SaveRankState(Callback):
    """Writes each rank's final weights (after every callback's ``on_train_end``, e.g. the LoRA merge)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        torch.save(state_copy(pl_module), Path(self.directory) / f"rank{trainer.global_rank}.pt")


def make_model(**kwargs: object) -> ImageClassifier:
    torch.manual_seed(0)
    return ImageClassifier(TinyBackbone(), num_classes=3, lr=0.05, warmup_steps=1, print_table=False, **kwargs)


def fit_on_two_ranks(tmp_path: Path, model: ImageClassifier, callbacks: list[Callback], strategy: str) -> list[dict]:
    callbacks = [*callbacks, SaveRankState(str(tmp_path))]
    trainer = make_trainer(callbacks, max_epochs=2, root=tmp_path, devices=2, strategy=strategy)
    trainer.fit(model, make_image_loader(32))
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]


def assert_identical_and_trained(ranks: list[dict], initial: dict) -> None:
    rank0, rank1 = ranks
    assert list(rank0) == list(initial)  # the plain model's keys: no teacher, no LoRA factors
    for name, value in rank0.items():
        assert torch.equal(value, rank1[name]), name
    assert any(not torch.equal(rank0[name], initial[name]) for name in initial if name.startswith("backbone."))


@pytest.mark.ddp
def test_weight_penalty_and_distillation_keep_replicas_identical(tmp_path: Path) -> None:
    model = make_model(distill="logits", distill_weight=1.0, distill_temperature=2.0)
    initial = state_copy(model)
    ranks = fit_on_two_ranks(tmp_path, model, [WeightPenaltyCallback(strength=0.5, norm="l2")], "ddp_spawn")
    assert_identical_and_trained(ranks, initial)


@pytest.mark.ddp
def test_lora_and_lp_ft_keep_replicas_identical(tmp_path: Path) -> None:
    model = make_model()
    initial = state_copy(model)
    callbacks = [LPFTCallback(probe_epochs=1), LoRACallback(r=2, alpha=4)]
    ranks = fit_on_two_ranks(tmp_path, model, callbacks, "ddp_spawn_find_unused_parameters_true")
    assert_identical_and_trained(ranks, initial)


@pytest.mark.ddp
def test_lp_ft_under_ddp_without_find_unused_parameters_is_refused_when_fit_starts(tmp_path: Path) -> None:
    # The check reads the DistributedDataParallel wrapper Lightning built, in each spawned rank.
    model = make_model()
    with pytest.raises(ProcessRaisedException, match=r"LPFTCallback with DDP needs `find_unused_parameters=True`"):
        fit_on_two_ranks(tmp_path, model, [LPFTCallback(probe_epochs=1)], "ddp_spawn")
