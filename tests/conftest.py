"""Shared fixtures. Environment first: no hub downloads, and Triton kernels interpreted on the CPU.

``TRITON_INTERPRET`` must be set before any ``@triton.jit`` decorator runs; the kernels are imported lazily, so
setting it here (before any test module imports them) is enough. ``setdefault`` lets a GPU run say ``0``.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class TinyBackbone(nn.Module):
    """A few-thousand-parameter image encoder for fast module tests."""

    num_features = 8

    def __init__(self, image_size: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.LazyLinear(8))
        self.net(torch.zeros(1, 3, image_size, image_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def make_image_loader(n: int = 16, seed: int = 1) -> DataLoader:
    """``n`` random 3x16x16 images with labels in ``{0, 1, 2}``, in batches of 8 (for ``TinyBackbone`` models)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=generator)
    y = torch.randint(0, 3, (n,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)


def make_epoch_trainer(callbacks: list[Callback], max_epochs: int, tmp_path: Path, **kwargs: Any) -> Trainer:
    """A quiet CPU ``Trainer`` for ``max_epochs`` epochs: no logger, progress bar, summary or sanity check."""
    return Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=kwargs.pop("enable_checkpointing", False),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        **kwargs,
    )


def state_copy(module: nn.Module) -> dict[str, torch.Tensor]:
    """Detached clones of ``module``'s state dict, to compare before and after a fit."""
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def write_image_folder(root: Path, classes: list[str], per_class: int = 4, size: int = 16, seed: int = 0) -> Path:
    """Write random RGB PNGs in ImageFolder layout; returns ``root``."""
    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


@pytest.fixture
def image_folders(tmp_path: Path) -> dict[str, Path]:
    """train / id / two OOD folders over classes a, b, c; ``ood_subset`` covers only a and c."""
    classes = ["a", "b", "c"]
    return {
        "train": write_image_folder(tmp_path / "train", classes, seed=0),
        "id": write_image_folder(tmp_path / "id", classes, seed=1),
        "ood_full": write_image_folder(tmp_path / "ood_full", classes, seed=2),
        "ood_subset": write_image_folder(tmp_path / "ood_subset", ["a", "c"], seed=3),
    }


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
