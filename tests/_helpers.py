"""The tests' shared pieces: one tiny classifier, one recorder callback, one trainer factory, and small data.

Where any LightningModule will do (a refusal that happens before the module is read), the tests use Lightning's own
``BoringModel`` (re-exported here); :class:`TinyNet` is the model where a test needs a real ``backbone`` and ``head``
(with an integer BatchNorm buffer, so weight-space code meets a tensor it must not interpolate). :class:`TinyBackbone`
is the encoder for the ``ImageClassifier`` tests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.demos.boring_classes import BoringModel
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = [
    "BoringModel",
    "Recorder",
    "TinyBackbone",
    "TinyNet",
    "assert_states_equal",
    "make_image_loader",
    "make_trainer",
    "params_of",
    "state_copy",
    "write_image_folder",
]


class TinyNet(LightningModule):
    """Linear + BatchNorm backbone (an integer buffer) and a linear ``head``, SGD; no metrics (WiSE-FT, soups)."""

    def __init__(self, in_dim: int = 6, hidden: int = 12, classes: int = 3, lr: float = 0.5) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.backbone = nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU())
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class TinyBackbone(nn.Module):
    """A few-thousand-parameter image encoder (3x16x16 in, 8 features out) for ``ImageClassifier`` tests."""

    num_features = 8

    def __init__(self, image_size: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.LazyLinear(8))
        self.net(torch.zeros(1, 3, image_size, image_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def make_trainer(
    callbacks: Sequence[Callback] = (),
    *,
    max_epochs: int | None = None,
    max_steps: int = -1,
    root: Path | str | None = None,
    **options: Any,
) -> Trainer:
    """A quiet, deterministic CPU ``Trainer``: no logger, checkpointing, progress bar, summary or sanity check.

    A fit gives ``max_epochs`` or ``max_steps`` (and any ``limit_*_batches``); every default can be overridden through
    ``options`` (a test that checks checkpoints passes ``enable_checkpointing=True``). ``root`` is
    ``default_root_dir``: tests that write files pass their ``tmp_path`` so nothing lands in the working directory.
    """
    settings: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "deterministic": True,
        "default_root_dir": root,
    }
    settings.update(options)
    return Trainer(callbacks=list(callbacks), max_epochs=max_epochs, max_steps=max_steps, **settings)


def state_copy(module: nn.Module) -> dict[str, torch.Tensor]:
    """Detached clones of ``module``'s state dict (parameters and buffers), to compare before and after a fit."""
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def params_of(module: nn.Module) -> dict[str, torch.Tensor]:
    """Detached clones of ``module``'s parameters only (what an optimizer changes)."""
    return {name: param.detach().clone() for name, param in module.named_parameters()}


def assert_states_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """The same names and bitwise the same tensors; the message lists the names that differ."""
    assert actual.keys() == expected.keys(), f"names differ: {sorted(actual.keys() ^ expected.keys())}"
    different = [name for name in expected if not torch.equal(actual[name], expected[name])]
    assert not different, f"tensors differ: {different}"


Probe = Callable[[Trainer, LightningModule], Any]


def _state_of(trainer: Trainer, pl_module: LightningModule) -> dict[str, torch.Tensor]:
    return state_copy(pl_module)


class Recorder(Callback):
    """What a fine-tuning test compares, as the fit goes: ``probe(trainer, module)`` at the points below.

    ``start`` (``on_train_start``), ``epoch_starts`` / ``epoch_ends``, ``after_step`` (once per optimizer step, at the
    batch end that completes it) and ``end`` (``on_train_end``, before a callback later in the list, e.g. WiSE-FT,
    changes the weights); ``grads`` holds the gradients the optimizer is given at every step (after any callback
    listed earlier has edited them). The default probe is a copy of the state dict; a test that needs other facts
    (a teacher's mode, the optimizer's size, a logged metric) passes its own. List the recorder first to see the
    weights before other callbacks act at the same hook, last to see them after.
    """

    def __init__(self, probe: Probe = _state_of) -> None:
        self.probe = probe
        self.start: Any = None
        self.end: Any = None
        self.epoch_starts: list[Any] = []
        self.epoch_ends: list[Any] = []
        self.after_step: list[Any] = []
        self.grads: list[dict[str, torch.Tensor]] = []
        self.step_seen = 0

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.step_seen = trainer.global_step  # a resumed fit starts past 0
        self.start = self.probe(trainer, pl_module)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.epoch_starts.append(self.probe(trainer, pl_module))

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        self.grads.append({n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None})

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if trainer.global_step != self.step_seen:  # an optimizer step completed (not a mere accumulation micro-batch)
            self.step_seen = trainer.global_step
            self.after_step.append(self.probe(trainer, pl_module))

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.epoch_ends.append(self.probe(trainer, pl_module))

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.end = self.probe(trainer, pl_module)


def make_image_loader(n: int = 16, seed: int = 1, batch_size: int = 8) -> DataLoader:
    """``n`` random 3x16x16 images with labels in ``{0, 1, 2}``, unshuffled (for ``TinyBackbone`` models)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=generator)
    y = torch.randint(0, 3, (n,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def write_image_folder(root: Path, classes: list[str], per_class: int = 4, size: int = 16, seed: int = 0) -> Path:
    """Write random RGB PNGs in ImageFolder layout; returns ``root``."""
    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root
