"""LPFTCallback: a linear probe that leaves the backbone bitwise fixed, then fine-tuning from the probe; resume."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from _helpers import Recorder, TinyBackbone, make_image_loader, make_trainer, state_copy
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightning_robustft import ImageClassifier
from lightning_robustft.callbacks.lp_ft import LPFTCallback
from lightning_robustft.errors import RobustFTConfigError


def bn_backbone() -> nn.Module:
    """A conv + BatchNorm encoder, so the probe must also keep running statistics fixed."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 8)
    )


def make_model(seed: int = 0, backbone: Any = bn_backbone, **kwargs: Any) -> ImageClassifier:
    torch.manual_seed(seed)
    kwargs = {"lr": 0.01, "warmup_steps": 3, **kwargs}
    return ImageClassifier(backbone(), num_classes=3, feature_dim=8, print_table=False, **kwargs)


def equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def stage(trainer: Trainer, pl_module: LightningModule) -> SimpleNamespace:
    """Backbone and head weights, whether the backbone trains (gradients, BatchNorm mode), and the optimizer's size."""
    return SimpleNamespace(
        backbone=state_copy(pl_module.backbone),
        head=state_copy(pl_module.head),
        grad=any(param.requires_grad for param in pl_module.backbone.parameters()),
        bn_training=pl_module.backbone[1].training,
        optimized=sum(len(group["params"]) for group in trainer.optimizers[0].param_groups),
    )


def test_probe_keeps_the_backbone_fixed_then_fine_tuning_starts_from_the_probe(tmp_path: Path) -> None:
    model = make_model()
    initial_backbone, initial_head = state_copy(model.backbone), state_copy(model.head)
    recorder = Recorder(stage)  # listed after LPFTCallback: sees each epoch's stage applied
    # warmup_steps=3 with 2 steps per epoch: the warm-up runs across the stage boundary (BackboneFinetuning breaks).
    make_trainer([LPFTCallback(probe_epochs=2), recorder], max_epochs=3, root=tmp_path).fit(model, make_image_loader())

    assert recorder.start.optimized == len(list(model.parameters()))  # everything was in the optimizer from the start
    assert [(seen.grad, seen.bn_training) for seen in recorder.epoch_starts] == [
        (False, False),
        (False, False),
        (True, True),
    ]
    for epoch in (0, 1):  # probe: the backbone (BatchNorm statistics included) is bitwise unchanged; the head trains
        assert equal(recorder.epoch_ends[epoch].backbone, initial_backbone)
    assert not equal(recorder.epoch_ends[0].head, initial_head)
    assert not equal(recorder.epoch_ends[1].head, recorder.epoch_ends[0].head)
    # Fine-tuning starts from the probe: the initial backbone and the probed head ...
    assert equal(recorder.epoch_starts[2].backbone, initial_backbone)
    assert equal(recorder.epoch_starts[2].head, recorder.epoch_ends[1].head)
    # ... and then the backbone moves, running statistics included.
    final = state_copy(model.backbone)
    assert not torch.equal(final["0.weight"], initial_backbone["0.weight"])
    assert not torch.equal(final["1.running_mean"], initial_backbone["1.running_mean"])
    assert all(param.requires_grad for param in model.parameters()) and model.backbone[1].training


@pytest.mark.parametrize(
    "optimizer",
    [
        lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.5),
        lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.5),
    ],
    ids=["adamw", "sgd"],
)
def test_optimizers_skip_the_probed_module_weight_decay_included(tmp_path: Path, optimizer: Any) -> None:
    model = make_model(optimizer=optimizer)
    initial = state_copy(model.backbone)
    recorder = Recorder(stage)
    with pytest.warns(UserWarning, match="probe_epochs`=1 >= max_epochs=1"):
        trainer = make_trainer([LPFTCallback(), recorder], max_epochs=1, root=tmp_path)
        trainer.fit(model, make_image_loader())
    assert equal(recorder.epoch_ends[0].backbone, initial)
    assert not equal(recorder.epoch_ends[0].head, recorder.epoch_starts[0].head)
    state = trainer.optimizers[0].state
    assert all(param not in state for param in model.backbone.parameters())  # no moments, no momentum buffers
    assert all(param in state for param in model.head.parameters())
    assert all(param.requires_grad for param in model.backbone.parameters())  # given back at the end of fit


def constant_sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1)


def constant_lr(optimizer: torch.optim.Optimizer) -> Any:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def test_equals_a_hand_made_two_phase_run(tmp_path: Path) -> None:
    options = {"backbone": TinyBackbone, "optimizer": constant_sgd, "lr_scheduler": constant_lr}
    lp_ft = make_model(**options)
    make_trainer([LPFTCallback(probe_epochs=1)], max_epochs=2, root=tmp_path).fit(lp_ft, make_image_loader())

    probe = make_model(freeze_backbone=True, **options)
    make_trainer([], max_epochs=1, root=tmp_path).fit(probe, make_image_loader())
    fine_tune = make_model(seed=5, **options)
    fine_tune.load_state_dict(probe.state_dict())
    make_trainer([], max_epochs=1, root=tmp_path).fit(fine_tune, make_image_loader())
    assert equal(state_copy(lp_ft), state_copy(fine_tune))


@pytest.mark.parametrize("resume_epoch", [0, 1], ids=["inside-probe", "at-boundary"])
def test_resume_across_the_stage_boundary_equals_the_straight_run(tmp_path: Path, resume_epoch: int) -> None:
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    straight = make_model()
    make_trainer([LPFTCallback(probe_epochs=2), saver], max_epochs=4, root=tmp_path, enable_checkpointing=True).fit(
        straight, make_image_loader()
    )
    resumed = make_model(seed=9)
    checkpoint = tmp_path / "ckpt" / f"epoch={resume_epoch}.ckpt"
    make_trainer([LPFTCallback(probe_epochs=2)], max_epochs=4, root=tmp_path).fit(
        resumed, make_image_loader(), ckpt_path=checkpoint
    )
    assert equal(state_copy(resumed), state_copy(straight))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"probe_epochs": 0}, r"`probe_epochs`=0 must be an integer >= 1"),
        ({"probe_epochs": True}, r"`probe_epochs`=True must be an integer >= 1 .*not bool"),
        ({"probe_epochs": 1.5}, r"`probe_epochs`=1.5 must be an integer >= 1 .*not float"),
        ({"backbone": ""}, r"`backbone`='' must be the dotted name of a submodule"),
    ],
)
def test_constructor_errors(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(RobustFTConfigError, match=match):
        LPFTCallback(**kwargs)


def test_the_deprecated_module_argument_still_names_the_backbone() -> None:
    with pytest.deprecated_call(match=r"`module` is deprecated.*`backbone`='encoder'"):
        callback = LPFTCallback(module="encoder")
    assert callback.backbone == "encoder"
    with pytest.raises(RobustFTConfigError, match=r"`backbone`='net' and its deprecated name `module`='encoder'"):
        LPFTCallback(backbone="net", module="encoder")


def _setup(callback: LPFTCallback, strategy: Any, max_epochs: int = 3) -> None:
    callback.setup(SimpleNamespace(strategy=strategy, max_epochs=max_epochs), make_model(), "fit")  # type: ignore[arg-type]


def test_setup_errors_and_warnings() -> None:
    with pytest.raises(RobustFTConfigError, match=r"`backbone`='encoder' is not a submodule.*'backbone', 'head'"):
        _setup(LPFTCallback(backbone="encoder"), None)
    with pytest.raises(RobustFTConfigError, match="does not support strategy FSDPStrategy"):
        _setup(LPFTCallback(), FSDPStrategy())
    with pytest.warns(UserWarning, match=r"`probe_epochs`=3 >= max_epochs=2"):
        _setup(LPFTCallback(probe_epochs=3), None, max_epochs=2)
    callback = LPFTCallback()
    with pytest.warns(UserWarning, match="no trainable parameter"):
        callback.setup(SimpleNamespace(strategy=None, max_epochs=3), make_model(freeze_backbone=True), "fit")  # type: ignore[arg-type]


def test_state_dict_is_the_configuration() -> None:
    assert LPFTCallback(probe_epochs=2).state_dict() == {"probe_epochs": 2, "backbone": "backbone"}
    with pytest.warns(UserWarning, match=r"trained with \{'probe_epochs': 2, 'backbone': 'backbone'\}; resuming with"):
        LPFTCallback(probe_epochs=3).load_state_dict({"probe_epochs": 2, "backbone": "backbone"})


@pytest.mark.parametrize("find_unused", [False, True])
def test_ddp_must_find_unused_parameters_checked_on_the_wrapped_model(find_unused: bool) -> None:
    # The strategy's own wrapper, as Lightning builds it before `on_fit_start`; its public flag is what is read.
    wrapped = DistributedDataParallel.__new__(DistributedDataParallel)
    wrapped.find_unused_parameters = find_unused
    trainer = SimpleNamespace(strategy=SimpleNamespace(model=wrapped))
    if find_unused:
        LPFTCallback().on_fit_start(trainer, make_model())  # type: ignore[arg-type]
        return
    with pytest.raises(RobustFTConfigError, match=r"needs `find_unused_parameters=True`.*_unused_parameters_true"):
        LPFTCallback().on_fit_start(trainer, make_model())  # type: ignore[arg-type]
