import pytest
import torch

from lightning_robustft.errors import RobustFTConfigError
from lightning_robustft.metrics import (
    format_results_table,
    make_metric_collection,
    ood_average,
    restrict_to_subset,
    sanitize_set_name,
)


def test_restrict_to_subset_scores_among_the_subset_classes():
    # Class 1 has the highest logit overall, but the set only covers classes 0 and 2.
    logits = torch.tensor([[1.0, 9.0, 2.0], [3.0, 9.0, 1.0]])
    target = torch.tensor([2, 0])
    sub_logits, sub_target = restrict_to_subset(logits, target, torch.tensor([0, 2]))
    assert sub_logits.tolist() == [[1.0, 2.0], [3.0, 1.0]]
    assert sub_target.tolist() == [1, 0]
    assert (sub_logits.argmax(-1) == sub_target).all()


def test_restrict_to_subset_rejects_labels_outside_the_subset():
    with pytest.raises(RobustFTConfigError, match=r"\[1\]"):
        restrict_to_subset(torch.zeros(2, 3), torch.tensor([0, 1]), torch.tensor([0, 2]))


def test_metric_collection_names_and_unknown_metric():
    collection = make_metric_collection(10, ["acc5", "macro_acc"])
    assert list(collection.keys()) == ["acc", "acc5", "macro_acc"]
    with pytest.raises(RobustFTConfigError, match="top3"):
        make_metric_collection(10, ["top3"])


def test_top5_and_macro_values():
    collection = make_metric_collection(6, ["acc5", "macro_acc"])
    logits = torch.eye(6)[[0, 0, 0, 1]] * 5  # predicts class 0, 0, 0, 1
    logits[3] += torch.tensor([0.0, 0.0, 1.0, -1.0, -1.0, -1.0])  # class 2 ranks second for the last sample
    collection.update(logits, torch.tensor([0, 0, 0, 2]))
    values = {k: float(v) for k, v in collection.compute().items()}
    assert values["acc"] == pytest.approx(0.75)
    assert values["acc5"] == pytest.approx(1.0)
    # torchmetrics averages over classes seen in targets or predictions: recall 1 (class 0), 0 (class 1), 0 (class 2).
    assert values["macro_acc"] == pytest.approx(1 / 3)


def test_ood_average_excludes_the_id_set():
    results = {"id": {"acc": 0.9}, "a": {"acc": 0.5}, "b": {"acc": 0.7}}
    assert ood_average(results, "id") == pytest.approx(0.6)
    assert ood_average({"id": {"acc": 0.9}}, "id") is None


def test_results_table_lists_every_set_with_its_role_and_the_average():
    table = format_results_table({"rot": {"acc": 0.5}, "clean": {"acc": 0.75}}, id_set="clean", title="val")
    lines = table.splitlines()
    assert lines[0] == "val"
    assert lines[2].split() == ["clean", "ID", "75.00"]  # ID set first
    assert lines[3].split() == ["rot", "OOD", "50.00"]
    assert lines[4].split() == ["ood_avg", "avg", "50.00"]


def test_sanitize_set_name():
    assert sanitize_set_name("imagenet-r") == "imagenet-r"
    assert sanitize_set_name("v2.matched") == "v2_matched"
    assert sanitize_set_name("2d") == "set_2d"
