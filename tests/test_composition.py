"""GMixout + very-large dropout head + WiSE-FT in one Trainer: they compose and leave a plain model behind."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_robustft.callbacks.dropout_head import DropoutHeadCallback
from lightning_robustft.callbacks.gmixout import GMixoutCallback
from lightning_robustft.callbacks.wise_ft import WiSEFTCallback
from lightning_robustft.ops.interpolate import interpolate_state_dicts


class Net(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


class Recorder(Callback):
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.start = {k: v.clone() for k, v in pl_module.state_dict().items()}

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.theta_1 = {k: v.clone() for k, v in pl_module.state_dict().items()}


def _data() -> tuple[DataLoader, dict[str, DataLoader]]:
    generator = torch.Generator().manual_seed(0)
    rule = torch.randn(6, 3, generator=generator)
    x = torch.randn(160, 6, generator=generator)
    y = (x @ rule).argmax(-1)
    train = DataLoader(TensorDataset(x[:96], y[:96]), batch_size=16, shuffle=True)
    val = {
        "id": DataLoader(TensorDataset(x[96:128], y[96:128]), batch_size=16),
        "shifted": DataLoader(TensorDataset(2 * x[128:] + 1, y[128:]), batch_size=16),
    }
    return train, val


def _accuracy(state: dict[str, torch.Tensor], loader: DataLoader) -> float:
    model = Net()
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        return torch.cat([(model(x).argmax(-1) == y).float() for x, y in loader]).mean().item()


def test_gmixout_dropout_head_and_wiseft_together(tmp_path: Path) -> None:
    seed_everything(0)
    train, val = _data()
    model = Net()
    module_types = [type(m) for m in model.modules()]
    recorder = Recorder()
    wise = WiSEFTCallback(alphas=[0.0, 0.5, 1.0])
    trainer = Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        callbacks=[recorder, GMixoutCallback(p=0.9, seed=0), DropoutHeadCallback(p=0.5), wise],
    )
    trainer.fit(model, train, val)

    start, theta_1 = recorder.start, recorder.theta_1
    assert not torch.equal(start["backbone.0.weight"], theta_1["backbone.0.weight"]), "the backbone trained"
    assert all(torch.equal(wise.theta_0[k], v) for k, v in start.items() if v.is_floating_point())
    expected = interpolate_state_dicts(start, theta_1, 0.5)
    final = model.state_dict()
    assert list(final) == list(start), "no parameters or buffers added"
    assert all(torch.equal(final[k], v) for k, v in expected.items())
    assert [type(m) for m in model.modules()] == module_types, "no module replaced"
    assert len(model.head._forward_pre_hooks) == 0 and len(model.head._forward_hooks) == 0

    rows = json.loads((tmp_path / "wiseft.json").read_text())["rows"]
    for row, state in ((rows[0], start), (rows[-1], theta_1)):
        for name, loader in val.items():
            assert abs(row[name] - _accuracy(state, loader)) < 1e-6

    plain = Net()
    plain.load_state_dict(torch.load(tmp_path / "wiseft_alpha0.50.ckpt", weights_only=True)["state_dict"])
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in final.items())
