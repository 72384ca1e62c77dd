"""The evaluation layer: the scoring loop, set naming, checkpoint reading/writing and the result tables."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from _helpers import TinyNet
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_robustft import run_wiseft, uniform_soup
from lightning_robustft.errors import RobustFTConfigError
from lightning_robustft.evaluation import (
    THETA_0_KEY,
    accuracy_row,
    cache_batches,
    check_set_names,
    dataloader_names,
    evaluate_accuracy,
    load_checkpoint,
    load_into,
    load_wiseft_endpoints,
    named_dataloaders,
    resolve_id_set,
    round_row,
    save_weights_checkpoint,
    write_results,
)


def make_loader(n: int = 40, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=generator)
    y = torch.randint(0, 3, (n,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=16)


class SubsetMetrics(TinyNet):
    """Scores only classes 0 and 1 (like ImageNet-R's subset), through its own metric objects."""

    def __init__(self) -> None:
        super().__init__()
        self.metric = MulticlassAccuracy(num_classes=2, average="micro")
        self.calls = 0

    def update_val_metrics(self, set_name: str, logits: torch.Tensor, target: torch.Tensor) -> None:
        keep = target < 2
        self.metric.update(logits[keep, :2], target[keep])
        self.calls += 1

    def compute_val_metrics(self, set_name: str) -> dict[str, float]:
        value = float(self.metric.compute())
        self.metric.reset()
        return {"acc": value}


# ------------------------------------------------------------------------------------------------------ the loop
def test_plain_modules_are_scored_by_top1_accuracy_in_eval_mode() -> None:
    torch.manual_seed(0)
    model, loader = TinyNet(), make_loader()
    model.train()
    x, y = loader.dataset.tensors
    model.eval()
    with torch.no_grad():
        expected = (model(x).argmax(-1) == y).float().mean().item()
    model.train()
    assert evaluate_accuracy(model, {"a": loader})["a"] == pytest.approx(expected)
    first = x[:16], y[:16]
    model.eval()
    with torch.no_grad():
        limited = (model(first[0]).argmax(-1) == first[1]).float().mean().item()
    assert evaluate_accuracy(model, {"a": loader}, max_batches={"a": 1})["a"] == pytest.approx(limited)


def test_evaluation_uses_the_module_metrics_and_restores_modes() -> None:
    loader = make_loader()
    model = SubsetMetrics()
    model.train()
    model.backbone[1].eval()
    result = evaluate_accuracy(model, {"id": loader})
    x, y = loader.dataset.tensors
    model.eval()
    with torch.no_grad():
        keep = y < 2
        expected = (model(x)[keep, :2].argmax(-1) == y[keep]).float().mean().item()
    assert result["id"] == pytest.approx(expected)
    assert model.calls == len(loader)
    model.train()
    model.backbone[1].eval()
    evaluate_accuracy(model, {"id": loader}, max_batches={"id": 1})
    assert model.training and model.head.training and not model.backbone[1].training
    assert model.calls == len(loader) + 1


def test_batches_without_labels_are_refused_with_the_set_name() -> None:
    with pytest.raises(RobustFTConfigError, match=r"'unlabelled' yields batches of type Tensor.*\(x, y\)"):
        evaluate_accuracy(TinyNet(), {"unlabelled": [torch.zeros(2, 6)]})


class CountingLoader:
    """A loader that counts how often it is read from the start."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader, self.reads = loader, 0

    def __iter__(self):
        self.reads += 1
        return iter(self.loader)


def test_cached_sets_are_read_once_and_score_as_the_loader_does() -> None:
    model = TinyNet()
    loaders = {"id": CountingLoader(make_loader(40, seed=1)), "ood": CountingLoader(make_loader(33, seed=2))}
    expected = evaluate_accuracy(model, {name: loader.loader for name, loader in loaders.items()})
    cached = cache_batches(loaders)
    for _ in range(3):
        assert evaluate_accuracy(model, cached) == expected
    assert [loader.reads for loader in loaders.values()] == [1, 1]
    assert [len(batches) for batches in cached.values()] == [3, 3]  # 40 and 33 items in batches of 16


def test_cached_sets_keep_only_the_batches_that_will_be_evaluated() -> None:
    cached = cache_batches({"id": make_loader(40), "ood": make_loader(40)}, max_batches={"id": 1})
    assert [len(batches) for batches in cached.values()] == [1, 3]


def test_sets_beyond_the_byte_budget_stay_loaders() -> None:
    loaders = {"small": make_loader(16), "large": make_loader(64), "next": make_loader(16)}
    one_batch = 16 * 6 * 4 + 16 * 8  # float32 inputs of 6 features, int64 labels
    cached = cache_batches(loaders, budget_bytes=3 * one_batch)
    assert isinstance(cached["small"], list)
    assert cached["large"] is loaders["large"]  # four batches do not fit in the two left
    assert isinstance(cached["next"], list)  # the budget the large set did not use is still there


# ------------------------------------------------------------------------------------------------------ naming
def test_naming_and_id_set_resolution() -> None:
    loader = DataLoader(TensorDataset(torch.zeros(2, 6)))
    assert list(named_dataloaders([loader, loader], ["a", "b"])) == ["a", "b"]
    assert list(named_dataloaders([loader, loader], ["a", "b", "c"])) == ["a", "b"], "extra names are ignored"
    assert list(named_dataloaders([loader, loader], ["a"])) == ["val_0", "val_1"]
    assert list(named_dataloaders(loader)) == ["val_0"]
    assert list(named_dataloaders({"x": loader, "y": loader}, ["a", "b"])) == ["x", "y"], "dict keys win"
    assert named_dataloaders(None) == {}
    assert resolve_id_set(["a", "b"], None) == "a"
    assert resolve_id_set(["a", "b"], "b") == "b"
    with pytest.raises(RobustFTConfigError, match=r"`id_set`='c' .* \['a', 'b'\]"):
        resolve_id_set(["a", "b"], "c")
    with pytest.raises(RobustFTConfigError, match="No validation sets"):
        resolve_id_set([], None)


def test_dataloader_names_fall_back_per_stage() -> None:
    loader = DataLoader(TensorDataset(torch.zeros(2, 6)))
    assert dataloader_names((loader, loader), ["clean"], prefix="test") == ["test_0", "test_1"]
    assert dataloader_names(loader, ["clean", "noisy"], prefix="test") == ["clean"]


# ------------------------------------------------------------------------------------------------- checkpoints
def test_missing_checkpoint_is_a_file_not_found_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "missing.ckpt"
    with pytest.raises(FileNotFoundError, match=r"missing\.ckpt"):
        load_checkpoint(missing)
    with pytest.raises(FileNotFoundError, match=r"missing\.ckpt"):
        run_wiseft(TinyNet(), missing, make_loader())


@pytest.mark.parametrize("weights_only", [False, True])
def test_empty_random_and_truncated_files_say_what_is_wrong(tmp_path: Path, weights_only: bool) -> None:
    empty = tmp_path / "empty.ckpt"
    empty.touch()
    with pytest.raises(ValueError, match=r"empty\.ckpt' is empty \(0 bytes\).*truncated download"):
        load_checkpoint(empty, weights_only=weights_only)
    noise = tmp_path / "noise.ckpt"
    noise.write_bytes(torch.randint(0, 256, (1000,), generator=torch.Generator().manual_seed(0)).byte().numpy())
    with pytest.raises(ValueError, match=r"noise\.ckpt' \(1000 bytes\) is not a PyTorch checkpoint") as error:
        load_checkpoint(noise, weights_only=weights_only)
    assert "weights_only" not in str(error.value), "no advice to unpickle a file that is not a checkpoint"
    whole = tmp_path / "whole.ckpt"
    torch.save({"state_dict": TinyNet().state_dict()}, whole)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"cut\.ckpt' .* only part of one"):
        load_checkpoint(cut, weights_only=weights_only)


def test_the_soups_report_a_broken_ingredient_by_name(tmp_path: Path) -> None:
    good, empty = tmp_path / "good.ckpt", tmp_path / "empty.ckpt"
    torch.save(TinyNet().state_dict(), good)
    empty.touch()
    with pytest.raises(ValueError, match=r"empty\.ckpt' is empty"):
        uniform_soup([good, empty])


def test_weights_only_refusal_names_the_file_and_the_switch(tmp_path: Path) -> None:
    path = tmp_path / "with_objects.ckpt"
    torch.save({"state_dict": TinyNet().state_dict(), "hyper_parameters": {"root": Path("data")}}, path)
    with pytest.raises(ValueError, match=r"with_objects\.ckpt'.*pass `weights_only=False`"):
        load_checkpoint(path, weights_only=True)
    assert load_checkpoint(path, weights_only=False)["hyper_parameters"] == {"root": Path("data")}


def test_checkpoints_and_bare_state_dicts_read_alike(tmp_path: Path) -> None:
    state = TinyNet().state_dict()
    bare, lightning_style = tmp_path / "bare.pt", tmp_path / "lightning.ckpt"
    torch.save(state, bare)
    torch.save({"state_dict": state, "epoch": 3}, lightning_style)
    from_bare = load_checkpoint(bare, weights_only=True)
    assert list(from_bare) == ["state_dict"]
    assert all(torch.equal(from_bare["state_dict"][k], v) for k, v in state.items())
    assert load_checkpoint(lightning_style, weights_only=True)["epoch"] == 3
    wrapped = load_checkpoint(state)["state_dict"]
    assert all(wrapped[k] is v for k, v in state.items()), "a state dict in memory is wrapped, its tensors not copied"
    junk = tmp_path / "junk.ckpt"
    torch.save([1, 2], junk)
    with pytest.raises(ValueError, match=r"junk\.ckpt' holds neither a Lightning checkpoint .* \(got list\)"):
        load_checkpoint(junk)


def test_endpoints_come_from_the_zero_shot_file_or_the_stored_theta_0(tmp_path: Path) -> None:
    start, end = TinyNet(), TinyNet()
    plain, zeroshot = tmp_path / "plain.ckpt", tmp_path / "zeroshot.ckpt"
    torch.save({"state_dict": end.state_dict()}, plain)
    torch.save(start.state_dict(), zeroshot)
    with pytest.raises(RobustFTConfigError, match="pass the zero-shot checkpoint"):
        load_wiseft_endpoints(plain)
    theta_0, theta_1, _ = load_wiseft_endpoints(plain, zeroshot)
    assert torch.equal(theta_0["head.weight"], start.head.weight)
    assert torch.equal(theta_1["head.weight"], end.head.weight)
    assert "backbone.1.num_batches_tracked" not in theta_0, "theta_0 keeps the floating-point tensors only"
    stored = tmp_path / "stored.ckpt"
    torch.save({"state_dict": end.state_dict(), THETA_0_KEY: start.state_dict()}, stored)
    assert torch.equal(load_wiseft_endpoints(stored)[0]["head.weight"], start.head.weight)


def test_saved_weights_keep_hyperparameters_and_drop_training_state(tmp_path: Path) -> None:
    model = TinyNet(hidden=5)
    source = {
        "hyper_parameters": dict(model.hparams),
        "optimizer_states": [{}],
        "callbacks": {},
        THETA_0_KEY: {},
        "epoch": 4,
    }
    path = save_weights_checkpoint(tmp_path / "sub" / "out.ckpt", model, source, {"note": {"k": 1}})
    saved = torch.load(path, weights_only=False)
    assert {"optimizer_states", "callbacks", THETA_0_KEY}.isdisjoint(saved)
    assert saved["epoch"] == 4 and saved["note"] == {"k": 1}
    restored = TinyNet.load_from_checkpoint(path)
    assert restored.hparams.hidden == 5
    assert all(torch.equal(restored.state_dict()[k], v) for k, v in model.state_dict().items())


def test_weights_of_another_architecture_are_refused_by_name() -> None:
    with pytest.raises(RobustFTConfigError, match=r"(?s)The weights of the soup do not fit TinyNet: .*head\.weight"):
        load_into(TinyNet(), TinyNet(classes=4).state_dict(), "the soup")


# ------------------------------------------------------------------------------------------------------ results
def test_rows_average_the_ood_sets_and_round_all_but_kept_columns() -> None:
    row = accuracy_row({"id": 0.9, "a": 0.5, "b": 0.25}, "id")
    assert row == {"id": 0.9, "a": 0.5, "b": 0.25, "ood_avg": pytest.approx(0.375)}
    assert "ood_avg" not in accuracy_row({"id": 0.9}, "id")
    rounded = round_row({"alpha": 1 / 3, "id": 1 / 3, "name": "x", "in_soup": True}, keep=("alpha",))
    assert rounded == {"alpha": 1 / 3, "id": 0.333333, "name": "x", "in_soup": True}
    with pytest.raises(RobustFTConfigError, match="named 'ood_avg'"):
        check_set_names(["id", "ood_avg"], ("alpha", "ood_avg"))


def test_tables_have_the_union_of_columns(tmp_path: Path) -> None:
    summary = {"method": "m", "rows": [{"a": 1, "b": 2}, {"a": 3, "c": 4}]}
    table, document = write_results(summary, tmp_path / "out", "table")
    with open(table) as handle:
        rows = list(csv.DictReader(handle))
    assert rows == [{"a": "1", "b": "2", "c": ""}, {"a": "3", "b": "", "c": "4"}]
    assert json.loads(document.read_text()) == summary
