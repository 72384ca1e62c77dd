"""`robustft predict` and `PredictionWriter`: one row per image, written to CSV / Parquet in the run directory."""

import csv
from pathlib import Path

import pytest
import torch
import yaml
from _helpers import make_trainer

from lightning_robustft import ImageClassifier, MultiDomainDataModule, RobustFTConfigError
from lightning_robustft.cli import cli_main
from lightning_robustft.data.demo import DEMO_CLASSES
from lightning_robustft.prediction import PredictionWriter

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["robustft"])


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_predict_on_the_demo_writes_predictions(tmp_path):
    """The documented command on the demo config, with no extra YAML: predictions land in the run directory."""
    cli = cli_main(
        [
            "predict",
            "--config",
            str(CONFIGS / "demo.yaml"),
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.limit_predict_batches=2",
            "--trainer.enable_progress_bar=false",
            "--data.eval_batch_size=5",
        ]
    )
    writers = [c for c in cli.trainer.callbacks if isinstance(c, PredictionWriter)]
    assert len(writers) == 1, "predict adds exactly one writer by default"
    paths = writers[0].paths
    assert [p.suffix for p in paths] == [".csv", ".parquet"] and all(p.is_relative_to(tmp_path) for p in paths)
    rows = read_csv(paths[0])
    assert len(rows) == 10
    assert list(rows[0]) == ["set", "index", "source", "label", "prediction", "probability"]
    assert {row["set"] for row in rows} == {"id_test"}
    assert [int(row["index"]) for row in rows] == list(range(10))
    assert all(row["prediction"] in DEMO_CLASSES and row["label"] in DEMO_CLASSES for row in rows)
    assert all(0.0 < float(row["probability"]) <= 1.0 for row in rows)
    # The zero-shot tiny CLIP is fair on the ID style: far better than chance on these digits.
    assert sum(row["prediction"] == row["label"] for row in rows) >= 4

    import pyarrow.parquet as pq

    table = pq.read_table(paths[1]).to_pylist()
    assert [r["prediction"] for r in table] == [r["prediction"] for r in rows]
    assert [round(r["probability"], 5) for r in table] == [round(float(r["probability"]), 5) for r in rows]


def test_writer_on_a_user_data_module_with_top_k(tmp_path, image_folders):
    """Image-folder sets: the source column is the file path; several named predict sets; top-k columns."""
    data = MultiDomainDataModule(
        image_folders["train"],
        {"id": image_folders["id"]},
        predict={"ood_full": image_folders["ood_full"], "ood_subset": image_folders["ood_subset"]},
        batch_size=4,
        num_workers=0,
    )
    model = ImageClassifier(backbone="timm:test_resnet:random", class_names=data.class_names)
    writer = PredictionWriter(output_dir=tmp_path / "out", top_k=2, formats=["csv"])
    trainer = make_trainer([writer], root=tmp_path)
    outputs = trainer.predict(model, datamodule=data)
    rows = read_csv(tmp_path / "out" / "predictions.csv")
    assert [p.name for p in writer.paths] == ["predictions.csv"]
    assert len(rows) == 12 + 8
    assert {row["set"] for row in rows} == {"ood_full", "ood_subset"}
    subset_rows = [row for row in rows if row["set"] == "ood_subset"]
    assert all(
        Path(row["source"]).is_file() and Path(row["source"]).is_relative_to(image_folders["ood_subset"])
        for row in subset_rows
    )
    # the true class is the folder of the file, in the full class list
    assert all(row["label"] == Path(row["source"]).parent.name for row in rows)
    assert list(rows[0])[-2:] == ["top2", "top2_probability"]
    first = outputs[0][0]  # probabilities of the first batch of the first set, as the model returned them
    top = first.topk(2, dim=1)
    assert rows[0]["prediction"] == data.class_names[int(top.indices[0, 0])]
    assert rows[0]["top2"] == data.class_names[int(top.indices[0, 1])]
    assert float(rows[0]["probability"]) == pytest.approx(float(top.values[0, 0]), abs=1e-6)


def test_configured_writer_is_not_doubled_and_bad_arguments(tmp_path, image_folders):
    config = {
        "trainer": {
            "accelerator": "cpu",
            "logger": False,
            "enable_progress_bar": False,
            "default_root_dir": str(tmp_path),
            "callbacks": [
                {
                    "class_path": "lightning_robustft.prediction.PredictionWriter",
                    "init_args": {"filename": "mine", "formats": ["csv"]},
                }
            ],
        },
        "model": {
            "class_path": "lightning_robustft.ImageClassifier",
            "init_args": {"backbone": "timm:test_resnet:random"},
        },
        "data": {
            "class_path": "lightning_robustft.MultiDomainDataModule",
            "init_args": {
                "train": str(image_folders["train"]),
                "val": {"id": str(image_folders["id"])},
                "predict": str(image_folders["ood_full"]),
                "num_workers": 0,
            },
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = cli_main(["predict", "--config", str(path)])
    writers = [c for c in cli.trainer.callbacks if isinstance(c, PredictionWriter)]
    assert len(writers) == 1 and writers[0].filename == "mine"
    rows = read_csv(tmp_path / "mine.csv")
    assert len(rows) == 12 and {row["set"] for row in rows} == {"predict"}

    with pytest.raises(RobustFTConfigError, match="top_k"):
        PredictionWriter(top_k=0)
    with pytest.raises(RobustFTConfigError, match="formats"):
        PredictionWriter(formats=["xlsx"])


def test_writer_refuses_outputs_that_are_not_probabilities(tmp_path):
    writer = PredictionWriter(output_dir=tmp_path)
    with pytest.raises(RobustFTConfigError, match=r"shape \(batch, classes\)"):
        writer.write_on_batch_end(None, None, torch.zeros(3), [0, 1, 2], None, 0, 0)
