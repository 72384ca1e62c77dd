import importlib.util
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from lightning_robustft.data.demo import DEMO_CLASSES, DEMO_TEMPLATES, DemoDigits, render_split
from lightning_robustft.errors import RobustFTConfigError
from lightning_robustft.models import tiny_clip
from lightning_robustft.models.tiny_clip import (
    TINY_CLIP_NAME,
    TINY_CLIP_PRETRAINED_TAG,
    register_tiny_clip,
    tiny_clip_checkpoint,
)

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "pretrain_tiny_clip.py"


@pytest.fixture(scope="module")
def loaded():
    name = register_tiny_clip()
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(tiny_clip_checkpoint()))
    return model.eval(), preprocess, open_clip.get_tokenizer(name)


def zero_shot_weights(model, tokenizer) -> torch.Tensor:
    """The CLIP recipe: per class, normalised text embeddings averaged over templates, renormalised, x logit scale."""
    with torch.no_grad():
        per_class = []
        for name in DEMO_CLASSES:
            text = F.normalize(model.encode_text(tokenizer([t.format(name) for t in DEMO_TEMPLATES])), dim=-1)
            per_class.append(F.normalize(text.mean(dim=0), dim=-1))
        return model.logit_scale.exp() * torch.stack(per_class)


def accuracy(model, preprocess, weights, split: str, limit: int = 300) -> float:
    dataset = DemoDigits(split)
    rows = np.linspace(0, len(dataset) - 1, limit).astype(int)  # spread over all classes
    images = torch.stack([preprocess(dataset[i][0]) for i in rows])
    labels = torch.tensor([dataset.targets[i] for i in rows])
    with torch.no_grad():
        features = F.normalize(model.encode_image(images), dim=-1)
    return float(((features @ weights.T).argmax(dim=-1) == labels).float().mean())


def test_register_is_idempotent_and_tokenizer_works():
    assert register_tiny_clip() == register_tiny_clip() == TINY_CLIP_NAME
    assert open_clip.list_models().count(TINY_CLIP_NAME) == 1
    tokens = open_clip.get_tokenizer(TINY_CLIP_NAME)(["a photo of the digit three.", "the number one."])
    assert tokens.shape == (2, 16) and tokens.dtype == torch.long
    assert TINY_CLIP_PRETRAINED_TAG == "mnist"


def test_checkpoint_is_small_fp16_and_in_the_package():
    path = tiny_clip_checkpoint()
    assert path.parent.name == "assets" and path.parent.parent.name == "lightning_robustft"
    assert path.stat().st_size < 8 * 2**20
    state_dict = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    assert {tensor.dtype for tensor in state_dict.values() if tensor.is_floating_point()} == {torch.float16}


def test_loads_through_open_clip_into_fp32(loaded):
    model, preprocess, _ = loaded
    stored = torch.load(tiny_clip_checkpoint(), map_location="cpu", weights_only=True)["state_dict"]
    for key, value in model.state_dict().items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, stored[key].float(), rtol=0, atol=0)
    n_params = sum(p.numel() for p in model.parameters())
    assert 1_000_000 <= n_params <= 3_000_000
    assert model.visual.image_size == (32, 32)
    image, _ = DemoDigits("id_val")[0]
    assert preprocess(image).shape == (3, 32, 32)


def test_zero_shot_classifier_beats_chance_by_far(loaded):
    model, preprocess, tokenizer = loaded
    weights = zero_shot_weights(model, tokenizer)
    id_acc = accuracy(model, preprocess, weights, "id_val")
    clean_acc = accuracy(model, preprocess, weights, "clean")
    assert id_acc > 0.5  # chance is 0.1
    # The demo's premise: pretraining covers the plain digits better than the ID style, leaving room to fine-tune.
    assert clean_acc > id_acc + 0.1


def test_missing_checkpoint_says_how_to_rebuild(monkeypatch, tmp_path):
    monkeypatch.setattr(tiny_clip, "_ASSETS", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"scripts/pretrain_tiny_clip.py --out"):
        tiny_clip.tiny_clip_checkpoint()


def load_script():
    spec = importlib.util.spec_from_file_location("pretrain_tiny_clip", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pretraining_augmentation_and_loss():
    script = load_script()
    masks = render_split("pretrain")[0][:64, ..., 0].astype(np.float32) / 255.0
    first = script.augment(masks, np.random.default_rng(0))
    again = script.augment(masks, np.random.default_rng(0))
    assert first.shape == (64, 32, 32, 3) and first.min() >= 0.0 and first.max() <= 1.0
    np.testing.assert_array_equal(first, again)  # seeded
    labels = torch.tensor([0, 0, 1, 2])
    text = F.normalize(torch.randn(3, 8), dim=-1)[labels]
    scale = torch.tensor(10.0)
    aligned = script.multi_positive_clip_loss(text, text, labels, scale)
    shuffled = script.multi_positive_clip_loss(text[[3, 2, 1, 0]], text, labels, scale)
    assert aligned < shuffled


@pytest.mark.slow
def test_rebuild_command_runs_and_writes_a_loadable_checkpoint(tmp_path, capsys):
    script = load_script()
    out = tmp_path / "tiny.pt"
    script.main(["--out", str(out), "--steps", "2", "--batch-size", "16", "--warmup", "1", "--log-every", "1"])
    printed = capsys.readouterr().out
    assert "step     2/2" in printed and "| OOD average |" in printed
    model = open_clip.create_model(register_tiny_clip(), pretrained=str(out))
    assert sum(p.numel() for p in model.parameters()) > 1_000_000


def test_building_the_tiny_clip_backbone_warns_nothing():
    import warnings

    from lightning_robustft.models.backbones import build_backbone

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "Converting a tensor with requires_grad=True to a scalar"
        built = build_backbone(f"open_clip:{TINY_CLIP_NAME}:{TINY_CLIP_PRETRAINED_TAG}")
    assert built.zeroshot_weights is not None


def test_unknown_tiny_clip_tag_lists_the_valid_ones():
    from lightning_robustft.models.backbones import build_backbone

    with pytest.raises(RobustFTConfigError, match=r"no pretrained tag 'nosuchtag'.*Valid tags: \['mnist'\]"):
        build_backbone(f"open_clip:{TINY_CLIP_NAME}:nosuchtag")
