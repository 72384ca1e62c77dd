"""The tables the weight-space tools write: one row per evaluated model, rounded, as CSV and JSON.

WiSE-FT writes one row per alpha, the soups one per ingredient and one for the soup; both add the OOD average the
same way (`accuracy_row`), round the same way (`round_row`) and write the same two files
(`write_results`): ``<stem>.csv`` holds the rows, ``<stem>.json`` the whole summary. Plots go through
`lightning_robustft.plotting`.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_robustft.errors import RobustFTConfigError
from lightning_robustft.metrics import OOD_AVERAGE, ood_average

__all__ = ["DIGITS", "accuracy_row", "check_set_names", "format_row", "round_row", "write_results"]

DIGITS = 6
"""Decimals of the accuracies in the files: they are float32 ratios, so 6 decimals keep every meaningful digit."""


def accuracy_row(accuracy: Mapping[str, float], id_set: str) -> dict[str, float]:
    """``{set: accuracy, ...}`` plus ``ood_avg``, the mean over every set but ``id_set`` (absent without OOD sets)."""
    row = dict(accuracy)
    average = ood_average({name: {"acc": value} for name, value in accuracy.items()}, id_set)
    if average is not None:
        row[OOD_AVERAGE] = average
    return row


def round_row(row: Mapping[str, Any], keep: Collection[str] = ()) -> dict[str, Any]:
    """The row with its floats rounded to `DIGITS` decimals, except the columns in ``keep`` (e.g. ``alpha``)."""
    return {
        key: round(value, DIGITS) if isinstance(value, float) and key not in keep else value
        for key, value in row.items()
    }


def format_row(row: Mapping[str, float]) -> str:
    """``"set=0.9123, ..."``: a row for the log, 4 decimals."""
    return ", ".join(f"{key}={value:.4f}" for key, value in row.items())


def check_set_names(names: Sequence[str], reserved: Collection[str]) -> None:
    """Refuse a set named like one of the table's own columns, which would overwrite it."""
    for name in reserved:
        if name in names:
            raise RobustFTConfigError(f"A validation set is named {name!r}; rename it (that name is a column).")


def write_results(summary: Mapping[str, Any], out_dir: str | Path, stem: str) -> tuple[Path, Path]:
    """Write ``summary["rows"]`` to ``<stem>.csv`` and the whole summary to ``<stem>.json`` in ``out_dir``.

    The CSV's columns are the union of the rows' keys, in first-seen order (a column missing from a row is empty).

    Returns:
        The paths of the CSV and JSON files.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = summary["rows"]
    table, document = out / f"{stem}.csv", out / f"{stem}.json"
    with open(table, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(dict.fromkeys(key for row in rows for key in row)))
        writer.writeheader()
        writer.writerows(rows)
    document.write_text(json.dumps(summary, indent=2) + "\n")
    return table, document
