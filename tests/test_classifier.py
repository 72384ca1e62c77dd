import logging

import lightning as L
import pytest
import torch
from conftest import TinyBackbone

from lightning_robustft import ImageClassifier, MultiDomainDataModule, RobustFTConfigError


def fit_tiny(folders, tmp_path, **model_kwargs):
    val = {"id": folders["id"], "ood_full": folders["ood_full"], "ood_subset": folders["ood_subset"]}
    dm = MultiDomainDataModule(folders["train"], val, batch_size=4, num_workers=0)
    model = ImageClassifier(TinyBackbone(), class_names=dm.class_names, lr=1e-2, **model_kwargs)
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, dm)
    return trainer, model


def test_plain_trainer_logs_named_sets_and_ood_average(image_folders, tmp_path):
    trainer, model = fit_tiny(image_folders, tmp_path, metrics=["acc", "macro_acc"])
    val_keys = {k for k in trainer.callback_metrics if k.startswith("val/")}
    expected = {f"val/{s}/{m}" for s in ("id", "ood_full", "ood_subset", "ood_avg") for m in ("acc", "macro_acc")}
    assert val_keys == expected
    assert not any("dataloader_idx" in k for k in trainer.callback_metrics)
    metrics = trainer.callback_metrics
    mean = (metrics["val/ood_full/acc"] + metrics["val/ood_subset/acc"]) / 2
    assert metrics["val/ood_avg/acc"] == pytest.approx(float(mean))
    # Names and subsets came from the data module; the subset set was scored on 2 classes.
    assert model.val_set_names == ["id", "ood_full", "ood_subset"]
    assert model.val_metrics["ood_subset"]["acc"].num_classes == 2


def test_validation_prints_a_table(image_folders, tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        fit_tiny(image_folders, tmp_path)
    text = caplog.text
    assert "val results (epoch 0" in text
    for row in ("id ", "ood_full", "ood_subset", "ood_avg"):
        assert row in text


def test_subset_set_is_scored_among_its_classes():
    model = ImageClassifier(TinyBackbone(), num_classes=3, val_sets=["r"], class_subsets={"r": [0, 2]})
    # Class 1 wins overall, but the set only covers 0 and 2: both predictions are right within the subset.
    logits = torch.tensor([[0.0, 9.0, 1.0], [1.0, 9.0, 0.0]])
    model.update_val_metrics("r", logits, torch.tensor([2, 0]))
    assert model.compute_val_metrics("r")["acc"] == pytest.approx(1.0)


def test_constructor_errors():
    with pytest.raises(RobustFTConfigError, match="unknown kind 'foo'"):
        ImageClassifier("foo:bar", num_classes=3)
    with pytest.raises(RobustFTConfigError, match="not a backbone spec"):
        ImageClassifier("resnet50", num_classes=3)
    with pytest.raises(RobustFTConfigError, match="needs a CLIP backbone"):
        ImageClassifier(TinyBackbone(), class_names=["a", "b"], head_init="zeroshot")
    with pytest.raises(RobustFTConfigError, match="disagrees"):
        ImageClassifier(TinyBackbone(), num_classes=3, class_names=["a", "b"])
    with pytest.raises(RobustFTConfigError, match="head_init"):
        ImageClassifier(TinyBackbone(), num_classes=3, head_init="zero")
    with pytest.raises(RobustFTConfigError, match=r"class_subsets\['r'\]"):
        ImageClassifier(TinyBackbone(), num_classes=3, class_subsets={"r": [0, 5]})
    with pytest.raises(RobustFTConfigError, match="feature_dim"):
        ImageClassifier(torch.nn.Flatten(), num_classes=3)


def test_unknown_open_clip_model_is_a_clear_error():
    with pytest.raises(RobustFTConfigError, match="open_clip has no model 'ViT-Nope'"):
        ImageClassifier("open_clip:ViT-Nope", num_classes=3)


@pytest.mark.parametrize(("spec", "width"), [("torchvision:resnet18:random", 512), ("timm:test_resnet:random", None)])
def test_torchvision_and_timm_backbones_give_features(spec, width):
    model = ImageClassifier(spec, num_classes=4)
    if width is not None:
        assert model.head.in_features == width
    assert model.eval_transform is not None
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 4)


def test_default_optimizer_and_warmup_cosine_schedule(image_folders, tmp_path):
    model = ImageClassifier(TinyBackbone(), num_classes=3, lr=0.1, weight_decay=0.05, warmup_steps=3)
    trainer = L.Trainer(max_steps=10, accelerator="cpu", logger=False, enable_checkpointing=False)
    model.trainer = trainer
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.05 and all(p.ndim >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.ndim < 2 for p in no_decay["params"])
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(0.1 / 4)
    assert lrs[:4] == sorted(lrs[:4]) and lrs[3] == pytest.approx(0.1)
    assert lrs[3:] == sorted(lrs[3:], reverse=True) and lrs[-1] < 0.01


@pytest.mark.parametrize("injected", [False, True])
def test_head_lr_scale_gives_the_head_its_own_rate_through_the_schedule(injected):
    optimizer = (lambda groups: torch.optim.SGD(groups, lr=0.2, weight_decay=0.05)) if injected else None
    model = ImageClassifier(
        TinyBackbone(), num_classes=3, lr=0.2, warmup_steps=0, head_lr_scale=10.0, optimizer=optimizer
    )
    model.trainer = L.Trainer(max_steps=10, accelerator="cpu", logger=False, enable_checkpointing=False)
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    head = {id(p) for p in model.head.parameters()}
    for group in optimizer.param_groups:
        in_head = {id(p) in head for p in group["params"]}
        assert len(in_head) == 1 and group.get("head", False) == in_head.pop()
        assert group["lr"] == pytest.approx(2.0 if group.get("head") else 0.2)
        assert group["weight_decay"] == (
            0.0 if group["params"][0].ndim < 2 else pytest.approx(0.05 if injected else 0.1)
        )
    assert sum(len(g["params"]) for g in optimizer.param_groups if g.get("head")) == 2  # weight and bias
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    rates = {bool(g.get("head")): g["lr"] for g in optimizer.param_groups}
    assert rates[True] == pytest.approx(10 * rates[False]) and rates[False] < 0.2  # the cosine scales both
    plain = ImageClassifier(TinyBackbone(), num_classes=3)
    plain.trainer = model.trainer
    assert len(plain.configure_optimizers()["optimizer"].param_groups) == 2  # as before: old checkpoints resume
    with pytest.raises(RobustFTConfigError, match="head_lr_scale"):
        ImageClassifier(TinyBackbone(), num_classes=3, head_lr_scale=0)


def test_checkpoint_round_trip_is_a_plain_model(tmp_path):
    model = ImageClassifier("timm:test_resnet:random", num_classes=3, val_sets=["id", "ood"])
    trainer = L.Trainer(accelerator="cpu", logger=False, max_epochs=0)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    keys = set(torch.load(tmp_path / "m.ckpt", weights_only=False)["state_dict"])
    assert keys == set(model.state_dict()) and all(k.startswith(("backbone.", "head.")) for k in keys)
    loaded = ImageClassifier.load_from_checkpoint(tmp_path / "m.ckpt")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.eval()(x), model.eval()(x))


def test_prompt_resolution():
    from lightning_robustft.models.prompts import resolve_prompt_names, resolve_templates

    assert resolve_prompt_names(None, ["aircraft_carrier", "cat"]) == ["aircraft carrier", "cat"]
    assert len(resolve_prompt_names("imagenet", None)) == 1000
    assert len(resolve_templates("openai_imagenet")) == 80
    with pytest.raises(RobustFTConfigError, match="one per class"):
        resolve_prompt_names(["a"], ["a", "b"])
    with pytest.raises(RobustFTConfigError, match="these have none"):
        resolve_templates(["a photo"])
    with pytest.raises(RobustFTConfigError, match="built-in template set"):
        resolve_templates("fancy")


class RecordLR(L.Callback):
    """The learning rate of every training batch, as the optimizer applies it."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def fit_for(folders, tmp_path, max_epochs, ckpt_path=None):
    """Fit (or resume) a tiny model for ``max_epochs`` epochs of 3 steps; 20 % warm-up, checkpoints in tmp_path."""
    dm = MultiDomainDataModule(folders["train"], {"id": folders["id"]}, batch_size=4, num_workers=0)
    model = ImageClassifier(TinyBackbone(), class_names=dm.class_names, lr=0.1, warmup_steps=0.2, print_table=False)
    recorder = RecordLR()
    trainer = L.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        logger=False,
        callbacks=[recorder, L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, dm, ckpt_path=ckpt_path)
    return trainer, recorder.lrs


@pytest.mark.parametrize("longer", [1, 2])
def test_resume_with_a_longer_schedule_follows_the_new_length(image_folders, tmp_path, longer):
    # 1 epoch = 3 steps: 20 % warm-up rounds to 0 steps; over 2 or 3 epochs it is 1 step. The checkpointed
    # schedule and the rebuilt one must still load into each other (it used to be `KeyError: '_schedulers'`).
    fit_for(image_folders, tmp_path, max_epochs=1)
    trainer, resumed = fit_for(image_folders, tmp_path, 1 + longer, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert trainer.global_step == 3 * (1 + longer)
    _, fresh = fit_for(image_folders, tmp_path / "fresh", 1 + longer)
    # The resumed steps use the longer run's schedule, from the checkpoint's step on, and decay toward zero.
    assert resumed == pytest.approx(fresh[3:])
    assert resumed == sorted(resumed, reverse=True) and resumed[0] > 0.01


def test_schedule_stays_at_zero_past_its_end_and_checkpoints_only_the_step():
    from lightning_robustft.models.schedules import WarmupCosineLR

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = WarmupCosineLR(optimizer, warmup_steps=0, total_steps=4)
    lrs = []
    for _ in range(7):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(1.0) and lrs[4:] == pytest.approx([0.0, 0.0, 0.0])
    state = scheduler.state_dict()
    assert state["last_epoch"] == 7 and state["lr_lambdas"] == [None]
    # The same keys whatever the warm-up, so a checkpoint of one length loads into a schedule of another.
    other = WarmupCosineLR(optimizer, warmup_steps=3, total_steps=40)
    assert set(other.state_dict()) == set(state)
    other.load_state_dict(state)
    assert other.last_epoch == 7


def test_timm_weights_unreachable_names_the_model_and_the_random_spec(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(RobustFTConfigError, match=r"pretrained weights of 'timm:resnet18'.*'timm:resnet18:random'"):
        ImageClassifier("timm:resnet18", num_classes=3)


def test_torchvision_download_failure_names_the_model_and_the_random_spec(monkeypatch):
    from urllib.error import URLError

    def no_network(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", no_network)
    with pytest.raises(RobustFTConfigError, match=r"'torchvision:resnet18'.*URLError.*'torchvision:resnet18:random'"):
        ImageClassifier("torchvision:resnet18", num_classes=3)


def test_open_clip_unknown_tag_lists_the_valid_tags():
    with pytest.raises(RobustFTConfigError, match=r"no pretrained tag 'nosuch'.*Valid tags: \['openai', "):
        ImageClassifier("open_clip:ViT-B-32:nosuch", num_classes=3)
