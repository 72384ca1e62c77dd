"""The no-grad evaluation loop of the weight-space tools, and the one rule that names validation sets.

WiSE-FT's sweep and the soups score many weight vectors on the same sets; they all go through
`evaluate_accuracy`, so a number in ``wiseft.csv`` and one in ``soup.csv`` mean the same thing. Sets are named by
`dataloader_names` everywhere, including `ImageClassifier`'s own logging, so the columns of those tables and the
``val/<set>/acc`` metrics of a fit agree.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import move_data_to_device
from torch import nn
from torchmetrics import MeanMetric

from lightning_robustft.errors import RobustFTConfigError

__all__ = [
    "CACHE_BYTES",
    "ForwardContext",
    "cache_batches",
    "dataloader_names",
    "evaluate_accuracy",
    "named_dataloaders",
    "resolve_id_set",
    "trainer_validation_sets",
]

ForwardContext = Callable[[], contextlib.AbstractContextManager[Any]]

CACHE_BYTES = 1 << 30
"""What `cache_batches` may hold in host memory by default: 1 GiB of batches, all sets together."""


def cache_batches(
    dataloaders: Mapping[str, Iterable[Any]],
    max_batches: Mapping[str, int | None] | None = None,
    budget_bytes: int = CACHE_BYTES,
) -> dict[str, Iterable[Any]]:
    """The sets' batches read once and kept in memory, for scoring many weight vectors on the same data.

    A WiSE-FT curve or a soup scores 5 to 20 weight vectors on the same sets; reading a small set once instead of
    once per vector saves the decoding and transforms (a 5-point curve of a demo cell: 14.3 s before, 6.3 s after,
    under cProfile). Sets are kept in the given order while their batches fit in ``budget_bytes`` together; a set
    that does not fit is returned as its dataloader (read anew each time), so large sets cost at most one wasted
    partial read.
    Accuracy does not depend on batch order, so a shuffling loader may be kept as read.

    Args:
        dataloaders: ``{set name: iterable of batches}``.
        max_batches: at most this many batches per set are read and kept (``None``: all), as the evaluation would.
        budget_bytes: the most tensor bytes to keep, over all sets.

    Returns:
        ``{set name: list of batches | the original dataloader}``.
    """
    cached: dict[str, Iterable[Any]] = {}
    remaining = budget_bytes
    for name, loader in dataloaders.items():
        batches: list[Any] = []
        size, fits = 0, True
        for batch in itertools.islice(loader, (max_batches or {}).get(name)):
            size += _tensor_bytes(batch)
            fits = size <= remaining
            if not fits:
                break
            batches.append(batch)
        cached[name] = batches if fits else loader
        remaining -= size if fits else 0
    return cached


def _tensor_bytes(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.nelement() * batch.element_size()
    if isinstance(batch, Mapping):
        return sum(_tensor_bytes(value) for value in batch.values())
    if isinstance(batch, (list, tuple)):
        return sum(_tensor_bytes(value) for value in batch)
    return 0


@torch.no_grad()
def evaluate_accuracy(
    module: nn.Module,
    dataloaders: Mapping[str, Iterable[Any]],
    *,
    device: torch.device | str | None = None,
    max_batches: Mapping[str, int | None] | None = None,
    forward_context: ForwardContext | None = None,
) -> dict[str, float]:
    """Top-1 accuracy of ``module`` on each set, in eval mode; every submodule's train/eval mode is restored after.

    A module with ``update_val_metrics(set, logits, y)`` and ``compute_val_metrics(set) -> {"acc": ...}`` (such as
    [`ImageClassifier`][lightning_robustft.ImageClassifier]) is scored by its own metrics, so class subsets and metric
    definitions match its validation; any other module by the fraction of ``argmax(forward(x)) == y``. Both are
    torchmetrics states, synced across DDP ranks when a process group is up.

    Args:
        module: the model to score, as it is (its weights are not changed).
        dataloaders: ``{set name: iterable of (x, y) batches}``.
        device: where to evaluate (default: the module's device).
        max_batches: at most this many batches per set (``None``: all).
        forward_context: a context-manager factory around each forward (e.g. the trainer's autocast).

    Returns:
        ``{set name: accuracy}`` as fractions in ``[0, 1]``.
    """
    target = torch.device(device) if device is not None else _module_device(module)
    context = forward_context or contextlib.nullcontext
    modes = {name: child.training for name, child in module.named_modules()}
    module.eval()
    try:
        return {
            name: _evaluate_set(module, name, loader, target, (max_batches or {}).get(name), context)
            for name, loader in dataloaders.items()
        }
    finally:
        for name, child in module.named_modules():
            child.training = modes.get(name, child.training)


def _evaluate_set(
    module: nn.Module,
    name: str,
    loader: Iterable[Any],
    device: torch.device,
    limit: int | None,
    context: ForwardContext,
) -> float:
    own_metrics = callable(getattr(module, "update_val_metrics", None)) and callable(
        getattr(module, "compute_val_metrics", None)
    )
    correct = None if own_metrics else MeanMetric().to(device)
    for index, batch in enumerate(loader):
        if limit is not None and index >= limit:
            break
        x, y = move_data_to_device(_split_batch(batch, name), device)
        with context():
            logits = module(x)
        if correct is None:
            module.update_val_metrics(name, logits, y)
        else:
            correct.update((logits.argmax(dim=-1) == y).float())
    if correct is None:
        return float(module.compute_val_metrics(name)["acc"])
    return float(correct.compute())


def _split_batch(batch: Any, name: str) -> tuple[Any, Any]:
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise RobustFTConfigError(
        f"Validation set {name!r} yields batches of type {type(batch).__name__}; evaluation needs (x, y) tuples. "
        "Make the dataloader return (inputs, labels)."
    )


def _module_device(module: nn.Module) -> torch.device:
    tensor = next(module.parameters(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def dataloader_names(loaders: Any, names: Sequence[str] | None = None, prefix: str = "val") -> list[str]:
    """The names of a stage's dataloaders: dict keys, else ``names`` when there are enough, else ``<prefix>_<i>``.

    Args:
        loaders: what Lightning hands over (``trainer.val_dataloaders``): a dict, a list or tuple, or one loader.
        names: the set names the module or data module declares, in loader order (extra names are ignored).
        prefix: the stage, for the fallback names (``val_0``, ``test_0``, ...).
    """
    if isinstance(loaders, Mapping):
        return list(loaders)
    count = len(loaders) if isinstance(loaders, (list, tuple)) else 1
    given = list(names or [])
    return given[:count] if len(given) >= count else [f"{prefix}_{index}" for index in range(count)]


def named_dataloaders(loaders: Any, set_names: Sequence[str] | None = None) -> dict[str, Iterable[Any]]:
    """Name validation dataloaders by `dataloader_names`: ``{name: loader}`` (empty for ``None``)."""
    if loaders is None:
        return {}
    if isinstance(loaders, Mapping):
        return dict(loaders)
    listed = list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]
    return dict(zip(dataloader_names(listed, set_names), listed, strict=True))


def resolve_id_set(names: Sequence[str], id_set: str | None) -> str:
    """``id_set`` if it is one of ``names``, the first name when it is ``None``; an error otherwise."""
    if not names:
        raise RobustFTConfigError("No validation sets: at least the ID validation set is needed.")
    if id_set is None:
        return names[0]
    if id_set not in names:
        raise RobustFTConfigError(f"`id_set`={id_set!r} is not a validation set; the sets are {list(names)}.")
    return id_set


def trainer_validation_sets(
    trainer: Trainer, pl_module: LightningModule
) -> tuple[dict[str, Iterable[Any]], dict[str, int | None]]:
    """The fit's validation loaders (with Lightning's distributed samplers) by name, and their batch limits.

    Lightning sets the loaders up lazily; after a fit that never validated, they are set up here.
    """
    if trainer.val_dataloaders is None:  # no validation ran during fit (no sanity check, or none scheduled)
        with contextlib.suppress(MisconfigurationException):  # raised when there is no val_dataloader at all
            trainer.fit_loop.epoch_loop.val_loop.setup_data()
    loaders = named_dataloaders(trainer.val_dataloaders, getattr(pl_module, "val_set_names", None))
    limits = list(trainer.num_val_batches)
    if len(limits) != len(loaders):
        return loaders, {}
    return loaders, {name: None if math.isinf(n) else int(n) for name, n in zip(loaders, limits, strict=True)}
