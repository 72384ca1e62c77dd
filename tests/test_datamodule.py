import shutil

import pytest
import torch

from lightning_robustft import MultiDomainDataModule, RobustFTConfigError


def make_dm(folders, **kwargs):
    val = {"id": folders["id"], "ood_full": folders["ood_full"], "ood_subset": folders["ood_subset"]}
    return MultiDomainDataModule(folders["train"], val, batch_size=4, num_workers=0, **kwargs)


def test_class_list_set_names_and_subsets(image_folders):
    dm = make_dm(image_folders)
    assert dm.class_names == ["a", "b", "c"]
    assert dm.val_set_names == ["id", "ood_full", "ood_subset"]
    assert dm.id_set == "id"
    assert dm.ood_set_names == ["ood_full", "ood_subset"]
    assert dm.class_subsets == {"ood_subset": [0, 2]}


def test_loaders_are_named_and_subset_labels_index_the_full_class_list(image_folders):
    dm = make_dm(image_folders)
    dm.setup("fit")
    loaders = dm.val_dataloader()
    assert list(loaders) == ["id", "ood_full", "ood_subset"]
    labels = torch.cat([y for _, y in loaders["ood_subset"]])
    assert sorted(set(labels.tolist())) == [0, 2]  # "c" is label 2 globally, 1 inside its own folder
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32


def test_missing_path_names_the_set_and_the_path(image_folders, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=r"Set 'sketch': path .*nowhere.* does not exist"):
        MultiDomainDataModule(image_folders["train"], {"id": image_folders["id"], "sketch": missing})


def test_empty_folder_is_an_error(image_folders, tmp_path):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(RobustFTConfigError, match=r"'empty'.*no images"):
        MultiDomainDataModule(image_folders["train"], {"id": image_folders["id"], "empty": tmp_path / "empty"})
    with pytest.raises(RobustFTConfigError, match="no class sub-folders"):
        MultiDomainDataModule(image_folders["train"], {"id": tmp_path / "empty" / "a"})


def test_class_mismatch_names_the_set_and_the_classes(image_folders):
    shutil.copytree(image_folders["id"] / "a", image_folders["ood_full"] / "zebra")
    with pytest.raises(RobustFTConfigError, match=r"Set 'ood_full' has classes \['zebra'\]"):
        make_dm(image_folders)


def test_bad_arguments(image_folders):
    with pytest.raises(RobustFTConfigError, match="id_set"):
        make_dm(image_folders, id_set="nope")
    with pytest.raises(RobustFTConfigError, match="augment"):
        make_dm(image_folders, augment="mixup")
    with pytest.raises(RobustFTConfigError, match="`val`"):
        MultiDomainDataModule(image_folders["train"], {})


def test_dataset_sources_and_augmentation(image_folders):
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(str(image_folders["id"]))
    dm = MultiDomainDataModule(dataset, {"id": dataset}, augment="randaugment", batch_size=2, num_workers=0)
    dm.setup("fit")
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 16, 16)


def test_test_stage_needs_test_sets(image_folders):
    dm = make_dm(image_folders)
    with pytest.raises(RobustFTConfigError, match="test` sets are needed"):
        dm.setup("test")
