"""Evaluation and training sets: image folders or datasets, checked up front and mapped onto one class list.

Each set is an image folder in ``ImageFolder`` layout (``<root>/<class name>/<image>``) or a dataset object with a
``classes`` attribute. Problems are found when the data module is built, not an hour into training: a missing or empty
folder, or a class that the training set does not have, is an error naming the set, the path and the fix. A set that
covers only some of the classes keeps labels indexed in the full class list, so that the model can score it among its
own classes (ImageNet-R / ImageNet-A style).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from lightning_robustft.errors import RobustFTConfigError

SetSource = str | os.PathLike | Dataset


def folder_classes(set_name: str, root: str | os.PathLike) -> list[str]:
    """Class names of an image folder (its sub-folders, sorted as ``ImageFolder`` sorts them), checked to be usable."""
    path = Path(root).expanduser()
    layout = "ImageFolder layout: <root>/<class name>/<image files>"
    if not path.exists():
        raise RobustFTConfigError(f"Set {set_name!r}: path {str(path)!r} does not exist. Fix the path ({layout}).")
    if not path.is_dir():
        raise RobustFTConfigError(f"Set {set_name!r}: path {str(path)!r} is not a folder ({layout}).")
    classes = sorted(entry.name for entry in os.scandir(path) if entry.is_dir())
    if not classes:
        raise RobustFTConfigError(f"Set {set_name!r}: folder {str(path)!r} has no class sub-folders ({layout}).")
    if not any(_has_image(path / name) for name in classes):
        raise RobustFTConfigError(
            f"Set {set_name!r}: folder {str(path)!r} has class folders but no images with extensions {IMG_EXTENSIONS}."
        )
    return classes


def _has_image(folder: Path) -> bool:
    return any(name.lower().endswith(IMG_EXTENSIONS) for _, _, files in os.walk(folder) for name in files)


def source_classes(set_name: str, source: SetSource) -> list[str] | None:
    """Class names of a set: folder names for a path, the ``classes`` attribute for a dataset (``None`` if absent)."""
    if isinstance(source, (str, os.PathLike)):
        return folder_classes(set_name, source)
    if isinstance(source, Dataset):
        classes = getattr(source, "classes", None)
        return list(classes) if classes is not None else None
    raise RobustFTConfigError(
        f"Set {set_name!r}: expected a folder path or a torch Dataset (a `class_path` in YAML), got "
        f"{type(source).__name__}."
    )


def subset_indices(set_name: str, classes: Sequence[str] | None, all_classes: Sequence[str]) -> list[int] | None:
    """Indices in ``all_classes`` of a set's classes; ``None`` when the set covers every class (or cannot tell)."""
    if classes is None or list(classes) == list(all_classes):
        return None
    index = {name: i for i, name in enumerate(all_classes)}
    unknown = [name for name in classes if name not in index]
    if unknown:
        raise RobustFTConfigError(
            f"Set {set_name!r} has classes {unknown[:10]} that the training classes do not have. Every set's classes "
            "must be among the training classes (rename the folders, or pass `classes=` to the data module)."
        )
    return sorted(index[name] for name in classes)


class LabeledSet(Dataset):
    """A set ready for a dataloader: the source's images transformed, labels mapped onto the full class list.

    Images that are already tensors (datasets that transform themselves) are passed through untouched.
    """

    def __init__(
        self, base: Dataset, transform: Callable[[Any], Any] | None, label_map: Sequence[int] | None = None
    ) -> None:
        self.base = base
        self.transform = transform
        self.label_map = list(label_map) if label_map is not None else None

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, label = self.base[index]
        if self.transform is not None and not isinstance(image, torch.Tensor):
            image = self.transform(image)
        label = int(label)
        return image, self.label_map[label] if self.label_map is not None else label


def open_set(
    set_name: str, source: SetSource, all_classes: Sequence[str], transform: Callable[[Any], Any] | None
) -> LabeledSet:
    """Open a set for reading: an ``ImageFolder`` for a path, the dataset itself otherwise."""
    classes = source_classes(set_name, source)
    base = ImageFolder(str(Path(source).expanduser())) if isinstance(source, (str, os.PathLike)) else source
    if len(base) == 0:  # type: ignore[arg-type]
        raise RobustFTConfigError(f"Set {set_name!r} is empty.")
    label_map = None
    if classes is not None and list(classes) != list(all_classes):
        index = {name: i for i, name in enumerate(all_classes)}
        subset_indices(set_name, classes, all_classes)  # raises on unknown classes
        label_map = [index[name] for name in classes]
    return LabeledSet(base, transform, label_map)
