"""Shared fixtures (the shared classes and functions live in ``_helpers``).

Environment first: no hub downloads, and Triton kernels interpreted on the CPU.

``TRITON_INTERPRET`` must be set before any ``@triton.jit`` decorator runs; the kernels are imported lazily, so
setting it here (before any test module imports them) is enough. ``setdefault`` lets a GPU run say ``0``.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from _helpers import TinyBackbone, write_image_folder

__all__ = ["TinyBackbone"]  # re-exported for test files that still import it from here; new code: tests/_helpers.py


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


@pytest.fixture(autouse=True)
def deterministic_flag_restored() -> Iterator[None]:
    """``make_trainer``'s ``deterministic=True`` sets a process-wide torch flag: give every test the flag it found."""
    enabled, warn_only = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
