"""A tiny, fast setting for ``robustft compare`` tests: Gaussian blobs, a linear backbone, one shifted OOD set.

Importable by ``class_path`` from the cells' configs (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from lightning_robustft.data.multi_domain import MultiDomainDataModule

CLASSES = ["a", "b", "c"]
DIM = 8


class Blobs(Dataset):
    """Three Gaussian classes in ``DIM`` dimensions; ``shift`` moves every point (an OOD set), ``seed`` redraws them.

    Setting :attr:`armed` (class-wide) makes sets with ``explode=True`` raise on every read: a loader that must not
    be touched at that moment.
    """

    classes = CLASSES
    armed = False

    def __init__(self, split: str = "train", seed: int = 0, shift: float = 0.0, size: int = 96, explode: bool = False):
        generator = torch.Generator().manual_seed(1000 * seed + sum(map(ord, split)))
        centers = torch.eye(len(CLASSES), DIM) * 2.0
        self.y = torch.arange(size) % len(CLASSES)
        self.x = centers[self.y] + torch.randn(size, DIM, generator=generator) + shift
        self.explode = explode

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self.explode and Blobs.armed:
            raise AssertionError("an OOD set was read while choosing (selection must use ID validation only)")
        return self.x[index], int(self.y[index])


class BlobsDataModule(MultiDomainDataModule):
    """The blobs setting as a data module: ``id`` validation and test sets, one ``shifted`` OOD set."""

    def __init__(self, seed: int = 0, explode: bool = False, batch_size: int = 32) -> None:
        super().__init__(
            train=Blobs("train", seed),
            val={"id": Blobs("val", seed), "shifted": Blobs("ood", seed, shift=1.0, explode=explode)},
            test={"id": Blobs("test", seed)},
            batch_size=batch_size,
            num_workers=0,
        )


def blobs_config(tmp_path: Path, *, max_epochs: int = 2, explode: bool = False) -> str:
    """Write a ``robustft fit`` config for the blobs setting and return its path."""
    path = tmp_path / "base.yaml"
    path.write_text(
        f"""
seed_everything: 0
trainer:
  max_epochs: {max_epochs}
  accelerator: cpu
  devices: 1
  logger: false
  enable_checkpointing: false
  enable_model_summary: false
  num_sanity_val_steps: 0
model:
  class_path: lightning_robustft.ImageClassifier
  init_args:
    backbone: {{class_path: torch.nn.Linear, init_args: {{in_features: {DIM}, out_features: 6}}}}
    lr: 0.01
    warmup_steps: 0
    print_table: false
data:
  class_path: _compare_fixtures.BlobsDataModule
  init_args: {{seed: 0, explode: {str(explode).lower()}}}
"""
    )
    return str(path)
