"""The demo as a user meets it: the shipped tiny CLIP through ImageClassifier, the demo data module, the demo config."""

from pathlib import Path

import pytest
from _helpers import make_trainer

from lightning_robustft import DemoDataModule, ImageClassifier, RobustFTConfigError
from lightning_robustft.cli import cli_main
from lightning_robustft.data.demo import DEMO_CLASSES, DEMO_OOD_SETS, DEMO_TEMPLATES

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["robustft"])


def test_zero_shot_head_classifies_the_demo_well_above_chance(tmp_path):
    data = DemoDataModule(eval_batch_size=500)
    assert data.val_set_names == ["id", *DEMO_OOD_SETS]
    model = ImageClassifier(
        "open_clip:robustft-tiny-clip:mnist",
        class_names=data.class_names,
        head_init="zeroshot",
        templates=list(DEMO_TEMPLATES),
    )
    assert model.head.weight.shape == (len(DEMO_CLASSES), model.head.in_features)
    assert model.head.bias.abs().sum() == 0
    trainer = make_trainer(root=tmp_path)
    metrics = trainer.validate(model, data, verbose=False)[0]
    assert metrics["val/id/acc"] > 0.3  # chance is 0.1
    assert metrics["val/ood_avg/acc"] > 0.5


def test_demo_data_module_tests_on_every_shift_it_validates_on():
    data = DemoDataModule()
    assert data.test_set_names == data.val_set_names == ["id", *DEMO_OOD_SETS]
    some = DemoDataModule(ood_sets=["rotated", "inverted"])
    assert some.test_set_names == some.val_set_names == ["id", "rotated", "inverted"]


def test_demo_data_module_rejects_unknown_shifts():
    with pytest.raises(RobustFTConfigError, match="ood_sets"):
        DemoDataModule(ood_sets=["snow"])


@pytest.mark.slow
def test_demo_config_fits_and_tests_every_set_from_the_cli(tmp_path):
    cli = cli_main(
        [
            "fit",
            "--config",
            str(CONFIGS / "demo.yaml"),
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    metrics = cli.trainer.callback_metrics
    assert {f"val/{name}/acc" for name in ("id", "ood_avg", *DEMO_OOD_SETS)} <= set(metrics)
    checkpoint = next(tmp_path.rglob("last.ckpt"))

    tested = cli_main(
        [
            "test",
            "--config",
            str(CONFIGS / "demo.yaml"),
            "--ckpt_path",
            str(checkpoint),
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    test_metrics = tested.trainer.callback_metrics
    assert {f"test/{name}/acc" for name in ("id", "ood_avg", *DEMO_OOD_SETS)} <= set(test_metrics)
    ood = [float(test_metrics[f"test/{name}/acc"]) for name in DEMO_OOD_SETS]
    assert float(test_metrics["test/ood_avg/acc"]) == pytest.approx(sum(ood) / len(ood), abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("config", "callback"),
    [
        ("demo_gmixout", "GMixoutCallback"),
        ("demo_dropout", "DropoutHeadCallback"),
        ("demo_wiseft", "WiSEFTCallback"),
    ],
)
def test_method_demo_configs_fit_with_their_callback(config, callback, tmp_path):
    cli = cli_main(
        [
            "fit",
            "--config",
            str(CONFIGS / f"{config}.yaml"),
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    assert callback in {type(cb).__name__ for cb in cli.trainer.callbacks}
    assert "val/ood_avg/acc" in cli.trainer.callback_metrics
    assert set(cli.model.state_dict()) == set(
        ImageClassifier.load_from_checkpoint(next(tmp_path.rglob("last.ckpt"))).state_dict()
    )
