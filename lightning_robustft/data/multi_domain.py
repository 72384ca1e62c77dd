"""``MultiDomainDataModule``: one training set, an ID validation set and any number of named OOD sets."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, Literal

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from lightning_robustft.data.sets import (
    LabeledSet,
    SetSource,
    open_set,
    resolve_source,
    source_classes,
    subset_indices,
)
from lightning_robustft.errors import RobustFTConfigError

__all__ = ["Augment", "MultiDomainDataModule", "PredictSource"]

PredictSource = Dataset | dict[str, SetSource] | str | os.PathLike
"""One prediction set, or ``{name: set}``; the mapping comes before ``str`` for the reason given at ``SetSource``."""

Augment = Literal["none", "randaugment", "trivialaugment", "autoaugment"]
_AUGMENTS: dict[str, Callable[[], Any]] = {
    "randaugment": T.RandAugment,
    "trivialaugment": T.TrivialAugmentWide,
    "autoaugment": T.AutoAugment,
}


class MultiDomainDataModule(LightningDataModule):
    """Train on one domain, validate on the ID domain and on every named distribution shift each epoch.

    Every set is an image folder (``<root>/<class name>/<image>``), a dataset with a ``classes`` attribute (a
    ``class_path`` in YAML), a Hugging Face dataset (``"hf:<name or path>[:<split>]"`` or a ``datasets.Dataset``) or
    a WILDS split (``"wilds:<dataset>:<split>"``, read under ``wilds_root``). The class list comes from ``classes`` or
    the training set; every other set must use the same class names or a subset of them (such sets are scored among
    their own classes). ``val_dataloader()`` returns a dict ``{set name: DataLoader}``, so metrics and logs carry set
    names, never dataloader indices.

    Transforms default to the backbone's own (open_clip's preprocess, timm's data config) taken from the
    LightningModule's ``train_transform`` / ``eval_transform`` attributes at ``setup``; pass ``train_transform`` /
    ``eval_transform`` to override them. Training uses the evaluation preprocessing (the WiSE-FT recipe) unless
    ``backbone_train_transform=True``, plus the optional ``augment`` policy in front.

    Args:
        train: the training set (folder path or dataset).
        val: ``{name: folder or dataset}``; one is the ID set, the rest are OOD sets.
        id_set: the ID validation set (default: the first of ``val``).
        test: optional ``{name: folder or dataset}`` test sets.
        predict: optional set for ``predict``, or ``{name: set}`` (the name is the ``set`` column of the
            prediction file).
        classes: the class list, in label order (default: the training set's).
        batch_size: training batch size per device.
        eval_batch_size: evaluation batch size (default: ``batch_size``).
        num_workers: dataloader workers per loader.
        augment: augmentation policy applied to training images before the preprocessing.
        backbone_train_transform: use the backbone's training transform (e.g. open_clip's random resized crop).
        train_transform: explicit training transform (PIL image -> tensor).
        eval_transform: explicit evaluation transform.
        pin_memory: pin host memory in the loaders.
        wilds_root: the folder holding the WILDS datasets (``<wilds_root>/iwildcam_v2.0/...``), for ``wilds:`` sets.
        folders_named_by_index: names of sets whose class folders are class indices (``0 ... 999``, as ImageNetV2
            ships them) into the class list, instead of class names.
    """

    def __init__(
        self,
        train: SetSource,
        val: dict[str, SetSource],
        id_set: str | None = None,
        test: dict[str, SetSource] | None = None,
        predict: PredictSource | None = None,
        classes: list[str] | None = None,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        augment: Augment = "none",
        backbone_train_transform: bool = False,
        train_transform: Callable[[Any], Any] | None = None,
        eval_transform: Callable[[Any], Any] | None = None,
        pin_memory: bool = False,
        wilds_root: str | os.PathLike | None = None,
        folders_named_by_index: list[str] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(val, Mapping) or not val:
            raise RobustFTConfigError("`val` must be a non-empty mapping {set name: folder or dataset}.")
        if id_set is not None and id_set not in val:
            raise RobustFTConfigError(f"`id_set`={id_set!r} is not one of the validation sets {list(val)}.")
        if augment not in ("none", *_AUGMENTS):
            raise RobustFTConfigError(f"`augment`={augment!r}; allowed: {['none', *_AUGMENTS]}.")
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size or 1)):
            if value < 1:
                raise RobustFTConfigError(f"`{name}`={value} must be >= 1.")
        if num_workers < 0:
            raise RobustFTConfigError(f"`num_workers`={num_workers} must be >= 0.")
        by_index = set(folders_named_by_index or [])
        unknown = sorted(by_index - {"train", "predict", *val, *(test or {})})
        if unknown:
            raise RobustFTConfigError(f"`folders_named_by_index` names sets that do not exist: {unknown}.")
        self.by_index = by_index

        def resolve(sources: Mapping[str, SetSource]) -> dict[str, Any]:
            return {name: resolve_source(name, source, wilds_root) for name, source in sources.items()}

        self.train_source = resolve_source("train", train, wilds_root)
        self.val_sources = resolve(val)
        self.test_sources = resolve(test or {})
        predict_sets = predict if isinstance(predict, Mapping) else {} if predict is None else {"predict": predict}
        self.predict_sources = resolve(predict_sets)
        self.id_set = id_set or next(iter(val))
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.augment = augment
        self.backbone_train_transform = backbone_train_transform
        self.train_transform = train_transform
        self.eval_transform = eval_transform
        self.pin_memory = pin_memory

        if "train" in by_index and not classes:
            raise RobustFTConfigError("The training folders are named by index: pass the class names, `classes=`.")
        train_classes = source_classes("train", self.train_source, classes, "train" in by_index)
        self.class_names: list[str] = list(classes or train_classes or [])
        if not self.class_names:
            raise RobustFTConfigError(
                "Cannot tell the class list: the training dataset has no `classes` attribute. Pass `classes=`."
            )
        subsets = {"train": subset_indices("train", train_classes, self.class_names)}
        for name, source in {**self.val_sources, **self.test_sources}.items():
            set_classes = source_classes(name, source, self.class_names, name in by_index)
            subsets[name] = subset_indices(name, set_classes, self.class_names)
        self.class_subsets: dict[str, list[int]] = {name: idx for name, idx in subsets.items() if idx is not None}
        self._sets: dict[str, LabeledSet] = {}

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)

    @property
    def val_set_names(self) -> list[str]:
        """Validation set names in dataloader order (the ID set first as configured)."""
        return list(self.val_sources)

    @property
    def ood_set_names(self) -> list[str]:
        """Validation sets other than the ID set."""
        return [name for name in self.val_sources if name != self.id_set]

    @property
    def test_set_names(self) -> list[str]:
        """Test set names in dataloader order."""
        return list(self.test_sources)

    @property
    def predict_set_names(self) -> list[str]:
        """Prediction set names in dataloader order (``["predict"]`` for a single unnamed set)."""
        return list(self.predict_sources)

    def _transforms(self) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
        module = self.trainer.lightning_module if self.trainer is not None else None
        eval_transform = self.eval_transform or getattr(module, "eval_transform", None) or T.ToTensor()
        base_train = self.train_transform or (
            getattr(module, "train_transform", None) if self.backbone_train_transform else None
        )
        train_transform = base_train or eval_transform
        if self.augment != "none":
            train_transform = T.Compose([T.Lambda(_to_rgb), _AUGMENTS[self.augment](), train_transform])
        return train_transform, eval_transform

    def setup(self, stage: str) -> None:
        """Open the sets the stage needs, with the backbone's transforms."""
        train_transform, eval_transform = self._transforms()
        if stage == "fit":
            self._sets["train"] = self._open("train", self.train_source, train_transform)
        if stage in ("fit", "validate"):
            for name, source in self.val_sources.items():
                self._sets[f"val/{name}"] = self._open(name, source, eval_transform)
        if stage == "test":
            if not self.test_sources:
                raise RobustFTConfigError(
                    "`test` sets are needed for `test`: give the data module `test={name: path}`."
                )
            for name, source in self.test_sources.items():
                self._sets[f"test/{name}"] = self._open(name, source, eval_transform)
        if stage == "predict":
            if not self.predict_sources:
                raise RobustFTConfigError(
                    "A `predict` set is needed for `predict`: give the data module `predict=` (a set or {name: set})."
                )
            for name, source in self.predict_sources.items():
                self._sets[f"predict/{name}"] = self._open(name, source, eval_transform)

    def _open(self, name: str, source: Any, transform: Callable[[Any], Any]) -> LabeledSet:
        return open_set(name, source, self.class_names, transform, by_index=name in self.by_index)

    def _loader(self, dataset: LabeledSet, train: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """The training loader (shuffled)."""
        return self._loader(self._sets["train"], train=True)

    def val_dataloader(self) -> dict[str, DataLoader]:
        """``{set name: loader}`` for every validation set."""
        return {name: self._loader(self._sets[f"val/{name}"], train=False) for name in self.val_sources}

    def test_dataloader(self) -> dict[str, DataLoader]:
        """``{set name: loader}`` for every test set."""
        return {name: self._loader(self._sets[f"test/{name}"], train=False) for name in self.test_sources}

    def predict_dataloader(self) -> dict[str, DataLoader]:
        """``{set name: loader}`` for every prediction set."""
        return {name: self._loader(self._sets[f"predict/{name}"], train=False) for name in self.predict_sources}


def _to_rgb(image: Any) -> Any:
    """Augmentation policies work on RGB PIL images; grey or palette images are converted first."""
    return image.convert("RGB") if hasattr(image, "convert") else image
