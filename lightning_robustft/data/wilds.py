"""``WildsSet``: a split of a WILDS dataset (iWildCam, FMoW, Camelyon17, ...) as a set of ``MultiDomainDataModule``.

WILDS ships each benchmark with its own ID / OOD splits (``train``, ``id_val``, ``val``, ``id_test``, ``test`` for
iWildCam); reading them through the ``wilds`` package keeps those splits exactly, instead of asking users to export
image folders. Datasets are read from disk only (``download=False``): download them once with ``wilds`` itself.
``wilds`` is an optional dependency (``pip install lightning-robustft[wilds]``), imported only when such a set is used.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from lightning_robustft._optional import require
from lightning_robustft.errors import RobustFTConfigError

__all__ = ["WildsSet"]


class WildsSet(Dataset):
    """One split of a WILDS dataset, returning ``(PIL image, label)``, with a ``classes`` list.

    In YAML a set can say ``wilds:<dataset>:<split>`` (e.g. ``wilds:iwildcam:id_val``) with the data module's
    ``wilds_root``, or use this class by ``class_path``. The dataset is opened once per ``(dataset, root_dir)`` and
    shared by its splits.

    Class names, which CLIP's zero-shot head needs: ``classes`` if given; else iWildCam's species names from
    ``categories.csv`` in the dataset folder (columns ``y`` and ``name``) when that file is there, FMoW's category
    names from ``wilds``, Camelyon17's ``normal`` / ``tumor``; else the class indices as strings.

    Args:
        dataset: the WILDS dataset name (``iwildcam``, ``fmow``, ``camelyon17``, ... see ``wilds.supported_datasets``).
        split: the split name (see the dataset's ``split_dict``, e.g. ``train``, ``id_val``, ``val``, ``test``).
        root_dir: the folder that holds the dataset's folder (``<root_dir>/iwildcam_v2.0/``).
        classes: class names in label order, to override the defaults above.
    """

    def __init__(self, dataset: str, split: str, root_dir: str | os.PathLike, classes: list[str] | None = None) -> None:
        wilds = require("wilds", "wilds", "A WILDS set")
        if dataset not in wilds.supported_datasets:
            raise RobustFTConfigError(f"Unknown WILDS dataset {dataset!r}; choose among {wilds.supported_datasets}.")
        full = _open_dataset(dataset, str(Path(root_dir).expanduser()))
        if split not in full.split_dict:
            raise RobustFTConfigError(
                f"WILDS {dataset!r} has no split {split!r}; its splits are {list(full.split_dict)}."
            )
        self.name = f"{dataset}:{split}"
        self.subset = full.get_subset(split)
        names = classes if classes is not None else _default_classes(dataset, full)
        if len(names) != full.n_classes:
            raise RobustFTConfigError(
                f"WILDS {dataset!r} has {full.n_classes} classes but {len(names)} class names were given."
            )
        #: class names in label order.
        self.classes: list[str] = list(names)

    @classmethod
    def from_spec(cls, set_name: str, spec: str, root_dir: str | os.PathLike | None) -> WildsSet:
        """Build from the part after ``wilds:``: ``<dataset>:<split>``, read under ``root_dir``."""
        dataset, _, split = spec.partition(":")
        if not dataset or not split:
            raise RobustFTConfigError(f"Set {set_name!r}: `wilds:{spec}`: write `wilds:<dataset>:<split>`.")
        if root_dir is None:
            raise RobustFTConfigError(
                f"Set {set_name!r} is a WILDS split: give the data module `wilds_root=` (the folder that holds "
                f"`{dataset}_v<version>/`)."
            )
        return cls(dataset, split, root_dir)

    def __len__(self) -> int:
        return len(self.subset)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, label, _ = self.subset[index]
        return (image.convert("RGB") if hasattr(image, "convert") else image), int(label)


@functools.lru_cache(maxsize=8)
def _open_dataset(dataset: str, root_dir: str) -> Any:
    """Open a WILDS dataset from disk once per process (its metadata table can take seconds to read)."""
    wilds = require("wilds", "wilds", "A WILDS set")
    if not Path(root_dir).is_dir():
        raise RobustFTConfigError(f"WILDS root {root_dir!r} does not exist: fix `wilds_root` (or `root_dir`).")
    try:
        return wilds.get_dataset(dataset=dataset, root_dir=root_dir, download=False)
    except FileNotFoundError as err:
        raise RobustFTConfigError(
            f"WILDS {dataset!r} is not under {root_dir!r} ({err}). Download it once with "
            f"`python -c \"import wilds; wilds.get_dataset('{dataset}', root_dir='{root_dir}', download=True)\"`."
        ) from err


def _default_classes(dataset: str, full: Any) -> list[str]:
    if dataset == "iwildcam":
        categories = Path(full.data_dir) / "categories.csv"
        if categories.is_file():
            import pandas as pd

            table = pd.read_csv(categories)
            names = dict(zip(table["y"], table["name"], strict=False))
            return [str(names.get(y, y)) for y in range(full.n_classes)]
    if dataset == "fmow":
        from wilds.datasets.fmow_dataset import categories

        return [name.replace("_", " ") for name in categories]
    if dataset == "camelyon17":
        return ["normal", "tumor"]
    return [str(y) for y in range(full.n_classes)]
