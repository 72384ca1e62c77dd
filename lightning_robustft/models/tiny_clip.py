"""The tiny "pretrained" CLIP shipped with the package, so the CLIP workflow runs offline on a laptop CPU.

A real ``open_clip`` model (a ViT image tower at 32 px and a narrow text tower, about 2.4 M parameters) whose
architecture is the JSON file ``assets/robustft-tiny-clip.json`` and whose weights, pretrained contrastively on the
demo's ``pretrain`` digits by ``scripts/pretrain_tiny_clip.py``, are ``assets/tiny_clip_mnist.pt`` (fp16, a few MB).
It loads through open_clip's own code path, exactly as a downloaded CLIP would::

    import open_clip
    from lightning_robustft.models.tiny_clip import register_tiny_clip, tiny_clip_checkpoint

    name = register_tiny_clip()
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(tiny_clip_checkpoint()))
    tokenizer = open_clip.get_tokenizer(name)

In the backbone spec string it is ``open_clip:robustft-tiny-clip:mnist``.

The text tower's token embedding (49,408 tokens x width) dominates the size, so the text width is 32 and the
weights are stored in half precision; open_clip loads them into an fp32 model (``load_state_dict`` casts). The
context length is 16 tokens, enough for the demo prompts (longer prompts are truncated by the tokenizer).
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "TINY_CLIP_NAME",
    "TINY_CLIP_PRETRAINED_TAG",
    "register_tiny_clip",
    "tiny_clip_checkpoint",
    "tiny_clip_config_path",
]

TINY_CLIP_NAME = "robustft-tiny-clip"
"""The open_clip model name the config is registered under."""

TINY_CLIP_PRETRAINED_TAG = "mnist"
"""The pretrained tag that stands for the shipped checkpoint in ``open_clip:robustft-tiny-clip:mnist``."""

_ASSETS = Path(__file__).resolve().parent.parent / "assets"
_CHECKPOINT_NAME = "tiny_clip_mnist.pt"


def tiny_clip_config_path() -> Path:
    """The model config JSON (open_clip's format; the file name is the model name)."""
    return _ASSETS / f"{TINY_CLIP_NAME}.json"


def register_tiny_clip() -> str:
    """Make ``open_clip`` know the tiny CLIP architecture; safe to call any number of times.

    open_clip finds architectures in a registry of JSON configs, so the shipped config is added to it once per
    process. Call this before ``open_clip.create_model*`` or ``open_clip.get_tokenizer`` with the name.

    Returns:
        The model name, `TINY_CLIP_NAME`.
    """
    import open_clip

    if TINY_CLIP_NAME not in open_clip.list_models():
        open_clip.add_model_config(tiny_clip_config_path())
    return TINY_CLIP_NAME


def tiny_clip_checkpoint() -> Path:
    """The shipped pretrained weights, a file that ``open_clip.create_model(..., pretrained=path)`` loads.

    Raises:
        FileNotFoundError: if the file is missing (e.g. an install without package data); it says how to rebuild.
    """
    path = _ASSETS / _CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"The tiny CLIP checkpoint is missing: {path} does not exist. Reinstall lightning-robustft with its "
            f"package data, or rebuild it with `python scripts/pretrain_tiny_clip.py --out {path}`."
        )
    return path
