"""Model soups: uniform mean, the greedy rule (ID set only), the after-the-fact runner, its files and its errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import lightning
import pytest
import torch
import torch.nn.functional as F
from _helpers import TinyBackbone, TinyNet, make_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_robustft.errors import RobustFTConfigError
from lightning_robustft.weight_space.soup import SOUP_KEY, SoupResult, greedy_soup, run_soup, uniform_soup


class Dial(nn.Module):
    """One weight ``w``; it scores itself ``1 - |w - 1|`` on the ID set and ``|w - 1|`` elsewhere (anti-correlated)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.evaluated: list[str] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def update_val_metrics(self, name: str, logits: torch.Tensor, target: torch.Tensor) -> None:
        self.evaluated.append(name)

    def compute_val_metrics(self, name: str) -> dict[str, float]:
        distance = abs(self.w.item() - 1.0)
        return {"acc": 1.0 - distance if name == "id" else distance}


class ExplodingLoader:
    """A validation set that must not be read."""

    def __iter__(self) -> Any:
        raise AssertionError("an OOD set was iterated while choosing the soup")


ONE_BATCH = [(torch.zeros(1, 3), torch.zeros(1, dtype=torch.long))]


def dials(*values: float) -> list[dict[str, torch.Tensor]]:
    return [{"w": torch.tensor([value])} for value in values]


def make_data(seed: int = 0, n: int = 96) -> tuple[TensorDataset, dict[str, DataLoader]]:
    generator = torch.Generator().manual_seed(seed)
    rule = torch.randn(6, 3, generator=generator)

    def dataset(shift: float) -> TensorDataset:
        x = torch.randn(n, 6, generator=generator)
        return TensorDataset(x * (1 + shift) + shift, (x @ rule).argmax(-1))

    val = {"id": dataset(0.0), "shift": dataset(0.7)}
    return dataset(0.0), {name: DataLoader(data, batch_size=32) for name, data in val.items()}


def fine_tune(
    start: dict[str, torch.Tensor], train: TensorDataset, lr: float, seed: int, epochs: int = 3
) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = TinyNet()
    model.load_state_dict(start)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(epochs):
        for x, y in DataLoader(train, batch_size=16, shuffle=True):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def accuracy(state: dict[str, torch.Tensor], loader: DataLoader) -> float:
    model = TinyNet()
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        return torch.cat([(model(x).argmax(-1) == y).float() for x, y in loader]).mean().item()


def save(path: Path, state: dict[str, torch.Tensor], hparams: dict[str, Any] | None = None) -> Path:
    if hparams is None:
        torch.save(state, path)  # a bare state dict
    else:
        torch.save({"state_dict": state, "hyper_parameters": hparams, "pytorch-lightning_version": "2.4.0"}, path)
    return path


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Three fine-tunes of one "pretrained" start (an lr sweep) and one bad ingredient (random, large weights)."""
    tmp = tmp_path_factory.mktemp("sweep")
    train, val = make_data()
    torch.manual_seed(0)
    start = fine_tune(TinyNet().state_dict(), train, lr=0.1, seed=0)
    good = [fine_tune(start, train, lr, seed) for lr, seed in ((0.1, 1), (0.05, 2), (0.2, 3))]
    torch.manual_seed(9)
    bad = {k: v.clone() for k, v in TinyNet().state_dict().items()}
    bad = {k: v * 8 if v.is_floating_point() else v for k, v in bad.items()}
    states = [good[0], bad, good[1], good[2]]
    hparams = dict(TinyNet().hparams)
    paths = [save(tmp / f"run{i}.ckpt", state, hparams if i != 2 else None) for i, state in enumerate(states)]
    return {"states": states, "paths": paths, "val": val, "bad": 1}


# ------------------------------------------------------------------------------------------------ uniform soup
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_soup_of_identical_checkpoints_is_that_checkpoint(dtype: torch.dtype, tmp_path: Path) -> None:
    state = TinyNet().to(dtype).state_dict()
    state["backbone.1.num_batches_tracked"].fill_(7)
    path = save(tmp_path / "same.ckpt", state)
    soup = uniform_soup([path, state, {"state_dict": state}, path, path])
    assert list(soup) == list(state)
    for name, value in state.items():
        assert soup[name].dtype == value.dtype
        assert torch.equal(soup[name], value), name
    greedy = greedy_soup(Dial(), [{"w": torch.tensor([0.3])}] * 3, {"id": ONE_BATCH})
    assert greedy.ingredients == [0, 1, 2], "equal accuracy joins the soup (Wortsman's >=)"
    assert torch.equal(greedy.state_dict["w"], torch.tensor([0.3]))


def test_uniform_soup_is_the_elementwise_mean_with_the_first_integer_buffers(sweep: dict[str, Any]) -> None:
    states = sweep["states"]
    soup = uniform_soup(sweep["paths"])
    assert list(soup) == list(states[0])
    for name, first in states[0].items():
        if first.is_floating_point():
            torch.testing.assert_close(soup[name], torch.stack([s[name] for s in states]).mean(0))
        else:
            assert torch.equal(soup[name], first), name
    varied = [{"a": torch.full((2,), float(i)), "n": torch.tensor(i)} for i in (1, 2, 6)]
    mean = uniform_soup(varied)
    assert torch.equal(mean["a"], torch.full((2,), 3.0))
    assert mean["n"].item() == 1 and mean["n"].dtype == torch.int64


# ------------------------------------------------------------------------------------------------- greedy soup
def test_greedy_rule_order_ties_and_mean_of_the_chosen() -> None:
    # own ID accuracies: 0.0, 0.4, 0.7, 0.8, -3.0 -> tried in the order 3, 2, 1, 0, 4
    dial = Dial()
    result = greedy_soup(dial, dials(0.0, 1.6, 0.7, 1.2, 5.0), {"id": ONE_BATCH, "ood": ExplodingLoader()})
    assert isinstance(result, SoupResult)
    assert result.ingredient_accuracies == pytest.approx([0.0, 0.4, 0.7, 0.8, -3.0])
    assert [step["index"] for step in result.steps] == [3, 2, 1, 0, 4]
    assert result.ingredients == [3, 2]
    assert result.ingredient_names == ["checkpoints[3]", "checkpoints[2]"]
    # the trial with 1.6 is the mean of all three chosen-so-far + it, not the mean of the soup and it
    assert result.steps[2]["id_acc"] == pytest.approx(1 - abs((1.2 + 0.7 + 1.6) / 3 - 1))
    assert [step["added"] for step in result.steps] == [True, True, False, False, False]
    assert result.accuracy == pytest.approx(0.95)
    assert result.id_set == "id"
    assert dial.w.item() == pytest.approx(0.95), "the module is left holding the soup"
    assert set(dial.evaluated) == {"id"}


def test_greedy_soup_leaves_out_a_bad_fine_tune(sweep: dict[str, Any]) -> None:
    val = sweep["val"]
    model = TinyNet()
    result = greedy_soup(model, sweep["paths"], {"id": val["id"], "shift": ExplodingLoader()}, id_set="id")
    alone = [accuracy(state, val["id"]) for state in sweep["states"]]
    assert result.ingredient_accuracies == pytest.approx(alone, abs=1e-6)
    assert sweep["bad"] not in result.ingredients
    assert result.ingredients[0] == max(range(4), key=lambda i: (alone[i], -i))
    assert result.accuracy >= max(alone)
    assert len(result.ingredients) >= 2, "good fine-tunes of one start make a soup"
    with_bad = uniform_soup(sweep["paths"])
    assert accuracy(with_bad, val["id"]) < result.accuracy, "one bad ingredient spoils the uniform soup"
    assert result.accuracy == pytest.approx(accuracy(result.state_dict, val["id"]), abs=1e-6)
    for name, value in model.state_dict().items():
        assert torch.equal(value, result.state_dict[name]), name
    # the bad ingredient was tried and refused because it lowered the ID accuracy
    bad_step = next(step for step in result.steps if step["index"] == sweep["bad"])
    assert not bad_step["added"] and bad_step["id_acc"] < result.accuracy


# ------------------------------------------------------------------------------------------------ run_soup
def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_run_soup_writes_tables_and_a_loadable_checkpoint(sweep: dict[str, Any], tmp_path: Path) -> None:
    val, paths = sweep["val"], sweep["paths"]
    model = TinyNet()
    summary = run_soup(model, paths, val, method="greedy", output_dir=tmp_path)
    assert json.loads((tmp_path / "soup.json").read_text()) == summary
    assert summary["method"] == "greedy" and summary["id_set"] == "id" and summary["ood_sets"] == ["shift"]
    assert str(paths[sweep["bad"]]) not in summary["ingredients"]
    rows = read_csv(tmp_path / "soup.csv")
    assert len(rows) == len(paths) + 1
    assert list(rows[0]) == ["index", "name", "in_soup", "id", "shift", "ood_avg"]
    for index, (row, state) in enumerate(zip(rows, sweep["states"], strict=False)):
        assert row["name"] == str(paths[index])
        assert row["in_soup"] == str(str(paths[index]) in summary["ingredients"])
        for name, loader in val.items():
            assert float(row[name]) == pytest.approx(accuracy(state, loader), abs=1e-6)
    soup_row = summary["rows"][-1]
    assert soup_row["name"] == "greedy_soup" and soup_row["index"] is None
    assert soup_row["id"] >= max(row["id"] for row in summary["rows"][:-1])
    assert soup_row["ood_avg"] == soup_row["shift"]
    kept = [step for step in summary["greedy_steps"] if step["added"]]
    assert [step["name"] for step in kept] == summary["ingredients"]

    checkpoint_path = Path(summary["checkpoint"])
    assert checkpoint_path == tmp_path / "soup_greedy.ckpt"
    restored = TinyNet.load_from_checkpoint(checkpoint_path)
    plain = TinyNet()
    saved = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    plain.load_state_dict(saved["state_dict"])
    for name, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[name], value) and torch.equal(plain.state_dict()[name], value)
    assert saved[SOUP_KEY]["method"] == "greedy"
    assert saved[SOUP_KEY]["ingredients"] == summary["ingredients"]
    assert saved["pytorch-lightning_version"]
    assert set(saved) == {"state_dict", "hyper_parameters", "pytorch-lightning_version", SOUP_KEY}


def test_run_soup_uniform_uses_every_ingredient(sweep: dict[str, Any], tmp_path: Path) -> None:
    model = TinyNet()
    summary = run_soup(model, sweep["paths"], sweep["val"], method="uniform", output_dir=tmp_path)
    assert summary["ingredients"] == [str(p) for p in sweep["paths"]]
    assert "greedy_steps" not in summary
    assert all(row["in_soup"] for row in summary["rows"][:-1])
    expected = uniform_soup(sweep["paths"])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    assert summary["rows"][-1]["id"] == pytest.approx(accuracy(expected, sweep["val"]["id"]), abs=1e-6)
    assert (tmp_path / "soup_uniform.ckpt").is_file() and (tmp_path / "soup.csv").is_file()


def test_run_soup_chooses_on_the_id_set_only(tmp_path: Path) -> None:
    # OOD accuracy is |w - 1|, highest for the ingredients greedy must leave out: OOD never sways the choice
    dial = Dial()
    summary = run_soup(dial, dials(0.0, 1.6, 0.7, 1.2, 5.0), {"ood": ONE_BATCH, "id": ONE_BATCH}, id_set="id",
                       output_dir=tmp_path)  # fmt: skip
    assert summary["ingredients"] == ["checkpoints[3]", "checkpoints[2]"]
    assert summary["rows"][-1]["id"] == pytest.approx(0.95)
    assert summary["rows"][-1]["ood"] == pytest.approx(0.05)
    assert summary["ood_sets"] == ["ood"]


def test_run_soup_with_an_image_classifier(image_folders: dict[str, Path], tmp_path: Path) -> None:
    from lightning_robustft import ImageClassifier, MultiDomainDataModule

    val = {name: image_folders[name] for name in ("id", "ood_full", "ood_subset")}
    dm = MultiDomainDataModule(image_folders["train"], val, batch_size=6, num_workers=0)
    dm.setup("validate")
    torch.manual_seed(0)
    assert list(dm.class_subsets) == ["ood_subset"], "one set is scored among its own classes"
    options = {"class_names": dm.class_names, "val_sets": list(val), "class_subsets": dm.class_subsets}
    model = ImageClassifier(TinyBackbone(), print_table=False, **options)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    nudged = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in base.items()}
    summary = run_soup(model, [base, nudged], dm.val_dataloader(), method="uniform", output_dir=tmp_path)
    assert summary["id_set"] == "id" and summary["ood_sets"] == ["ood_full", "ood_subset"]
    assert [row["name"] for row in summary["rows"]] == ["checkpoints[0]", "checkpoints[1]", "uniform_soup"]
    fresh = ImageClassifier(TinyBackbone(), print_table=False, **options)
    fresh.load_state_dict(torch.load(summary["checkpoint"], weights_only=True)["state_dict"])
    for name, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    trainer = make_trainer(root=tmp_path)
    validated = {key: value for logged in trainer.validate(model, dm, verbose=False) for key, value in logged.items()}
    soup_row = summary["rows"][-1]
    for name in val:
        assert soup_row[name] == pytest.approx(validated[f"val/{name}/acc"], abs=1e-6), "the classifier's own metrics"
    assert soup_row["ood_avg"] == pytest.approx(validated["val/ood_avg/acc"], abs=1e-6)


# ----------------------------------------------------------------------------------------------------- errors
def test_checkpoint_argument_errors(sweep: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(RobustFTConfigError, match="`checkpoints` is empty"):
        uniform_soup([])
    with pytest.raises(RobustFTConfigError, match="list of checkpoint paths"):
        uniform_soup(str(sweep["paths"][0]))
    missing = tmp_path / "nowhere" / "gone.ckpt"
    with pytest.raises(FileNotFoundError, match=r"checkpoints\[1\].*nowhere/gone\.ckpt"):
        greedy_soup(TinyNet(), [sweep["paths"][0], missing], sweep["val"])
    with pytest.raises(RobustFTConfigError, match=r"`checkpoints\[0\]` is a int"):
        uniform_soup([3])
    with pytest.raises(RobustFTConfigError, match="`checkpoints` is empty"):
        run_soup(TinyNet(), [], sweep["val"], output_dir=tmp_path)


def test_mismatched_checkpoints_are_named_with_their_keys(sweep: dict[str, Any], tmp_path: Path) -> None:
    wider = save(tmp_path / "wider.ckpt", TinyNet(hidden=13).state_dict())
    with pytest.raises(ValueError, match=r"wider\.ckpt.*backbone\.0\.weight") as error:
        uniform_soup([sweep["paths"][0], wider])
    assert str(sweep["paths"][0]) in str(error.value)
    extra = {**sweep["states"][0], "extra.weight": torch.ones(2)}
    with pytest.raises(ValueError, match=r"only in checkpoints\[1\]: extra\.weight"):
        greedy_soup(TinyNet(), [sweep["states"][0], extra], sweep["val"])
    with pytest.raises(RobustFTConfigError, match="do not fit TinyNet"):
        greedy_soup(TinyNet(), [TinyNet(hidden=13).state_dict()], sweep["val"])


def test_run_soup_argument_errors(sweep: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(RobustFTConfigError, match="`method`='best'"):
        run_soup(TinyNet(), sweep["paths"], sweep["val"], method="best", output_dir=tmp_path)  # type: ignore[arg-type]
    with pytest.raises(RobustFTConfigError, match="`id_set`='nope'"):
        run_soup(TinyNet(), sweep["paths"], sweep["val"], id_set="nope", output_dir=tmp_path)
    with pytest.raises(RobustFTConfigError, match="named 'ood_avg'"):
        run_soup(TinyNet(), sweep["paths"], {"id": sweep["val"]["id"], "ood_avg": []}, output_dir=tmp_path)
    assert not list(tmp_path.iterdir()), "nothing is written when the arguments are wrong"


def test_lightning_version_is_kept_from_the_source(sweep: dict[str, Any], tmp_path: Path) -> None:
    bare = [sweep["states"][0]]
    summary = run_soup(TinyNet(), bare, sweep["val"], method="uniform", output_dir=tmp_path)
    saved = torch.load(summary["checkpoint"], weights_only=True)
    assert saved["pytorch-lightning_version"] == lightning.__version__, "a bare state dict gets the running version"
    assert saved[SOUP_KEY]["ingredients"] == ["checkpoints[0]"]
