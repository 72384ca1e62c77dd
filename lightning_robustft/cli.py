"""The ``robustft`` command: LightningCLI over `ImageClassifier` and `MultiDomainDataModule`.

``robustft fit|validate|test|predict --config configs/demo.yaml``; callbacks by ``class_path`` in YAML;
``--print_config`` shows the full resolved configuration. YAML files are read in OmegaConf mode, so a recipe can
say ``train: ${oc.env:IMAGENET_ROOT}/train`` and take its paths from the environment. The data module's class list,
set names, ID set and class subsets are linked into the model, so a YAML file states them once.

The console script itself (``robustft``, with its ``compare`` subcommand and its one-line errors) is
`lightning_robustft.console.main`; this module is the LightningCLI that it and ``robustft compare``'s cells run.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from lightning_robustft.data.multi_domain import MultiDomainDataModule
from lightning_robustft.models.classifier import ImageClassifier
from lightning_robustft.prediction import PredictionWriter

__all__ = ["DATA_TO_MODEL_LINKS", "RobustFTCLI", "cli_main"]

#: data-module attribute -> ImageClassifier argument, filled in when the data module is instantiated.
DATA_TO_MODEL_LINKS: dict[str, str] = {
    "class_names": "class_names",
    "val_set_names": "val_sets",
    "id_set": "id_set",
    "class_subsets": "class_subsets",
}


class RobustFTCLI(LightningCLI):
    """LightningCLI with the data -> model links of this package and a quieter, more informative output.

    ``validate`` and ``test`` print the model's per-set table only (Lightning's own table would repeat every metric
    in a column per dataloader); ``fit`` ends by saying where its checkpoints and logs are. Outside ``fit``,
    ``ModelCheckpoint`` callbacks are dropped: they save nothing there, and restoring their state from a fit's
    checkpoint only warns that the run directory changed.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Link the data module's class list and set names into the model's arguments."""
        for source, target in DATA_TO_MODEL_LINKS.items():
            parser.link_arguments(f"data.{source}", f"model.init_args.{target}", apply_on="instantiate")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Build the trainer for the subcommand.

        ``predict`` gets a `PredictionWriter` unless a prediction writer is configured (without one,
        ``trainer.predict`` computes every prediction and the command ends with nothing saved); subcommands that do
        not fit drop the checkpoint callbacks, so they neither warn about a changed dirpath nor write checkpoints.
        """
        trainer = super().instantiate_trainer(**kwargs)
        if self.subcommand not in (None, "fit"):
            trainer.callbacks = [cb for cb in trainer.callbacks if not isinstance(cb, ModelCheckpoint)]
        if self.subcommand == "predict" and not any(isinstance(c, BasePredictionWriter) for c in trainer.callbacks):
            trainer.callbacks.append(PredictionWriter())
        return trainer

    def validate(self, **kwargs: Any) -> Any:
        """``Trainer.validate`` without Lightning's results table when the model prints its own."""
        return self.trainer.validate(**self._quiet(kwargs))

    def test(self, **kwargs: Any) -> Any:
        """``Trainer.test`` without Lightning's results table when the model prints its own."""
        return self.trainer.test(**self._quiet(kwargs))

    def _quiet(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        if getattr(self.model, "hparams", {}).get("print_table", False):
            kwargs["verbose"] = False
        return kwargs

    def after_fit(self) -> None:
        """Say where the run's checkpoints, logs and saved ``config.yaml`` are."""
        log_dir = self.trainer.log_dir
        lines = [f"Logs and config.yaml: {log_dir}" if log_dir else "Logs: none (no logger)"]
        for callback in self.trainer.checkpoint_callbacks:
            best = callback.best_model_path or "-"
            last = callback.last_model_path or "-"
            lines.append(f"Checkpoints: {callback.dirpath} (best: {best}, last: {last})")
        rank_zero_info("\n".join(lines))


def cli_main(args: ArgsType = None, run: bool = True) -> RobustFTCLI:
    """Entry point of ``robustft``; ``args`` (a list of strings or a dict) makes it callable from tests.

    ``run=False`` only builds the model, data module and trainer (no subcommand), as ``robustft compare`` does for
    each cell of its grid.
    """
    return RobustFTCLI(
        ImageClassifier,
        MultiDomainDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"parser_mode": "omegaconf"},
        args=args,
        run=run,
    )
