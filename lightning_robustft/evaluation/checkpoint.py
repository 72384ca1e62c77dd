"""Checkpoint files for the weight-space tools: read them with errors that say what is wrong, write weights-only ones.

WiSE-FT and the soups read fine-tuned checkpoints written by Lightning (or bare state dicts saved with
``torch.save``) and write one model back. Reading goes through `load_checkpoint`, which names the file in
every error: a missing path is a ``FileNotFoundError``, an empty or truncated file (an interrupted save, a
truncated download) is a ``ValueError`` that says so instead of torch's bare ``EOFError`` or its ``weights_only``
advice. Writing goes through `save_weights_checkpoint`: the weights and the source's hyperparameters, so
``MyModule.load_from_checkpoint(path)`` rebuilds the model, without optimizer or callback state.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning
import torch
from torch import Tensor, nn

from lightning_robustft.errors import RobustFTConfigError
from lightning_robustft.ops.interpolate import float_state_snapshot

__all__ = [
    "THETA_0_KEY",
    "load_checkpoint",
    "load_into",
    "load_wiseft_endpoints",
    "save_weights_checkpoint",
]

THETA_0_KEY = "wiseft_theta_0"
"""Checkpoint key under which ``WiSEFTCallback`` stores theta_0 (CPU float tensors of the state dict)."""

_TRAINING_STATE = ("state_dict", "optimizer_states", "lr_schedulers", "callbacks", "loops", THETA_0_KEY)


def load_checkpoint(checkpoint: str | Path | Mapping[str, Any], weights_only: bool = False) -> dict[str, Any]:
    """A checkpoint as a dict with a ``"state_dict"`` entry, from a file or from an already loaded object.

    A Lightning checkpoint is returned as saved; a bare state dict (``{name: tensor}``) is wrapped as
    ``{"state_dict": ...}``. Only load files you trust: with ``weights_only=False`` (needed for checkpoints that
    carry hyperparameter objects) ``torch.load`` unpickles arbitrary objects.

    Args:
        checkpoint: a checkpoint file, or a loaded checkpoint dict or state dict.
        weights_only: passed to ``torch.load``.

    Raises:
        FileNotFoundError: the path does not exist or is not a file.
        ValueError: the file is empty, truncated or not a PyTorch checkpoint, or holds objects that
            ``weights_only=True`` refuses, or holds neither a checkpoint nor a state dict.
    """
    if isinstance(checkpoint, Mapping):
        loaded: Any = checkpoint
        label = "The checkpoint object"
    else:
        file = Path(checkpoint)
        loaded = _read(file, weights_only)
        label = repr(str(file))
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        return dict(loaded)
    if isinstance(loaded, Mapping) and all(isinstance(value, Tensor) for value in loaded.values()):
        return {"state_dict": dict(loaded)}
    raise ValueError(
        f"{label} holds neither a Lightning checkpoint (a dict with 'state_dict') nor a state dict "
        f"(got {type(loaded).__name__}). Save one with `trainer.save_checkpoint(path)` or "
        "`torch.save({'state_dict': model.state_dict()}, path)`."
    )


def _read(file: Path, weights_only: bool) -> Any:
    """``torch.load`` on the CPU, with the file named in every error and the likely cause spelled out."""
    if not file.is_file():
        raise FileNotFoundError(f"Checkpoint {str(file)!r} does not exist or is not a file.")
    if file.stat().st_size == 0:
        raise ValueError(
            f"Checkpoint {str(file)!r} is empty (0 bytes): an interrupted save or a truncated download? "
            "Save or download it again."
        )
    try:
        return torch.load(file, map_location="cpu", weights_only=weights_only)
    except (EOFError, pickle.UnpicklingError, RuntimeError) as error:
        if not zipfile.is_zipfile(file):  # torch.save writes a zip archive; a cut-off one has no central directory
            raise ValueError(
                f"Checkpoint {str(file)!r} ({file.stat().st_size} bytes) is not a PyTorch checkpoint, or only part of "
                "one (a truncated download or an interrupted save?). Save or download it again."
            ) from error
        if weights_only and isinstance(error, pickle.UnpicklingError):
            raise ValueError(
                f"Checkpoint {str(file)!r} holds objects besides tensors (such as hyperparameters), which "
                "`weights_only=True` refuses to unpickle. If you trust the file, pass `weights_only=False`."
            ) from error
        raise


def load_wiseft_endpoints(
    finetuned: str | Path, zeroshot: str | Path | None = None, weights_only: bool = False
) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, Any]]:
    """Read theta_0 and theta_1 for an after-the-fact WiSE-FT sweep.

    Args:
        finetuned: the fine-tuned checkpoint (its ``state_dict`` is theta_1).
        zeroshot: the zero-shot checkpoint; default: the ``wiseft_theta_0`` that ``WiSEFTCallback`` stored in
            ``finetuned``.
        weights_only: passed to ``torch.load``.

    Returns:
        ``(theta_0, theta_1, finetuned_checkpoint)``; the last is reused to write the interpolated checkpoint.

    Raises:
        FileNotFoundError: a checkpoint path does not exist.
        ValueError: a file is not a readable checkpoint (see `load_checkpoint`).
        RobustFTConfigError: ``zeroshot`` is ``None`` and ``finetuned`` holds no theta_0.
    """
    checkpoint = load_checkpoint(finetuned, weights_only)
    if zeroshot is not None:
        theta_0 = load_checkpoint(zeroshot, weights_only)["state_dict"]
    elif THETA_0_KEY in checkpoint:
        theta_0 = checkpoint[THETA_0_KEY]
    else:
        raise RobustFTConfigError(
            f"`zeroshot` is None and {str(finetuned)!r} has no {THETA_0_KEY!r} (it was not trained with "
            "WiSEFTCallback): pass the zero-shot checkpoint, e.g. one written with "
            "`torch.save({'state_dict': model.state_dict()}, 'zeroshot.ckpt')` before fine-tuning."
        )
    return float_state_snapshot(theta_0), checkpoint["state_dict"], checkpoint


def load_into(module: nn.Module, state: Mapping[str, Any], what: str) -> None:
    """``module.load_state_dict(state)`` (strict), with an error that names ``what`` was loaded and the fix."""
    try:
        module.load_state_dict(dict(state))
    except RuntimeError as error:
        raise RobustFTConfigError(
            f"The weights of {what} do not fit {type(module).__name__}: {error}. Build the module with the "
            "architecture of the checkpoints."
        ) from error


def save_weights_checkpoint(
    path: str | Path,
    module: nn.Module,
    source: Mapping[str, Any] | None = None,
    record: Mapping[str, Any] | None = None,
) -> Path:
    """Save ``module``'s weights as a weights-only Lightning checkpoint, with ``record``'s entries added at the top.

    Hyperparameters and other metadata are copied from ``source`` (a checkpoint of the same model) so that
    ``MyModule.load_from_checkpoint(path)`` rebuilds the model; training state (optimizers, callbacks, theta_0) is
    dropped.

    Returns:
        The path written (its folder is created).
    """
    checkpoint = {key: value for key, value in (source or {}).items() if key not in _TRAINING_STATE}
    checkpoint.setdefault("pytorch-lightning_version", lightning.__version__)
    checkpoint["state_dict"] = {
        name: value.detach().cpu() if isinstance(value, Tensor) else value
        for name, value in module.state_dict().items()
    }
    checkpoint.update(record or {})
    file = Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, file)
    return file
