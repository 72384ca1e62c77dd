"""Set sources beyond image folders: datasets by class path (through the CLI), Hugging Face, WILDS, index folders."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from _helpers import write_image_folder
from PIL import Image

from lightning_robustft import MultiDomainDataModule, RobustFTConfigError
from lightning_robustft._optional import require
from lightning_robustft.cli import cli_main
from lightning_robustft.data import HFImageSet, WildsSet
from lightning_robustft.data.demo import DEMO_CLASSES, DemoDigits

DEMO = "lightning_robustft.data.demo.DemoDigits"


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["robustft"])


def _images(count, size=8, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


# --- datasets by class path, through the CLI -----------------------------------------------------------------------


def _cli_config(tmp_path, data_args, data_class="lightning_robustft.MultiDomainDataModule"):
    config = {
        "trainer": {
            "accelerator": "cpu",
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(tmp_path / "run"),
            "limit_test_batches": 1,
            "limit_predict_batches": 1,
        },
        "model": {
            "class_path": "lightning_robustft.ImageClassifier",
            "init_args": {"backbone": "timm:test_resnet:random"},
        },
        "data": {"class_path": data_class, "init_args": {"batch_size": 4, "num_workers": 0, **data_args}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_datasets_by_class_path_in_yaml_for_every_set(tmp_path, image_folders):
    """The documented YAML (`class_path` sets) reaches the data module as datasets for train, val, test and predict."""

    def demo(split):
        return {"class_path": DEMO, "init_args": {"split": split}}

    config = _cli_config(
        tmp_path,
        {
            "train": demo("train"),
            "val": {"id": demo("id_val"), "rotated": demo("rotated")},
            # a torchvision dataset by class path, next to the package's own
            "test": {
                "folder": {
                    "class_path": "torchvision.datasets.ImageFolder",
                    "init_args": {"root": str(tmp_path / "d")},
                },
                "inverted": demo("inverted"),
            },
            "predict": demo("noisy"),
            "eval_batch_size": 2,
        },
    )
    # An ImageFolder whose class folders are demo class names: any Dataset class works, scored among its classes.
    write_image_folder(tmp_path / "d", ["one", "seven"], per_class=2, size=32)
    cli = cli_main(["test", "--config", str(config)])
    data = cli.datamodule
    assert isinstance(data.train_source, DemoDigits) and data.train_source.split == "train"
    assert {name: type(s).__name__ for name, s in data.val_sources.items()} == {
        "id": "DemoDigits",
        "rotated": "DemoDigits",
    }
    assert type(data.test_sources["folder"]).__name__ == "ImageFolder"
    assert data.class_names == list(DEMO_CLASSES)
    assert data.class_subsets == {"folder": [1, 7]}
    assert {"test/folder/acc", "test/inverted/acc"} <= set(cli.trainer.callback_metrics)

    predicted = cli_main(["predict", "--config", str(config)])
    assert predicted.datamodule.predict_set_names == ["predict"]
    assert isinstance(predicted.datamodule.predict_sources["predict"], DemoDigits)
    assert predicted.datamodule.predict_sources["predict"].split == "noisy"


def test_class_path_that_does_not_fit_says_so(tmp_path):
    """Wrong init_args must not end as "path ... does not exist" (the parser's fallback to a string or a dict)."""
    broken = {"class_path": DEMO, "init_args": {"split": "train", "no_such_argument": 1}}
    good = {"class_path": DEMO, "init_args": {"split": "id_val"}}
    message = r"Set '(train|ood)' is a `class_path` mapping that could not be turned into a dataset.*no_such_arg"
    for data_args in ({"train": broken, "val": {"id": good}}, {"train": good, "val": {"id": good, "ood": broken}}):
        config = _cli_config(tmp_path, data_args)
        with pytest.raises(Exception, match=message):
            cli_main(["predict", "--config", str(config)])


def test_user_dataset_without_classes_by_class_path_needs_classes(tmp_path):
    """torchvision's FakeData has no `classes`: the class list comes from `classes=`, and the error says so."""
    from torchvision.datasets import FakeData

    with pytest.raises(RobustFTConfigError, match="Pass `classes=`"):
        MultiDomainDataModule(FakeData(size=2), {"id": FakeData(size=2)})
    fake = {
        "class_path": "torchvision.datasets.FakeData",
        "init_args": {"size": 4, "image_size": [3, 8, 8], "num_classes": 2},
    }
    config = _cli_config(tmp_path, {"train": fake, "val": {"id": fake}, "classes": ["x", "y"]})
    cli = cli_main(["validate", "--config", str(config), "--trainer.limit_val_batches=1"])
    assert type(cli.datamodule.train_source).__name__ == "FakeData"
    assert cli.model.hparams.class_names == ["x", "y"]
    assert "val/id/acc" in cli.trainer.callback_metrics


# --- Hugging Face datasets -----------------------------------------------------------------------------------------


@pytest.fixture
def hf_saved(tmp_path):
    """A dataset saved by `datasets` itself: an Image column and a ClassLabel column, plus a two-split DatasetDict."""
    datasets = pytest.importorskip("datasets")
    features = datasets.Features(
        {"picture": datasets.Image(), "kind": datasets.ClassLabel(names=["cat", "dog", "owl"])}
    )
    train = datasets.Dataset.from_dict({"picture": _images(6), "kind": [0, 1, 2, 0, 1, 2]}, features=features)
    test = datasets.Dataset.from_dict({"picture": _images(4, seed=1), "kind": [2, 2, 0, 2]}, features=features)
    train.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict(train=train, test=test).save_to_disk(str(tmp_path / "dict"))
    return {"single": tmp_path / "single", "dict": tmp_path / "dict", "train": train, "test": test}


def test_hf_sources_from_strings_and_objects(hf_saved):
    data = MultiDomainDataModule(
        f"hf:{hf_saved['dict']}:train",
        {"id": hf_saved["test"], "saved": f"hf:{hf_saved['single']}"},  # a datasets.Dataset object, a saved folder
        batch_size=2,
        num_workers=0,
    )
    assert data.class_names == ["cat", "dog", "owl"]  # from the ClassLabel feature
    assert isinstance(data.val_sources["id"], HFImageSet)
    data.setup("fit")
    x, _ = next(iter(data.train_dataloader()))
    assert x.shape == (2, 3, 8, 8) and x.dtype == torch.float32
    labels = torch.cat([y for _, y in data.val_dataloader()["id"]])
    assert labels.tolist() == [2, 2, 0, 2]


def test_hf_columns_are_configurable_and_errors_say_what_to_do(hf_saved, tmp_path):
    datasets = pytest.importorskip("datasets")
    with pytest.raises(RobustFTConfigError, match=r"splits \['train', 'test'\]"):
        HFImageSet(str(hf_saved["dict"]))
    with pytest.raises(RobustFTConfigError, match=r"'.*nowhere' could not be loaded"):
        MultiDomainDataModule(f"hf:{tmp_path / 'nowhere'}", {"id": hf_saved["test"]})
    # Two image columns and an integer label: the defaults cannot tell, so the columns must be named.
    two = datasets.Dataset.from_dict(
        {"a": _images(2), "b": _images(2, seed=3), "target": [1, 0]},
        features=datasets.Features({"a": datasets.Image(), "b": datasets.Image(), "target": datasets.Value("int64")}),
    )
    with pytest.raises(RobustFTConfigError, match="name the image column"):
        HFImageSet(two)
    with pytest.raises(RobustFTConfigError, match="has no column"):
        HFImageSet(two, image_column="b", label_column="nope")
    chosen = HFImageSet(two, image_column="b", label_column="target")
    assert chosen.classes is None  # plain integers: the data module then needs `classes=`
    image, label = chosen[0]
    assert label == 1 and np.array_equal(np.asarray(image), np.asarray(_images(2, seed=3)[0]))


def test_hf_set_by_class_path_through_the_cli(hf_saved, tmp_path):
    source = {"class_path": "lightning_robustft.data.HFImageSet", "init_args": {"dataset": str(hf_saved["single"])}}
    config = _cli_config(tmp_path, {"train": source, "val": {"id": f"hf:{hf_saved['dict']}:test"}})
    cli = cli_main(["validate", "--config", str(config), "--trainer.limit_val_batches=1"])
    assert cli.model.hparams.class_names == ["cat", "dog", "owl"]
    assert "val/id/acc" in cli.trainer.callback_metrics


def test_missing_optional_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match=r"pip install lightning-robustft\[hf\]"):
        require("datasets", "hf")
    with pytest.raises(ImportError, match=r"lightning-robustft\[hf\]"):
        HFImageSet("beans")


# --- WILDS ---------------------------------------------------------------------------------------------------------


def write_fake_iwildcam(root: Path, with_categories: bool = True) -> Path:
    """The on-disk layout `wilds` reads for iWildCam v2.0: a release file, metadata.csv and images under train/."""
    pytest.importorskip("wilds")
    folder = root / "iwildcam_v2.0"
    (folder / "train").mkdir(parents=True)
    (folder / "RELEASE_v2.0.txt").write_text("fake\n")
    rows = ["split,filename,y,location_remapped,sequence_remapped,datetime"]
    layout = [("train", 0), ("train", 1), ("train", 2), ("id_val", 1), ("id_val", 2), ("val", 0), ("val", 2)]
    layout += [("id_test", 0), ("test", 1)]
    for i, (split, label) in enumerate(layout):
        name = f"img{i}.jpg"
        _images(1, size=12, seed=i)[0].save(folder / "train" / name)
        rows.append(f"{split},{name},{label},{i % 3},{i},2013-06-0{1 + i % 9} 10:00:00.000")
    (folder / "metadata.csv").write_text("\n".join(rows) + "\n")
    if with_categories:
        (folder / "categories.csv").write_text("y,category_id,name\n0,0,empty\n1,3,tayassu pecari\n2,8,puma concolor\n")
    return root


def test_wilds_splits_by_name(tmp_path):
    root = write_fake_iwildcam(tmp_path / "wilds")
    data = MultiDomainDataModule(
        "wilds:iwildcam:train",
        {"id_val": "wilds:iwildcam:id_val", "ood_val": "wilds:iwildcam:val"},
        test={"id_test": "wilds:iwildcam:id_test", "ood_test": "wilds:iwildcam:test"},
        wilds_root=str(root),
        batch_size=8,
        num_workers=0,
    )
    assert data.class_names == ["empty", "tayassu pecari", "puma concolor"]  # from categories.csv
    data.setup("fit")
    sizes = {name: len(loader.dataset) for name, loader in data.val_dataloader().items()}
    assert sizes == {"id_val": 2, "ood_val": 2}
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (3, 3, 12, 12) and sorted(y.tolist()) == [0, 1, 2]
    labels = torch.cat([y for _, y in data.val_dataloader()["ood_val"]])
    assert sorted(labels.tolist()) == [0, 2]


def test_iwildcam_recipe_reads_the_wilds_splits(tmp_path):
    """configs/clip_iwildcam.yaml's data section, on a fake WILDS copy: every split it names exists."""
    root = write_fake_iwildcam(tmp_path / "wilds")
    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "clip_iwildcam.yaml").read_text())
    init_args = {**config["data"]["init_args"], "wilds_root": str(root), "num_workers": 0}
    data = MultiDomainDataModule(**init_args)
    assert data.val_set_names == ["id_val", "ood_val"] and data.test_set_names == ["id_test", "ood_test"]
    assert data.class_names == ["empty", "tayassu pecari", "puma concolor"]
    data.setup("test")
    assert {name: len(loader.dataset) for name, loader in data.test_dataloader().items()} == {
        "id_test": 1,
        "ood_test": 1,
    }


def test_camelyon17_splits_and_class_names(tmp_path):
    """A second WILDS layout (patches named by patient, node and position; OOD splits by hospital)."""
    pytest.importorskip("wilds")
    folder = tmp_path / "wilds" / "camelyon17_v1.0"
    rows = [",patient,node,x_coord,y_coord,tumor,slide,center,split"]
    # (center, split, tumor): centers 1 and 2 are WILDS's OOD val and test hospitals; split 1 marks ID val.
    layout = [(0, 0, 0), (0, 0, 1), (0, 1, 1), (1, 0, 0), (2, 0, 1), (2, 0, 0)]
    for i, (center, split, tumor) in enumerate(layout):
        patch = folder / "patches" / f"patient_00{i}_node_0" / f"patch_patient_00{i}_node_0_x_{i}_y_{i}.png"
        patch.parent.mkdir(parents=True)
        _images(1, size=12, seed=i)[0].save(patch)
        rows.append(f"{i},00{i},0,{i},{i},{tumor},{i},{center},{split}")
    (folder / "metadata.csv").write_text("\n".join(rows) + "\n")
    (folder / "RELEASE_v1.0.txt").write_text("fake\n")
    data = MultiDomainDataModule(
        "wilds:camelyon17:train",
        {"id_val": "wilds:camelyon17:id_val", "val": "wilds:camelyon17:val", "test": "wilds:camelyon17:test"},
        wilds_root=tmp_path / "wilds",
        num_workers=0,
    )
    assert data.class_names == ["normal", "tumor"]
    data.setup("fit")
    labels = {name: torch.cat([y for _, y in loader]).tolist() for name, loader in data.val_dataloader().items()}
    assert labels == {"id_val": [1], "val": [0], "test": [1, 0]}
    assert len(data.train_dataloader().dataset) == 2


def test_wilds_errors_name_the_fix(tmp_path):
    root = write_fake_iwildcam(tmp_path / "wilds", with_categories=False)
    assert WildsSet("iwildcam", "train", root).classes == ["0", "1", "2"]  # no categories.csv: indices
    with pytest.raises(RobustFTConfigError, match=r"no split 'ood'.*'id_val'"):
        WildsSet("iwildcam", "ood", root)
    with pytest.raises(RobustFTConfigError, match="wilds_root="):
        MultiDomainDataModule("wilds:iwildcam:train", {"id": "wilds:iwildcam:id_val"})
    with pytest.raises(RobustFTConfigError, match=r"not under .*download=True"):
        WildsSet("fmow", "train", root)
    with pytest.raises(RobustFTConfigError, match="Unknown WILDS dataset"):
        WildsSet("imagenet", "train", root)


# --- image folders named by class index (ImageNetV2) ----------------------------------------------------------------


def test_folders_named_by_index(tmp_path, image_folders):
    v2 = write_image_folder(tmp_path / "v2", ["0", "2"], per_class=2, seed=9)  # classes a and c of ["a", "b", "c"]
    data = MultiDomainDataModule(
        image_folders["train"], {"id": image_folders["id"], "v2": v2}, folders_named_by_index=["v2"], num_workers=0
    )
    assert data.class_subsets == {"v2": [0, 2]}
    data.setup("validate")
    assert torch.cat([y for _, y in data.val_dataloader()["v2"]]).tolist() == [0, 0, 2, 2]
    with pytest.raises(RobustFTConfigError, match="do not exist"):
        MultiDomainDataModule(image_folders["train"], {"id": image_folders["id"]}, folders_named_by_index=["v3"])
    with pytest.raises(RobustFTConfigError, match=r"folders \['a', 'b', 'c'\] are not indices"):
        MultiDomainDataModule(image_folders["train"], {"id": image_folders["id"]}, folders_named_by_index=["id"])
