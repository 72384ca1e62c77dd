"""WiSE-FT as plain functions: the alpha sweep, the choice of alpha, and the whole run after the fact from files.

As in the original WiSE-FT code, the merge itself is a pure function
([`interpolate_state_dicts`][lightning_robustft.ops.interpolate.interpolate_state_dicts]) and the scoring is separate
([`evaluate_accuracy`][lightning_robustft.evaluation.loop.evaluate_accuracy]); this module joins them. Both
``WiSEFTCallback`` (at the end of a fit) and `run_wiseft` (on saved checkpoints) call `wiseft_sweep`,
so they compute the same numbers and write the same files.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from matplotlib.figure import Figure
from torch import Tensor, nn

from lightning_robustft.errors import RobustFTConfigError, check_config_number
from lightning_robustft.evaluation.checkpoint import load_into, load_wiseft_endpoints, save_weights_checkpoint
from lightning_robustft.evaluation.loop import (
    ForwardContext,
    cache_batches,
    evaluate_accuracy,
    named_dataloaders,
    resolve_id_set,
)
from lightning_robustft.evaluation.results import accuracy_row, check_set_names, format_row, round_row, write_results
from lightning_robustft.metrics import OOD_AVERAGE
from lightning_robustft.ops.interpolate import interpolate_state_dicts
from lightning_robustft.plotting import plot_id_vs_ood

__all__ = [
    "ALPHA_KEY",
    "DEFAULT_ALPHAS",
    "SelectMode",
    "apply_alpha",
    "checkpoint_name",
    "make_summary",
    "run_wiseft",
    "select_alpha",
    "sweep_alphas",
    "wiseft_sweep",
    "write_wiseft_results",
]

SelectMode = Literal["fixed", "id"]

DEFAULT_ALPHAS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))
"""0.0, 0.1, ..., 1.0: the sweep of the WiSE-FT paper."""

ALPHA_KEY = "alpha"
"""The column of the mixing coefficient in the rows, and the key of the alpha in saved checkpoints."""


def sweep_alphas(alphas: Sequence[float] | None, alpha: float, select: str) -> list[float]:
    """Validate the sweep arguments; return the sorted distinct alphas (with ``alpha`` added when it is applied)."""
    if select not in ("fixed", "id"):
        raise RobustFTConfigError(f"`select`={select!r}; allowed: 'fixed' (apply `alpha`), 'id' (best ID alpha).")
    _check_unit_interval("alpha", alpha)
    requested = list(DEFAULT_ALPHAS if alphas is None else alphas)
    if not requested:
        raise RobustFTConfigError("`alphas` is empty: give the coefficients to sweep, e.g. [0.0, 0.5, 1.0].")
    for index, value in enumerate(requested):
        _check_unit_interval(f"alphas[{index}]", value)
    if select == "fixed":
        requested.append(alpha)
    return sorted({float(value) for value in requested})


def _check_unit_interval(name: str, value: Any) -> None:
    check_config_number(name, value, "[0, 1]", hint="0 is the zero-shot model, 1 the fine-tuned one")


def wiseft_sweep(
    module: nn.Module,
    theta_0: Mapping[str, Tensor],
    theta_1: Mapping[str, Any],
    dataloaders: Mapping[str, Iterable[Any]],
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    *,
    id_set: str | None = None,
    device: torch.device | str | None = None,
    max_batches: Mapping[str, int | None] | None = None,
    forward_context: ForwardContext | None = None,
) -> list[dict[str, float]]:
    """Evaluate ``theta(alpha) = (1 - alpha) * theta_0 + alpha * theta_1`` on every set, for every alpha.

    Args:
        module: the model to load each interpolation into (any ``nn.Module`` whose state dict ``theta_1`` is).
        theta_0: the zero-shot weights (at least the floating-point entries).
        theta_1: the fine-tuned weights (the full state dict).
        dataloaders: ``{set name: iterable of (x, y) batches}``.
        alphas: the coefficients, evaluated in the given order.
        id_set: the in-distribution set (default: the first); the others are averaged into ``ood_avg``.
        device: where to evaluate (default: the module's device).
        max_batches: at most this many batches per set (``None``: all).
        forward_context: a context-manager factory around each forward (e.g. autocast).

    Returns:
        One row per alpha: ``{"alpha": a, <set>: accuracy, ..., "ood_avg": mean over OOD sets}`` (accuracies as
        fractions; ``ood_avg`` only when there are OOD sets). The module is left holding ``theta_1``.
    """
    names = list(dataloaders)
    id_set = resolve_id_set(names, id_set)
    check_set_names(names, (ALPHA_KEY, OOD_AVERAGE))
    cached = cache_batches(dataloaders, max_batches)  # every alpha reads the same batches
    rows = []
    for alpha in alphas:
        apply_alpha(module, theta_0, theta_1, alpha)
        accuracy = evaluate_accuracy(
            module, cached, device=device, max_batches=max_batches, forward_context=forward_context
        )
        rows.append({ALPHA_KEY: float(alpha), **accuracy_row(accuracy, id_set)})
        rank_zero_info("WiSE-FT " + format_row(rows[-1]))
    module.load_state_dict(dict(theta_1))
    return rows


def apply_alpha(module: nn.Module, theta_0: Mapping[str, Tensor], theta_1: Mapping[str, Any], alpha: float) -> None:
    """Load ``theta(alpha)`` into ``module`` (strictly: the module's keys and shapes must be ``theta_1``'s)."""
    load_into(module, interpolate_state_dicts(theta_0, theta_1, alpha), f"theta(alpha={alpha:g})")


def select_alpha(rows: Sequence[Mapping[str, float]], select: SelectMode, alpha: float, id_set: str | None) -> float:
    """The alpha to apply: ``alpha`` itself (``"fixed"``), or the best on the ID set (``"id"``, ties to the smaller).

    OOD columns are never consulted: choosing on them would tune on the test distributions.
    """
    if select == "fixed":
        return float(alpha)
    if select != "id":
        raise RobustFTConfigError(f"`select`={select!r}; allowed: 'fixed', 'id'.")
    scored = [row for row in rows if id_set in row and not math.isnan(row[id_set])]
    if not scored:
        raise RobustFTConfigError(f"select='id' needs ID accuracies in column {id_set!r}; none found in the sweep.")
    return float(max(scored, key=lambda row: (row[id_set], -row[ALPHA_KEY]))[ALPHA_KEY])


def checkpoint_name(alpha: float) -> str:
    """File name of the model saved at ``alpha``, e.g. ``wiseft_alpha0.50.ckpt``."""
    return f"wiseft_alpha{alpha:.2f}.ckpt"


def make_summary(
    rows: Sequence[Mapping[str, float]],
    id_set: str,
    select: str,
    selected_alpha: float,
    checkpoint: str | Path | None,
) -> dict[str, Any]:
    """The content of ``wiseft.json``: the sweep (accuracies rounded to 6 decimals) and what was applied."""
    return {
        "id_set": id_set,
        "ood_sets": [key for key in rows[0] if key not in (ALPHA_KEY, OOD_AVERAGE, id_set)],
        "select": select,
        "selected_alpha": selected_alpha,
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "rows": [round_row(row, keep=(ALPHA_KEY,)) for row in rows],
    }


def write_wiseft_results(summary: Mapping[str, Any], out_dir: str | Path) -> Figure | None:
    """Write ``wiseft.csv``, ``wiseft.json`` and (with OOD sets) ``wiseft.png`` into ``out_dir``; return the figure."""
    write_results(summary, out_dir, "wiseft")
    if not summary["ood_sets"]:
        rank_zero_warn("WiSE-FT: no OOD validation set, so no ID-vs-OOD plot; the table has the ID numbers.")
        return None
    return plot_id_vs_ood(
        summary["rows"],
        Path(out_dir) / "wiseft.png",
        id_key=summary["id_set"],
        ood_key=OOD_AVERAGE,
        selected=summary["selected_alpha"],
        title="WiSE-FT: " + ", ".join(summary["ood_sets"]),
    )


def run_wiseft(
    module: nn.Module,
    finetuned: str | Path,
    dataloaders: Any,
    *,
    zeroshot: str | Path | None = None,
    alphas: Sequence[float] | None = None,
    alpha: float = 0.5,
    select: SelectMode = "fixed",
    output_dir: str | Path = "wiseft",
    id_set: str | None = None,
    device: torch.device | str | None = None,
    weights_only: bool = False,
) -> dict[str, Any]:
    """Run the WiSE-FT sweep after the fact, from a fine-tuned and a zero-shot checkpoint; write what the callback does.

    Example::

        model = ImageClassifier(backbone="open_clip:ViT-B-32:openai", class_names=names, head_init="zeroshot")
        dm = MultiDomainDataModule(...); dm.setup("validate")
        summary = run_wiseft(model, "finetuned.ckpt", dm.val_dataloader(), zeroshot="zeroshot.ckpt", select="id")

    Args:
        module: a model of the checkpoints' architecture; it is left holding the selected alpha.
        finetuned: the fine-tuned checkpoint (theta_1).
        dataloaders: validation loaders: ``{set name: loader}``, a list (named by ``module.val_set_names`` or
            ``val_<i>``) or one loader.
        zeroshot: the zero-shot checkpoint (theta_0); default: theta_0 stored in ``finetuned`` by the callback.
        alphas: the coefficients to sweep, each in ``[0, 1]`` (default ``0.0, 0.1, ..., 1.0``).
        alpha: the coefficient applied with ``select="fixed"`` (added to the sweep if absent).
        select: ``"fixed"`` or ``"id"`` (best on the ID set; never chosen on OOD sets).
        output_dir: where ``wiseft.csv``/``.json``/``.png`` and ``wiseft_alpha<alpha>.ckpt`` go.
        id_set: the ID set (default: ``module.id_set`` or the first set).
        device: where to evaluate (default: the module's device).
        weights_only: passed to ``torch.load`` when reading the checkpoints.

    Returns:
        The summary written to ``wiseft.json`` (``rows``, ``selected_alpha``, ``checkpoint``, ...).

    Raises:
        FileNotFoundError: a checkpoint path does not exist.
        ValueError: a checkpoint file is empty, truncated or not a checkpoint (the message names it).
        RobustFTConfigError: bad sweep arguments, an unknown ``id_set``, or weights that do not fit ``module``.
    """
    swept = sweep_alphas(alphas, alpha, select)
    theta_0, theta_1, source = load_wiseft_endpoints(finetuned, zeroshot, weights_only)
    loaders = named_dataloaders(dataloaders, getattr(module, "val_set_names", None))
    resolved_id = resolve_id_set(list(loaders), id_set or getattr(module, "id_set", None))
    rows = wiseft_sweep(module, theta_0, theta_1, loaders, swept, id_set=resolved_id, device=device)
    chosen = select_alpha(rows, select, alpha, resolved_id)
    apply_alpha(module, theta_0, theta_1, chosen)
    checkpoint = save_weights_checkpoint(
        Path(output_dir) / checkpoint_name(chosen), module, source, {"wiseft": {ALPHA_KEY: float(chosen)}}
    )
    summary = make_summary(rows, resolved_id, select, chosen, checkpoint)
    write_wiseft_results(summary, output_dir)
    return summary
