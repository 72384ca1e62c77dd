"""GMixoutCallback: arguments, targets, the exact per-step semantics, and that weights outside a step are ``w``."""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L
import pytest
import torch
from _gmixout_helpers import (
    ManualModel,
    Recorder,
    TinyClassifier,
    assert_params_close,
    assert_params_equal,
    make_batches,
    make_loader,
    make_model,
    make_trainer,
    params_of,
    reference_gmixout,
)
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from torch import nn

from lightning_robustft.callbacks.gmixout import (
    ANCHORS_CHECKPOINT_KEY,
    GMixoutCallback,
    check_supported,
    derive_seed,
    select_targets,
    step_was_skipped,
)
from lightning_robustft.errors import RobustFTConfigError

TARGETS = ["backbone.0.weight", "backbone.3.weight"]


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"p": 1.0}, "`p`"),
        ({"p": -0.1}, "`p`"),
        ({"p": True}, "`p`"),
        ({"resample_every": 0}, "`resample_every`"),
        ({"resample_every": 2.0}, "`resample_every`"),
        ({"anchor_decay": 1.5}, "`anchor_decay`"),
        ({"anchor_decay": -0.01}, "`anchor_decay`"),
        ({"targets": []}, "`targets`"),
        ({"targets": "backbone.*"}, "`targets`"),
        ({"exclude": [""]}, "`exclude`"),
        ({"head": ""}, "`head`"),
        ({"seed": -1}, "`seed`"),
        ({"seed": 2**31}, "`seed`"),
        ({"backend": "cuda"}, "`backend`"),
    ],
)
def test_rejects_bad_arguments(kwargs: dict, argument: str) -> None:
    with pytest.raises(RobustFTConfigError, match=argument) as info:
        GMixoutCallback(**kwargs)
    assert repr(next(iter(kwargs.values()))) in str(info.value)


class ZooModule(nn.Module):
    """Every kind of parameter the default target rule must take or leave."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.attn = nn.MultiheadAttention(8, 2)
        self.cross = nn.MultiheadAttention(8, 2, kdim=4, vdim=4)
        self.norm = nn.LayerNorm(8)
        self.mlp = nn.Linear(8, 8)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.proj = nn.Parameter(torch.zeros(8, 8))
        self.head = nn.Linear(8, 2)


def test_default_targets_are_weight_matrices_outside_the_head() -> None:
    assert select_targets(ZooModule(), None, [], "head") == [
        "conv.weight",
        "attn.in_proj_weight",
        "attn.out_proj.weight",
        "cross.q_proj_weight",
        "cross.k_proj_weight",
        "cross.v_proj_weight",
        "cross.out_proj.weight",
        "mlp.weight",
    ]
    assert "head.weight" in select_targets(ZooModule(), None, [], None)


def test_patterns_are_globs_and_exclude_removes() -> None:
    module = ZooModule()
    assert select_targets(module, ["*proj*weight", "embed.weight", "proj"], ["cross.*"], "head") == [
        "proj",
        "embed.weight",
        "attn.in_proj_weight",
        "attn.out_proj.weight",
    ]
    assert select_targets(module, ["head.*"], [], "head") == ["head.weight", "head.bias"]
    assert select_targets(module, None, ["*attn*", "cross.*", "conv.weight"], "head") == ["mlp.weight"]


@pytest.mark.parametrize(
    ("targets", "exclude", "head", "expected"),
    [
        (["backbone.*.scale"], [], "head", r"`targets` pattern 'backbone\.\*\.scale' matches no parameter.*conv"),
        (["frozen.*"], [], "head", r"`targets` pattern 'frozen\.\*' matches only frozen parameters"),
        (None, ["nothing*"], "head", r"`exclude` pattern 'nothing\*' matches no parameter"),
        (None, [], "classifier", r"`head`='classifier' is not a submodule.*'head'"),
        (None, ["*"], "head", r"no trainable weight to mix"),
    ],
)
def test_bad_selection_is_explained(targets: list | None, exclude: list, head: str, expected: str) -> None:
    with pytest.raises(RobustFTConfigError, match=expected):
        select_targets(ZooModule(), targets, exclude, head)


def test_pattern_that_matches_nothing_fails_in_setup() -> None:
    trainer = make_trainer([GMixoutCallback(targets=["backbone.*.weight", "encoder.*"])], max_steps=1)
    with pytest.raises(RobustFTConfigError, match=r"'encoder\.\*' matches no parameter.*backbone\.0\.weight"):
        trainer.fit(make_model(), make_loader(1))


def test_manual_optimization_is_refused() -> None:
    trainer = make_trainer([GMixoutCallback()], max_steps=1)
    with pytest.raises(RobustFTConfigError, match="automatic_optimization is False"):
        trainer.fit(ManualModel(), make_loader(1))


@pytest.mark.parametrize("strategy_cls", [FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy])
def test_sharded_strategies_are_refused(strategy_cls: type) -> None:
    strategy = strategy_cls.__new__(strategy_cls)  # the check reads the type only; DeepSpeed need not be installed
    with pytest.raises(RobustFTConfigError, match=f"does not support strategy {strategy_cls.__name__}.*ddp"):
        check_supported(strategy, make_model())


def _fit(
    callback: GMixoutCallback, steps: int, accumulate: int = 1, **kwargs: object
) -> tuple[TinyClassifier, Recorder]:
    model, recorder = make_model(), Recorder()
    trainer = make_trainer([callback, recorder], max_steps=steps, accumulate_grad_batches=accumulate, **kwargs)
    trainer.fit(model, make_loader(steps * accumulate))
    return model, recorder


@pytest.mark.parametrize(
    ("resample_every", "anchor_decay", "accumulate", "backend"),
    [
        (1, 1.0, 1, "torch"),  # Mixout
        (2, 0.6, 1, "torch"),  # a period of two steps and a moving anchor
        (3, 0.0, 2, "torch"),  # the anchor jumps to w; gradient accumulation
        pytest.param(1, 1.0, 1, "triton", marks=pytest.mark.triton),
        pytest.param(2, 0.6, 2, "triton", marks=pytest.mark.triton),
    ],
)
def test_training_matches_hand_written_gmixout(
    resample_every: int, anchor_decay: float, accumulate: int, backend: str
) -> None:
    """Per-step gradients and final weights equal autograd through a hand-written GMixout forward, same masks."""
    steps, p = 5, 0.6
    callback = GMixoutCallback(
        p=p, resample_every=resample_every, anchor_decay=anchor_decay, targets=TARGETS, seed=7, backend=backend
    )
    model, recorder = _fit(callback, steps, accumulate)
    assert callback.passes is not None and callback.passes.backend == backend
    assert callback.step == steps and not callback.passes.mixed
    grads, after = reference_gmixout(
        make_model(),
        make_batches(steps * accumulate),
        callback.passes.mask,
        TARGETS,
        steps,
        p,
        resample_every,
        anchor_decay,
        accumulate,
    )
    for got, want in zip(recorder.grads, grads, strict=True):
        assert_params_close(got, want, rtol=1e-5, atol=1e-6)
    assert_params_close(params_of(model), after[-1], rtol=1e-5, atol=1e-6)


def test_compiled_backbone_sees_the_mixed_weights_without_recompiling() -> None:
    """A user's ``torch.compile``: the ``.data`` swap keeps each Parameter, so one graph serves ``w~`` and ``w``.

    The graph is compiled on ``w``'s storage before fit, then serves ``w~`` in every training step. Dynamo guards
    on the parameters' metadata, not their storage; a swap that replaced the Parameter objects or changed a stride
    would recompile (``error_on_recompile`` fails the test), and a graph that kept reading the old storage would
    train ``w`` instead of ``w~`` (the comparison with the hand-written reference fails).
    """
    steps, p = 4, 0.6
    callback = GMixoutCallback(p=p, targets=TARGETS, seed=11)
    model, recorder = make_model(), Recorder()
    model.backbone.compile()
    trainer = make_trainer([callback, recorder], max_steps=steps)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        model.backbone(make_batches(1)[0][0])  # compiled on w's storage, with grad enabled as in training
        trainer.fit(model, make_loader(steps))
    grads, after = reference_gmixout(make_model(), make_batches(steps), callback.passes.mask, TARGETS, steps, p, 1, 1.0)
    for got, want in zip(recorder.grads, grads, strict=True):
        assert_params_close(got, want, rtol=1e-5, atol=1e-6)
    assert_params_close(params_of(model), after[-1], rtol=1e-5, atol=1e-6)


def test_masks_follow_the_period() -> None:
    callback = GMixoutCallback(p=0.5, resample_every=2, targets=TARGETS, seed=3)
    _fit(callback, 1)
    mask = callback.passes.mask
    assert torch.equal(mask(1, 0), mask(1, 0))
    assert not torch.equal(mask(1, 0), mask(2, 0))
    assert not torch.equal(mask(1, 0)[:, :12], mask(1, 1)[:, :12])


def test_weights_outside_a_step_are_learned_and_state_dict_is_plain() -> None:
    callback = GMixoutCallback(p=0.9, targets=TARGETS, seed=0)
    model, recorder = _fit(callback, 3)
    assert model.state_dict().keys() == make_model().state_dict().keys()
    assert all(type(param) is nn.Parameter for param in model.parameters())
    assert not any(module._forward_pre_hooks or module._forward_hooks for module in model.modules())
    assert_params_equal(params_of(model), recorder.after_step[-1])
    assert recorder.steps == [1, 2, 3]


def test_mid_accumulation_validation_sees_w_and_changes_nothing() -> None:
    """Validation after every micro-batch (also between the two of a step) sees ``w``; the run is bitwise unchanged."""
    steps, accumulate = 3, 2

    def run(validate: bool) -> tuple[TinyClassifier, Recorder]:
        model, recorder = make_model(), Recorder()
        extra = {"limit_val_batches": 1, "val_check_interval": 1} if validate else {}
        trainer = make_trainer(
            [GMixoutCallback(p=0.7, resample_every=2, anchor_decay=0.5, targets=TARGETS, seed=1), recorder],
            max_steps=steps,
            accumulate_grad_batches=accumulate,
            **extra,
        )
        loader = make_loader(steps * accumulate)
        trainer.fit(model, loader, loader if validate else None)
        return model, recorder

    validated, recorder = run(validate=True)
    plain, _ = run(validate=False)
    assert_params_equal(params_of(validated), params_of(plain))
    assert len(validated.val_params) == steps * accumulate
    initial = params_of(make_model())
    learned = [initial, initial, *[w for w in recorder.after_step for _ in range(accumulate)]]
    for index, seen in enumerate(validated.val_params):
        assert_params_equal(seen, learned[index + 1])


def test_checkpoint_saved_mid_step_holds_w(tmp_path) -> None:
    callback = GMixoutCallback(p=0.9, anchor_decay=0.5, targets=TARGETS, seed=0)
    model, recorder = make_model(), Recorder()
    model.save_at_step = (2, tmp_path / "mid.ckpt")
    make_trainer([callback, recorder], max_steps=3).fit(model, make_loader(3))
    checkpoint = torch.load(tmp_path / "mid.ckpt", weights_only=False)
    assert_params_equal(
        {name: checkpoint["state_dict"][name] for name in recorder.after_step[1]}, recorder.after_step[1]
    )
    assert list(checkpoint[ANCHORS_CHECKPOINT_KEY]) == TARGETS
    assert checkpoint[ANCHORS_CHECKPOINT_KEY][TARGETS[0]].dtype == torch.float32
    # The save did not disturb training: the step that saved continued on w~ and matches a run that did not save.
    unsaved, _ = _fit(GMixoutCallback(p=0.9, anchor_decay=0.5, targets=TARGETS, seed=0), 3)
    assert_params_equal(params_of(model), params_of(unsaved))


def test_exception_mid_step_leaves_w() -> None:
    callback = GMixoutCallback(p=0.9, targets=TARGETS, seed=0)
    model, recorder = make_model(), Recorder()
    model.raise_at_step = 2
    with pytest.raises(RuntimeError, match="planned failure"):
        make_trainer([callback, recorder], max_steps=4).fit(model, make_loader(4))
    assert not callback.passes.mixed
    assert_params_equal(params_of(model), recorder.after_step[-1])


class StopAfterBatch(Callback):
    def __init__(self, batch_idx: int) -> None:
        self.batch_idx = batch_idx

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if args[-1] == self.batch_idx:
            trainer.should_stop = True


def test_stop_between_micro_batches_leaves_w() -> None:
    """Early stopping after the first micro-batch of a step (the parameters hold w~ then) ends fit with ``w``."""
    callback = GMixoutCallback(p=0.9, targets=TARGETS, seed=0)
    model, recorder = make_model(), Recorder()
    trainer = make_trainer([callback, recorder, StopAfterBatch(2)], max_steps=5, accumulate_grad_batches=2)
    trainer.fit(model, make_loader(10))
    assert trainer.global_step == callback.step == 1
    assert not callback.passes.mixed
    assert_params_equal(params_of(model), recorder.after_step[-1])


def test_fp16_amp_skipped_step_does_not_count() -> None:
    """A GradScaler-skipped step (forced inf loss) keeps the counter, the weights and the anchor where they were."""
    callback = GMixoutCallback(p=0.5, anchor_decay=0.5, targets=TARGETS, seed=0)
    model, recorder = make_model(), Recorder()
    model.inf_at_step = 2  # Lightning's global_step still advances on a skipped step: it is the 3rd batch
    plugin = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))
    make_trainer([callback, recorder], max_steps=5, plugins=[plugin]).fit(model, make_loader(5))
    assert recorder.steps == [1, 2, 2, 3, 4]
    assert_params_equal(recorder.after_step[2], recorder.after_step[1])
    # The skipped step's period started (and moved the anchor); its retry is the same period: no second move.
    for before, after in zip(recorder.anchors[2], recorder.anchors[3], strict=True):
        assert torch.equal(before, after)
    for before, after in zip(recorder.anchors[3], recorder.anchors[4], strict=True):
        assert not torch.equal(before, after)


def test_step_was_skipped() -> None:
    assert step_was_skipped(65536.0, 32768.0)
    assert not step_was_skipped(65536.0, 65536.0)
    assert not step_was_skipped(65536.0, 131072.0)


def test_seed_comes_from_seed_everything_without_consuming_the_generator() -> None:
    def seed_after(global_seed: int) -> tuple[int | None, torch.Tensor]:
        callback, model = GMixoutCallback(targets=TARGETS), make_model()
        trainer = make_trainer([callback], max_steps=1)
        L.seed_everything(global_seed, verbose=False)
        callback.setup(trainer, model, "fit")
        return callback.seed, torch.rand(3)

    first, draw = seed_after(5)
    again, draw_again = seed_after(5)
    other, _ = seed_after(6)
    L.seed_everything(5, verbose=False)
    assert first == again == derive_seed(5) and first != other
    assert torch.equal(draw, draw_again) and torch.equal(draw, torch.rand(3))
    assert 0 <= first < 2**31


def test_half_precision_parameters_keep_their_dtype() -> None:
    callback = GMixoutCallback(p=0.5, targets=TARGETS, seed=0)
    model, _ = _fit(callback, 2, precision="bf16-true")
    assert model.backbone[0].weight.dtype == torch.bfloat16
    assert all(anchor.dtype == torch.float32 for anchor in callback.passes.anchors)
    assert all(torch.isfinite(param).all() for param in model.parameters())


def test_frozen_backbone_suggests_trainable_targets() -> None:
    """As with ``freeze_backbone=True``: every default target is frozen, so the error names trainable tensors only."""
    model = make_model()
    model.backbone.requires_grad_(False)
    with pytest.raises(RobustFTConfigError, match=r"all 2 default targets .* are frozen") as info:
        select_targets(model, None, [], "head")
    assert "['head.weight', 'head.bias']" in str(info.value)
    assert "backbone.0.weight" not in str(info.value)


def test_explicit_targets_in_the_head_warn_once() -> None:
    callback = GMixoutCallback(targets=["backbone.0.weight", "head.*"], seed=0)
    model = make_model()
    trainer = make_trainer([callback], max_steps=1)
    with pytest.warns(UserWarning, match=r"select 2 tensors of the head 'head' \(\['head.weight', 'head.bias'\]\)"):
        callback.setup(trainer, model, "fit")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        callback.setup(trainer, model, "fit")
        other = GMixoutCallback(targets=["backbone.0.weight"], seed=0)
        other.setup(make_trainer([other], max_steps=1), model, "fit")
    assert callback.target_names == ["backbone.0.weight", "head.weight", "head.bias"]
