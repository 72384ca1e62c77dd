"""GMixoutCallback(sparse=True): only the free entries train; under plain SGD that is dense GMixout, step for step."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from _gmixout_helpers import (
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
from torch import nn

from lightning_robustft.callbacks._sparse_gmixout import PACKED_SUFFIX
from lightning_robustft.callbacks.gmixout import ANCHORS_CHECKPOINT_KEY, GMixoutCallback
from lightning_robustft.errors import RobustFTConfigError
from lightning_robustft.ops.sparse_mixout import draw_free_indices, free_count

TARGETS = ["backbone.0.weight", "backbone.3.weight"]
PLAIN_NAMES = list(params_of(make_model()))


def plain(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's own parameters, without the packed ones that exist during fit."""
    return {name: value for name, value in params.items() if not name.endswith(PACKED_SUFFIX)}


class SparseRecorder(Callback):
    """Records, per optimizer step: the period's free indices, the packed gradients, the plain weights after it."""

    def __init__(self) -> None:
        self.indices: dict[int, list[torch.Tensor]] = {}
        self.packed_grads: list[list[torch.Tensor]] = []
        self.after_step: list[dict[str, torch.Tensor]] = []
        self.state_sizes: list[int] = []
        self.live_after_forward: list[int] = []
        self._last = 0

    @staticmethod
    def gmixout(trainer: Trainer) -> GMixoutCallback:
        return next(cb for cb in trainer.callbacks if isinstance(cb, GMixoutCallback))

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        engine = self.gmixout(trainer).sparse_mixout
        self.indices.setdefault(engine.period, [t.indices.clone() for t in engine.targets])
        optimizer = trainer.optimizers[0]
        self.state_sizes.append(len(optimizer.state.get(engine.targets[0].packed, {})))

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        self.live_after_forward.append(self.gmixout(trainer).sparse_mixout.resident_mixed())

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        engine = self.gmixout(trainer).sparse_mixout
        self.packed_grads.append([t.packed.grad.detach().clone() for t in engine.targets])
        assert all(t.weight.grad is None for t in engine.targets)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if trainer.global_step != self._last:
            self._last = trainer.global_step
            self.after_step.append(plain(params_of(pl_module)))


def sgd_model(momentum: float = 0.0) -> TinyClassifier:
    model = make_model()
    model.momentum = momentum
    return model


def _fit(
    callback: GMixoutCallback,
    steps: int,
    accumulate: int = 1,
    model: TinyClassifier | None = None,
    extra: Sequence[Callback] = (),
    **kwargs: Any,
) -> tuple[TinyClassifier, SparseRecorder]:
    model = sgd_model() if model is None else model
    recorder = SparseRecorder()
    trainer = make_trainer([callback, recorder, *extra], max_steps=steps, accumulate_grad_batches=accumulate, **kwargs)
    trainer.fit(model, make_loader(steps * accumulate))
    return model, recorder


def reference(
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    indices: dict[int, list[torch.Tensor]],
    steps: int,
    p: float,
    resample_every: int,
    anchor_decay: float,
    accumulate: int = 1,
    clip: float | None = None,
) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
    """Dense GMixout by hand (the shared reference), plain SGD, masks from the given subsets.

    Returns the dense gradients of ``w`` and the parameters after every step.
    """
    model = sgd_model()
    shapes = {name: param.shape for name, param in model.named_parameters()}

    def masks(period: int, index: int) -> torch.Tensor:
        keep = torch.zeros(shapes[TARGETS[index]].numel(), dtype=torch.bool)
        keep[indices[period][index].long()] = True
        return keep.view(shapes[TARGETS[index]])

    return reference_gmixout(model, batches, masks, TARGETS, steps, p, resample_every, anchor_decay, accumulate, clip)


@pytest.mark.parametrize(
    ("resample_every", "anchor_decay", "accumulate", "clip"),
    [
        (1, 1.0, 1, None),  # Mixout's levers
        (2, 0.6, 1, None),  # a period of two steps and a moving anchor
        (3, 0.0, 2, None),  # the anchor jumps to w; gradient accumulation
        (2, 0.5, 1, 0.05),  # gradient clipping by norm: the packed norm is the dense norm
    ],
)
def test_sgd_equals_dense_gmixout_with_the_same_masks_step_for_step(
    resample_every: int, anchor_decay: float, accumulate: int, clip: float | None
) -> None:
    steps, p = 6, 0.6
    callback = GMixoutCallback(
        p=p, resample_every=resample_every, anchor_decay=anchor_decay, targets=TARGETS, seed=7, sparse=True
    )
    extra = {} if clip is None else {"gradient_clip_val": clip}
    _, recorder = _fit(callback, steps, accumulate, **extra)
    assert callback.step == steps and len(recorder.indices) == -(-steps // resample_every)
    grads, after = reference(
        make_batches(steps * accumulate), recorder.indices, steps, p, resample_every, anchor_decay, accumulate, clip
    )
    for t in range(steps):
        subsets = recorder.indices[t // resample_every]
        for i, name in enumerate(TARGETS):
            dense = grads[t][name].flatten()
            free = subsets[i].long()
            torch.testing.assert_close(recorder.packed_grads[t][i].flatten(), dense[free], rtol=1e-5, atol=1e-7)
            held = torch.ones_like(dense, dtype=torch.bool)
            held[free] = False
            assert torch.count_nonzero(dense[held]) == 0  # dense GMixout's gradient vanishes where sparse has none
        assert_params_close(recorder.after_step[t], after[t], rtol=1e-5, atol=1e-6)


def test_free_entries_have_the_exact_count_and_change_with_the_period() -> None:
    p = 0.7
    callback = GMixoutCallback(p=p, resample_every=2, targets=TARGETS, seed=3, sparse=True)
    model, recorder = _fit(callback, 6)
    assert sorted(recorder.indices) == [0, 1, 2]
    for period, subsets in recorder.indices.items():
        for i, name in enumerate(TARGETS):
            numel = dict(model.named_parameters())[name].numel()
            idx = subsets[i]
            assert idx.dtype == torch.int32 and idx.numel() == round((1 - p) * numel)
            assert bool((idx[1:] > idx[:-1]).all()) and int(idx[0]) >= 0 and int(idx[-1]) < numel
            expected = draw_free_indices(numel, free_count(numel, p), callback.seed, period, i, torch.device("cpu"))
            assert torch.equal(idx, expected)  # a pure function of (seed, period, tensor): every rank, every resume
    assert not torch.equal(recorder.indices[0][0], recorder.indices[1][0])
    engine = callback.sparse_mixout
    assert [tuple(t.packed.shape) for t in engine.targets] == [(58, 1), (77, 1)]  # (m, 1): the weight's ndim


def test_draws_are_uniform_subsets() -> None:
    """Every entry is free in a fraction ``m/n`` of the periods, and pairs are as often together as uniformity says."""
    numel, count, periods = 40, 12, 4000
    hits = torch.zeros(numel)
    pairs = torch.zeros(numel, numel)
    for period in range(periods):
        keep = torch.zeros(numel)
        keep[draw_free_indices(numel, count, 11, period, 0, torch.device("cpu")).long()] = 1.0
        hits += keep
        pairs += keep[:, None] * keep[None, :]
    rate = count / numel
    sd = (rate * (1 - rate) / periods) ** 0.5
    assert ((hits / periods - rate).abs() < 5 * sd).all()
    pair_rate = count * (count - 1) / (numel * (numel - 1))
    off = ~torch.eye(numel, dtype=torch.bool)
    assert abs(float((pairs / periods)[off].mean()) - pair_rate) < 0.005


def test_draw_handles_every_cut() -> None:
    """Counts near 0 and near n, and sizes that are not multiples of 8, give exact, sorted, distinct subsets."""
    for numel in (1, 9, 255, 1000, 4099):
        for count in sorted({1, numel // 3, numel - 1, numel} - {0}):
            idx = draw_free_indices(numel, count, 5, 2, 1, torch.device("cpu"))
            assert idx.numel() == count and len(set(idx.tolist())) == count and int(idx.max()) < numel
    with pytest.raises(ValueError, match="0 free entries"):
        free_count(3, 0.9)


def test_after_fit_the_model_is_plain_and_learned() -> None:
    callback = GMixoutCallback(p=0.9, resample_every=2, anchor_decay=0.5, targets=TARGETS, seed=0, sparse=True)
    model, recorder = _fit(callback, 4)
    reference_model = make_model()
    assert model.state_dict().keys() == reference_model.state_dict().keys()
    assert list(params_of(model)) == PLAIN_NAMES
    assert all(param.requires_grad for param in model.parameters())
    assert [type(m) for m in model.modules()] == [type(m) for m in reference_model.modules()]
    assert not any(
        m._forward_pre_hooks or m._forward_hooks or m._state_dict_hooks or m._load_state_dict_pre_hooks
        for m in model.modules()
    )
    assert not any(m._load_state_dict_post_hooks for m in model.modules())
    assert not model.trainer.optimizers[0]._optimizer_step_post_hooks
    assert_params_equal(params_of(model), recorder.after_step[-1])
    assert not torch.equal(model.backbone[0].weight, reference_model.backbone[0].weight)


def test_mixed_weights_are_not_resident_between_forward_and_backward() -> None:
    """The saved-tensor hooks keep no ``w~``: after the forward every mixed weight that was built is freed again."""
    callback = GMixoutCallback(p=0.7, targets=TARGETS, seed=0, sparse=True)
    _, recorder = _fit(callback, 3)
    assert recorder.live_after_forward == [0, 0, 0]


def test_validation_and_checkpoints_see_plain_w(tmp_path: Path) -> None:
    """Validation after every micro-batch sees ``w`` (a Parameter); a checkpoint saved mid-step has plain keys."""
    seen: list[bool] = []

    class Probe(Callback):
        def on_validation_batch_start(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
            weight = pl_module.backbone[0].weight
            seen.append(type(weight) is nn.Parameter and type(pl_module.backbone[0]) is nn.Linear)

    def run(validate: bool) -> tuple[TinyClassifier, SparseRecorder]:
        model, recorder = sgd_model(momentum=0.9), SparseRecorder()
        model.save_at_step = (2, tmp_path / f"mid{validate}.ckpt")
        extra = {"limit_val_batches": 1, "val_check_interval": 1} if validate else {}
        callback = GMixoutCallback(p=0.7, resample_every=2, anchor_decay=0.5, targets=TARGETS, seed=1, sparse=True)
        trainer = make_trainer([callback, recorder, Probe()], max_steps=3, accumulate_grad_batches=2, **extra)
        loader = make_loader(6)
        trainer.fit(model, loader, loader if validate else None)
        return model, recorder

    validated, recorder = run(validate=True)
    unvalidated, _ = run(validate=False)
    assert seen and all(seen)
    assert_params_equal(params_of(validated), params_of(unvalidated))
    assert_params_equal(plain(validated.val_params[-1]), recorder.after_step[-1])
    checkpoint = torch.load(tmp_path / "midTrue.ckpt", weights_only=False)
    assert list(checkpoint["state_dict"]) == list(make_model().state_dict())
    assert_params_equal({n: checkpoint["state_dict"][n] for n in PLAIN_NAMES}, recorder.after_step[1])
    assert list(checkpoint[ANCHORS_CHECKPOINT_KEY]) == TARGETS


def test_exception_mid_step_leaves_the_plain_learned_model() -> None:
    callback = GMixoutCallback(p=0.7, targets=TARGETS, seed=0, sparse=True)
    model = sgd_model()
    model.raise_at_step = 2
    recorder = SparseRecorder()
    with pytest.raises(RuntimeError, match="planned failure"):
        make_trainer([callback, recorder], max_steps=4).fit(model, make_loader(4))
    assert list(params_of(model)) == PLAIN_NAMES and type(model.backbone[0]) is nn.Linear
    assert_params_equal(params_of(model), recorder.after_step[-1])


def test_new_period_resets_the_packed_optimizer_state() -> None:
    """SGD momentum: the packed tensor's buffer exists mid-period and is gone at the first step of every period."""
    callback = GMixoutCallback(p=0.7, resample_every=2, targets=TARGETS, seed=0, sparse=True)
    _, recorder = _fit(callback, 6, model=sgd_model(momentum=0.9))
    assert recorder.state_sizes == [0, 1, 0, 1, 0, 1]


def test_adam_with_short_periods_warns() -> None:
    class AdamModel(TinyClassifier):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r"resample_every=2.*sign\(gradient\)"):
        _fit(GMixoutCallback(p=0.7, resample_every=2, targets=TARGETS, sparse=True), 2, model=AdamModel())


def test_optimizer_without_the_packed_tensors_is_refused() -> None:
    class HeadOnly(TinyClassifier):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.head.parameters(), lr=0.1)

    torch.manual_seed(0)
    with pytest.raises(RobustFTConfigError, match=r"does not train 2 packed tensors.*configure_optimizers"):
        _fit(GMixoutCallback(p=0.7, targets=TARGETS, sparse=True), 2, model=HeadOnly())


def test_optimizer_of_a_submodule_trains_its_packed_tensors() -> None:
    """The packed tensors live next to their weights, so ``self.backbone.parameters()`` holds them."""

    class BackboneGroups(TinyClassifier):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            groups = [{"params": self.backbone.parameters()}, {"params": self.head.parameters(), "lr": 0.0}]
            return torch.optim.SGD(groups, lr=self.lr)

    torch.manual_seed(0)
    model, _ = _fit(GMixoutCallback(p=0.7, targets=TARGETS, seed=0, sparse=True), 2, model=BackboneGroups())
    initial = make_model()
    assert not torch.equal(model.backbone[0].weight, initial.backbone[0].weight)
    assert torch.equal(model.head.weight, initial.head.weight)


def test_fp16_amp_skipped_step_keeps_count_weights_and_period() -> None:
    callback = GMixoutCallback(p=0.5, resample_every=1, anchor_decay=0.5, targets=TARGETS, seed=0, sparse=True)
    model = sgd_model()
    model.inf_at_step = 2
    plugin = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))
    _, recorder = _fit(callback, 5, model=model, plugins=[plugin])
    assert callback.step == 4
    assert_params_equal(recorder.after_step[2], recorder.after_step[1])
    assert sorted(recorder.indices) == [0, 1, 2, 3]  # the skipped step's period is retried, not skipped


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
def test_bf16_trains_with_fp32_anchors(precision: str) -> None:
    callback = GMixoutCallback(p=0.5, resample_every=2, targets=TARGETS, seed=0, sparse=True)
    model, _ = _fit(callback, 3, precision=precision)
    dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32
    assert model.backbone[0].weight.dtype == dtype
    assert all(t.anchor.dtype == torch.float32 and t.packed.dtype == dtype for t in callback.sparse_mixout.targets)
    assert all(torch.isfinite(param).all() for param in model.parameters())
    assert not torch.equal(model.backbone[0].weight.float(), make_model().backbone[0].weight)


def test_multihead_attention_out_projection_is_mixed_through_its_parent() -> None:
    """``nn.MultiheadAttention`` reads ``out_proj.weight`` in its own forward: the property serves ``w~`` there too."""

    class Attention(TinyClassifier):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.backbone(x).unsqueeze(1)
            return self.head(self.attn(h, h, h, need_weights=False)[0].squeeze(1))

    torch.manual_seed(0)
    model = Attention()
    initial = params_of(model)
    targets = ["attn.in_proj_weight", "attn.out_proj.weight"]
    callback = GMixoutCallback(p=0.5, targets=targets, seed=0, sparse=True)
    make_trainer([callback], max_steps=2).fit(model, make_loader(2))
    for name in targets:
        changed = int((params_of(model)[name] != initial[name]).sum())
        assert 0 < changed <= 2 * round(0.5 * initial[name].numel())


def _resume_run(
    callback: GMixoutCallback, steps: int, ckpt_path: Path | None = None, save: Path | None = None
) -> TinyClassifier:
    model = sgd_model(momentum=0.9)  # momentum: the packed optimizer state must survive the resume
    L.seed_everything(0, verbose=False)
    trainer = make_trainer([callback], max_steps=steps)
    trainer.fit(model, make_loader(1), ckpt_path=ckpt_path)
    if save is not None:
        trainer.save_checkpoint(save)
    return model


@pytest.mark.parametrize("resample_every", [2, 3], ids=["mid-period", "period-boundary"])
def test_resumed_run_is_bitwise_the_straight_run(tmp_path: Path, resample_every: int) -> None:
    def callback() -> GMixoutCallback:
        return GMixoutCallback(p=0.7, resample_every=resample_every, anchor_decay=0.5, targets=TARGETS, sparse=True)

    straight = _resume_run(callback(), 7)
    _resume_run(callback(), 3, save=tmp_path / "step3.ckpt")
    checkpoint = torch.load(tmp_path / "step3.ckpt", weights_only=False)
    assert list(checkpoint["state_dict"]) == list(make_model().state_dict())
    assert list(checkpoint[ANCHORS_CHECKPOINT_KEY]) == TARGETS
    resumed_cb = callback()
    resumed = _resume_run(resumed_cb, 7, ckpt_path=tmp_path / "step3.ckpt")
    assert resumed_cb.step == 7
    assert_params_equal(params_of(resumed), params_of(straight))


def test_dense_and_sparse_checkpoints_are_not_mixed_up(tmp_path: Path) -> None:
    _resume_run(GMixoutCallback(p=0.7, targets=TARGETS, sparse=True), 2, save=tmp_path / "sparse.ckpt")
    with pytest.raises(
        RobustFTConfigError, match=r"trained with GMixoutCallback\(sparse=True\), this run has sparse=F"
    ):
        _resume_run(GMixoutCallback(p=0.7, targets=TARGETS), 3, ckpt_path=tmp_path / "sparse.ckpt")


@pytest.mark.slow
def test_sparse_demo_config_fits_and_leaves_a_plain_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``configs/demo_gmixout_sparse.yaml`` from the CLI: ImageClassifier's AdamW groups train the packed tensors."""
    from lightning_robustft import ImageClassifier
    from lightning_robustft.cli import cli_main

    monkeypatch.setattr("sys.argv", ["robustft"])
    config = Path(__file__).resolve().parents[1] / "configs" / "demo_gmixout_sparse.yaml"
    args = ["fit", "--config", str(config), "--trainer.max_epochs=1", "--trainer.limit_train_batches=2"]
    cli = cli_main([*args, "--trainer.limit_val_batches=1", f"--trainer.default_root_dir={tmp_path}"])
    callback = next(cb for cb in cli.trainer.callbacks if isinstance(cb, GMixoutCallback))
    assert callback.sparse and callback.step == 2
    groups = cli.trainer.optimizers[0].param_groups
    decayed = {id(param) for param in groups[0]["params"]}
    assert all(id(target.packed) in decayed for target in callback.sparse_mixout.targets)  # (m, 1): ndim 2
    saved = ImageClassifier.load_from_checkpoint(next(tmp_path.rglob("last.ckpt"))).state_dict()
    assert set(cli.model.state_dict()) == set(saved)
    assert not any(name.endswith(PACKED_SUFFIX) for name in saved)
