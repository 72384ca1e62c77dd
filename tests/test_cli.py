import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from lightning_robustft.cli import cli_main
from lightning_robustft.console import find_user_error, main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    """LightningCLI warns when called with ``args`` while ``sys.argv`` holds pytest's own arguments."""
    monkeypatch.setattr("sys.argv", ["robustft"])


def write_config(tmp_path, folders, **model_args):
    config = {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": 1,
            "accelerator": "cpu",
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path)}},
            "enable_progress_bar": False,
            "default_root_dir": str(tmp_path),
        },
        "model": {
            "class_path": "lightning_robustft.ImageClassifier",
            "init_args": {"backbone": "timm:test_resnet:random", "lr": 1e-3, **model_args},
        },
        "data": {
            "class_path": "lightning_robustft.MultiDomainDataModule",
            "init_args": {
                "train": str(folders["train"]),
                "val": {"id": str(folders["id"]), "ood_subset": str(folders["ood_subset"])},
                "test": {"ood_full": str(folders["ood_full"])},
                "batch_size": 4,
                "num_workers": 0,
            },
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_fit_then_validate_and_test_from_yaml(image_folders, tmp_path, capsys, caplog):
    config = write_config(tmp_path, image_folders)
    with caplog.at_level(logging.INFO):
        cli = cli_main(["fit", "--config", str(config)])
    # The data module's class list, set names and subsets were linked into the model.
    assert cli.model.hparams.class_names == ["a", "b", "c"]
    assert cli.model.val_set_names == ["id", "ood_subset"]
    assert cli.model.class_subsets == {"ood_subset": [0, 2]}
    assert {"val/id/acc", "val/ood_subset/acc", "val/ood_avg/acc"} <= set(cli.trainer.callback_metrics)
    checkpoints = list(tmp_path.rglob("*.ckpt"))
    assert checkpoints, "fit should leave a checkpoint"
    assert list(tmp_path.rglob("metrics.csv")), "fit should leave CSV logs"
    # fit says where its checkpoints and logs went.
    assert f"Checkpoints: {checkpoints[0].parent} (best: {checkpoints[0]}" in caplog.text
    assert f"Logs and config.yaml: {cli.trainer.log_dir}" in caplog.text
    assert (Path(cli.trainer.log_dir) / "config.yaml").is_file()

    for subcommand, key in (("validate", "val/ood_subset/acc"), ("test", "test/ood_full/acc")):
        capsys.readouterr()
        caplog.clear()
        with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
            warnings.simplefilter("always")
            ran = cli_main([subcommand, "--config", str(config), "--ckpt_path", str(checkpoints[0])])
        assert key in ran.trainer.callback_metrics
        # Only the model's per-set table, not Lightning's one with a column per dataloader.
        assert f"{'val' if subcommand == 'validate' else 'test'} results (epoch" in caplog.text
        assert "DataLoader" not in capsys.readouterr().out
        # Next to the fit run, the checkpoint's ModelCheckpoint state is not restored with a dirpath warning.
        assert not [w for w in caught if "dirpath has changed" in str(w.message)]


def test_print_config_shows_the_resolved_configuration(image_folders, tmp_path, capsys):
    config = write_config(tmp_path, image_folders)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["backbone"] == "timm:test_resnet:random"
    assert printed["data"]["init_args"]["val"]["ood_subset"] == str(image_folders["ood_subset"])


def test_wrong_type_in_yaml_names_the_key(image_folders, tmp_path, capsys):
    config = write_config(tmp_path, image_folders, lr="fast")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(config)])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert "lr" in err and "fast" in err and "float" in err


def test_missing_path_in_yaml_is_reported(image_folders, tmp_path):
    image_folders = dict(image_folders, ood_subset=tmp_path / "no_such_folder")
    config = write_config(tmp_path, image_folders)
    # jsonargparse wraps what the data module raises; the CLI's error printer finds our error in the chain.
    with pytest.raises((ValueError, FileNotFoundError)) as raised:
        cli_main(["fit", "--config", str(config)])
    error = find_user_error(raised.value)
    assert isinstance(error, FileNotFoundError)
    assert re.search(r"Set 'ood_subset': path .*no_such_folder.* does not exist", str(error))


@pytest.mark.parametrize("recipe", ["clip_imagenet", "clip_domainnet", "clip_iwildcam"])
def test_real_recipes_parse(recipe, monkeypatch, capsys):
    for name in ("IMAGENET_ROOT", "DOMAINNET_ROOT", "WILDS_ROOT"):
        monkeypatch.setenv(name, "/data/example")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(CONFIGS / f"{recipe}.yaml"), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["backbone"] == "open_clip:ViT-B-16:openai"
    data = printed["data"]["init_args"]
    assert data["train"].startswith("/data/example/") or data.get("wilds_root") == "/data/example"


@pytest.mark.slow
def test_fit_resumed_with_more_epochs(image_folders, tmp_path):
    # 3 steps an epoch: 20 % warm-up is 0 steps over 1 epoch, 1 step over 2 (the two schedules used to differ).
    config = write_config(tmp_path, image_folders, warmup_steps=0.2)
    cli_main(["fit", "--config", str(config)])
    (checkpoint,) = tmp_path.rglob("*.ckpt")
    resumed = cli_main(["fit", "--config", str(config), "--ckpt_path", str(checkpoint), "--trainer.max_epochs=2"])
    assert resumed.trainer.current_epoch == 2 and resumed.trainer.global_step == 6
    assert resumed.trainer.lr_scheduler_configs[0].scheduler.last_epoch == 6


def bad_backbone_config(tmp_path, image_folders):
    return write_config(tmp_path, image_folders, backbone="foo:bar")


def test_configuration_error_is_one_line_on_stderr(image_folders, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("ROBUSTFT_TRACEBACK", raising=False)
    monkeypatch.setattr("sys.argv", ["robustft", "fit", "--config", str(bad_backbone_config(tmp_path, image_folders))])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "robustft: error: `backbone`='foo:bar' has unknown kind 'foo'" in err
    assert "Traceback" not in err and "ROBUSTFT_TRACEBACK=1" in err


def test_traceback_on_request(image_folders, tmp_path):
    config = bad_backbone_config(tmp_path, image_folders)
    command = [
        sys.executable,
        "-c",
        "from lightning_robustft.console import main; main()",
        "fit",
        "--config",
        str(config),
    ]
    env = {**os.environ, "ROBUSTFT_TRACEBACK": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr
    assert "RobustFTConfigError: `backbone`='foo:bar'" in done.stderr


def test_errors_from_libraries_are_not_taken_for_configuration_mistakes():
    try:
        int("not a number")  # a ValueError raised outside this package: a bug, keeps its traceback
    except ValueError as error:
        assert find_user_error(error) is None
    try:
        from lightning_robustft.models.prompts import resolve_templates

        resolve_templates(["no placeholder"])
    except ValueError as error:
        try:
            raise ValueError("wrapped by jsonargparse") from error
        except ValueError as wrapper:
            assert find_user_error(wrapper) is error
