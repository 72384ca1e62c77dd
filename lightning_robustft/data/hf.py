"""``HFImageSet``: a Hugging Face ``datasets`` image-classification split as a set of ``MultiDomainDataModule``.

Many image sets a user already has live on the Hugging Face hub or were saved with ``datasets``; this wrapper reads
them as they are, so nothing has to be exported to image folders. Image and label columns are found from the
dataset's features (its ``Image`` and ``ClassLabel`` columns) or named explicitly, and the class names come from the
``ClassLabel`` feature. ``datasets`` is an optional dependency (``pip install lightning-robustft[hf]``), imported only
when such a set is used.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from lightning_robustft._optional import require
from lightning_robustft.errors import RobustFTConfigError

__all__ = ["HFImageSet"]


class HFImageSet(Dataset):
    """One split of a Hugging Face dataset, returning ``(PIL image, label)``, with ``classes`` from its features.

    In YAML a set can say ``hf:<hub name or local path>[:<split>]`` (e.g. ``hf:beans:validation``,
    ``hf:/data/my_set:test``), or use this class by ``class_path`` to name the columns. From Python, a
    ``datasets.Dataset`` can be given to the data module directly.

    Args:
        dataset: a hub name or a local path (a folder written by ``save_to_disk``, or anything ``load_dataset``
            reads), or a ``datasets.Dataset`` / ``DatasetDict`` object.
        split: the split to read (needed when the dataset has several).
        image_column: the image column (default: the only ``Image`` feature).
        label_column: the label column (default: the only ``ClassLabel`` feature).
    """

    def __init__(
        self,
        dataset: Any,
        split: str | None = None,
        image_column: str | None = None,
        label_column: str | None = None,
    ) -> None:
        datasets = require("datasets", "hf", "A Hugging Face set")
        self.name = str(dataset) if isinstance(dataset, (str, os.PathLike)) else type(dataset).__name__
        loaded = _load(datasets, dataset, split) if isinstance(dataset, (str, os.PathLike)) else dataset
        if isinstance(loaded, datasets.DatasetDict):
            loaded = _pick_split(self.name, loaded, split)
        if not isinstance(loaded, datasets.Dataset):
            raise RobustFTConfigError(
                f"Hugging Face set {self.name!r}: expected a `datasets.Dataset` (a split), got {type(loaded).__name__}."
            )
        features = loaded.features
        self.image_column = image_column or _only_column(self.name, features, datasets.Image, "image")
        self.label_column = label_column or _only_column(self.name, features, datasets.ClassLabel, "label")
        missing = [name for name in (self.image_column, self.label_column) if name not in features]
        if missing:
            raise RobustFTConfigError(
                f"Hugging Face set {self.name!r} has no column(s) {missing}; its columns are {list(features)}."
            )
        label_feature = features[self.label_column]
        #: class names in label order, from the label column's ``ClassLabel`` feature (``None`` for plain integers).
        self.classes: list[str] | None = (
            list(label_feature.names) if isinstance(label_feature, datasets.ClassLabel) else None
        )
        self.dataset = loaded.select_columns([self.image_column, self.label_column])

    @classmethod
    def from_spec(cls, spec: str) -> HFImageSet:
        """Build from the part after ``hf:``: ``<hub name or local path>[:<split>]``."""
        name, _, split = spec.rpartition(":") if ":" in spec else (spec, "", "")
        if not name:
            raise RobustFTConfigError(f"`hf:{spec}`: write `hf:<hub name or local path>[:<split>]`.")
        return cls(name, split=split or None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        row = self.dataset[index]
        image = row[self.image_column]
        return (image.convert("RGB") if hasattr(image, "convert") else image), int(row[self.label_column])


def _load(datasets: Any, dataset: str | os.PathLike, split: str | None) -> Any:
    """``load_from_disk`` for a folder written by ``save_to_disk``, ``load_dataset`` for anything else."""
    path = Path(dataset).expanduser()
    saved = path.is_dir() and any((path / name).is_file() for name in ("state.json", "dataset_dict.json"))
    try:
        return datasets.load_from_disk(str(path)) if saved else datasets.load_dataset(str(dataset), split=split)
    except (FileNotFoundError, ValueError, ConnectionError) as err:
        raise RobustFTConfigError(
            f"Hugging Face set {str(dataset)!r} could not be loaded ({type(err).__name__}: {err}). Give a hub name "
            "(the hub must be reachable, or the dataset cached) or a local folder."
        ) from err


def _pick_split(name: str, splits: Any, split: str | None) -> Any:
    if split is None and len(splits) == 1:
        return next(iter(splits.values()))
    if split not in splits:
        raise RobustFTConfigError(
            f"Hugging Face set {name!r} has splits {list(splits)}: choose one (`hf:{name}:<split>` or `split=`); "
            f"got {split!r}."
        )
    return splits[split]


def _only_column(name: str, features: Any, kind: type, role: str) -> str:
    columns = [column for column, feature in features.items() if isinstance(feature, kind)]
    if len(columns) != 1:
        raise RobustFTConfigError(
            f"Hugging Face set {name!r} has {len(columns)} {kind.__name__} columns {columns} among {list(features)}: "
            f"name the {role} column (`{role}_column=` on `lightning_robustft.data.HFImageSet`, by `class_path` in "
            "YAML)."
        )
    return columns[0]
