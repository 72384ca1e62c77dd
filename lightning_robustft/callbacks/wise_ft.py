"""``WiSEFTCallback`` and the functions behind it: post-hoc weight-space interpolation of zero-shot and fine-tuned.

The sweep itself (:func:`wiseft_sweep`) and the after-the-fact entry point (:func:`run_wiseft`, on a zero-shot and a
fine-tuned checkpoint) are plain functions, so the callback and user scripts compute the same numbers.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import move_data_to_device, rank_zero_info, rank_zero_warn
from matplotlib.figure import Figure
from torch import Tensor, nn
from torchmetrics import MeanMetric

from lightning_robustft.errors import RobustFTConfigError
from lightning_robustft.metrics import OOD_AVERAGE
from lightning_robustft.ops.interpolate import float_state_snapshot, interpolate_state_dicts
from lightning_robustft.plotting import plot_id_vs_ood

SelectMode = Literal["fixed", "id"]

DEFAULT_ALPHAS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))
"""0.0, 0.1, ..., 1.0: the sweep of the WiSE-FT paper."""

THETA_0_KEY = "wiseft_theta_0"
"""Checkpoint key under which :class:`WiSEFTCallback` stores theta_0 (CPU float tensors of the state dict)."""

ALPHA_KEY = "alpha"
_DIGITS = 6  # accuracies in the files: float32 ratios, so 6 decimals keep every meaningful digit


class WiSEFTCallback(Callback):
    """WiSE-FT: after fit, interpolate between the zero-shot and the fine-tuned weights and keep the chosen mix.

    Wortsman et al. (CVPR 2022) show that ``theta(alpha) = (1 - alpha) * theta_0 + alpha * theta_1`` between the
    zero-shot model ``theta_0`` and the fine-tuned ``theta_1`` keeps most of fine-tuning's in-distribution gain while
    recovering, often exceeding, the zero-shot model's robustness under distribution shift; ``alpha = 0.5`` is their
    recommendation when no OOD data can be used for choosing. The interpolated model is the same architecture, so
    nothing changes at inference.

    What it does:

    * ``on_fit_start``: snapshot ``theta_0`` (a CPU copy of the floating-point tensors of the module's state dict;
      never a copy of the module). It goes into every checkpoint under ``"wiseft_theta_0"`` (:data:`THETA_0_KEY`),
      and a resumed fit takes it from there, so it always interpolates against the weights of the *first* start.
      Callbacks run in list order: put this one before any callback that changes weights in ``on_fit_start``.
    * ``on_train_end`` (while the model is still on its device and the loggers are open): for every alpha, load
      ``theta(alpha)`` and evaluate every validation set with a no-grad loop of its own (the module's
      ``update_val_metrics`` / ``compute_val_metrics`` when it has them, else top-1 accuracy of ``forward`` on
      ``(x, y)`` batches), honouring ``limit_val_batches``. Then apply the selected alpha, save that model as
      ``wiseft_alpha<alpha>.ckpt`` (a weights-only Lightning checkpoint: ``MyModule.load_from_checkpoint(path)`` or
      ``model.load_state_dict(torch.load(path)["state_dict"])``), write ``wiseft.csv``, ``wiseft.json`` and
      ``wiseft.png`` (ID accuracy against OOD-average accuracy) into the run's log directory, and send the numbers
      (``wiseft/<set>/acc``, step = index of the alpha) and the figure (TensorBoard) to the loggers.

    Under DDP every rank evaluates its shard and torchmetrics syncs, so every rank gets the same table and applies
    the same alpha; files are written on global rank zero. Sharded strategies (FSDP, DeepSpeed) are refused, since
    their state dicts are not whole tensors. ``ModelCheckpoint`` files saved during training hold ``theta_1`` (and
    ``theta_0``, which doubles their size); one saved after this callback's ``on_train_end`` (``save_last`` when it
    was not saved yet) holds the interpolated weights, and its callback state records ``applied_alpha``.

    Args:
        alphas: the mixing coefficients to evaluate, each in ``[0, 1]`` (default ``0.0, 0.1, ..., 1.0``).
        alpha: the coefficient applied with ``select="fixed"`` (added to the sweep if absent).
        select: ``"fixed"`` applies ``alpha``; ``"id"`` applies the alpha with the best accuracy on the ID
            validation set (ties go to the smaller alpha, closer to the robust end). OOD sets are never used to
            choose: that would report a tuned-on-test number.
        dirpath: where to write the files; default: the run's log directory (``trainer.log_dir``, else
            ``default_root_dir``).
        save_model: save the model at the applied alpha as ``wiseft_alpha<alpha>.ckpt``.

    Example::

        trainer = Trainer(max_epochs=10, callbacks=[WiSEFTCallback(select="fixed", alpha=0.5)])
        trainer.fit(model, datamodule=dm)  # model now holds theta(0.5)

    In a LightningCLI config::

        trainer:
          callbacks:
            - class_path: lightning_robustft.callbacks.WiSEFTCallback
              init_args: {alphas: [0.0, 0.25, 0.5, 0.75, 1.0], alpha: 0.5, select: fixed}
    """

    def __init__(
        self,
        alphas: Sequence[float] | None = None,
        alpha: float = 0.5,
        select: SelectMode = "fixed",
        dirpath: str | None = None,
        save_model: bool = True,
    ) -> None:
        self.alphas = sweep_alphas(alphas, alpha, select)
        self.alpha = float(alpha)
        self.select = select
        self.dirpath = dirpath
        self.save_model = save_model
        self.applied_alpha: float | None = None
        self.results: list[dict[str, float]] = []
        self._theta_0: dict[str, Tensor] | None = None

    @property
    def theta_0(self) -> dict[str, Tensor] | None:
        """The snapshot interpolated from (CPU float tensors), or ``None`` before fit starts."""
        return self._theta_0

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Refuse sharded strategies and forget a previous fit's snapshot (a checkpoint may restore one next)."""
        if stage != "fit":
            return
        strategy = trainer.strategy
        if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) or isinstance(strategy, DeepSpeedStrategy):
            raise RobustFTConfigError(
                f"WiSEFTCallback does not support strategy={type(strategy).__name__}: it needs whole (unsharded) "
                "state dicts. Use a single device or DDP, or run `run_wiseft` on the saved checkpoints afterwards."
            )
        self._theta_0 = None
        self.applied_alpha = None
        self.results = []

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Snapshot theta_0, unless a resumed checkpoint already restored the original one."""
        if self._theta_0 is not None:
            rank_zero_info("WiSEFTCallback: theta_0 restored from the checkpoint (the weights at the first start).")
            return
        self._theta_0 = float_state_snapshot(pl_module.state_dict())
        rank_zero_info(f"WiSEFTCallback: theta_0 snapshot of {len(self._theta_0)} floating-point tensors.")

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Sweep the alphas on the validation sets, apply the selected one, save the model and write the results."""
        if self._theta_0 is None:
            rank_zero_warn("WiSEFTCallback: no theta_0 snapshot (fit did not start normally); nothing interpolated.")
            return
        theta_1 = {k: v.detach().to("cpu", copy=True) if isinstance(v, Tensor) else v for k, v in _state(pl_module)}
        out_dir = Path(self.dirpath or trainer.log_dir or trainer.default_root_dir)  # log_dir: a collective call
        id_set = self._sweep(trainer, pl_module, self._theta_0, theta_1)
        chosen = select_alpha(self.results, self.select, self.alpha, id_set) if self.results else self.alpha
        apply_alpha(pl_module, self._theta_0, theta_1, chosen)
        self.applied_alpha = chosen
        checkpoint = out_dir / checkpoint_name(chosen) if self.save_model else None
        if checkpoint is not None:
            trainer.save_checkpoint(checkpoint, weights_only=True)  # on every rank; the strategy writes once
        if trainer.is_global_zero and id_set is not None:
            summary = make_summary(self.results, id_set, self.select, chosen, checkpoint)
            _log_to_loggers(trainer, summary, write_wiseft_results(summary, out_dir))
        rank_zero_info(f"WiSEFTCallback: the model now holds theta(alpha={chosen:g}); results in {out_dir}.")

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """Store theta_0 in the checkpoint, so a resumed fit still interpolates against the true start."""
        if self._theta_0 is not None:
            checkpoint[THETA_0_KEY] = self._theta_0

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """Restore theta_0 from a checkpoint written by this callback; warn when resuming from any other."""
        if THETA_0_KEY in checkpoint:
            self._theta_0 = {name: tensor.to("cpu") for name, tensor in checkpoint[THETA_0_KEY].items()}
        elif trainer.state.fn == TrainerFn.FITTING:
            rank_zero_warn(
                f"WiSEFTCallback: the checkpoint has no {THETA_0_KEY!r}; theta_0 will be the weights the fit resumes "
                "from, not the zero-shot model."
            )

    def state_dict(self) -> dict[str, Any]:
        """Small scalars only (theta_0 travels through ``on_save_checkpoint``)."""
        return {"alpha": self.alpha, "select": self.select, "applied_alpha": self.applied_alpha}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore which alpha the saved weights hold; the configuration stays the constructor's."""
        self.applied_alpha = state_dict.get("applied_alpha")

    def _sweep(
        self, trainer: Trainer, pl_module: LightningModule, theta_0: dict[str, Tensor], theta_1: dict[str, Any]
    ) -> str | None:
        """Fill ``self.results`` from the fit's validation loaders; return the ID set (``None``: no sets)."""
        loaders, max_batches = _trainer_validation_sets(trainer, pl_module)
        if not loaders:
            rank_zero_warn("WiSEFTCallback: no validation sets to evaluate; applying the fixed `alpha` unevaluated.")
            self.results = []
            return None
        id_set = resolve_id_set(list(loaders), getattr(pl_module, "id_set", None))
        self.results = wiseft_sweep(
            pl_module,
            theta_0,
            theta_1,
            loaders,
            self.alphas,
            id_set=id_set,
            max_batches=max_batches,
            forward_context=trainer.precision_plugin.forward_context,
        )
        return id_set


# --------------------------------------------------------------------------------------------------- the sweep
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
    forward_context: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
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
    for reserved in (ALPHA_KEY, OOD_AVERAGE):
        if reserved in names:
            raise RobustFTConfigError(f"A validation set is named {reserved!r}; rename it (that name is a column).")
    rows = []
    for alpha in alphas:
        apply_alpha(module, theta_0, theta_1, alpha)
        accuracy = evaluate_accuracy(
            module, dataloaders, device=device, max_batches=max_batches, forward_context=forward_context
        )
        ood = [accuracy[name] for name in names if name != id_set]
        row = {ALPHA_KEY: float(alpha), **accuracy}
        if ood:
            row[OOD_AVERAGE] = sum(ood) / len(ood)
        rows.append(row)
        rank_zero_info("WiSE-FT " + ", ".join(f"{key}={value:.4f}" for key, value in row.items()))
    module.load_state_dict(dict(theta_1))
    return rows


def apply_alpha(module: nn.Module, theta_0: Mapping[str, Tensor], theta_1: Mapping[str, Any], alpha: float) -> None:
    """Load ``theta(alpha)`` into ``module`` (strictly: the module's keys and shapes must be ``theta_1``'s)."""
    mixed = interpolate_state_dicts(theta_0, theta_1, alpha)
    try:
        module.load_state_dict(mixed)
    except RuntimeError as error:
        raise RobustFTConfigError(
            f"The interpolated weights do not fit {type(module).__name__}: {error}. Build the module with the "
            "architecture of the checkpoints."
        ) from error


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


@torch.no_grad()
def evaluate_accuracy(
    module: nn.Module,
    dataloaders: Mapping[str, Iterable[Any]],
    *,
    device: torch.device | str | None = None,
    max_batches: Mapping[str, int | None] | None = None,
    forward_context: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
) -> dict[str, float]:
    """Top-1 accuracy of ``module`` on each set, in eval mode; every submodule's train/eval mode is restored after.

    A module with ``update_val_metrics(set, logits, y)`` and ``compute_val_metrics(set) -> {"acc": ...}`` (such as
    :class:`~lightning_robustft.models.ImageClassifier`) is scored by its own metrics, so class subsets and metric
    definitions match its validation; any other module by the fraction of ``argmax(forward(x)) == y``. Both are
    torchmetrics states, synced across DDP ranks when a process group is up.
    """
    target = torch.device(device) if device is not None else _module_device(module)
    context = forward_context or contextlib.nullcontext
    modes = {name: child.training for name, child in module.named_modules()}
    module.eval()
    try:
        return {
            name: _evaluate_set(module, name, loader, target, (max_batches or {}).get(name), context)
            for name, loader in dataloaders.items()
        }
    finally:
        for name, child in module.named_modules():
            child.training = modes.get(name, child.training)


def _evaluate_set(
    module: nn.Module,
    name: str,
    loader: Iterable[Any],
    device: torch.device,
    limit: int | None,
    context: Callable[[], contextlib.AbstractContextManager[Any]],
) -> float:
    own_metrics = callable(getattr(module, "update_val_metrics", None)) and callable(
        getattr(module, "compute_val_metrics", None)
    )
    correct = None if own_metrics else MeanMetric().to(device)
    for index, batch in enumerate(loader):
        if limit is not None and index >= limit:
            break
        x, y = move_data_to_device(_split_batch(batch, name), device)
        with context():
            logits = module(x)
        if correct is None:
            module.update_val_metrics(name, logits, y)
        else:
            correct.update((logits.argmax(dim=-1) == y).float())
    if correct is None:
        return float(module.compute_val_metrics(name)["acc"])
    return float(correct.compute())


def _split_batch(batch: Any, name: str) -> tuple[Any, Any]:
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise RobustFTConfigError(
        f"Validation set {name!r} yields batches of type {type(batch).__name__}; WiSE-FT evaluation needs (x, y) "
        "tuples. Make the dataloader return (inputs, labels)."
    )


def _module_device(module: nn.Module) -> torch.device:
    tensor = next(module.parameters(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


# ----------------------------------------------------------------------------------------------- set naming
def named_dataloaders(loaders: Any, set_names: Sequence[str] | None = None) -> dict[str, Iterable[Any]]:
    """Name validation dataloaders: dict keys if a dict, else ``set_names`` if they fit, else ``val_0, val_1, ...``."""
    if loaders is None:
        return {}
    if isinstance(loaders, Mapping):
        return dict(loaders)
    listed = list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]
    names = list(set_names or [])
    if len(names) < len(listed):
        names = [f"val_{index}" for index in range(len(listed))]
    return dict(zip(names, listed, strict=False))


def resolve_id_set(names: Sequence[str], id_set: str | None) -> str:
    """``id_set`` if it is one of ``names``, the first name when it is ``None``; an error otherwise."""
    if not names:
        raise RobustFTConfigError("No validation sets: WiSE-FT needs at least the ID validation set.")
    if id_set is None:
        return names[0]
    if id_set not in names:
        raise RobustFTConfigError(f"`id_set`={id_set!r} is not a validation set; the sets are {list(names)}.")
    return id_set


def _trainer_validation_sets(
    trainer: Trainer, pl_module: LightningModule
) -> tuple[dict[str, Iterable[Any]], dict[str, int | None]]:
    """The fit's validation loaders (with Lightning's distributed samplers) by name, and their batch limits."""
    if trainer.val_dataloaders is None:  # no validation ran during fit (no sanity check, or none scheduled)
        with contextlib.suppress(MisconfigurationException):  # raised when there is no val_dataloader at all
            trainer.fit_loop.epoch_loop.val_loop.setup_data()
    loaders = named_dataloaders(trainer.val_dataloaders, getattr(pl_module, "val_set_names", None))
    limits = list(trainer.num_val_batches)
    if len(limits) != len(loaders):
        return loaders, {}
    return loaders, {name: None if math.isinf(n) else int(n) for name, n in zip(loaders, limits, strict=True)}


# --------------------------------------------------------------------------------------------------- outputs
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
    ood_sets = [key for key in rows[0] if key not in (ALPHA_KEY, OOD_AVERAGE, id_set)]
    return {
        "id_set": id_set,
        "ood_sets": ood_sets,
        "select": select,
        "selected_alpha": selected_alpha,
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "rows": [
            {key: value if key == ALPHA_KEY else round(value, _DIGITS) for key, value in row.items()} for row in rows
        ],
    }


def write_wiseft_results(summary: Mapping[str, Any], out_dir: str | Path) -> Figure | None:
    """Write ``wiseft.csv``, ``wiseft.json`` and (with OOD sets) ``wiseft.png`` into ``out_dir``; return the figure."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = summary["rows"]
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(out / "wiseft.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    (out / "wiseft.json").write_text(json.dumps(summary, indent=2) + "\n")
    if not summary["ood_sets"]:
        rank_zero_warn("WiSE-FT: no OOD validation set, so no ID-vs-OOD plot; the table has the ID numbers.")
        return None
    return plot_id_vs_ood(
        rows,
        out / "wiseft.png",
        id_key=summary["id_set"],
        ood_key=OOD_AVERAGE,
        selected=summary["selected_alpha"],
        title="WiSE-FT: " + ", ".join(summary["ood_sets"]),
    )


def _log_to_loggers(trainer: Trainer, summary: Mapping[str, Any], figure: Figure | None) -> None:
    rows = summary["rows"]
    selected = next((row for row in rows if row[ALPHA_KEY] == summary["selected_alpha"]), None)
    for logger in trainer.loggers:
        for step, row in enumerate(rows):
            logger.log_metrics(_metric_names(row, "wiseft"), step=step)
        if selected is not None:
            logger.log_metrics(_metric_names(selected, "wiseft/selected"), step=len(rows))
        if figure is not None and isinstance(logger, TensorBoardLogger):
            logger.experiment.add_figure("wiseft/id_vs_ood", figure, global_step=trainer.global_step, close=False)
        logger.save()


def _metric_names(row: Mapping[str, float], prefix: str) -> dict[str, float]:
    return {f"{prefix}/{key}" if key == ALPHA_KEY else f"{prefix}/{key}/acc": value for key, value in row.items()}


# --------------------------------------------------------------------------------- after the fact, from files
def load_checkpoint_state_dict(path: str | Path, weights_only: bool = False) -> dict[str, Any]:
    """Read a checkpoint file into a dict: a Lightning checkpoint as saved, a bare state dict as ``{"state_dict"}``.

    Only load files you trust: with ``weights_only=False`` (needed for checkpoints that carry hyperparameter
    objects) ``torch.load`` unpickles arbitrary objects.
    """
    file = Path(path)
    if not file.is_file():
        raise RobustFTConfigError(f"Checkpoint path {str(file)!r} does not exist or is not a file.")
    loaded = torch.load(file, map_location="cpu", weights_only=weights_only)
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        return dict(loaded)
    if isinstance(loaded, Mapping) and all(isinstance(value, Tensor) for value in loaded.values()):
        return {"state_dict": dict(loaded)}
    raise RobustFTConfigError(
        f"{str(file)!r} holds neither a Lightning checkpoint (a dict with 'state_dict') nor a state dict."
    )


def load_wiseft_endpoints(
    finetuned: str | Path, zeroshot: str | Path | None = None, weights_only: bool = False
) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, Any]]:
    """Read theta_0 and theta_1 for an after-the-fact sweep.

    Args:
        finetuned: the fine-tuned checkpoint (its ``state_dict`` is theta_1).
        zeroshot: the zero-shot checkpoint; default: the ``wiseft_theta_0`` that :class:`WiSEFTCallback` stored in
            ``finetuned``.
        weights_only: passed to ``torch.load``.

    Returns:
        ``(theta_0, theta_1, finetuned_checkpoint)``; the last is reused to write the interpolated checkpoint.
    """
    checkpoint = load_checkpoint_state_dict(finetuned, weights_only)
    if zeroshot is not None:
        theta_0 = load_checkpoint_state_dict(zeroshot, weights_only)["state_dict"]
    elif THETA_0_KEY in checkpoint:
        theta_0 = checkpoint[THETA_0_KEY]
    else:
        raise RobustFTConfigError(
            f"`zeroshot` is None and {str(finetuned)!r} has no {THETA_0_KEY!r} (it was not trained with "
            "WiSEFTCallback): pass the zero-shot checkpoint, e.g. one written with "
            "`torch.save({'state_dict': model.state_dict()}, 'zeroshot.ckpt')` before fine-tuning."
        )
    return float_state_snapshot(theta_0), checkpoint["state_dict"], checkpoint


def save_interpolated_checkpoint(
    path: str | Path, module: nn.Module, alpha: float, source: Mapping[str, Any] | None = None
) -> Path:
    """Save ``module``'s weights as a weights-only Lightning checkpoint that records ``alpha``.

    Hyperparameters and other metadata are copied from ``source`` (the fine-tuned checkpoint) so that
    ``MyModule.load_from_checkpoint(path)`` rebuilds the model; training state (optimizers, callbacks, theta_0) is
    dropped.
    """
    return save_weights_checkpoint(path, module, source, {"wiseft": {ALPHA_KEY: float(alpha)}})


def save_weights_checkpoint(
    path: str | Path,
    module: nn.Module,
    source: Mapping[str, Any] | None = None,
    record: Mapping[str, Any] | None = None,
) -> Path:
    """Save ``module``'s weights as a weights-only Lightning checkpoint, with ``record``'s entries added at the top.

    Hyperparameters and other metadata are copied from ``source`` (a checkpoint of the same model) so that
    ``MyModule.load_from_checkpoint(path)`` rebuilds the model; training state (optimizers, callbacks, theta_0) is
    dropped.
    """
    dropped = {"state_dict", "optimizer_states", "lr_schedulers", "callbacks", "loops", THETA_0_KEY}
    checkpoint = {key: value for key, value in (source or {}).items() if key not in dropped}
    checkpoint.setdefault("pytorch-lightning_version", lightning.__version__)
    checkpoint["state_dict"] = {k: v.detach().cpu() if isinstance(v, Tensor) else v for k, v in _state(module)}
    checkpoint.update(record or {})
    file = Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, file)
    return file


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
    """
    swept = sweep_alphas(alphas, alpha, select)
    theta_0, theta_1, source = load_wiseft_endpoints(finetuned, zeroshot, weights_only)
    loaders = named_dataloaders(dataloaders, getattr(module, "val_set_names", None))
    resolved_id = resolve_id_set(list(loaders), id_set or getattr(module, "id_set", None))
    rows = wiseft_sweep(module, theta_0, theta_1, loaders, swept, id_set=resolved_id, device=device)
    chosen = select_alpha(rows, select, alpha, resolved_id)
    apply_alpha(module, theta_0, theta_1, chosen)
    checkpoint = save_interpolated_checkpoint(Path(output_dir) / checkpoint_name(chosen), module, chosen, source)
    summary = make_summary(rows, resolved_id, select, chosen, checkpoint)
    write_wiseft_results(summary, output_dir)
    return summary


def _state(module: nn.Module) -> Iterable[tuple[str, Any]]:
    return module.state_dict().items()


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
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise RobustFTConfigError(
            f"`{name}`={value!r} must be a number in [0, 1] (0 is the zero-shot model, 1 the fine-tuned one)."
        )
