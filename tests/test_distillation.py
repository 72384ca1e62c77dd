import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from _helpers import Recorder, TinyBackbone, make_image_loader, make_trainer, state_copy
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_robustft import ImageClassifier, RobustFTConfigError
from lightning_robustft.callbacks import DropoutHeadCallback
from lightning_robustft.models.distillation import (
    TEACHER_CHECKPOINT_KEY,
    feature_distillation_loss,
    logit_distillation_loss,
)


def make_model(seed: int = 0, **kwargs) -> ImageClassifier:
    torch.manual_seed(seed)
    kwargs = {"lr": 1e-2, "warmup_steps": 0, "print_table": False, **kwargs}
    return ImageClassifier(TinyBackbone(), num_classes=3, **kwargs)


def fit(model: ImageClassifier, tmp_path, max_epochs: int = 1, callbacks=(), ckpt_path=None) -> L.Trainer:
    checkpointing = any(isinstance(cb, ModelCheckpoint) for cb in callbacks)
    trainer = make_trainer(callbacks, max_epochs=max_epochs, root=tmp_path, enable_checkpointing=checkpointing)
    trainer.fit(model, train_dataloaders=make_image_loader(batch_size=4), ckpt_path=ckpt_path)
    return trainer


def test_logit_distillation_matches_the_formula():
    student = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    teacher = torch.tensor([[3.0, 2.0, 1.0], [1.0, 0.0, -1.0]])
    temperature = 2.0
    expected = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist(), strict=True):
        zs = sum(math.exp(v / temperature) for v in s_row)
        zt = sum(math.exp(v / temperature) for v in t_row)
        ps = [math.exp(v / temperature) / zs for v in s_row]
        pt = [math.exp(v / temperature) / zt for v in t_row]
        expected += sum(p * math.log(p / q) for p, q in zip(pt, ps, strict=True))
    expected = temperature**2 * expected / 2
    assert logit_distillation_loss(student, teacher, temperature).item() == pytest.approx(expected, rel=1e-6)
    assert logit_distillation_loss(teacher, teacher, 3.0).item() == pytest.approx(0.0, abs=1e-7)


def test_feature_distillation_matches_the_formula():
    student = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    teacher = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    # (1 + 4 + 9 + 16) / 2: squared distances summed over features, averaged over the batch.
    assert feature_distillation_loss(student, teacher).item() == pytest.approx(15.0)


@pytest.mark.parametrize("mode", ["logits", "features"])
def test_first_step_loss_and_gradient_are_zero(mode):
    model = make_model(distill=mode, distill_temperature=2.0)
    model.on_fit_start()  # the snapshot fit takes: student == teacher
    x = torch.randn(4, 3, 16, 16)
    features = model.features(x)
    loss = model.distillation_loss(x, features, model.head(features))
    assert loss.item() == 0.0
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [g for g in torch.autograd.grad(loss, params, allow_unused=True) if g is not None]  # features: no head
    assert grads
    # Analytically zero; the KL gradient goes through softmax(s) - softmax(t), zero up to float rounding.
    assert max(grad.abs().max().item() for grad in grads) < (1e-7 if mode == "logits" else 1e-30)


def teacher_probe(trainer, pl_module) -> SimpleNamespace:
    """The teacher and student weights, what fit must keep true of the teacher, and the logged distillation loss."""
    teacher = pl_module.teacher
    return SimpleNamespace(
        teacher=state_copy(teacher),
        student=state_copy(pl_module),
        loss=trainer.callback_metrics.get("train/distill_loss"),
        teacher_training=any(m.training for m in teacher.modules()),
        teacher_requires_grad=any(p.requires_grad for p in teacher.parameters()),
        # Private read: a hook copied from the student's head acts only in train mode, so the eval-mode teacher cannot
        # show it through its outputs.
        teacher_hooks=sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in teacher.modules()),
        shared={p.data_ptr() for p in teacher.parameters()} & {p.data_ptr() for p in pl_module.parameters()},
    )


@pytest.mark.parametrize("mode", ["logits", "features"])
def test_teacher_is_frozen_outside_the_state_dict_and_released(mode, tmp_path):
    recorder = Recorder(teacher_probe)
    model = make_model(distill=mode)
    initial = state_copy(model)
    # DropoutHeadCallback hooks the student's head: the teacher copy must not inherit the hook.
    fit(model, tmp_path, callbacks=[recorder, DropoutHeadCallback(p=0.5)])
    start, end = recorder.start, recorder.end
    assert end.loss is not None, "the distillation loss was logged"
    assert set(start.teacher) == set(initial)
    for name, tensor in start.teacher.items():
        assert torch.equal(tensor, end.teacher[name]) and torch.equal(tensor, initial[name])
    assert any(not torch.equal(start.student[k], end.student[k]) for k in start.student)
    for seen in (start, end):
        assert not seen.teacher_training and not seen.teacher_requires_grad
        assert seen.teacher_hooks == 0 and not seen.shared
    # The model left after fit is the plain one: same keys as without distillation, no teacher kept.
    assert set(model.state_dict()) == set(make_model().state_dict())
    assert all(k.startswith(("backbone.", "head.")) for k in model.state_dict())
    assert model.teacher is None


def test_first_logged_distillation_loss_is_zero(tmp_path):
    recorder = Recorder(teacher_probe)
    fit(make_model(distill="logits", distill_temperature=4.0), tmp_path, callbacks=[recorder])
    losses = [float(seen.loss) for seen in recorder.after_step]
    assert len(losses) == 4 and losses[0] == 0.0
    assert losses[-1] > 0.0, "the student moved away from the teacher, so the later losses are not zero"


def test_checkpoint_holds_the_teacher_beside_a_plain_state_dict(tmp_path):
    model = make_model(distill="features")
    initial = state_copy(model)
    checkpoint_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last")
    fit(model, tmp_path, callbacks=[checkpoint_cb])
    checkpoint = torch.load(checkpoint_cb.best_model_path, weights_only=False)
    assert set(checkpoint["state_dict"]) == set(initial)
    assert set(checkpoint[TEACHER_CHECKPOINT_KEY]) == set(initial)
    for name, tensor in checkpoint[TEACHER_CHECKPOINT_KEY].items():
        assert torch.equal(tensor, initial[name])
    # The checkpoint loads as a plain model (the teacher key is ignored outside fit).
    loaded = ImageClassifier.load_from_checkpoint(checkpoint_cb.best_model_path, backbone=TinyBackbone())
    assert loaded.teacher is None and set(loaded.state_dict()) == set(initial)


def test_resume_distills_toward_the_original_teacher(tmp_path):
    kwargs = {"distill": "logits", "distill_weight": 5.0, "distill_temperature": 2.0}
    checkpoint_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_top_k=-1)
    straight = make_model(seed=0, **kwargs)
    fit(straight, tmp_path / "a", max_epochs=2, callbacks=[checkpoint_cb])
    middle = tmp_path / "ckpt" / "epoch=0.ckpt"

    # A fresh model with other initial weights: the teacher must come from the checkpoint, not from these.
    resumed = make_model(seed=123, **kwargs)
    fit(resumed, tmp_path / "b", max_epochs=2, ckpt_path=middle)
    for name, tensor in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], tensor, rtol=0, atol=0)

    # Without the stored teacher, the resumed run distills toward the resumed weights: a different result.
    checkpoint = torch.load(middle, weights_only=False)
    del checkpoint[TEACHER_CHECKPOINT_KEY]
    torch.save(checkpoint, tmp_path / "no_teacher.ckpt")
    other = make_model(seed=123, **kwargs)
    with pytest.warns(UserWarning, match="no 'distill_teacher'"):
        fit(other, tmp_path / "c", max_epochs=2, ckpt_path=tmp_path / "no_teacher.ckpt")
    assert any(not torch.equal(other.state_dict()[k], v) for k, v in straight.state_dict().items())


def test_zero_weight_trains_as_without_distillation(tmp_path):
    plain, zero = make_model(seed=0), make_model(seed=0, distill="features", distill_weight=0.0)
    fit(plain, tmp_path / "a")
    trainer = fit(zero, tmp_path / "b")
    assert "train/distill_loss" in trainer.callback_metrics
    for name, tensor in plain.state_dict().items():
        assert torch.equal(zero.state_dict()[name], tensor), name


def test_distillation_pulls_toward_the_teacher(tmp_path):
    plain, distilled = make_model(seed=0), make_model(seed=0, distill="features", distill_weight=10.0)
    initial = state_copy(plain)
    fit(plain, tmp_path / "a", max_epochs=2)
    fit(distilled, tmp_path / "b", max_epochs=2)
    x = make_image_loader().dataset.tensors[0]
    drift = {}
    for name, model in (("plain", plain), ("distilled", distilled)):
        start = make_model(seed=0)
        start.load_state_dict(initial)
        with torch.no_grad():
            drift[name] = feature_distillation_loss(model.features(x), start.features(x)).item()
    assert drift["distilled"] < drift["plain"]


def test_distillation_loss_needs_a_teacher():
    model = make_model(distill="logits")
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(RuntimeError, match="No teacher"):
        model.distillation_loss(x, model.features(x), model(x))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"distill": "kd"}, "`distill`='kd'"),
        ({"distill": "logits", "distill_weight": -1.0}, "`distill_weight`=-1.0"),
        ({"distill": "logits", "distill_weight": float("inf")}, "`distill_weight`=inf"),
        ({"distill": "logits", "distill_weight": float("nan")}, "`distill_weight`=nan"),
        ({"distill": "logits", "distill_weight": True}, "`distill_weight`=True"),
        ({"distill": "logits", "distill_temperature": 0.0}, "`distill_temperature`=0.0"),
        ({"distill": "logits", "distill_temperature": -2}, "`distill_temperature`=-2"),
        ({"distill": "logits", "distill_temperature": float("inf")}, "`distill_temperature`=inf"),
    ],
)
def test_argument_errors(kwargs, match):
    with pytest.raises(RobustFTConfigError, match=match):
        make_model(**kwargs)
