"""The ``robustft`` command: LightningCLI over `ImageClassifier` and `MultiDomainDataModule`.

``robustft fit|validate|test|predict --config configs/demo.yaml``; callbacks by ``class_path`` in YAML;
``--print_config`` shows the full resolved configuration. YAML files are read in OmegaConf mode, so a recipe can
say ``train: ${oc.env:IMAGENET_ROOT}/train`` and take its paths from the environment. The data module's class list,
set names, ID set and class subsets are linked into the model, so a YAML file states them once.

A configuration mistake found while the objects are built (a bad backbone, a missing folder, an unknown metric)
ends the command with one ``robustft: error: ...`` line on stderr and exit status 1, not a 30-frame traceback;
``ROBUSTFT_TRACEBACK=1`` shows the traceback.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

import lightning_robustft
from lightning_robustft.data.multi_domain import MultiDomainDataModule
from lightning_robustft.models.classifier import ImageClassifier
from lightning_robustft.prediction import PredictionWriter

__all__ = ["DATA_TO_MODEL_LINKS", "TRACEBACK_ENV", "RobustFTCLI", "cli_main", "find_user_error", "main"]

#: data-module attribute -> ImageClassifier argument, filled in when the data module is instantiated.
DATA_TO_MODEL_LINKS: dict[str, str] = {
    "class_names": "class_names",
    "val_set_names": "val_sets",
    "id_set": "id_set",
    "class_subsets": "class_subsets",
}

#: Set to ``1`` to see the full traceback of an error that ``robustft`` would otherwise print as one line.
TRACEBACK_ENV = "ROBUSTFT_TRACEBACK"

#: Built-in errors that are a user's mistake when this package raises them (elsewhere they are bugs: traceback).
_USER_ERROR_TYPES = (ValueError, TypeError, FileNotFoundError, ImportError)
_PACKAGE_DIR = str(Path(lightning_robustft.__file__).resolve().parent)


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


def cli_main(args: ArgsType = None) -> RobustFTCLI:
    """Entry point of ``robustft``; ``args`` (a list of strings or a dict) makes it callable from tests."""
    return RobustFTCLI(
        ImageClassifier,
        MultiDomainDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"parser_mode": "omegaconf"},
        args=args,
    )


def find_user_error(error: BaseException) -> BaseException | None:
    """The configuration mistake behind ``error``, or ``None`` when it is a bug (which keeps its traceback).

    jsonargparse wraps an error raised while it builds a class in its own ``ValueError``, so the chain of causes is
    searched. Configuration errors (this package's and Lightning's ``MisconfigurationException``) always count; a
    ``ValueError``, ``TypeError``, ``FileNotFoundError`` or ``ImportError`` counts when this package raised it (its
    messages say what to fix), not when it comes from deep inside a library.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, MisconfigurationException):
            return current
        if isinstance(current, _USER_ERROR_TYPES):
            frames = traceback.extract_tb(current.__traceback__)
            if frames and str(Path(frames[-1].filename).resolve()).startswith(_PACKAGE_DIR):
                return current
        current = current.__cause__ or current.__context__
    return None


def main() -> None:
    """Console-script entry point: exit status 0 on success, 1 with a one-line message on a configuration error."""
    try:
        cli_main()
    except Exception as error:
        user_error = find_user_error(error)
        if user_error is None or os.environ.get(TRACEBACK_ENV, "0") not in ("", "0"):
            raise
        print(f"robustft: error: {user_error}", file=sys.stderr)
        print(f"(set {TRACEBACK_ENV}=1 to see the traceback)", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
