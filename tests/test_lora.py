"""LoRACallback: peft adapters while fitting, a plain merged model after, exact resume, refused configurations."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from _helpers import Recorder, TinyBackbone, make_image_loader, make_trainer, state_copy
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import FSDPStrategy
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from lightning_robustft import ImageClassifier, WiSEFTCallback
from lightning_robustft.callbacks.lora import LoRACallback, check_strategy
from lightning_robustft.errors import RobustFTConfigError

LORA_LAYER = "backbone.net.3"  # TinyBackbone's Linear: the default target


def make_model(seed: int = 0, **kwargs: Any) -> ImageClassifier:
    torch.manual_seed(seed)
    return ImageClassifier(TinyBackbone(), num_classes=3, lr=0.05, warmup_steps=1, print_table=False, **kwargs)


def peft_modules(module: nn.Module) -> list[str]:
    return [name for name, sub in module.named_modules() if isinstance(sub, BaseTunerLayer)]


def adapted(inputs: torch.Tensor) -> Callable[[Trainer, LightningModule], SimpleNamespace]:
    """A ``Recorder`` probe: the (adapted) state dict, the PEFT layers and the eval-mode outputs on ``inputs``.

    Listed before LoRACallback, the recorder sees the adapted model at the start and end of training, before the merge.
    """

    def probe(trainer: Trainer, pl_module: LightningModule) -> SimpleNamespace:
        modes = {module: module.training for module in pl_module.modules()}
        with torch.no_grad():
            outputs = pl_module.eval()(inputs)
        for module, training in modes.items():
            module.train(training)
        return SimpleNamespace(state=state_copy(pl_module), peft_layers=peft_modules(pl_module), outputs=outputs)

    return probe


def test_fit_trains_only_lora_and_head_and_leaves_the_plain_model(tmp_path: Path) -> None:
    model = make_model()
    plain = state_copy(model)
    inputs = torch.randn(5, 3, 16, 16)
    recorder = Recorder(adapted(inputs))
    callback = LoRACallback(r=2, alpha=4)
    make_trainer([recorder, callback], max_epochs=3, root=tmp_path).fit(model, make_image_loader())

    # During fit: the adapted structure; only LoRA weights and the head moved, frozen weights bitwise unchanged.
    start, end = recorder.start, recorder.end
    assert start.peft_layers == end.peft_layers == [LORA_LAYER]
    assert callback.adapted == ["net.3"]
    lora_keys = {f"{LORA_LAYER}.lora_A.default.weight", f"{LORA_LAYER}.lora_B.default.weight"}
    assert lora_keys <= set(start.state)
    changed = {name for name in start.state if not torch.equal(start.state[name], end.state[name])}
    assert changed == lora_keys | {"head.weight", "head.bias"}
    assert torch.equal(end.state[f"{LORA_LAYER}.base_layer.weight"], plain[f"{LORA_LAYER}.weight"])

    # After fit: the plain model (same keys in the same order, no peft class, no peft_config), trainable as before.
    assert peft_modules(model) == []
    assert list(model.state_dict()) == list(plain)
    assert not hasattr(model.backbone, "peft_config")
    assert type(model.backbone.net[3]) is nn.Linear
    assert all(param.requires_grad for param in model.parameters())
    # ... with the adapted model's outputs, and the update merged into the adapted layer only.
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(inputs), end.outputs)
    after = model.state_dict()
    assert not torch.equal(after[f"{LORA_LAYER}.weight"], plain[f"{LORA_LAYER}.weight"])
    for name in ("backbone.net.0.weight", "backbone.net.0.bias", f"{LORA_LAYER}.bias"):
        assert torch.equal(after[name], plain[name])


def test_merge_is_w_plus_alpha_over_r_times_b_a() -> None:
    model = make_model()
    weight = model.backbone.net[3].weight.detach().clone()
    callback = LoRACallback(r=3, alpha=5)
    callback.inject(model)
    layer = model.backbone.net[3]
    assert layer.scaling["default"] == pytest.approx(5 / 3) == callback.scaling
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()  # B starts at zero; give it a value so the merge shows
    a, b = layer.lora_A["default"].weight.detach().clone(), layer.lora_B["default"].weight.detach().clone()
    assert a.shape == (3, weight.shape[1]) and b.shape == (weight.shape[0], 3)
    callback.merge(model)
    torch.testing.assert_close(model.backbone.net[3].weight, weight + (5 / 3) * b @ a)
    callback.merge(model)  # a second merge is a no-op


def test_train_head_false_freezes_the_head_during_fit_only(tmp_path: Path) -> None:
    model = make_model()
    recorder = Recorder()
    make_trainer([recorder, LoRACallback(r=2, train_head=False)], max_epochs=1, root=tmp_path).fit(
        model, make_image_loader()
    )
    changed = {name for name in recorder.start if not torch.equal(recorder.start[name], recorder.end[name])}
    assert changed == {f"{LORA_LAYER}.lora_A.default.weight", f"{LORA_LAYER}.lora_B.default.weight"}
    assert all(param.requires_grad for param in model.parameters())


def test_resume_from_a_mid_fit_checkpoint_equals_the_straight_run(tmp_path: Path) -> None:
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    straight = make_model()
    make_trainer([LoRACallback(r=2), saver], max_epochs=4, root=tmp_path, enable_checkpointing=True).fit(
        straight, make_image_loader()
    )
    checkpoint = tmp_path / "ckpt" / "epoch=1.ckpt"
    saved = torch.load(checkpoint, weights_only=False)
    assert f"{LORA_LAYER}.lora_B.default.weight" in saved["state_dict"]
    assert saved["callbacks"]["LoRACallback"]["adapted"] == ["net.3"]

    resumed = make_model(seed=7)  # other initial weights and other LoRA init: the checkpoint must win
    make_trainer([LoRACallback(r=2)], max_epochs=4, root=tmp_path).fit(
        resumed, make_image_loader(), ckpt_path=checkpoint
    )
    assert peft_modules(resumed) == []
    for (name, got), want in zip(resumed.state_dict().items(), straight.state_dict().values(), strict=True):
        assert torch.equal(got, want), name


def test_a_checkpoint_becomes_a_plain_model_with_inject_load_merge(tmp_path: Path) -> None:
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last")
    trained = make_model()
    make_trainer([LoRACallback(r=2), saver], max_epochs=1, root=tmp_path, enable_checkpointing=True).fit(
        trained, make_image_loader()
    )
    fresh, callback = make_model(seed=3), LoRACallback(r=2)
    callback.inject(fresh)
    fresh.load_state_dict(torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["state_dict"])
    callback.merge(fresh)
    for name, tensor in trained.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[name], tensor)


class FailingClassifier(ImageClassifier):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.global_step == 1:
            raise RuntimeError("planned failure")
        return super().training_step(batch, batch_idx)


def test_a_failed_fit_leaves_the_merged_plain_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = FailingClassifier(TinyBackbone(), num_classes=3, lr=0.05, print_table=False)
    keys = list(model.state_dict())
    with pytest.raises(RuntimeError, match="planned failure"):
        make_trainer([LoRACallback(r=2)], max_epochs=2, root=tmp_path).fit(model, make_image_loader())
    assert peft_modules(model) == []
    assert list(model.state_dict()) == keys


class AttentionBlock(nn.Module):
    """nn.MultiheadAttention plus an MLP, laid out as in open_clip's residual block."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, 2)
        self.mlp = nn.Sequential(nn.Linear(width, 16), nn.GELU(), nn.Linear(16, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return x + self.mlp(x)


class AttentionModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(AttentionBlock(), AttentionBlock())
        self.head = nn.Linear(8, 3)


def test_default_targets_on_attention_skip_out_proj_and_adapt_in_proj() -> None:
    torch.manual_seed(0)
    model = AttentionModel()
    plain = state_copy(model)
    callback = LoRACallback(r=2)
    callback.inject(model)
    assert callback.adapted == [
        "0.mlp.0",
        "0.mlp.2",
        "1.mlp.0",
        "1.mlp.2",
        "0.attn.in_proj_weight",
        "1.attn.in_proj_weight",
    ]
    trainable = [name for name, param in model.named_parameters() if param.requires_grad]
    assert all("lora_" in name for name in trainable if name.startswith("backbone."))
    assert "head.weight" in trainable
    x = torch.randn(5, 4, 8)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param, std=0.2)
    model.backbone(x).sum().backward()  # the update on in_proj_weight takes part in forward and backward
    grads = {name for name, param in model.named_parameters() if param.grad is not None}
    assert "backbone.0.attn.lora_A.default.weight" in grads
    with torch.no_grad():
        adapted = model.backbone(x)
    for name, tensor in state_copy(model).items():  # the frozen base weights do not drift
        base = name.replace("base_layer.", "")
        if base in plain:
            assert torch.equal(tensor, plain[base]), name
    callback.merge(model)
    assert peft_modules(model) == [] and set(model.state_dict()) == set(plain)
    assert type(model.backbone[0].attn) is nn.MultiheadAttention
    with torch.no_grad():
        torch.testing.assert_close(model.backbone(x), adapted)
    assert not torch.equal(model.backbone[0].attn.in_proj_weight, plain["backbone.0.attn.in_proj_weight"])
    assert torch.equal(model.backbone[0].attn.out_proj.weight, plain["backbone.0.attn.out_proj.weight"])


def test_dropout_leaves_in_proj_out_with_a_warning() -> None:
    callback = LoRACallback(r=2, dropout=0.1)
    with pytest.warns(UserWarning, match="in_proj_weight.*dropout > 0"):
        callback.inject(AttentionModel())
    assert callback.adapted == ["0.mlp.0", "0.mlp.2", "1.mlp.0", "1.mlp.2"]


def test_tiny_clip_injection_merge_and_outputs() -> None:
    torch.manual_seed(0)
    model = ImageClassifier("open_clip:robustft-tiny-clip:mnist", num_classes=10)
    plain = state_copy(model)
    callback = LoRACallback(r=4, alpha=8)
    callback.inject(model)
    blocks = len(model.backbone.transformer.resblocks)
    assert len(callback.adapted) == 3 * blocks
    assert {name.split("resblocks.0.")[-1] for name in callback.adapted if "resblocks.0." in name} == {
        "mlp.c_fc",
        "mlp.c_proj",
        "attn.in_proj_weight",
    }
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable == {name for name in trainable if "lora_" in name} | {"head.weight", "head.bias"}
    for name, param in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param, std=0.05)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        adapted = model(x)
    callback.merge(model)
    assert peft_modules(model) == [] and list(model.state_dict()) == list(plain)
    with torch.no_grad():
        torch.testing.assert_close(model(x), adapted, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(adapted, ImageClassifier_with(plain)(x), atol=1e-3)


def ImageClassifier_with(state: dict[str, torch.Tensor]) -> ImageClassifier:  # noqa: N802
    model = ImageClassifier("open_clip:robustft-tiny-clip:mnist", num_classes=10)
    model.load_state_dict(state)
    return model.eval()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"r": 0}, r"`r`=0 must be an integer >= 1"),
        ({"r": True}, r"`r`=True must be an integer >= 1 .*not bool"),
        ({"alpha": 0}, r"`alpha`=0 must be a finite number > 0"),
        ({"dropout": 1.0}, r"`dropout`=1.0 must be a number in \[0, 1\)"),
        ({"dropout": -0.1}, r"`dropout`=-0.1"),
        ({"target_modules": "c_fc"}, r"`target_modules`='c_fc' must be None or a non-empty list"),
        ({"target_modules": []}, r"`target_modules`=\[\]"),
        ({"target_parameters": ["w"], "dropout": 0.1}, r"`target_parameters`=\['w'\] needs `dropout`=0"),
        ({"backbone": ""}, r"`backbone`='' must be the dotted name of a submodule"),
        ({"train_head": "yes"}, r"`train_head`='yes' must be True or False"),
    ],
)
def test_constructor_errors(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(RobustFTConfigError, match=match):
        LoRACallback(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"backbone": "encoder"}, r"`backbone`='encoder' is not a submodule.*\['backbone', 'head'\]"),
        ({"backbone": "head"}, r"`backbone`='head' is a single Linear"),
        ({"target_modules": ["nope"]}, r"`target_modules` name 'nope' matches no layer.*Some layer names"),
        ({"target_modules": ["out_proj"]}, r"matches '0.attn.out_proj', the output projection .* ignored"),
        ({"target_modules": ["mlp"]}, r"matches '0.mlp', a Sequential"),
        ({"target_parameters": ["attn.nope"]}, r"`target_parameters` name 'attn.nope' matches no parameter"),
    ],
)
def test_targets_and_module_errors(kwargs: dict[str, Any], match: str) -> None:
    model = AttentionModel()
    keys = list(model.state_dict())
    with pytest.raises(RobustFTConfigError, match=match):
        LoRACallback(**kwargs).inject(model)
    assert list(model.state_dict()) == keys and peft_modules(model) == []


def test_user_targets_pass_to_peft() -> None:
    model = AttentionModel()
    callback = LoRACallback(target_modules=["mlp.2"], target_parameters=["attn.in_proj_weight"])
    callback.inject(model)
    assert callback.adapted == ["0.mlp.2", "1.mlp.2", "0.attn.in_proj_weight", "1.attn.in_proj_weight"]
    assert sorted(peft_modules(model)) == ["backbone.0.attn", "backbone.0.mlp.2", "backbone.1.attn", "backbone.1.mlp.2"]
    callback.merge(model)
    assert peft_modules(model) == []


def test_wise_ft_in_the_same_trainer_is_refused_before_any_change(tmp_path: Path) -> None:
    model = make_model()
    keys = list(model.state_dict())
    trainer = make_trainer([LoRACallback(), WiSEFTCallback(dirpath=str(tmp_path))], max_epochs=1, root=tmp_path)
    with pytest.raises(RobustFTConfigError, match=r"cannot share a Trainer.*run_wiseft"):
        trainer.fit(model, make_image_loader())
    assert list(model.state_dict()) == keys and peft_modules(model) == []


def test_sharded_strategies_are_refused() -> None:
    with pytest.raises(RobustFTConfigError, match="does not support strategy FSDPStrategy"):
        check_strategy(FSDPStrategy())


def test_state_dict_records_the_configuration_and_warns_on_a_change() -> None:
    callback = LoRACallback(r=4, alpha=8)
    state = callback.state_dict()
    assert state == {"r": 4, "alpha": 8.0, "dropout": 0.0, "backbone": "backbone", "adapted": []}
    with pytest.warns(UserWarning, match=r"trained with \{'r': 4, .*\}; resuming with \{'r': 2, "):
        LoRACallback(r=2, alpha=8).load_state_dict(state)


def test_the_deprecated_module_argument_still_names_the_backbone() -> None:
    with pytest.deprecated_call(match=r"`module` is deprecated.*`backbone`='encoder'"):
        callback = LoRACallback(module="encoder")
    assert callback.backbone == "encoder"
    with pytest.raises(RobustFTConfigError, match=r"`backbone`='net' and its deprecated name `module`='encoder'"):
        LoRACallback(backbone="net", module="encoder")


def test_a_missing_peft_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "peft", None)  # what Python does for a package that is not installed
    model = AttentionModel()
    with pytest.raises(ImportError, match=r"LoRACallback needs .*`peft`.*pip install lightning-robustft\[lora\]"):
        LoRACallback().inject(model)
    assert peft_modules(model) == []
