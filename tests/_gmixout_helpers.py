"""GMixout test helpers (the shared ones are in ``_helpers``): a LightningModule with failure switches, its data, a
hand-written GMixout reference for the callback tests, and float64 references of the passes with the checks that the
torch and Triton backends' tests share."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import _helpers as helpers
import torch
import torch.nn.functional as F
from _helpers import assert_states_equal, make_trainer, params_of
from lightning.pytorch import LightningModule, Trainer
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from lightning_robustft.callbacks.gmixout import GMixoutCallback
from lightning_robustft.ops.mixout import MixoutPasses, mix_scale

__all__ = [
    "ManualModel",
    "Recorder",
    "TinyClassifier",
    "anchor_reference",
    "assert_mixed_close",
    "assert_params_close",
    "assert_params_equal",  # = _helpers.assert_states_equal, for the GMixout tests that import it from here
    "check_pass_semantics",
    "make_batches",
    "make_loader",
    "make_model",
    "make_targets",
    "make_trainer",  # the shared factory, re-exported for the GMixout tests that import it from here
    "mixin_reference",
    "mixout_grad_reference",
    "move",
    "params_of",  # likewise
    "reference_gmixout",
]

FEATURES, CLASSES, BATCH = 12, 3, 8
assert_params_equal = assert_states_equal


class TinyClassifier(LightningModule):
    """An MLP with a norm and a ``head``; SGD with momentum. Test switches make a step fail, save or overflow."""

    def __init__(self, lr: float = 0.05, momentum: float = 0.9) -> None:
        super().__init__()
        self.lr, self.momentum = lr, momentum
        self.backbone = nn.Sequential(
            nn.Linear(FEATURES, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh()
        )
        self.head = nn.Linear(16, CLASSES)
        self.raise_at_step: int | None = None
        self.inf_at_step: int | None = None
        self.save_at_step: tuple[int, Path] | None = None
        self.val_params: list[dict[str, torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y.long())
        if self.raise_at_step == self.global_step:
            raise RuntimeError("planned failure")
        if self.save_at_step is not None and self.save_at_step[0] == self.global_step:
            self.trainer.save_checkpoint(self.save_at_step[1])
        if self.inf_at_step == self.global_step:
            loss = loss * float("inf")
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:
            self.val_params.append(params_of(self))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


class ManualModel(TinyClassifier):
    """The same model with manual optimization, which the gradient-editing callbacks must refuse."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False


def make_model(seed: int = 0) -> TinyClassifier:
    torch.manual_seed(seed)
    return TinyClassifier()


def make_batches(n_batches: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n_batches * BATCH, FEATURES, generator=generator)
    y = torch.randint(0, CLASSES, (n_batches * BATCH,), generator=generator).float()
    return [(x[i * BATCH : (i + 1) * BATCH], y[i * BATCH : (i + 1) * BATCH]) for i in range(n_batches)]


def make_loader(n_batches: int, seed: int = 1) -> DataLoader:
    x, y = (torch.cat(parts) for parts in zip(*make_batches(n_batches, seed), strict=True))
    return DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=False)


class Recorder(helpers.Recorder):
    """The shared recorder, plus GMixout's step counter and anchors after every optimizer step."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[int] = []
        self.anchors: list[list[torch.Tensor]] = []

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        recorded = len(self.after_step)
        super().on_train_batch_end(trainer, pl_module, *args)
        if len(self.after_step) > recorded:
            gmixout = next(cb for cb in trainer.callbacks if isinstance(cb, GMixoutCallback))
            self.steps.append(gmixout.step)
            self.anchors.append([anchor.clone() for anchor in gmixout.passes.anchors])


def reference_gmixout(
    model: TinyClassifier,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    masks: Any,
    names: Sequence[str],
    steps: int,
    p: float,
    resample_every: int,
    anchor_decay: float,
    accumulate: int = 1,
    clip: float | None = None,
) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
    """GMixout written out by hand: autograd through ``w~ = a + M*(w-a)/(1-p)``, the moving anchor, the model's SGD.

    ``masks(period, index)`` gives the boolean keep-mask of target ``index``; ``clip`` clips the gradient norm before
    each step. Returns the gradient the optimizer saw at every step and the parameters after every step.
    """
    model = copy.deepcopy(model)
    params = dict(model.named_parameters())
    anchors = {name: params[name].detach().clone() for name in names}
    optimizer = model.configure_optimizers()
    grads: list[dict[str, torch.Tensor]] = []
    after: list[dict[str, torch.Tensor]] = []
    anchor_period = 0
    for t in range(steps):
        period = t // resample_every
        if period > anchor_period:
            for name in names:
                anchors[name] = anchor_decay * anchors[name] + (1 - anchor_decay) * params[name].detach()
            anchor_period = period
        optimizer.zero_grad()
        for micro in range(accumulate):
            mixed = dict(params)
            for index, name in enumerate(names):
                keep = masks(period, index).to(params[name].dtype)
                mixed[name] = anchors[name] + keep * (params[name] - anchors[name]) / (1 - p)
            x, y = batches[t * accumulate + micro]
            loss = F.cross_entropy(functional_call(model, mixed, (x,)), y.long()) / accumulate
            loss.backward()
        grads.append({name: param.grad.detach().clone() for name, param in params.items()})
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        after.append(params_of(model))
    return grads, after


def assert_params_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], **tol: float) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], msg=lambda m, name=name: f"{name}: {m}", **tol)


# ----------------------------------------------------------------------------------------------------------------------
# The passes (MixoutPasses): float64 references of the three passes, and the checks both backends' tests share
# ----------------------------------------------------------------------------------------------------------------------


def mixin_reference(w: torch.Tensor, a: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
    """Reference mixed weight ``w~ = a + M*(w - a)/(1-p)``, computed in float64 and rounded to ``w``'s dtype."""
    w64, a64 = w.double(), a.double()
    return torch.where(mask, a64 + (w64 - a64) / (1.0 - p), a64).to(w.dtype)


def mixout_grad_reference(g: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
    """Reference gradient of ``w``: ``M*g/(1-p)``, computed in float64 and rounded to ``g``'s dtype."""
    return torch.where(mask, g.double() / (1.0 - p), 0.0).to(g.dtype)


def anchor_reference(a: torch.Tensor, w: torch.Tensor, decay: float) -> torch.Tensor:
    """Reference anchor EMA ``decay*a + (1-decay)*w``, computed in float64 and rounded to fp32."""
    return (decay * a.double() + (1.0 - decay) * w.double()).float()


def make_targets(
    shapes: Sequence[tuple[int, ...]], dtype: torch.dtype, seed: int = 0, device: str = "cpu"
) -> tuple[list[torch.Tensor], torch.Generator]:
    """Anchored tensors, then moved away from the anchor so that kept and held entries differ."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in shapes]
    return params, gen


def move(params: Sequence[torch.Tensor], gen: torch.Generator) -> list[torch.Tensor]:
    """Step every target away from where it is (in place); returns copies of the new values ``w``."""
    for w in params:
        w.add_(torch.randn(w.shape, generator=gen).to(device=w.device, dtype=w.dtype))
    return [w.clone() for w in params]


def assert_mixed_close(got: torch.Tensor, ref: torch.Tensor, w: torch.Tensor, a: torch.Tensor, p: float) -> None:
    """|got - ref| within one ulp of the dtype at |ref| plus fp32 rounding of the lerp's terms."""
    terms = a.double().abs() + w.double().abs() * (1 + mix_scale(p)) + a.double().abs() * mix_scale(p)
    bound = torch.finfo(got.dtype).eps * ref.double().abs() + 8 * torch.finfo(torch.float32).eps * terms + 1e-30
    err = (got.double() - ref.double()).abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max().item()}"


def check_pass_semantics(
    passes: MixoutPasses,
    params: Sequence[torch.Tensor],
    anchors: Sequence[torch.Tensor],
    w: Sequence[torch.Tensor],
    period: int,
    p: float,
    gen: torch.Generator,
) -> list[torch.Tensor]:
    """mix_in / mix_out against the references for the masks the passes report; returns those masks.

    Target 1 gets no gradient (``None`` must pass through).
    """
    passes.mix_in(period)
    masks = [passes.mask(period, i) for i in range(len(params))]
    for t, a, w_i, m in zip(params, anchors, w, masks, strict=True):
        assert torch.equal(t[~m], a[~m].to(t.dtype)), "held entries must be exactly the anchor"
        assert_mixed_close(t, mixin_reference(w_i, a, m, p), w_i, a, p)
    fresh = [torch.randn(t.shape, generator=gen).to(device=t.device, dtype=t.dtype) for t in params]
    grads = [g.clone() for g in fresh]
    grads[1] = None
    passes.mix_out(period, grads)
    for t, w_i in zip(params, w, strict=True):
        assert torch.equal(t, w_i), "mix_out must restore w bitwise"
    for g, g0, m in zip(grads, fresh, masks, strict=True):
        if g is not None:
            assert (g[~m] == 0).all()
            ref = mixout_grad_reference(g0, m, p)
            torch.testing.assert_close(g, ref, rtol=torch.finfo(g.dtype).eps, atol=0)
    return masks
