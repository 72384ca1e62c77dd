"""``PredictionWriter``: what ``predict`` computed, saved per image to CSV (and Parquet) in the run directory.

Lightning's ``trainer.predict`` returns the model's outputs and forgets them; ``robustft predict`` used to end there,
with nothing printed or saved. This callback turns each batch of class probabilities into one row per image (the set,
where the image came from, the predicted class name and its probability, optionally the top k) and writes the rows
when the prediction epoch ends, saying where.
"""

from __future__ import annotations

import csv
import importlib.util
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from lightning_robustft.errors import RobustFTConfigError

__all__ = ["Format", "PredictionWriter"]

Format = Literal["csv", "parquet"]


class PredictionWriter(BasePredictionWriter):
    """Save every prediction of ``trainer.predict`` as a table: one row per image.

    Columns: ``set`` (the prediction set's name), ``index`` (the image's index in its set), ``source`` (its file path
    when the dataset knows it, else the index), ``label`` (the true class name when the set has labels, else empty),
    ``prediction`` (the top class name) and ``probability`` (its softmax probability); with ``top_k > 1`` also
    ``top2``, ``top2_probability``, ... up to ``top<k>``. Class names come from the model's ``class_names``
    hyper-parameter, else the data module's ``class_names``, else class indices.

    The model's ``predict_step`` must return class probabilities ``(batch, classes)`` (``ImageClassifier`` does); the
    batches must be ``(images, labels)`` or images. ``robustft predict`` adds this writer when no other prediction
    writer is configured.

    Args:
        output_dir: where to write (default: the trainer's ``log_dir``, else its ``default_root_dir``).
        filename: file name without extension; under DDP each rank writes ``<filename>-rank<r>``.
        top_k: how many classes to write per image (1: only the prediction).
        formats: file formats (default: CSV, plus Parquet when ``pyarrow`` is installed).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike | None = None,
        filename: str = "predictions",
        top_k: int = 1,
        formats: list[Format] | None = None,
    ) -> None:
        super().__init__(write_interval="batch")
        if top_k < 1:
            raise RobustFTConfigError(f"`top_k`={top_k} must be >= 1.")
        chosen = list(formats) if formats is not None else ["csv", *(["parquet"] if _has_pyarrow() else [])]
        bad = [name for name in chosen if name not in ("csv", "parquet")]
        if bad or not chosen:
            raise RobustFTConfigError(f"`formats`={formats!r}: choose among ['csv', 'parquet'].")
        if "parquet" in chosen and not _has_pyarrow():
            raise RobustFTConfigError(
                "Parquet output needs `pyarrow`, which is not installed: `pip install pyarrow`, or `formats: [csv]`."
            )
        self.output_dir = output_dir
        self.filename = filename
        self.top_k = top_k
        self.formats: list[str] = chosen
        self.rows: list[dict[str, Any]] = []
        self.paths: list[Path] = []

    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Start an empty table (a writer can serve several ``predict`` calls)."""
        self.rows = []
        self.paths = []

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        """Turn a batch of class probabilities into rows."""
        if not isinstance(prediction, torch.Tensor) or prediction.ndim != 2:
            raise RobustFTConfigError(
                "PredictionWriter expects `predict_step` to return class probabilities of shape (batch, classes); "
                f"got {type(prediction).__name__}{tuple(getattr(prediction, 'shape', ()))}."
            )
        names = _class_names(trainer, pl_module, prediction.shape[1])
        set_name, dataset = _predict_set(trainer, dataloader_idx)
        count = prediction.shape[0]
        indices = list(batch_indices) if batch_indices is not None else [None] * count
        labels = batch[1].tolist() if isinstance(batch, (list, tuple)) and len(batch) > 1 else [None] * count
        k = min(self.top_k, prediction.shape[1])
        top_probs, top_classes = prediction.detach().float().cpu().topk(k, dim=1)
        for row in range(count):
            index = indices[row]
            label = labels[row]
            record: dict[str, Any] = {
                "set": set_name,
                "index": index,
                "source": _source(dataset, index),
                "label": names[label] if isinstance(label, int) and 0 <= label < len(names) else "",
                "prediction": names[int(top_classes[row, 0])],
                "probability": float(top_probs[row, 0]),
            }
            for rank in range(1, k):
                record[f"top{rank + 1}"] = names[int(top_classes[row, rank])]
                record[f"top{rank + 1}_probability"] = float(top_probs[row, rank])
            self.rows.append(record)

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Write the table and say where."""
        directory = Path(self.output_dir or trainer.log_dir or trainer.default_root_dir)
        directory.mkdir(parents=True, exist_ok=True)
        stem = self.filename if trainer.world_size == 1 else f"{self.filename}-rank{trainer.global_rank}"
        self.paths = []
        for name in self.formats:
            path = directory / f"{stem}.{name}"
            (_write_csv if name == "csv" else _write_parquet)(path, self.rows)
            self.paths.append(path)
        rank_zero_info(f"Predictions for {len(self.rows)} images written to {', '.join(map(str, self.paths))}")


def _has_pyarrow() -> bool:
    return importlib.util.find_spec("pyarrow") is not None


def _class_names(trainer: Trainer, pl_module: LightningModule, count: int) -> list[str]:
    hparams = getattr(pl_module, "hparams", {})
    for names in (hparams.get("class_names"), getattr(trainer.datamodule, "class_names", None)):
        if names is not None and len(names) == count:
            return [str(name) for name in names]
    return [str(i) for i in range(count)]


def _predict_set(trainer: Trainer, dataloader_idx: int) -> tuple[str, Any]:
    """The name and dataset of the ``dataloader_idx``-th prediction loader."""
    loaders = trainer.predict_dataloaders
    if isinstance(loaders, Mapping):
        name = list(loaders)[dataloader_idx]
        return str(name), getattr(loaders[name], "dataset", None)
    if isinstance(loaders, Sequence):
        names = getattr(trainer.datamodule, "predict_set_names", None) or []
        name = names[dataloader_idx] if dataloader_idx < len(names) else f"predict_{dataloader_idx}"
        return name, getattr(loaders[dataloader_idx], "dataset", None)
    return "predict", getattr(loaders, "dataset", None)


def _source(dataset: Any, index: int | None) -> str:
    if index is None:
        return ""
    if callable(getattr(dataset, "source", None)):
        return str(dataset.source(index))
    samples = getattr(dataset, "samples", None)
    return str(samples[index][0]) if samples is not None else str(index)


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    columns = list(rows[0]) if rows else ["set", "index", "source", "label", "prediction", "probability"]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _write_parquet(path: Path, rows: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
