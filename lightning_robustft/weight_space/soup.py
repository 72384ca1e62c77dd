"""Model soups (Wortsman et al., ICML 2022): average the weights of several fine-tunes of one pretrained model.

A *soup* is one model whose weights are the mean of several fine-tuned models' weights ("ingredients"), for instance
the runs of a hyperparameter sweep. Fine-tunes that start from the same pretrained weights tend to stay in one
linearly connected basin, so their average is a good model too, and usually a better one, in distribution and under
shift, than the best single run; like WiSE-FT it costs nothing at inference (one model of the same architecture).
Models trained from *different* initialisations do not share a basin: their average is usually a broken model.

Two recipes, both after the fact on checkpoint files (or state dicts):

* `uniform_soup`: the plain average of every ingredient. Good when every fine-tune is good.
* `greedy_soup`: sort the ingredients by their own accuracy on the ID validation set, start from the best and
  add each next one only if the average with it does not lower the ID validation accuracy. A few bad runs (a too
  high learning rate, a diverged seed) are common in a sweep and drag a uniform soup down; the greedy soup leaves
  them out, and is never worse on the ID validation set than the best single ingredient.

`run_soup` evaluates every validation set (ID and OOD) for each ingredient and for the soup, writes
``soup.csv`` / ``soup.json`` and saves the soup as a weights-only checkpoint, like
`run_wiseft` does for WiSE-FT. Ingredients are read one at a time and
the running mean is kept in float64 on the CPU, so memory stays at a few copies of one model however many
ingredients there are, and a soup of identical checkpoints is bitwise that checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeAlias

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_robustft.errors import RobustFTConfigError
from lightning_robustft.evaluation.checkpoint import load_checkpoint, load_into, save_weights_checkpoint
from lightning_robustft.evaluation.loop import cache_batches, evaluate_accuracy, named_dataloaders, resolve_id_set
from lightning_robustft.evaluation.results import accuracy_row, check_set_names, format_row, round_row, write_results
from lightning_robustft.metrics import OOD_AVERAGE
from lightning_robustft.ops.interpolate import average_state_dicts, check_compatible

__all__ = [
    "SOUP_KEY",
    "SOUP_METHODS",
    "CheckpointLike",
    "SoupMethod",
    "SoupResult",
    "greedy_soup",
    "run_soup",
    "soup_checkpoint_name",
    "uniform_soup",
]

CheckpointLike: TypeAlias = "str | Path | Mapping[str, Any]"
"""A checkpoint file (Lightning checkpoint or bare state dict), a loaded checkpoint dict, or a state dict."""

SoupMethod = Literal["uniform", "greedy"]
SOUP_METHODS: tuple[str, ...] = ("uniform", "greedy")

SOUP_KEY = "model_soup"
"""Checkpoint key under which `run_soup` records the method and the ingredients of the saved soup."""

_RESERVED_COLUMNS = ("index", "name", "in_soup", OOD_AVERAGE)


@dataclass
class SoupResult:
    """What `greedy_soup` chose, and why.

    Attributes:
        state_dict: the soup's weights (CPU tensors; floating-point entries in the ingredients' dtype).
        ingredients: indices into the ``checkpoints`` argument of the ingredients in the soup, in the order they
            were added (the best single one first).
        names: a label for every checkpoint, by index: its path, or ``checkpoints[i]`` for an in-memory one.
        ingredient_accuracies: the ID validation accuracy of every checkpoint on its own, by index.
        accuracy: the soup's ID validation accuracy.
        id_set: the validation set used to choose.
        steps: the greedy trace, one entry per candidate in the order tried: ``{"index", "name", "id_acc",
            "added"}``, where ``id_acc`` is the accuracy of the soup with that candidate (the first entry is the
            best ingredient alone).
    """

    state_dict: dict[str, Any] = field(repr=False)
    ingredients: list[int]
    names: list[str]
    ingredient_accuracies: list[float]
    accuracy: float
    id_set: str
    steps: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ingredient_names(self) -> list[str]:
        """The labels (paths) of the ingredients in the soup, in the order they were added."""
        return [self.names[index] for index in self.ingredients]


# ----------------------------------------------------------------------------------------------- ingredients
@dataclass(frozen=True)
class _Source:
    label: str
    item: str | Path | Mapping[str, Any]

    def load(self, weights_only: bool) -> dict[str, Any]:
        """The checkpoint as a dict with a ``"state_dict"`` entry (a bare state dict is wrapped)."""
        return load_checkpoint(self.item, weights_only)


def _sources(checkpoints: Sequence[CheckpointLike]) -> list[_Source]:
    """Check the ``checkpoints`` argument up front (before any evaluation) and label each entry."""
    if isinstance(checkpoints, (str, Path, Mapping)) or not isinstance(checkpoints, Iterable):
        raise RobustFTConfigError(
            f"`checkpoints` must be a list of checkpoint paths or state dicts, got {type(checkpoints).__name__}; "
            "wrap a single one in a list."
        )
    items = list(checkpoints)
    if not items:
        raise RobustFTConfigError("`checkpoints` is empty: a soup needs at least one checkpoint.")
    sources = []
    for index, item in enumerate(items):
        if isinstance(item, Mapping):
            sources.append(_Source(f"checkpoints[{index}]", item))
        elif isinstance(item, (str, Path)):
            if not Path(item).is_file():
                raise FileNotFoundError(
                    f"`checkpoints[{index}]`: checkpoint path {str(item)!r} does not exist or is not a file."
                )
            sources.append(_Source(str(item), item))
        else:
            raise RobustFTConfigError(
                f"`checkpoints[{index}]` is a {type(item).__name__}; give a checkpoint path or a state dict."
            )
    return sources


def _skeleton(state: Mapping[str, Any]) -> dict[str, Any]:
    """Names, shapes and dtypes of a state dict, without its data (meta tensors), to check the others against."""
    return {
        name: torch.empty(value.shape, dtype=value.dtype, device="meta") if isinstance(value, Tensor) else None
        for name, value in state.items()
    }


def _check_ingredient(
    reference: tuple[str, dict[str, Any]] | None, label: str, state: Mapping[str, Any]
) -> tuple[str, dict[str, Any]]:
    """Return ``(label, skeleton)`` of the first ingredient; raise, naming both, if ``state`` does not match it."""
    if reference is None:
        return label, _skeleton(state)
    check_compatible(reference[0], reference[1], {label: state})
    return reference


# ------------------------------------------------------------------------------------------- the running mean
def _start_mean(state: Mapping[str, Any]) -> dict[str, Any]:
    """A float64 CPU copy of the floating-point entries (the rest cloned): the mean of one ingredient."""
    return {
        name: value.detach().to(device="cpu", dtype=torch.float64, copy=True)
        if isinstance(value, Tensor) and value.is_floating_point()
        else (value.detach().to("cpu", copy=True) if isinstance(value, Tensor) else value)
        for name, value in state.items()
    }


def _add_to_mean(mean: Mapping[str, Any], count: int, state: Mapping[str, Any]) -> dict[str, Any]:
    """The mean of ``count`` ingredients plus one more: weights ``count : 1``; non-float entries stay the mean's."""
    return average_state_dicts([mean, state], weights=[count, 1])


def _cast_like(mean: Mapping[str, Any], skeleton: Mapping[str, Any]) -> dict[str, Any]:
    """The float64 mean cast back to the ingredients' dtypes."""
    return {
        name: value.to(skeleton[name].dtype) if isinstance(value, Tensor) and value.is_floating_point() else value
        for name, value in mean.items()
    }


def _metadata(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in checkpoint.items() if key != "state_dict"}


# ---------------------------------------------------------------------------------------------- the recipes
def uniform_soup(checkpoints: Sequence[CheckpointLike], *, weights_only: bool = False) -> dict[str, Any]:
    """The uniform soup: the elementwise mean of the ingredients' weights.

    It needs no validation data and uses every ingredient, which is what you want when all of them are good
    fine-tunes of the **same** pretrained model (a hyperparameter sweep from one initialisation). One bad ingredient
    (a diverged run) pulls the whole average down: use `greedy_soup` when that can happen.

    Floating-point tensors are averaged (in float64, cast back to their dtype); integer buffers (BatchNorm's
    ``num_batches_tracked``) and other non-float entries are taken from the first checkpoint. The ingredients are
    read one at a time, so memory does not grow with their number.

    Args:
        checkpoints: checkpoint files (Lightning checkpoints or bare state dicts), loaded checkpoint dicts (with a
            ``"state_dict"``) or state dicts.
        weights_only: passed to ``torch.load`` when reading files (``False`` reads checkpoints that carry
            hyperparameter objects; only load files you trust).

    Returns:
        The soup's state dict (CPU tensors, keys and dtypes of the first checkpoint).

    Raises:
        RobustFTConfigError: no checkpoints, a missing file (named), or state dicts that disagree in keys or shapes
            (the keys are listed).

    Example::

        model.load_state_dict(uniform_soup(["runs/lr1e-5.ckpt", "runs/lr3e-5.ckpt", "runs/lr1e-4.ckpt"]))
    """
    return _uniform(_sources(checkpoints), weights_only)[0]


def _uniform(sources: Sequence[_Source], weights_only: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """The uniform soup and the first checkpoint's metadata (hyperparameters, for saving)."""
    reference = None
    mean: dict[str, Any] = {}
    metadata: dict[str, Any] = {}
    for count, source in enumerate(sources):
        checkpoint = source.load(weights_only)
        state = checkpoint["state_dict"]
        reference = _check_ingredient(reference, source.label, state)
        if count == 0:
            mean, metadata = _start_mean(state), _metadata(checkpoint)
        else:
            mean = _add_to_mean(mean, count, state)
    return _cast_like(mean, reference[1]), metadata


def greedy_soup(
    module: nn.Module,
    checkpoints: Sequence[CheckpointLike],
    dataloaders: Any,
    *,
    id_set: str | None = None,
    device: torch.device | str | None = None,
    max_batches: Mapping[str, int | None] | None = None,
    weights_only: bool = False,
) -> SoupResult:
    """The greedy soup: add ingredients, best first, only while the ID validation accuracy does not drop.

    Wortsman et al.'s recipe: score every checkpoint on the ID validation set, sort them by that accuracy
    (descending; ties keep the given order), start the soup from the best one, and try each next one in turn: it
    joins when the uniform average of the soup's ingredients and it scores at least as well as the soup without it
    (``>=``, as in the paper). Bad fine-tunes, and checkpoints from another initialisation whose average with the
    others is broken, are left out, so the soup never scores below the best single checkpoint on the ID validation
    set. The choice uses **only the ID validation set**: the OOD sets are not even iterated (choosing on them would
    report a number tuned on the test distributions).

    Args:
        module: a model of the checkpoints' architecture; each candidate is loaded into it to be scored, and it is
            left holding the soup.
        checkpoints: checkpoint files, loaded checkpoint dicts or state dicts of fine-tunes of one pretrained model.
        dataloaders: the validation loaders (``{set name: loader}``, a list named by ``module.val_set_names`` or
            ``val_<i>``, or one loader); only the ID one is used.
        id_set: the ID validation set (default: ``module.id_set``, else the first set).
        device: move the module there to evaluate (default: where it is).
        max_batches: at most this many batches per set (``{set name: n}``; ``None``: all).
        weights_only: passed to ``torch.load`` when reading files.

    Returns:
        A `SoupResult`: the ingredients chosen, every checkpoint's own ID accuracy, the soup's ID accuracy,
        the greedy trace and the state dict.

    Raises:
        RobustFTConfigError: no checkpoints, a missing file (named), mismatched state dicts (keys listed), an
            unknown ``id_set``, or weights that do not fit ``module``.

    Example::

        result = greedy_soup(model, sorted(Path("sweep").glob("*.ckpt")), dm.val_dataloader(), id_set="imagenet")
        print(result.ingredient_names, result.accuracy)  # model now holds the soup
    """
    sources = _sources(checkpoints)
    loaders = named_dataloaders(dataloaders, getattr(module, "val_set_names", None))
    resolved_id = resolve_id_set(list(loaders), id_set or getattr(module, "id_set", None))
    id_loader = cache_batches({resolved_id: loaders[resolved_id]}, max_batches)  # read once, scored per trial
    if device is not None:
        module.to(device)
    reference = None
    scores = []
    for source in sources:
        state = source.load(weights_only)["state_dict"]
        reference = _check_ingredient(reference, source.label, state)
        load_into(module, state, source.label)
        scores.append(evaluate_accuracy(module, id_loader, max_batches=max_batches)[resolved_id])
        rank_zero_info(f"Greedy soup: {source.label} alone: {resolved_id}={scores[-1]:.4f}")
    return _greedy(module, sources, scores, id_loader, max_batches, weights_only)[0]


def _greedy(
    module: nn.Module,
    sources: Sequence[_Source],
    scores: Sequence[float],
    id_loader: Mapping[str, Iterable[Any]],
    max_batches: Mapping[str, int | None] | None,
    weights_only: bool,
) -> tuple[SoupResult, dict[str, Any]]:
    """The greedy pass over already-scored, already-checked ingredients; also returns the best one's metadata.

    ``id_loader`` holds the ID set only, so nothing else can be looked at while choosing.
    """
    (id_name,) = id_loader
    order = sorted(range(len(sources)), key=lambda index: -scores[index])
    best = order[0]
    checkpoint = sources[best].load(weights_only)
    skeleton = _skeleton(checkpoint["state_dict"])
    mean, metadata = _start_mean(checkpoint["state_dict"]), _metadata(checkpoint)
    del checkpoint
    chosen, accuracy = [best], float(scores[best])
    steps = [{"index": best, "name": sources[best].label, "id_acc": accuracy, "added": True}]
    for index in order[1:]:
        trial = _add_to_mean(mean, len(chosen), sources[index].load(weights_only)["state_dict"])
        load_into(module, _cast_like(trial, skeleton), f"the soup with {sources[index].label}")
        trial_accuracy = evaluate_accuracy(module, id_loader, max_batches=max_batches)[id_name]
        added = trial_accuracy >= accuracy
        if added:
            mean, accuracy = trial, trial_accuracy
            chosen.append(index)
        steps.append({"index": index, "name": sources[index].label, "id_acc": trial_accuracy, "added": added})
        rank_zero_info(
            f"Greedy soup: with {sources[index].label}: {id_name}={trial_accuracy:.4f} -> "
            + (f"added ({len(chosen)} ingredients)" if added else f"left out (soup stays at {accuracy:.4f})")
        )
    state = _cast_like(mean, skeleton)
    load_into(module, state, "the soup")
    result = SoupResult(
        state_dict=state,
        ingredients=chosen,
        names=[source.label for source in sources],
        ingredient_accuracies=[float(score) for score in scores],
        accuracy=accuracy,
        id_set=id_name,
        steps=steps,
    )
    return result, metadata


# --------------------------------------------------------------------------------- after the fact, from files
def soup_checkpoint_name(method: str) -> str:
    """File name of the saved soup, e.g. ``soup_greedy.ckpt``."""
    return f"soup_{method}.ckpt"


def run_soup(
    module: nn.Module,
    checkpoints: Sequence[CheckpointLike],
    dataloaders: Any,
    *,
    method: SoupMethod = "greedy",
    output_dir: str | Path = "soup",
    id_set: str | None = None,
    device: torch.device | str | None = None,
    max_batches: Mapping[str, int | None] | None = None,
    weights_only: bool = False,
) -> dict[str, Any]:
    """Cook a soup from checkpoint files, evaluate it and every ingredient on every set, and save it.

    Every validation set (ID and OOD) is evaluated for each ingredient and for the soup, so the table shows what the
    soup gains over its ingredients, in distribution and under shift; the greedy choice itself only reads the ID
    column. Writes into ``output_dir``:

    * ``soup.csv`` and ``soup.json``: one row per ingredient and one for the soup (``index``, ``name``,
      ``in_soup``, a column per set, ``ood_avg`` when there are OOD sets); the JSON adds ``method``, ``id_set``,
      ``ood_sets``, ``ingredients`` (the chosen ones, in the order added), ``checkpoint`` and, for the greedy
      soup, ``greedy_steps``.
    * ``soup_<method>.ckpt``: a weights-only Lightning checkpoint of the soup, with the hyperparameters of its first
      ingredient (so ``MyModule.load_from_checkpoint(path)`` works, as does
      ``model.load_state_dict(torch.load(path)["state_dict"])``) and the ingredients under ``"model_soup"``.

    Example::

        model = ImageClassifier(backbone="open_clip:ViT-B-32:openai", class_names=names)
        dm = MultiDomainDataModule(...); dm.setup("validate")
        summary = run_soup(model, sorted(Path("sweep").glob("*/last.ckpt")), dm.val_dataloader(), method="greedy")

    Args:
        module: a model of the checkpoints' architecture; it is left holding the soup.
        checkpoints: the ingredients: checkpoint files, loaded checkpoint dicts or state dicts of fine-tunes of one
            pretrained model.
        dataloaders: validation loaders: ``{set name: loader}``, a list (named by ``module.val_set_names`` or
            ``val_<i>``) or one loader.
        method: ``"greedy"`` (`greedy_soup`, chosen on the ID set) or ``"uniform"`` (`uniform_soup`).
        output_dir: where ``soup.csv`` / ``soup.json`` / ``soup_<method>.ckpt`` go.
        id_set: the ID set (default: ``module.id_set`` or the first set); the others are OOD.
        device: move the module there to evaluate (default: where it is).
        max_batches: at most this many batches per set (``{set name: n}``; ``None``: all).
        weights_only: passed to ``torch.load`` when reading the checkpoints.

    Returns:
        The summary written to ``soup.json``.

    Raises:
        RobustFTConfigError: an unknown ``method``, no checkpoints, a missing file (named), mismatched state dicts
            (keys listed), an unknown ``id_set`` or a set named like a column.
    """
    if method not in SOUP_METHODS:
        raise RobustFTConfigError(f"`method`={method!r}; allowed: 'greedy' (chosen on the ID set), 'uniform'.")
    sources = _sources(checkpoints)
    loaders = named_dataloaders(dataloaders, getattr(module, "val_set_names", None))
    resolved_id = resolve_id_set(list(loaders), id_set or getattr(module, "id_set", None))
    check_set_names(list(loaders), _RESERVED_COLUMNS)
    loaders = cache_batches(loaders, max_batches)  # every ingredient and trial soup reads the same batches
    if device is not None:
        module.to(device)

    reference = None
    accuracies = []
    for source in sources:
        state = source.load(weights_only)["state_dict"]
        reference = _check_ingredient(reference, source.label, state)
        load_into(module, state, source.label)
        accuracies.append(evaluate_accuracy(module, loaders, max_batches=max_batches))
        rank_zero_info(f"Soup ingredient {source.label}: " + format_row(accuracies[-1]))
        del state

    steps = None
    if method == "greedy":
        scores = [row[resolved_id] for row in accuracies]
        result, metadata = _greedy(
            module, sources, scores, {resolved_id: loaders[resolved_id]}, max_batches, weights_only
        )
        chosen, steps = result.ingredients, result.steps
    else:
        state, metadata = _uniform(sources, weights_only)
        load_into(module, state, "the soup")
        chosen = list(range(len(sources)))
    soup_accuracy = evaluate_accuracy(module, loaders, max_batches=max_batches)
    rank_zero_info(f"{method.capitalize()} soup of {len(chosen)}: " + format_row(soup_accuracy))

    record = {
        "method": method,
        "ingredients": [sources[index].label for index in chosen],
        "indices": chosen,
        "id_set": resolved_id,
    }
    path = Path(output_dir) / soup_checkpoint_name(method)
    checkpoint = save_weights_checkpoint(path, module, metadata, {SOUP_KEY: record})
    rows = [
        _row(index, source.label, index in chosen, row, resolved_id)
        for index, (source, row) in enumerate(zip(sources, accuracies, strict=True))
    ]
    rows.append(_row(None, f"{method}_soup", None, soup_accuracy, resolved_id))
    summary: dict[str, Any] = {
        "method": method,
        "id_set": resolved_id,
        "ood_sets": [name for name in loaders if name != resolved_id],
        "ingredients": record["ingredients"],
        "checkpoint": str(checkpoint),
        "rows": rows,
    }
    if steps is not None:
        summary["greedy_steps"] = [round_row(step) for step in steps]
    write_results(summary, output_dir, "soup")
    return summary


def _row(
    index: int | None, name: str, in_soup: bool | None, accuracy: Mapping[str, float], id_set: str
) -> dict[str, Any]:
    return round_row({"index": index, "name": name, "in_soup": in_soup, **accuracy_row(accuracy, id_set)})
