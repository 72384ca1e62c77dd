"""WiSEFTCallback, the sweep functions, the after-the-fact path and the ID-vs-OOD plot."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed as dist
from _helpers import Recorder, TinyBackbone, TinyNet, make_trainer
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_robustft.callbacks.wise_ft import THETA_0_KEY, WiSEFTCallback
from lightning_robustft.errors import RobustFTConfigError
from lightning_robustft.ops.interpolate import interpolate_state_dicts
from lightning_robustft.plotting import plot_id_vs_ood
from lightning_robustft.weight_space import run_wiseft, select_alpha, wiseft_sweep

SETS = ("id", "shift", "noise")


def make_data(n: int = 48, seed: int = 0) -> tuple[DataLoader, dict[str, DataLoader]]:
    generator = torch.Generator().manual_seed(seed)
    rule = torch.randn(6, 3, generator=generator)

    def dataset(shift: float, noise: float) -> TensorDataset:
        x = torch.randn(n, 6, generator=generator)
        y = (x @ rule).argmax(-1)
        return TensorDataset(x * (1 + shift) + shift + noise * torch.randn(n, 6, generator=generator), y)

    train = DataLoader(dataset(0.0, 0.0), batch_size=16, shuffle=True)
    val = {"id": dataset(0.0, 0.0), "shift": dataset(1.0, 0.0), "noise": dataset(0.0, 1.5)}
    return train, {name: DataLoader(data, batch_size=16) for name, data in val.items()}


def manual_accuracy(model: nn.Module, state: dict[str, torch.Tensor], loader: DataLoader) -> float:
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        hits = [(model(x).argmax(-1) == y).float() for x, y in loader]
    return torch.cat(hits).mean().item()


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """One fit with the default WiSE-FT, CSV + TensorBoard loggers and a ModelCheckpoint; tests inspect it."""
    tmp = tmp_path_factory.mktemp("default_run")
    torch.manual_seed(0)
    train, val = make_data()
    model = TinyNet()
    csv_logger = CSVLogger(tmp, name="csv")
    tensorboard = TensorBoardLogger(tmp, name="tb")
    figures: list[str] = []
    tensorboard.experiment.add_figure = lambda tag, figure, **kw: figures.append(tag)  # type: ignore[method-assign]
    recorder, wise = Recorder(), WiSEFTCallback()
    checkpoint = ModelCheckpoint(dirpath=tmp / "ckpt", filename="theta1")
    trainer = make_trainer(
        [recorder, wise, checkpoint],
        max_epochs=2,
        logger=[csv_logger, tensorboard],
        enable_checkpointing=True,
        num_sanity_val_steps=2,  # the sanity check's validation must not count as the end-of-fit evaluation
        root=tmp,
    )
    trainer.fit(model, train, val)
    return SimpleNamespace(
        tmp=tmp,
        model=model,
        val=val,
        recorder=recorder,
        wise=wise,
        out=Path(csv_logger.log_dir),
        figures=figures,
        checkpoint=tmp / "ckpt" / "theta1.ckpt",
    )


def test_default_leaves_the_module_at_the_midpoint(default_run: SimpleNamespace) -> None:
    theta_0, theta_1 = default_run.recorder.start, default_run.recorder.end
    assert default_run.wise.applied_alpha == 0.5
    for name, value in default_run.model.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, (theta_0[name] + theta_1[name]) / 2)
        else:
            assert torch.equal(value, theta_1[name]), name
    assert not torch.equal(theta_0["head.weight"], theta_1["head.weight"]), "training changed the weights"


def test_theta_0_is_a_cpu_snapshot_of_the_start(default_run: SimpleNamespace) -> None:
    snapshot = default_run.wise.theta_0
    expected = {k: v for k, v in default_run.recorder.start.items() if v.is_floating_point()}
    assert set(snapshot) == set(expected)
    assert all(torch.equal(snapshot[k], expected[k]) for k in expected)


def test_table_has_one_row_per_alpha_and_correct_endpoints(default_run: SimpleNamespace) -> None:
    rows = read_csv(default_run.out / "wiseft.csv")
    assert [float(r["alpha"]) for r in rows] == pytest.approx([0.1 * i for i in range(11)])
    assert list(rows[0]) == ["alpha", *SETS, "ood_avg"]
    model = TinyNet()
    for row, state in ((rows[0], default_run.recorder.start), (rows[-1], default_run.recorder.end)):
        for name in SETS:
            assert float(row[name]) == pytest.approx(manual_accuracy(model, state, default_run.val[name]), abs=1e-6)
        assert float(row["ood_avg"]) == pytest.approx((float(row["shift"]) + float(row["noise"])) / 2)
    assert rows[0] != rows[-1]


def test_json_plot_and_logger_outputs(default_run: SimpleNamespace) -> None:
    summary = json.loads((default_run.out / "wiseft.json").read_text())
    assert summary["id_set"] == "id"
    assert summary["ood_sets"] == ["shift", "noise"]
    assert summary["selected_alpha"] == 0.5
    assert len(summary["rows"]) == 11
    for written, computed in zip(summary["rows"], default_run.wise.results, strict=True):
        assert written == pytest.approx(computed, abs=1e-6)
    assert (default_run.out / "wiseft.png").read_bytes()[:4] == b"\x89PNG"
    assert default_run.figures == ["wiseft/id_vs_ood"]
    logged = read_csv(default_run.out / "metrics.csv")
    sweep = [r for r in logged if r.get("wiseft/id/acc")]
    assert len(sweep) == 11
    assert [float(r["wiseft/alpha"]) for r in sweep] == pytest.approx([0.1 * i for i in range(11)])
    assert any(r.get("wiseft/selected/alpha") == "0.5" for r in logged)


def test_saved_model_loads_into_a_plain_module(default_run: SimpleNamespace) -> None:
    path = default_run.out / "wiseft_alpha0.50.ckpt"
    assert Path(json.loads((default_run.out / "wiseft.json").read_text())["checkpoint"]) == path
    plain = TinyNet()
    plain.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["state_dict"])
    restored = TinyNet.load_from_checkpoint(path)
    for name, value in default_run.model.state_dict().items():
        assert torch.equal(plain.state_dict()[name], value)
        assert torch.equal(restored.state_dict()[name], value)


def test_training_checkpoints_carry_theta_0(default_run: SimpleNamespace) -> None:
    checkpoint = torch.load(default_run.checkpoint, map_location="cpu", weights_only=False)
    stored = checkpoint[THETA_0_KEY]
    assert all(torch.equal(stored[k], default_run.wise.theta_0[k]) for k in default_run.wise.theta_0)
    assert all(torch.equal(checkpoint["state_dict"][k], v) for k, v in default_run.recorder.end.items())


def test_run_wiseft_from_checkpoints_reproduces_the_callback(default_run: SimpleNamespace, tmp_path: Path) -> None:
    alphas = default_run.wise.alphas
    summary = run_wiseft(TinyNet(), default_run.checkpoint, default_run.val, alphas=alphas, output_dir=tmp_path / "a")
    assert len(summary["rows"]) == len(default_run.wise.results)
    for ours, callbacks in zip(summary["rows"], default_run.wise.results, strict=True):
        assert ours == pytest.approx(callbacks, abs=1e-6)
    zeroshot = tmp_path / "zeroshot.pt"
    torch.save(default_run.recorder.start, zeroshot)
    module = TinyNet()
    explicit = run_wiseft(
        module, default_run.checkpoint, default_run.val, zeroshot=zeroshot, select="id", output_dir=tmp_path / "b"
    )
    best = max(explicit["rows"], key=lambda r: (r["id"], -r["alpha"]))["alpha"]
    assert explicit["selected_alpha"] == best
    saved = torch.load(explicit["checkpoint"], map_location="cpu", weights_only=False)
    assert saved["wiseft"] == {"alpha": best}
    assert THETA_0_KEY not in saved and "optimizer_states" not in saved
    restored = TinyNet.load_from_checkpoint(explicit["checkpoint"])
    assert all(torch.equal(restored.state_dict()[k], v) for k, v in module.state_dict().items())
    assert {p.name for p in (tmp_path / "b").iterdir()} >= {"wiseft.csv", "wiseft.json", "wiseft.png"}


def test_select_id_applies_the_best_id_alpha(tmp_path: Path) -> None:
    torch.manual_seed(1)
    train, val = make_data(seed=1)
    model, recorder = TinyNet(lr=1.0), Recorder()
    wise = WiSEFTCallback(alphas=[0.0, 0.25, 0.5, 0.75, 1.0], select="id", save_model=False)
    make_trainer([recorder, wise], max_epochs=2, root=tmp_path).fit(model, train, val)
    summary = json.loads((tmp_path / "wiseft.json").read_text())
    expected = max(summary["rows"], key=lambda r: (r["id"], -r["alpha"]))["alpha"]
    assert wise.applied_alpha == summary["selected_alpha"] == expected
    assert len(summary["rows"]) == 5, "the fixed alpha is not added when selecting on ID"
    target = interpolate_state_dicts(recorder.start, recorder.end, expected)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in target.items())
    assert not list(tmp_path.glob("*.ckpt"))


def test_select_alpha_never_looks_at_ood() -> None:
    rows = [
        {"alpha": 0.0, "id": 0.50, "ood": 0.95, "ood_avg": 0.95},
        {"alpha": 0.5, "id": 0.80, "ood": 0.70, "ood_avg": 0.70},
        {"alpha": 1.0, "id": 0.80, "ood": 0.20, "ood_avg": 0.20},
    ]
    assert select_alpha(rows, "id", 0.3, "id") == 0.5  # tie on ID -> smaller alpha; OOD best (0.0) ignored
    assert select_alpha(rows, "fixed", 0.3, "id") == 0.3
    with pytest.raises(RobustFTConfigError, match="ID accuracies"):
        select_alpha(rows, "id", 0.5, "missing")


def test_resume_interpolates_against_the_original_theta_0(tmp_path: Path) -> None:
    torch.manual_seed(2)
    train, val = make_data(seed=2)
    model = TinyNet()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    make_trainer([WiSEFTCallback(alphas=[0.0]), saver], max_epochs=1, enable_checkpointing=True, root=tmp_path).fit(
        model, train, val
    )
    last = tmp_path / "ckpt" / "last.ckpt"
    resumed_from = torch.load(last, map_location="cpu", weights_only=False)["state_dict"]
    torch.manual_seed(3)
    fresh, recorder, wise = TinyNet(), Recorder(), WiSEFTCallback(alphas=[0.0, 1.0])
    make_trainer([recorder, wise], max_epochs=2, root=tmp_path / "resumed").fit(fresh, train, val, ckpt_path=last)
    assert torch.equal(recorder.start["head.weight"], resumed_from["head.weight"]), "the fit resumed"
    assert not torch.equal(resumed_from["head.weight"], start["head.weight"])
    assert all(torch.equal(wise.theta_0[k], v) for k, v in start.items() if v.is_floating_point())
    expected = interpolate_state_dicts(start, recorder.end, 0.5)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in expected.items())


def test_resuming_from_a_foreign_checkpoint_warns() -> None:
    wise = WiSEFTCallback()
    fitting = SimpleNamespace(state=SimpleNamespace(fn="fit"))
    with pytest.warns(UserWarning, match="no 'wiseft_theta_0'"):
        wise.on_load_checkpoint(fitting, None, {"state_dict": {}})  # type: ignore[arg-type]
    assert wise.theta_0 is None
    validating = SimpleNamespace(state=SimpleNamespace(fn="validate"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wise.on_load_checkpoint(validating, None, {"state_dict": {}})  # type: ignore[arg-type]


def test_single_validation_set_writes_a_table_without_plot(tmp_path: Path) -> None:
    train, val = make_data()
    with pytest.warns(UserWarning, match="no OOD validation set"):
        make_trainer([WiSEFTCallback(alphas=[0.0, 1.0])], max_epochs=1, root=tmp_path).fit(TinyNet(), train, val["id"])
    rows = read_csv(tmp_path / "wiseft.csv")
    assert [list(r) for r in rows] == [["alpha", "val_0"]] * 3  # 0.0, 0.5 (the fixed alpha), 1.0
    assert not (tmp_path / "wiseft.png").exists()


def test_without_validation_the_fixed_alpha_is_applied_unevaluated(tmp_path: Path) -> None:
    train, _ = make_data()
    model, recorder = TinyNet(), Recorder()
    with pytest.warns(UserWarning, match="no validation sets"):
        make_trainer([recorder, WiSEFTCallback(alpha=0.3)], max_epochs=1, root=tmp_path).fit(model, train)
    expected = interpolate_state_dicts(recorder.start, recorder.end, 0.3)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    assert (tmp_path / "wiseft_alpha0.30.ckpt").exists()
    assert not (tmp_path / "wiseft.csv").exists()


def test_sweep_leaves_theta_1_and_checks_inputs() -> None:
    _, val = make_data()
    theta_0 = TinyNet().state_dict()
    model = TinyNet()
    theta_1 = {k: v.clone() for k, v in model.state_dict().items()}
    rows = wiseft_sweep(model, theta_0, theta_1, val, [0.0, 1.0], id_set="shift")
    assert rows[0]["ood_avg"] == pytest.approx((rows[0]["id"] + rows[0]["noise"]) / 2)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in theta_1.items())
    with pytest.raises(RobustFTConfigError, match="'alpha'"):
        wiseft_sweep(model, theta_0, theta_1, {"alpha": val["id"]}, [0.0])
    with pytest.raises(RobustFTConfigError, match="needs \\(x, y\\)"):
        wiseft_sweep(model, theta_0, theta_1, {"id": [torch.zeros(2, 6)]}, [0.0])
    wider = TinyNet(classes=4).state_dict()
    with pytest.raises(ValueError, match=r"mismatched in theta_0: head\.weight"):
        wiseft_sweep(model, theta_0, wider, val, [0.5])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alphas": [0.0, 1.2]}, r"alphas\[1\]"),
        ({"alphas": []}, "`alphas` is empty"),
        ({"alpha": -0.1}, "`alpha`"),
        ({"alpha": True}, "`alpha`"),
        ({"select": "ood"}, "`select`='ood'"),
    ],
)
def test_constructor_validation(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(RobustFTConfigError, match=match):
        WiSEFTCallback(**kwargs)


def test_fixed_alpha_joins_the_sweep() -> None:
    assert WiSEFTCallback(alphas=[1.0, 0.0], alpha=0.3).alphas == [0.0, 0.3, 1.0]
    assert WiSEFTCallback(alphas=[1.0, 0.0], select="id").alphas == [0.0, 1.0]


def test_plot_marks_points_and_rejects_bad_rows(tmp_path: Path) -> None:
    rows = [{"alpha": a, "id": 0.8 + 0.1 * a, "ood_avg": 0.9 - 0.2 * a} for a in (1.0, 0.0, 0.5)]
    figure = plot_id_vs_ood(
        rows, tmp_path / "sub" / "curve.png", id_key="id", selected=0.5, reference_points={"x": (0.85, 0.8)}
    )
    axes = figure.axes[0]
    texts = [t.get_text() for t in axes.texts]
    assert texts == ["zero-shot", "0.5", "fine-tuned"]
    assert list(axes.lines[0].get_xdata()) == pytest.approx([80.0, 85.0, 90.0])
    assert {t.get_text() for t in axes.get_legend().get_texts()} >= {"selected alpha=0.5", "x"}
    assert (tmp_path / "sub" / "curve.png").stat().st_size > 1000
    with pytest.raises(RobustFTConfigError, match=r"lacks \['ood_avg'\]"):
        plot_id_vs_ood([{"alpha": 0.0, "id": 1.0}], id_key="id")
    with pytest.raises(RobustFTConfigError, match="empty"):
        plot_id_vs_ood([], id_key="id")


class PerRankOutput(WiSEFTCallback):
    """Writes into ``<dirpath>/rank<r>`` so the test can see which rank wrote files."""

    @property
    def dirpath(self) -> str:
        rank = dist.get_rank() if dist.is_initialized() else 0
        return f"{self._base}/rank{rank}"

    @dirpath.setter
    def dirpath(self, value: str) -> None:
        self._base = value


class DumpRows(Callback):
    def __init__(self, wise: WiSEFTCallback, out: str) -> None:
        self.wise, self.out = wise, out

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        weights = {k: v.tolist() for k, v in pl_module.state_dict().items() if v.is_floating_point()}
        payload = {"rows": self.wise.results, "alpha": self.wise.applied_alpha, "weights": weights}
        Path(self.out, f"dump{trainer.global_rank}.json").write_text(json.dumps(payload))


@pytest.mark.ddp
def test_ddp_ranks_agree_and_write_once(tmp_path: Path) -> None:
    torch.manual_seed(4)
    train, val = make_data(seed=4)
    model = TinyNet()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    wise = PerRankOutput(alphas=[0.0, 1.0], select="id", dirpath=str(tmp_path))
    trainer = make_trainer(
        [wise, DumpRows(wise, str(tmp_path))], strategy="ddp_spawn", devices=2, max_epochs=1, root=tmp_path
    )
    trainer.fit(model, train, val)
    dumps = [json.loads((tmp_path / f"dump{rank}.json").read_text()) for rank in (0, 1)]
    assert dumps[0] == dumps[1]
    assert dumps[0]["alpha"] in (0.0, 1.0)
    alpha_0 = dumps[0]["rows"][0]
    for name in SETS:
        assert alpha_0[name] == pytest.approx(manual_accuracy(TinyNet(), start, val[name]), abs=1e-6)
    assert {p.name for p in (tmp_path / "rank0").iterdir()} >= {"wiseft.csv", "wiseft.json", "wiseft.png"}
    assert len(list((tmp_path / "rank0").glob("wiseft_alpha*.ckpt"))) == 1
    assert not (tmp_path / "rank1").exists()


def test_image_classifier_rows_match_its_own_validation(image_folders: dict[str, Path], tmp_path: Path) -> None:

    from lightning_robustft import ImageClassifier, MultiDomainDataModule

    val = {name: image_folders[name] for name in ("id", "ood_full", "ood_subset")}
    dm = MultiDomainDataModule(image_folders["train"], val, id_set="ood_full", batch_size=4, num_workers=0)
    model = ImageClassifier(TinyBackbone(), class_names=dm.class_names, lr=0.05, print_table=False)
    wise = WiSEFTCallback(alphas=[0.0, 1.0], alpha=0.5)
    trainer = make_trainer([wise], max_epochs=2, root=tmp_path)
    trainer.fit(model, dm)
    summary = json.loads((tmp_path / "wiseft.json").read_text())
    assert summary["id_set"] == "ood_full", "the module's id_set is the ID set"
    assert summary["ood_sets"] == ["id", "ood_subset"]
    validated = {key: value for logged in trainer.validate(model, dm, verbose=False) for key, value in logged.items()}
    applied = next(row for row in summary["rows"] if row["alpha"] == 0.5)
    for name in val:
        assert applied[name] == pytest.approx(validated[f"val/{name}/acc"], abs=1e-6)
    assert applied["ood_avg"] == pytest.approx(validated["val/ood_avg/acc"], abs=1e-6)
