"""``WiSEFTCallback``: at the end of a fit, interpolate between the zero-shot and the fine-tuned weights.

The callback only keeps theta_0 across the fit (and its checkpoints) and hands over to the functions of
`lightning_robustft.weight_space.wise_ft` (the sweep, the choice of alpha, the result files), which
``run_wiseft`` also uses on saved checkpoints, so the callback and user scripts compute the same numbers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from matplotlib.figure import Figure
from torch import Tensor
from typing_extensions import override

from lightning_robustft.callbacks._shared import checkpoint_entry, refuse_unsupported
from lightning_robustft.evaluation.checkpoint import THETA_0_KEY
from lightning_robustft.evaluation.loop import resolve_id_set, trainer_validation_sets
from lightning_robustft.ops.interpolate import float_state_snapshot
from lightning_robustft.weight_space.wise_ft import (
    ALPHA_KEY,
    SelectMode,
    apply_alpha,
    checkpoint_name,
    make_summary,
    select_alpha,
    sweep_alphas,
    wiseft_sweep,
    write_wiseft_results,
)

__all__ = ["THETA_0_KEY", "WiSEFTCallback"]


class WiSEFTCallback(Callback):
    """WiSE-FT: after fit, interpolate between the zero-shot and the fine-tuned weights and keep the chosen mix.

    Wortsman et al. (CVPR 2022) show that ``theta(alpha) = (1 - alpha) * theta_0 + alpha * theta_1`` between the
    zero-shot model ``theta_0`` and the fine-tuned ``theta_1`` keeps most of fine-tuning's in-distribution gain while
    recovering, often exceeding, the zero-shot model's robustness under distribution shift; ``alpha = 0.5`` is their
    recommendation when no OOD data can be used for choosing. The interpolated model is the same architecture, so
    nothing changes at inference.

    What it does:

    * ``on_fit_start``: snapshot ``theta_0`` (a CPU copy of the floating-point tensors of the module's state dict;
      never a copy of the module). It goes into every checkpoint under ``"wiseft_theta_0"`` (``THETA_0_KEY``),
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

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Refuse sharded strategies and forget a previous fit's snapshot (a checkpoint may restore one next)."""
        if stage != TrainerFn.FITTING:
            return
        refuse_unsupported(
            trainer.strategy,
            None,
            callback="WiSEFTCallback",
            needs="WiSE-FT snapshots, interpolates and loads whole (unsharded) state dicts",
            fix="Use a single device or DDP, or run `run_wiseft` on the saved checkpoints afterwards.",
        )
        self._theta_0 = None
        self.applied_alpha = None
        self.results = []

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Snapshot theta_0, unless a resumed checkpoint already restored the original one."""
        if self._theta_0 is not None:
            rank_zero_info("WiSEFTCallback: theta_0 restored from the checkpoint (the weights at the first start).")
            return
        self._theta_0 = float_state_snapshot(pl_module.state_dict())
        rank_zero_info(f"WiSEFTCallback: theta_0 snapshot of {len(self._theta_0)} floating-point tensors.")

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Sweep the alphas on the validation sets, apply the selected one, save the model and write the results."""
        if self._theta_0 is None:
            rank_zero_warn("WiSEFTCallback: no theta_0 snapshot (fit did not start normally); nothing interpolated.")
            return
        theta_1 = {
            name: value.detach().to("cpu", copy=True) if isinstance(value, Tensor) else value
            for name, value in pl_module.state_dict().items()
        }
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

    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """Store theta_0 in the checkpoint, so a resumed fit still interpolates against the true start."""
        if self._theta_0 is not None:
            checkpoint[THETA_0_KEY] = self._theta_0

    @override
    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """Restore theta_0 from a checkpoint written by this callback; warn when resuming from any other."""
        without = "theta_0 will be the weights the fit resumes from, not the zero-shot model"
        theta_0 = checkpoint_entry(trainer, checkpoint, THETA_0_KEY, callback="WiSEFTCallback", without=without)
        if theta_0 is not None:
            self._theta_0 = {name: tensor.to("cpu") for name, tensor in theta_0.items()}

    @override
    def state_dict(self) -> dict[str, Any]:
        """Small scalars only (theta_0 travels through ``on_save_checkpoint``)."""
        return {"alpha": self.alpha, "select": self.select, "applied_alpha": self.applied_alpha}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore which alpha the saved weights hold; the configuration stays the constructor's."""
        self.applied_alpha = state_dict.get("applied_alpha")

    def _sweep(
        self, trainer: Trainer, pl_module: LightningModule, theta_0: dict[str, Tensor], theta_1: dict[str, Any]
    ) -> str | None:
        """Fill ``self.results`` from the fit's validation loaders; return the ID set (``None``: no sets)."""
        loaders, max_batches = trainer_validation_sets(trainer, pl_module)
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
