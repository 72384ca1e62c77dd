"""Per-set metric collections for multi-OOD evaluation, class-subset scoring, the OOD average and the console table.

Every evaluation set (the ID validation set and each OOD set) gets its own torchmetrics objects, so that sets never
mix and each one syncs across DDP ranks by itself. Sets that only cover some of the classes (ImageNet-R / -A style)
are scored among their own classes: the logits are restricted to the subset before the argmax, as the ImageNet-R/A
papers and the WiSE-FT code do.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from lightning_robustft.errors import RobustFTConfigError

__all__ = [
    "METRIC_NAMES",
    "OOD_AVERAGE",
    "MetricName",
    "format_results_table",
    "make_metric_collection",
    "ood_average",
    "restrict_to_subset",
    "sanitize_set_name",
]

MetricName = Literal["acc", "acc5", "macro_acc", "macro_f1"]
METRIC_NAMES: tuple[str, ...] = ("acc", "acc5", "macro_acc", "macro_f1")
OOD_AVERAGE = "ood_avg"


def sanitize_set_name(name: str) -> str:
    """Return a key usable in an ``nn.ModuleDict`` (no dots, no empty names) for a set name."""
    key = re.sub(r"[^0-9A-Za-z_-]", "_", name)
    return key if key and not key[0].isdigit() else f"set_{key}"


def make_metric_collection(num_classes: int, metrics: Sequence[str] = ("acc",)) -> MetricCollection:
    """Build the metrics of one evaluation set.

    Args:
        num_classes: number of classes the set is scored on (its subset size for class-subset sets).
        metrics: names among ``acc`` (top-1, micro, as CLIP / WiSE-FT report it), ``acc5`` (top-5), ``macro_acc``
            (mean per-class recall) and ``macro_f1`` (iWildCam's metric). ``acc`` is always included.
    """
    unknown = sorted(set(metrics) - set(METRIC_NAMES))
    if unknown:
        raise RobustFTConfigError(f"`metrics` has unknown names {unknown}; allowed: {list(METRIC_NAMES)}.")
    if num_classes < 2:
        raise RobustFTConfigError(f"A set must be scored on at least 2 classes, got num_classes={num_classes}.")
    names = ["acc", *(m for m in metrics if m != "acc")]
    factories = {
        "acc": lambda: MulticlassAccuracy(num_classes, average="micro"),
        "acc5": lambda: MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro"),
        "macro_acc": lambda: MulticlassAccuracy(num_classes, average="macro"),
        "macro_f1": lambda: MulticlassF1Score(num_classes, average="macro"),
    }
    return MetricCollection({name: factories[name]() for name in dict.fromkeys(names)})


def restrict_to_subset(
    logits: torch.Tensor, target: torch.Tensor, subset: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Restrict logits and targets to a class subset.

    Args:
        logits: ``(batch, num_classes)`` logits over the full class list.
        target: ``(batch,)`` labels indexed in the full class list; each must belong to ``subset``.
        subset: ``(k,)`` sorted indices of the classes the set covers.

    Returns:
        ``(batch, k)`` logits and ``(batch,)`` targets indexed within the subset.
    """
    position = torch.searchsorted(subset, target)
    position = position.clamp_max(subset.numel() - 1)
    if not torch.equal(subset[position], target):
        outside = sorted(set(target.tolist()) - set(subset.tolist()))
        raise RobustFTConfigError(
            f"Labels {outside} are outside this set's class subset {subset.tolist()}: the set's labels must index the "
            "full class list and belong to the classes the set covers."
        )
    return logits.index_select(-1, subset), position


def ood_average(results: Mapping[str, Mapping[str, float]], id_set: str, metric: str = "acc") -> float | None:
    """Mean of ``metric`` over the OOD sets (every set but ``id_set``); ``None`` when there is no OOD set."""
    values = [row[metric] for name, row in results.items() if name != id_set and metric in row]
    return sum(values) / len(values) if values else None


def format_results_table(results: Mapping[str, Mapping[str, float]], id_set: str | None, title: str = "") -> str:
    """A compact fixed-width table, one row per set (ID first, then OOD sets, then the OOD average), in percent."""
    columns = list(dict.fromkeys(key for row in results.values() for key in row))
    rows = sorted(results.items(), key=lambda item: item[0] != id_set)
    average = {c: ood_average(results, id_set or "", c) for c in columns}
    width = max([len("set"), len(OOD_AVERAGE), *(len(name) for name in results)])
    lines = [title] if title else []
    lines.append(f"{'set':<{width}}  role  " + "  ".join(f"{c:>9}" for c in columns))
    for name, row in rows:
        role = "ID " if name == id_set else "OOD"
        cells = "  ".join(f"{100 * row[c]:9.2f}" if c in row else f"{'-':>9}" for c in columns)
        lines.append(f"{name:<{width}}  {role}   {cells}")
    if id_set is not None and any(v is not None for v in average.values()):
        cells = "  ".join(f"{100 * v:9.2f}" if v is not None else f"{'-':>9}" for v in average.values())
        lines.append(f"{OOD_AVERAGE:<{width}}  avg   {cells}")
    return "\n".join(lines)
