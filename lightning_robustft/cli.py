"""The ``robustft`` command: LightningCLI over :class:`ImageClassifier` and :class:`MultiDomainDataModule`.

``robustft fit|validate|test|predict --config configs/demo.yaml``; callbacks by ``class_path`` in YAML;
``--print_config`` shows the full resolved configuration. YAML files are read in OmegaConf mode, so a recipe can
say ``train: ${oc.env:IMAGENET_ROOT}/train`` and take its paths from the environment. The data module's class list,
set names, ID set and class subsets are linked into the model, so a YAML file states them once.
"""

from __future__ import annotations

import sys

from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from lightning_robustft.data.multi_domain import MultiDomainDataModule
from lightning_robustft.models.classifier import ImageClassifier

#: data-module attribute -> ImageClassifier argument, filled in when the data module is instantiated.
DATA_TO_MODEL_LINKS: dict[str, str] = {
    "class_names": "class_names",
    "val_set_names": "val_sets",
    "id_set": "id_set",
    "class_subsets": "class_subsets",
}


class RobustFTCLI(LightningCLI):
    """LightningCLI with the data -> model links of this package."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Link the data module's class list and set names into the model's arguments."""
        for source, target in DATA_TO_MODEL_LINKS.items():
            parser.link_arguments(f"data.{source}", f"model.init_args.{target}", apply_on="instantiate")


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


def main() -> None:
    """Console-script entry point (returns nothing, so the process exits with status 0 on success)."""
    if sys.argv[1:2] == ["compare"]:  # not a Trainer subcommand: a grid of fits (lightning_robustft.compare)
        from lightning_robustft.compare.cli import compare_main

        compare_main(sys.argv[2:])
        return
    cli_main()


if __name__ == "__main__":
    main()
