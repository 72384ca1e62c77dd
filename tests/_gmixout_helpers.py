"""A tiny LightningModule, its data, and a hand-written GMixout reference for the GMixoutCallback tests."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from lightning_robustft.callbacks.gmixout import GMixoutCallback

FEATURES, CLASSES, BATCH = 12, 3, 8


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


def make_trainer(callbacks: Sequence[Callback], max_steps: int, **kwargs: Any) -> Trainer:
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": max_steps,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
    }
    options.update(kwargs)
    return Trainer(callbacks=list(callbacks), **options)


def params_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in module.named_parameters()}


class Recorder(Callback):
    """Records what the optimizer is given (after GMixout's mix-out) and the weights after every optimizer step."""

    def __init__(self, names: Sequence[str] | None = None) -> None:
        self.names = names
        self.grads: list[dict[str, torch.Tensor]] = []
        self.after_step: list[dict[str, torch.Tensor]] = []
        self.steps: list[int] = []
        self.anchors: list[list[torch.Tensor]] = []
        self._last_global_step = 0

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        self.grads.append({n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None})

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if trainer.global_step == self._last_global_step:
            return
        self._last_global_step = trainer.global_step
        self.after_step.append(params_of(pl_module))
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
) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """GMixout written out by hand: autograd through ``w~ = a + M*(w-a)/(1-p)``, the moving anchor, plain SGD.

    ``masks(period, index)`` gives the boolean keep-mask of target ``index``. Returns the gradient the optimizer saw at
    every step and the final parameters.
    """
    model = copy.deepcopy(model)
    params = dict(model.named_parameters())
    anchors = {name: params[name].detach().clone() for name in names}
    optimizer = model.configure_optimizers()
    grads: list[dict[str, torch.Tensor]] = []
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
        optimizer.step()
    return grads, params_of(model)


def assert_params_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], **tol: float) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], msg=lambda m, name=name: f"{name}: {m}", **tol)


def assert_params_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    different = [name for name in expected if not torch.equal(actual[name], expected[name])]
    assert not different, f"parameters differ: {different}"
