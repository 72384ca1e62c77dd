"""Backbone factory: a spec string (or a module) -> image feature extractor, its transforms, CLIP's text side.

The spec strings (``open_clip:...``, ``timm:...``, ``torchvision:...``) are listed in ``build_backbone``'s
docstring, which the API reference renders.

Only the image tower is kept as the backbone; for CLIP the text tower is used once to build the zero-shot head and
then dropped, so the fine-tuned model carries no dead weight.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_robustft._optional import require
from lightning_robustft.errors import RobustFTConfigError

__all__ = ["BACKBONE_KINDS", "Backbone", "Transform", "build_backbone"]

BACKBONE_KINDS = ("open_clip", "timm", "torchvision")
Transform = Callable[[Any], Any]


@dataclass
class Backbone:
    """What the classifier needs from a backbone.

    Attributes:
        module: maps a batch of images ``(B, 3, H, W)`` to features ``(B, feature_dim)``.
        feature_dim: width of the features (the head's input).
        train_transform: the family's training preprocessing (PIL image -> tensor), if it defines one.
        eval_transform: the family's evaluation preprocessing.
        normalize_features: CLIP heads act on L2-normalised features; other families on raw features.
        zeroshot_weights: for CLIP only, a function ``(class_names, templates) -> (num_classes, feature_dim)`` head
            weights (normalised text embeddings averaged over templates, times CLIP's logit scale).
    """

    module: nn.Module
    feature_dim: int
    train_transform: Transform | None = None
    eval_transform: Transform | None = None
    normalize_features: bool = False
    zeroshot_weights: Callable[[Sequence[str], Sequence[Any]], torch.Tensor] | None = None


def build_backbone(spec: str | nn.Module, feature_dim: int | None = None) -> Backbone:
    """Build a [`Backbone`][lightning_robustft.models.backbones.Backbone] from a spec string or wrap a ready module.

    Spec strings name where the weights come from, so a YAML file switches families without code:

    - `open_clip:<model>[:<pretrained tag or file>]`, e.g. `open_clip:ViT-B-32:openai`,
      `open_clip:ViT-B-16:/ckpts/clip.pt`, `open_clip:hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K`, or the shipped
      demo model `open_clip:robustft-tiny-clip:mnist`; with no tag the weights are random.
    - `timm:<model>[:pretrained|random]`, e.g. `timm:vit_base_patch16_clip_224.openai` (default `pretrained`).
    - `torchvision:<model>[:<weights name>|random]`, e.g. `torchvision:resnet50:IMAGENET1K_V2` (default `DEFAULT`).

    Weights that cannot be fetched (offline, no cache) and unknown models or tags are errors that name the spec and
    the fix (the valid tags, or the `:random` form).

    Args:
        spec: a spec string or an `nn.Module` that maps images to features.
        feature_dim: the feature width of a module given directly, when it has none of the attributes
            `num_features`, `output_dim`, `embed_dim`, `out_features`.

    Raises:
        RobustFTConfigError: an unknown kind, model, tag or weights name, or weights that could not be fetched.
    """
    if isinstance(spec, nn.Module):
        return Backbone(module=spec, feature_dim=_module_feature_dim(spec, feature_dim))
    if not isinstance(spec, str) or ":" not in spec:
        raise RobustFTConfigError(
            f"`backbone`={spec!r} is not a backbone spec: use 'open_clip:<model>[:<pretrained>]', "
            "'timm:<model>[:pretrained|random]', 'torchvision:<model>[:<weights>|random]' or pass an nn.Module."
        )
    kind, rest = spec.split(":", 1)
    builders = {"open_clip": _open_clip_backbone, "timm": _timm_backbone, "torchvision": _torchvision_backbone}
    if kind not in builders:
        raise RobustFTConfigError(
            f"`backbone`={spec!r} has unknown kind {kind!r}; expected one of {list(BACKBONE_KINDS)} "
            "(e.g. 'open_clip:ViT-B-32:openai') or an nn.Module given by class path."
        )
    return builders[kind](rest)


def _module_feature_dim(module: nn.Module, feature_dim: int | None) -> int:
    if feature_dim is not None:
        return feature_dim
    for attr in ("num_features", "output_dim", "embed_dim", "out_features"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    raise RobustFTConfigError(
        f"Cannot tell the feature width of backbone {type(module).__name__}: it has none of the attributes "
        "num_features / output_dim / embed_dim / out_features. Pass `feature_dim=` explicitly."
    )


def _split_tag(rest: str) -> tuple[str, str | None]:
    """Split ``model[:tag]``; ``hf-hub:org/repo`` names are one model name (open_clip loads its own weights)."""
    if rest.startswith("hf-hub:"):
        return rest, None
    name, _, tag = rest.partition(":")
    return name, tag or None


def _open_clip_backbone(rest: str) -> Backbone:
    import open_clip

    name, tag = _split_tag(rest)
    pretrained = _resolve_shipped_weights(name, tag)
    try:
        model, train_transform, eval_transform = open_clip.create_model_and_transforms(name, pretrained=pretrained)
    except RuntimeError as err:
        clear = _open_clip_error(name, tag, err)
        if clear is None:
            raise
        raise clear from err
    tokenizer = open_clip.get_tokenizer(name)
    # A constant of the zero-shot head, read once: detached, so no autograd history is turned into a float.
    logit_scale = float(model.logit_scale.detach().exp()) if hasattr(model, "logit_scale") else 100.0

    @torch.no_grad()
    def zeroshot_weights(class_names: Sequence[str], templates: Sequence[Any]) -> torch.Tensor:
        was_training = model.training
        model.eval()
        weights = open_clip.build_zero_shot_classifier(model, tokenizer, list(class_names), list(templates))
        model.train(was_training)
        return logit_scale * weights.T.float()

    visual = model.visual
    return Backbone(
        module=visual,
        feature_dim=int(visual.output_dim),
        train_transform=train_transform,
        eval_transform=eval_transform,
        normalize_features=True,
        zeroshot_weights=zeroshot_weights,
    )


def _resolve_shipped_weights(name: str, tag: str | None) -> str | None:
    """Map the demo model's tag to the checkpoint shipped in the package; other tags go to open_clip unchanged."""
    from lightning_robustft.models import tiny_clip

    if name == tiny_clip.register_tiny_clip() and tag == tiny_clip.TINY_CLIP_PRETRAINED_TAG:
        return str(tiny_clip.tiny_clip_checkpoint())
    return tag


def _open_clip_error(name: str, tag: str | None, err: RuntimeError) -> RobustFTConfigError | None:
    """A clear error for open_clip's ``RuntimeError`` (unknown model or tag, weights it could not fetch), else None."""
    import open_clip

    from lightning_robustft.models import tiny_clip

    if name not in _open_clip_models() and not name.startswith("hf-hub:"):
        return RobustFTConfigError(
            f"open_clip has no model {name!r}. Known models include {_open_clip_models()[:8]} ... "
            "(see open_clip.list_models())."
        )
    tags = list(open_clip.list_pretrained_tags_by_model(name))
    if name == tiny_clip.TINY_CLIP_NAME:
        tags.append(tiny_clip.TINY_CLIP_PRETRAINED_TAG)
    if tag is not None and tag not in tags and not Path(tag).exists():
        return RobustFTConfigError(
            f"open_clip model {name!r} has no pretrained tag {tag!r} and no file of that name exists. Valid tags: "
            f"{tags}; or give a checkpoint file path, or 'open_clip:{name}' for random weights."
        )
    if tag in tags and "download" in str(err).lower():
        return RobustFTConfigError(
            f"Could not fetch the pretrained weights of 'open_clip:{name}:{tag}' ({err}). Download them once with "
            "network access (they are cached under HF_HOME), or give a local checkpoint file as the tag: "
            f"'open_clip:{name}:/path/to/weights.pt'."
        )
    return None


def _open_clip_models() -> list[str]:
    """open_clip's architecture names, the shipped tiny CLIP included."""
    import open_clip

    from lightning_robustft.models import tiny_clip

    tiny_clip.register_tiny_clip()
    return list(open_clip.list_models())


def _timm_backbone(rest: str) -> Backbone:
    timm = require("timm", "timm", feature="A timm backbone")

    name, tag = _split_tag(rest)
    if tag not in (None, "pretrained", "random"):
        raise RobustFTConfigError(f"timm backbone tag must be 'pretrained' or 'random', got {tag!r} in 'timm:{rest}'.")
    try:
        module = timm.create_model(name, pretrained=tag != "random", num_classes=0)
    except RuntimeError as err:
        raise RobustFTConfigError(f"timm cannot create {name!r}: {err}. See timm.list_models().") from err
    except OSError as err:  # huggingface_hub's LocalEntryNotFoundError, connection errors
        raise RobustFTConfigError(
            f"Could not fetch the pretrained weights of 'timm:{name}' from the Hugging Face Hub "
            f"({type(err).__name__}: {err}). Download them once with network access (they are cached under HF_HOME; "
            f"HF_HUB_OFFLINE=1 allows only the cache), or use 'timm:{name}:random' for random weights."
        ) from err
    config = timm.data.resolve_data_config({}, model=module)
    return Backbone(
        module=module,
        feature_dim=int(module.num_features),
        train_transform=timm.data.create_transform(**config, is_training=True),
        eval_transform=timm.data.create_transform(**config, is_training=False),
    )


def _torchvision_backbone(rest: str) -> Backbone:
    from torchvision import models

    name, tag = _split_tag(rest)
    try:
        weights_enum = models.get_model_weights(name)
    except ValueError as err:
        raise RobustFTConfigError(
            f"torchvision has no model {name!r}; known: {sorted(models.list_models())[:10]} ..."
        ) from err
    default_weights = weights_enum.DEFAULT
    weights = (
        None if tag == "random" else (default_weights if tag in (None, "DEFAULT") else _weights(weights_enum, tag))
    )
    try:
        module = models.get_model(name, weights=weights)
    except OSError as err:  # URLError, HTTPError, connection errors of the download
        import torch.hub

        raise RobustFTConfigError(
            f"Could not download the torchvision weights {weights} of 'torchvision:{name}' "
            f"({type(err).__name__}: {err}). Download them once with network access (they are cached in "
            f"{torch.hub.get_dir()}/checkpoints), or use 'torchvision:{name}:random' for random weights."
        ) from err
    feature_dim = _drop_last_linear(module, name)
    eval_transform = (weights or default_weights).transforms()
    return Backbone(module=module, feature_dim=feature_dim, train_transform=None, eval_transform=eval_transform)


def _weights(weights_enum: Any, tag: str) -> Any:
    try:
        return weights_enum[tag]
    except KeyError as err:
        known = [w.name for w in weights_enum]
        raise RobustFTConfigError(
            f"Unknown torchvision weights {tag!r}; known: {[*known, 'DEFAULT', 'random']}."
        ) from err


def _drop_last_linear(module: nn.Module, name: str) -> int:
    """Replace the classifier (the last ``nn.Linear``) by ``nn.Identity``; return its input width."""
    linears = [(path, child) for path, child in module.named_modules() if isinstance(child, nn.Linear)]
    if not linears:
        raise RobustFTConfigError(f"torchvision model {name!r} has no nn.Linear classifier to replace.")
    path, last = linears[-1]
    parent_path, _, attr = path.rpartition(".")
    setattr(module.get_submodule(parent_path) if parent_path else module, attr, nn.Identity())
    return int(last.in_features)
