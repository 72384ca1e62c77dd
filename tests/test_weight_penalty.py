"""WeightPenaltyCallback and ops/penalty: the gradient is the penalty's, and fit equals adding it to the loss."""

from __future__ import annotations

import ast
import copy
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from _gmixout_helpers import (
    ManualModel,
    TinyClassifier,
    assert_params_close,
    make_batches,
    make_loader,
    make_model,
)
from _helpers import Recorder, TinyBackbone, assert_states_equal, make_trainer, params_of
from lightning.pytorch import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from torch import nn

from lightning_robustft.callbacks.weight_penalty import (
    ANCHORS_CHECKPOINT_KEY,
    WeightPenaltyCallback,
    check_supported,
    select_penalty_targets,
)
from lightning_robustft.errors import RobustFTConfigError
from lightning_robustft.ops import penalty
from lightning_robustft.ops.penalty import add_penalty_grad_, make_anchors, penalty_grad_reference, penalty_value

SIZES = [(1,), (7,), (33, 17), (3, 5, 7)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# One rounding of an fp32 result to the gradient's dtype; the float64 reference rounds once too, so they differ by
# at most one unit in the last place of the dtype (plus fp32 error, negligible for bf16 / fp16).
TOL = {
    torch.float32: {"rtol": 2e-6, "atol": 1e-6},
    torch.bfloat16: {"rtol": 8e-3, "atol": 1e-3},
    torch.float16: {"rtol": 1e-3, "atol": 1e-4},
}
BACKBONE = [
    "backbone.0.weight",
    "backbone.0.bias",
    "backbone.1.weight",
    "backbone.1.bias",
    "backbone.3.weight",
    "backbone.3.bias",
]


def _tensors(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    """Weights ``w`` moved away from their fp32 anchors ``a`` (a few entries left exactly at it), and a gradient."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=generator).to(dtype).float()
    w = (a + 0.1 * torch.randn(shape, generator=generator)).to(dtype)
    w.view(-1)[::5] = a.view(-1)[::5].to(dtype)  # w == a: the L1 subgradient is 0 there
    g = torch.randn(shape, generator=generator).to(dtype)
    return w, a, g


# ----------------------------------------------------------------------------------------------------------------------
# ops/penalty.py
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["l2", "l1"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_penalty_gradient_is_analytic_and_autograds(norm: str, dtype: torch.dtype) -> None:
    strength = 0.37
    params, anchors, grads = zip(*(_tensors(shape, dtype, seed) for seed, shape in enumerate(SIZES)), strict=True)
    got = [g.clone() for g in grads]
    add_penalty_grad_(params, anchors, got, strength, norm)
    for w, a, g, out in zip(params, anchors, grads, got, strict=True):
        assert out.dtype == dtype
        torch.testing.assert_close(out, penalty_grad_reference(w, a, g, strength, norm), **TOL[dtype])

    # Starting from zero gradients, the result is autograd's gradient of the penalty value itself.
    leaves = [w.clone().requires_grad_() for w in params]
    autograd = torch.autograd.grad(penalty_value(leaves, anchors, strength, norm), leaves)
    zeros = [torch.zeros_like(w) for w in params]
    add_penalty_grad_(params, anchors, zeros, strength, norm)
    for mine, theirs in zip(zeros, autograd, strict=True):
        torch.testing.assert_close(mine, theirs, **TOL[dtype])
    if norm == "l1":
        for mine, w, a in zip(zeros, params, anchors, strict=True):
            held = w.float() == a
            assert held.any() and torch.equal(mine[held], torch.zeros_like(mine[held]))
            assert torch.equal(mine[~held].abs().float(), torch.full_like(mine[~held], strength).to(dtype).float())


@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_penalty_value_is_the_formula(norm: str) -> None:
    w, a, _ = _tensors((33, 17), torch.float32, 0)
    diff = w.double() - a.double()
    expected = 0.3 * (diff.abs().sum() if norm == "l1" else 0.5 * diff.square().sum())
    torch.testing.assert_close(penalty_value([w], [a], 0.3, norm), expected, rtol=1e-6, atol=0)


def test_mixed_dtypes_none_grads_layouts_and_buckets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(penalty, "BUCKET_NUMEL", 40)  # several buckets per dtype
    tensors = [
        _tensors(shape, dtype, seed) for seed, (shape, dtype) in enumerate(zip(SIZES * 3, DTYPES * 4, strict=True))
    ]
    params = [w for w, _, _ in tensors]
    anchors = make_anchors(params)  # fp32 copies, exact for every dtype
    assert all(x.dtype == torch.float32 and torch.equal(x, w.float()) for x, w in zip(anchors, params, strict=True))
    anchors = [a for _, a, _ in tensors]
    grads: list[torch.Tensor | None] = [g.clone() for _, _, g in tensors]
    grads[4] = None
    grads[2] = grads[2].t().contiguous().t()  # a gradient laid out unlike its parameter
    before = [None if g is None else g.clone() for g in grads]
    add_penalty_grad_(params, anchors, grads, 0.05, "l2")
    assert grads[4] is None
    for w, a, g, out in zip(params, anchors, before, grads, strict=True):
        if g is not None:
            torch.testing.assert_close(out, penalty_grad_reference(w, a, g, 0.05, "l2"), **TOL[w.dtype])


def test_fp64_is_computed_in_fp64() -> None:
    w, _, g = (t.double() for t in _tensors((7, 3), torch.float32, 0))
    anchors = make_anchors([w])
    assert anchors[0].dtype == torch.float64
    out = g.clone()
    add_penalty_grad_([w], anchors, [out], 1e-3, "l2")
    torch.testing.assert_close(out, g + 1e-3 * (w - anchors[0]), rtol=1e-15, atol=0)


def test_zero_strength_touches_nothing() -> None:
    w, a, g = _tensors((33, 17), torch.bfloat16, 0)
    out = g.clone()
    add_penalty_grad_([w], [a], [out], 0.0, "l1")
    assert torch.equal(out, g)


@pytest.mark.parametrize(
    ("call", "error", "expected"),
    [
        (lambda w, a, g: add_penalty_grad_([w], [a], [g], -1.0), ValueError, r"`strength`=-1\.0 must be a finite"),
        (lambda w, a, g: add_penalty_grad_([w], [a], [g], math.inf), ValueError, r"`strength`=inf"),
        (lambda w, a, g: add_penalty_grad_([w], [a], [g], "0.1"), TypeError, r"`strength`='0\.1'.*not str"),
        (lambda w, a, g: add_penalty_grad_([w], [a], [g], 0.1, "l3"), ValueError, r"`norm`='l3'"),
        (lambda w, a, g: add_penalty_grad_([w], [a], [g, g], 0.1), ValueError, r"`grads` needs 1 entries"),
        (lambda w, a, g: add_penalty_grad_([w], [a[:2]], [g], 0.1), ValueError, r"`anchors\[0\]` must be shaped"),
        (lambda w, a, g: add_penalty_grad_([w], [a.long()], [g], 0.1), TypeError, r"`anchors\[0\]` must be a float"),
        (lambda w, a, g: add_penalty_grad_([w], [a], [g.double()], 0.1), ValueError, r"`grads\[0\]` must match"),
        (lambda w, a, g: add_penalty_grad_([w], [a], [g.to_sparse()], 0.1), TypeError, r"`grads\[0\]` is a torch.sp"),
        (lambda w, a, g: make_anchors([w.long()]), TypeError, r"`params\[0\]` must be a floating-point tensor"),
    ],
)
def test_ops_reject_bad_input_with_plain_python_errors(call: Any, error: type, expected: str) -> None:
    w, a, g = _tensors((4, 3), torch.float32, 0)
    with pytest.raises(error, match=expected) as info:
        call(w, a, g)
    assert not isinstance(info.value, RobustFTConfigError)  # ops/ raises Python's errors, not Lightning's


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    return names | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}


def test_ops_penalty_imports_no_lightning_even_indirectly() -> None:
    root = Path(penalty.__file__).parents[1]
    seen, todo = set(), ["lightning_robustft.ops.penalty"]
    while todo:
        module = todo.pop()
        seen.add(module)
        path = root.parent / (module.replace(".", "/") + ".py")
        for name in _imports(path):
            assert name.split(".")[0] != "lightning", f"{module} imports {name}"
            if name.startswith("lightning_robustft.") and name not in seen:
                todo.append(name)
    assert seen == {"lightning_robustft.ops.penalty", "lightning_robustft._validation"}


# ----------------------------------------------------------------------------------------------------------------------
# The callback: arguments and targets
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"strength": -0.1}, "`strength`"),
        ({"strength": math.nan}, "`strength`"),
        ({"strength": math.inf}, "`strength`"),
        ({"strength": True}, "`strength`"),
        ({"strength": "0.1"}, "`strength`"),
        ({"norm": "l3"}, "`norm`"),
        ({"norm": "L2"}, "`norm`"),
        ({"targets": []}, "`targets`"),
        ({"targets": "backbone.*"}, "`targets`"),
        ({"exclude": [""]}, "`exclude`"),
        ({"head": ""}, "`head`"),
    ],
)
def test_rejects_bad_arguments(kwargs: dict, argument: str) -> None:
    with pytest.raises(RobustFTConfigError, match=argument) as info:
        WeightPenaltyCallback(**kwargs)
    assert repr(next(iter(kwargs.values()))) in str(info.value)


class FrozenPartModel(TinyClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.backbone[0].requires_grad_(False)


def test_default_targets_are_every_trainable_parameter_outside_the_head() -> None:
    assert select_penalty_targets(make_model(), None, [], "head") == BACKBONE
    assert select_penalty_targets(make_model(), None, [], None) == [*BACKBONE, "head.weight", "head.bias"]
    assert select_penalty_targets(FrozenPartModel(), None, ["*.bias"], "head") == [
        "backbone.1.weight",
        "backbone.3.weight",
    ]
    assert select_penalty_targets(make_model(), ["backbone.*.weight"], ["*.1.*"], "head") == [
        "backbone.0.weight",
        "backbone.3.weight",
    ]
    conv = nn.Sequential()
    conv.backbone, conv.head = TinyBackbone(), nn.Linear(8, 2)
    assert select_penalty_targets(conv, None, [], "head") == [
        "backbone.net.0.weight",
        "backbone.net.0.bias",
        "backbone.net.3.weight",
        "backbone.net.3.bias",
    ]


@pytest.mark.parametrize(
    ("targets", "exclude", "head", "expected"),
    [
        (["backbone.*.scale"], [], "head", r"`targets` pattern 'backbone\.\*\.scale' matches no parameter.*backbone"),
        (["backbone.0.*"], [], "head", r"`targets` pattern 'backbone\.0\.\*' matches only frozen"),
        (None, ["nothing*"], "head", r"`exclude` pattern 'nothing\*' matches no parameter"),
        (None, [], "classifier", r"`head`='classifier' is not a submodule"),
        (None, ["backbone.*"], "head", r"no trainable parameter to penalise"),
    ],
)
def test_bad_selection_fails_fit_naming_the_argument(targets: Any, exclude: list, head: str, expected: str) -> None:
    trainer = make_trainer([WeightPenaltyCallback(targets=targets, exclude=exclude, head=head)], max_steps=1)
    with pytest.raises(RobustFTConfigError, match=expected):
        trainer.fit(FrozenPartModel(), make_loader(1))


def test_manual_optimization_is_refused() -> None:
    trainer = make_trainer([WeightPenaltyCallback()], max_steps=1)
    with pytest.raises(RobustFTConfigError, match="WeightPenaltyCallback needs automatic optimization"):
        trainer.fit(ManualModel(), make_loader(1))


@pytest.mark.parametrize("strategy_cls", [FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy])
def test_sharded_strategies_are_refused(strategy_cls: type) -> None:
    strategy = strategy_cls.__new__(strategy_cls)  # the check reads the type only; DeepSpeed need not be installed
    with pytest.raises(
        RobustFTConfigError, match=f"WeightPenaltyCallback does not support strategy {strategy_cls.__name__}"
    ):
        check_supported(strategy, make_model())


# ----------------------------------------------------------------------------------------------------------------------
# The callback in fit
# ----------------------------------------------------------------------------------------------------------------------


def _fit(callbacks: Sequence[Callback], steps: int, accumulate: int = 1, **kwargs: Any) -> TinyClassifier:
    model = make_model()
    trainer = make_trainer(callbacks, max_steps=steps, accumulate_grad_batches=accumulate, **kwargs)
    trainer.fit(model, make_loader(steps * accumulate))
    return model


def _reference(
    penalties: Sequence[tuple[float, str, Sequence[str]]], steps: int, accumulate: int = 1
) -> dict[str, torch.Tensor]:
    """The penalties written into the loss by hand: plain autograd, the module's own SGD, same data and init."""
    model = copy.deepcopy(make_model())
    params = dict(model.named_parameters())
    anchors = {name: param.detach().clone() for name, param in params.items()}
    optimizer = model.configure_optimizers()
    batches = make_batches(steps * accumulate)
    for t in range(steps):
        optimizer.zero_grad()
        for micro in range(accumulate):
            x, y = batches[t * accumulate + micro]
            loss = F.cross_entropy(model(x), y.long()) / accumulate
            if micro == 0:  # the penalty belongs to the step, not to each micro-batch
                for strength, norm, names in penalties:
                    loss = loss + penalty_value([params[n] for n in names], [anchors[n] for n in names], strength, norm)
            loss.backward()
        optimizer.step()
    return params_of(model)


@pytest.mark.parametrize(
    ("penalties", "accumulate"),
    [
        ([(0.3, "l2")], 1),
        ([(0.02, "l1")], 1),
        ([(0.3, "l2")], 2),
        ([(0.3, "l2"), (0.02, "l1")], 1),
    ],
    ids=["l2", "l1", "l2-accumulate2", "l2+l1"],
)
def test_fit_equals_the_penalty_in_the_loss(penalties: list[tuple[float, str]], accumulate: int) -> None:
    steps = 6
    callbacks = [WeightPenaltyCallback(strength=s, norm=n) for s, n in penalties]
    got = params_of(_fit(callbacks, steps, accumulate))
    expected = _reference([(s, n, BACKBONE) for s, n in penalties], steps, accumulate)
    assert_params_close(got, expected, rtol=1e-5, atol=1e-6)
    # The penalty must matter, or the comparison proves nothing.
    plain = _reference([], steps, accumulate)
    assert (got["backbone.0.weight"] - plain["backbone.0.weight"]).abs().max() > 1e-3
    for callback in callbacks:
        assert callback.target_names == BACKBONE
        assert all(anchor.device.type == "cpu" for anchor in callback.anchors.values())
        assert_states_equal(callback.anchors, {n: p for n, p in params_of(make_model()).items() if n in BACKBONE})


def test_zero_strength_is_training_without_the_callback() -> None:
    with_callback = params_of(_fit([WeightPenaltyCallback(strength=0.0)], 4))
    assert_states_equal(with_callback, params_of(_fit([], 4)))


class UnusedParamModel(TinyClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.ones(3))


def test_parameters_without_grad_get_no_penalty_and_module_stays_plain() -> None:
    model = UnusedParamModel()
    plain_keys = list(UnusedParamModel().state_dict())
    callback = WeightPenaltyCallback(strength=0.5, targets=["backbone.*", "unused"])
    make_trainer([callback], max_steps=3).fit(model, make_loader(3))
    assert model.unused.grad is None and torch.equal(model.unused.detach(), torch.ones(3))
    assert list(model.state_dict()) == plain_keys
    assert type(model) is UnusedParamModel
    assert [name for name, _ in model.named_modules()] == [name for name, _ in UnusedParamModel().named_modules()]
    plain = UnusedParamModel()
    plain.load_state_dict(model.state_dict())
    x = make_batches(1)[0][0]
    torch.testing.assert_close(model.eval()(x), plain.eval()(x), rtol=0, atol=0)  # no hook changes the forward


def test_resumed_run_pulls_toward_the_original_weights(tmp_path: Path) -> None:
    def run(steps: int, ckpt_path: Path | None = None, callback: WeightPenaltyCallback | None = None) -> TinyClassifier:
        model = make_model()
        L.seed_everything(0, verbose=False)
        # One full batch per epoch, so that every checkpoint is at an epoch boundary and the data resume exactly.
        trainer = make_trainer([callback or WeightPenaltyCallback(strength=0.3)], max_steps=steps)
        trainer.fit(model, make_loader(1), ckpt_path=ckpt_path)
        return model

    straight = run(6)
    first = run(3)
    first.trainer.save_checkpoint(tmp_path / "step3.ckpt")
    checkpoint = torch.load(tmp_path / "step3.ckpt", weights_only=False)
    (anchors,) = checkpoint[ANCHORS_CHECKPOINT_KEY].values()
    assert_states_equal(anchors, {n: p for n, p in params_of(make_model()).items() if n in BACKBONE})
    assert not torch.equal(checkpoint["state_dict"]["backbone.0.weight"], anchors["backbone.0.weight"])

    resumed = run(6, tmp_path / "step3.ckpt", WeightPenaltyCallback(strength=0.3))
    assert_states_equal(params_of(resumed), params_of(straight))

    # Without the anchors the penalty pulls toward the resumed weights: a different run, with a warning.
    del checkpoint[ANCHORS_CHECKPOINT_KEY]
    torch.save(checkpoint, tmp_path / "no_anchors.ckpt")
    with pytest.warns(UserWarning, match="pulls toward the weights the fit resumes from"):
        other = run(6, tmp_path / "no_anchors.ckpt")
    assert not torch.equal(params_of(other)["backbone.0.weight"], params_of(straight)["backbone.0.weight"])


def test_resuming_with_other_targets_is_refused(tmp_path: Path) -> None:
    model = make_model()
    make_trainer([WeightPenaltyCallback()], max_steps=1).fit(model, make_loader(1))
    model.trainer.save_checkpoint(tmp_path / "step1.ckpt")
    trainer = make_trainer([WeightPenaltyCallback(targets=["backbone.0.*"])], max_steps=2)
    with pytest.raises(RobustFTConfigError, match=r"anchors do not match the current targets.*unexpected \['backbone"):
        trainer.fit(make_model(), make_loader(1), ckpt_path=tmp_path / "step1.ckpt")


def test_gradient_is_penalised_only_on_targets() -> None:
    probe_plain, probe = Recorder(), Recorder()
    _fit([probe_plain], 1)
    _fit([WeightPenaltyCallback(strength=0.3, targets=["backbone.3.weight"]), probe], 1)
    # Step 0: w == w0, so the L2 penalty's gradient is zero and every gradient is the plain one.
    assert_states_equal(probe.grads[0], probe_plain.grads[0])
    probe_plain, probe = Recorder(), Recorder()
    _fit([probe_plain], 2)
    _fit([WeightPenaltyCallback(strength=0.3, norm="l1", targets=["backbone.3.weight"]), probe], 2)
    changed = [n for n in probe.grads[1] if not torch.equal(probe.grads[1][n], probe_plain.grads[1][n])]
    assert changed == ["backbone.3.weight"]
