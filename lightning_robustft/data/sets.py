"""Evaluation and training sets: image folders, datasets, Hugging Face or WILDS splits, mapped onto one class list.

A set is one of

- an image folder in ``ImageFolder`` layout (``<root>/<class name>/<image>``);
- a dataset object with a ``classes`` attribute (a ``class_path`` in YAML), or a Hugging Face ``datasets.Dataset``;
- ``"hf:<hub name or local path>[:<split>]"``: a Hugging Face dataset (`HFImageSet`);
- ``"wilds:<dataset>:<split>"``: a WILDS split (`WildsSet`), read under the
  data module's ``wilds_root``.

Problems are found when the data module is built, not an hour into training: a missing or empty folder, or a class
that the training set does not have, is an error naming the set, the path and the fix. A set that covers only some of
the classes keeps labels indexed in the full class list, so that the model can score it among its own classes
(ImageNet-R / ImageNet-A style).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from lightning_robustft.errors import RobustFTConfigError

__all__ = [
    "HF_PREFIX",
    "WILDS_PREFIX",
    "LabeledSet",
    "SetSource",
    "folder_classes",
    "index_folder_classes",
    "open_set",
    "raise_unparsed_class_path",
    "resolve_source",
    "source_classes",
    "subset_indices",
]

SetSource = Dataset | str | os.PathLike
"""A set: a dataset object, a folder path or a ``hf:`` / ``wilds:`` source string.

``Dataset`` comes first on purpose. jsonargparse (the CLI's parser) tries a union's members in the order written, and
it parses ``os.PathLike`` with ``str()``, which accepts anything: listed before ``Dataset``, it turned a YAML
``{class_path: ..., init_args: ...}`` mapping into the string of the dict instead of instantiating the class.
"""


def folder_classes(set_name: str, root: str | os.PathLike) -> list[str]:
    """Class names of an image folder (its sub-folders, sorted as ``ImageFolder`` sorts them), checked to be usable."""
    path = Path(root).expanduser()
    layout = "ImageFolder layout: <root>/<class name>/<image files>"
    if not path.exists():
        raise FileNotFoundError(f"Set {set_name!r}: path {str(path)!r} does not exist. Fix the path ({layout}).")
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


def resolve_source(set_name: str, source: Any, wilds_root: str | os.PathLike | None = None) -> Path | Dataset:
    """Turn what a user wrote into a folder path or a dataset, once, when the data module is built.

    Args:
        set_name: the set's name, for error messages.
        source: a folder path, a dataset, a ``datasets.Dataset``, ``"hf:<name or path>[:<split>]"`` or
            ``"wilds:<dataset>:<split>"``.
        wilds_root: the folder that holds the WILDS datasets (``<root>/iwildcam_v2.0/...``), for ``wilds:`` sources.

    Returns:
        The folder's path, or a dataset returning ``(image, label)``.
    """
    if isinstance(source, Dataset):
        return source
    if _is_hf_dataset(source):
        from lightning_robustft.data.hf import HFImageSet

        return HFImageSet(source)
    if isinstance(source, str) and source.startswith(HF_PREFIX):
        from lightning_robustft.data.hf import HFImageSet

        return HFImageSet.from_spec(source[len(HF_PREFIX) :])
    if isinstance(source, str) and source.startswith(WILDS_PREFIX):
        from lightning_robustft.data.wilds import WildsSet

        return WildsSet.from_spec(set_name, source[len(WILDS_PREFIX) :], wilds_root)
    if isinstance(source, str) and "class_path" in source and source.lstrip().startswith("{"):
        raise_unparsed_class_path(set_name, source)
    if isinstance(source, (str, os.PathLike)):
        return Path(source).expanduser()
    raise RobustFTConfigError(
        f"Set {set_name!r}: expected a folder path, a torch Dataset (a `class_path` in YAML), a Hugging Face dataset "
        f"or a '{HF_PREFIX}...' / '{WILDS_PREFIX}...' string; got {type(source).__name__}."
    )


def raise_unparsed_class_path(set_name: str, text: str) -> NoReturn:
    """Explain a ``class_path`` mapping that the CLI could not turn into a dataset.

    When the class cannot be imported or its ``init_args`` do not fit, jsonargparse falls back to the next type of the
    set's union and hands over the mapping as a string (or as a dict of sets named ``class_path`` and ``init_args``);
    a "path does not exist" error would hide the real problem.
    """
    raise RobustFTConfigError(
        f"Set {set_name!r} is a `class_path` mapping that could not be turned into a dataset: {text[:200]}. Check that "
        "the class imports from where `robustft` runs (`python -c 'import <module>'`), that it is a "
        "torch.utils.data.Dataset, and that its `init_args` match its signature."
    )


HF_PREFIX = "hf:"
"""Prefix of a Hugging Face dataset source: ``hf:<hub name or local path>[:<split>]``."""

WILDS_PREFIX = "wilds:"
"""Prefix of a WILDS split source: ``wilds:<dataset>:<split>``."""


def _is_hf_dataset(source: Any) -> bool:
    """Whether ``source`` is a ``datasets.Dataset``, without importing ``datasets`` (its objects imply it is loaded)."""
    module = sys.modules.get("datasets")
    return module is not None and isinstance(source, module.Dataset)


def source_classes(
    set_name: str, source: Path | Dataset, all_classes: Sequence[str] | None = None, by_index: bool = False
) -> list[str] | None:
    """Class names of a resolved set: folder names for a path, the ``classes`` attribute for a dataset.

    Args:
        set_name: the set's name, for error messages.
        source: a folder path or a dataset (see `resolve_source`).
        all_classes: the data module's class list, needed when ``by_index``.
        by_index: the folder's class folders are class indices (``0``, ``1``, ... as ImageNetV2 ships them), each
            naming the class at that index of ``all_classes``.

    Returns:
        The set's class names, or ``None`` for a dataset without a ``classes`` attribute.
    """
    if isinstance(source, Path):
        names = folder_classes(set_name, source)
        return index_folder_classes(set_name, names, all_classes or []) if by_index else names
    classes = getattr(source, "classes", None)
    return list(classes) if classes is not None else None


def index_folder_classes(set_name: str, folders: Sequence[str], all_classes: Sequence[str]) -> list[str]:
    """Class names of folders named by class index (ImageNetV2's ``0 ... 999``), checked against the class list."""
    bad = [name for name in folders if not name.isdigit() or int(name) >= len(all_classes)]
    if bad:
        raise RobustFTConfigError(
            f"Set {set_name!r} is read with class folders named by index, but folders {bad[:10]} are not indices in "
            f"[0, {len(all_classes)}). Remove the set from `folders_named_by_index` if its folders are class names."
        )
    return [all_classes[int(name)] for name in folders]


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

    def source(self, index: int) -> str:
        """Where item ``index`` came from, for prediction files.

        The file path when the dataset knows it (an image folder's ``samples``, a ``source(index)`` method), else the
        index.
        """
        samples = getattr(self.base, "samples", None)
        if samples is not None:
            return str(samples[index][0])
        if callable(getattr(self.base, "source", None)):
            return str(self.base.source(index))
        return str(index)


def open_set(
    set_name: str,
    source: Path | Dataset,
    all_classes: Sequence[str],
    transform: Callable[[Any], Any] | None,
    by_index: bool = False,
) -> LabeledSet:
    """Open a resolved set for reading: an ``ImageFolder`` for a path, the dataset itself otherwise."""
    classes = source_classes(set_name, source, all_classes, by_index)
    base = ImageFolder(str(source)) if isinstance(source, Path) else source
    if len(base) == 0:  # type: ignore[arg-type]
        raise RobustFTConfigError(f"Set {set_name!r} is empty.")
    label_map = None
    if classes is not None and list(classes) != list(all_classes):
        index = {name: i for i, name in enumerate(all_classes)}
        subset_indices(set_name, classes, all_classes)  # raises on unknown classes
        label_map = [index[name] for name in classes]
    return LabeledSet(base, transform, label_map)
