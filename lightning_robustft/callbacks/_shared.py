"""What every callback shares: its checks, its refusals, its checkpoint helpers, and one convention for its hooks.

The callbacks are independent, but they check, refuse, restore and checkpoint the same things in the same way, so
their errors read alike (each names the callback, the argument and its value, what is available and how to fix it)
and a user who learned one callback's lifecycle knows them all. Model: Lightning's own callbacks
(``lightning.pytorch.callbacks.weight_averaging``): ``@override`` on every hook, one job per hook.

The convention, hook by hook (a callback leaves out the hooks it does not need):

* ``__init__``: validate the arguments (`check_config_number`, `check_dotted_name`, `check_selection`) and store them;
  no module or trainer yet.
* ``setup``: ``if stage != TrainerFn.FITTING: return`` (the one stage test); refuse what cannot be served
  (`refuse_unsupported`), resolve dotted names (`resolve_submodule`) and parameter globs
  (`select_parameters`), reset the state of a previous fit; module surgery that optimizers must see (LoRA's
  adapters) and hooks (the dropout pre-hook) are installed here, before ``configure_optimizers``.
* ``on_fit_start``: checks that need the strategy's wrapped model (`require_unused_parameters`); snapshots
  of the starting weights (WiSE-FT's theta_0).
* ``on_train_start``: tensors that need the model on its device and any checkpoint restored (anchors).
* **Giving the module back.** Whatever a callback changed on the module (hooks, adapters, ``requires_grad`` flags,
  norm modes, swapped weights) is given back by one idempotent method, called from ``on_train_end`` (a fit that
  ends: later callbacks, ``on_fit_end``, checkpoints and the user see the plain model), from ``on_exception`` (a
  fit that fails: Lightning then calls neither ``on_train_end`` nor ``teardown``) and, for what ``setup`` changed,
  from ``teardown`` (a fit with nothing to train, e.g. resumed from a finished run or ``limit_train_batches=0``:
  Lightning then skips ``on_train_start`` and ``on_train_end``). Weights swapped for a training
  step (GMixout's ``w~``) are given back when the step ends and, at the latest, in ``on_train_epoch_end``: so a
  callback that reads the final weights in its own ``on_train_end`` (WiSE-FT) sees ``w`` whatever its place in
  ``trainer.callbacks``.
* ``teardown``: frees the callback's own memory (moves anchors off the accelerator) and calls the method above
  (a no-op after ``on_train_end``).
* State: small scalars in ``state_dict`` / ``load_state_dict`` (the constructor's settings win; a changed setting
  warns through `warn_if_settings_changed`); tensors in ``on_save_checkpoint`` / ``on_load_checkpoint`` under
  a documented key, read with `checkpoint_entry` and copied in with `load_named_tensors`.
* Submodules are named by their role, as ``ImageClassifier`` names its attributes: ``head`` (the classification
  head) and ``backbone`` (the pretrained part), dotted names resolved with ``get_submodule``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy, Strategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_deprecation, rank_zero_warn
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightning_robustft.errors import RobustFTConfigError, RobustFTConfigTypeError

__all__ = [
    "HEAD_HINT",
    "SHARDED_STRATEGIES",
    "USE_DDP",
    "check_dotted_name",
    "check_selection",
    "checkpoint_entry",
    "example_names",
    "load_named_tensors",
    "matching_names",
    "no_match_message",
    "refuse_unsupported",
    "renamed_argument",
    "require_unused_parameters",
    "resolve_submodule",
    "select_parameters",
    "warn_if_settings_changed",
]

#: Strategies that shard parameters (or own the optimizer step), with what they do that a callback reading whole
#: weight tensors and gradients cannot work with. The one table every callback's refusal reads.
SHARDED_STRATEGIES: dict[type[Strategy], str] = {
    FSDPStrategy: "it shards parameters and gradients across ranks",
    ModelParallelStrategy: "it holds parameters and gradients as sharded DTensors",
    DeepSpeedStrategy: "its engine owns the optimizer step and partitions parameters, gradients and optimizer state "
    "(ZeRO), so whole tensors are not in `param.data` / `param.grad`",
}

#: The fix suggested when a strategy is refused, unless a callback needs another one.
USE_DDP = "Use strategy='ddp' (or a single device)."

#: The hint of an optional ``head`` argument that names the classification head.
HEAD_HINT = "Pass the dotted name of the classification head (e.g. 'model.fc'), or head=None if there is none."


def check_dotted_name(argument: str, value: Any, *, example: str, optional: bool = False) -> None:
    """Check, in a constructor, an argument that names a submodule by its dotted path (``get_submodule``'s form).

    Args:
        argument: the argument's name, quoted in the message (``"head"``, ``"backbone"``).
        value: what the constructor was given.
        example: a typical value shown in the message, e.g. ``"'head' or 'model.fc'"``.
        optional: ``None`` is allowed (the module has no such submodule).

    Raises:
        RobustFTConfigTypeError: ``value`` is not a string (nor ``None`` when ``optional``).
        RobustFTConfigError: ``value`` is the empty string.
    """
    if optional and value is None:
        return
    allowed = f"the dotted name of a submodule, e.g. {example}" + (", or None" if optional else "")
    if not isinstance(value, str):
        raise RobustFTConfigTypeError(f"`{argument}`={value!r} must be {allowed}.")
    if not value:
        raise RobustFTConfigError(f"`{argument}`={value!r} must be {allowed}.")


def renamed_argument(callback: str, old: str, old_value: Any, new: str, new_value: Any, default: Any) -> Any:
    """The value of the argument ``new``, also when it was passed under its deprecated name ``old``.

    Args:
        callback: the callback's class name, which starts the messages.
        old: the deprecated argument name.
        old_value: what was passed as ``old`` (``None``: not passed).
        new: the current argument name.
        new_value: what was passed as ``new`` (its default when not passed).
        default: the default of ``new``.

    Returns:
        ``old_value`` when it was passed (with a deprecation warning), else ``new_value``.

    Raises:
        RobustFTConfigError: both names were passed, with different values.
    """
    if old_value is None:
        return new_value
    if new_value != default and new_value != old_value:
        raise RobustFTConfigError(
            f"{callback} got `{new}`={new_value!r} and its deprecated name `{old}`={old_value!r}; pass `{new}` only."
        )
    rank_zero_deprecation(f"{callback}: `{old}` is deprecated and will be removed; pass `{new}`={old_value!r}.")
    return old_value


def resolve_submodule(module: nn.Module, name: str, argument: str = "head", hint: str = HEAD_HINT) -> nn.Module:
    """Return ``module.get_submodule(name)``, or raise an error that lists the top-level submodules.

    ``get_submodule``'s own ``AttributeError`` names only the missing attribute; a user who passed a wrong dotted name
    needs to see which names exist and what the argument is for.

    Args:
        module: the module the name is relative to (usually the ``LightningModule``).
        name: the dotted submodule name the user passed.
        argument: the constructor argument that holds ``name``, quoted in the error.
        hint: the last sentence of the error: what the argument should name, with an example.

    Returns:
        The submodule.

    Raises:
        RobustFTConfigError: ``name`` is not a submodule of ``module``.
    """
    try:
        return module.get_submodule(name)
    except AttributeError:
        children = [child for child, _ in module.named_children()]
        raise RobustFTConfigError(
            f"`{argument}`={name!r} is not a submodule of {type(module).__name__}; its top-level submodules are "
            f"{children}. {hint}"
        ) from None


def refuse_unsupported(
    strategy: Strategy,
    pl_module: LightningModule | None,
    *,
    callback: str,
    needs: str,
    fix: str = USE_DDP,
    manual_optimization: str | None = None,
) -> None:
    """Raise for a strategy or an optimization mode that ``callback`` cannot serve: the one refusal of every callback.

    Called in a callback's ``setup``, before any weight is touched, so that a run fails at once with the reason
    instead of training wrongly (a sharded weight read as a whole, an optimizer hook that never runs). The strategies
    refused are those of `SHARDED_STRATEGIES` (subclasses included); every other strategy (single device, DDP
    and its spawn / fork variants) keeps whole tensors on every rank.

    Args:
        strategy: the trainer's strategy.
        pl_module: the module being fit; only read when ``manual_optimization`` is given.
        callback: the callback's class name, which starts every message.
        needs: what the callback does that a sharded strategy breaks, e.g. ``"the penalty reads whole weight tensors
            and their full gradients"``.
        fix: the sentence that ends a strategy's refusal (what to use instead).
        manual_optimization: ``None`` when the callback works with manual optimization; otherwise the rest of the
            sentence that starts "with manual optimization the module steps the optimizer itself", i.e. why the
            callback needs automatic optimization and what to do instead.

    Raises:
        RobustFTConfigError: the strategy is refused, or the module uses manual optimization and the callback needs
            automatic optimization.
    """
    for cls, what in SHARDED_STRATEGIES.items():
        if isinstance(strategy, cls):
            raise RobustFTConfigError(
                f"{callback} does not support strategy {type(strategy).__name__}: {what}, while {needs}. {fix}"
            )
    if manual_optimization is not None and pl_module is not None and not pl_module.automatic_optimization:
        raise RobustFTConfigError(
            f"{callback} needs automatic optimization, but {type(pl_module).__name__}.automatic_optimization is "
            f"False: with manual optimization the module steps the optimizer itself, {manual_optimization}"
        )


def require_unused_parameters(trainer: Trainer, *, callback: str, why: str, fix: str) -> None:
    """Refuse a DDP-wrapped model whose reducer expects a gradient for every parameter in every step.

    Called in ``on_fit_start``, once the strategy has wrapped the model, from the wrapper's public
    ``find_unused_parameters`` (what the user chose, e.g. with ``strategy="ddp_find_unused_parameters_true"``).

    Args:
        trainer: the trainer; its ``strategy.model`` is read.
        callback: the callback's class name, which starts the message.
        why: why some parameters get no gradient in some steps.
        fix: what to use instead.

    Raises:
        RobustFTConfigError: the model is wrapped in ``DistributedDataParallel`` with ``find_unused_parameters=False``.
    """
    wrapped = trainer.strategy.model
    if isinstance(wrapped, DistributedDataParallel) and not wrapped.find_unused_parameters:
        raise RobustFTConfigError(
            f"{callback} with DDP needs `find_unused_parameters=True`: {why}, which plain DDP reports as an error. "
            f"{fix}"
        )


def warn_if_settings_changed(callback: str, saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """Warn when a checkpoint's callback state was trained with other settings than the constructor's.

    The constructor's settings are what the user asks for now, so they are kept; the warning says what changed, so
    that a resumed run that differs from the first one is not a surprise. Keys missing from ``saved`` (checkpoints of
    older versions) are ignored.

    Args:
        callback: the callback's class name, which starts the message.
        saved: the ``state_dict`` loaded from the checkpoint.
        current: the settings in use, ``{name: value}``.
    """
    trained = {key: saved[key] for key in current if key in saved}
    if any(current[key] != value for key, value in trained.items()):
        rank_zero_warn(f"{callback}: the checkpoint was trained with {trained}; resuming with {dict(current)}.")


def checkpoint_entry(
    trainer: Trainer, checkpoint: Mapping[str, Any], key: str, *, callback: str, without: str
) -> Any | None:
    """The entry ``key`` that a callback stored in ``checkpoint``, or ``None``; warn when a fit resumes without it.

    Only a fit uses a callback's tensors (validate / test / predict restore the weights alone), so nothing is read
    and nothing is said in the other stages.

    Args:
        trainer: the trainer (its stage is read).
        checkpoint: the checkpoint being loaded (``on_load_checkpoint``'s argument).
        key: the documented checkpoint key.
        callback: the callback's class name, which starts the warning.
        without: what happens without the entry, e.g. ``"the anchors start at the checkpoint's weights"``.

    Returns:
        ``checkpoint[key]``, or ``None`` when the trainer is not fitting or the key is missing.
    """
    if trainer.state.fn != TrainerFn.FITTING:
        return None
    if key not in checkpoint:
        rank_zero_warn(
            f"{callback}: the checkpoint has no {key!r} entry (it was not trained with {callback}), so {without}."
        )
        return None
    return checkpoint[key]


def load_named_tensors(
    destination: Sequence[torch.Tensor], names: Sequence[str], stored: Mapping[str, torch.Tensor], *, what: str
) -> None:
    """Copy checkpointed tensors into ``destination`` (in place), after checking they cover exactly ``names``.

    Args:
        destination: the callback's tensors, one per name (e.g. anchors already built for the current targets).
        names: the parameter names of ``destination``, in order.
        stored: ``{parameter name: tensor}`` read from the checkpoint.
        what: what the tensors are, for the message, e.g. ``"GMixout anchors"``.

    Raises:
        RobustFTConfigError: the checkpoint's names are not the current ones, or a shape differs: the run resumes
            with other targets or another model than it was trained with.
    """
    if set(stored) != set(names):
        missing, unexpected = sorted(set(names) - set(stored)), sorted(set(stored) - set(names))
        raise RobustFTConfigError(
            f"The checkpoint's {what} do not match the current targets: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}. Resume with the `targets` / `exclude` / `head` the checkpoint was trained with."
        )
    with torch.no_grad():
        for name, tensor in zip(names, destination, strict=True):
            if stored[name].shape != tensor.shape:
                raise RobustFTConfigError(
                    f"The checkpoint's {what} entry {name!r} has shape {tuple(stored[name].shape)}, the parameter "
                    f"{tuple(tensor.shape)}. Resume with the model the checkpoint was trained with."
                )
            tensor.copy_(stored[name])


def check_selection(
    targets: Sequence[str] | None, exclude: Sequence[str] | None, head: str | None, example: str
) -> None:
    """Check the ``targets`` / ``exclude`` / ``head`` constructor arguments of a callback that selects parameters.

    Only the types are checked here (the module is not known yet); ``setup`` resolves the patterns against it.

    Args:
        targets: globs over parameter names, or ``None`` for the callback's default.
        exclude: globs removing parameters from the targets, or ``None``.
        head: dotted name of the classification head, or ``None``.
        example: a pattern list shown in the error, e.g. ``"['backbone.*']"``.

    Raises:
        RobustFTConfigTypeError: a pattern list is a string or holds a non-string or empty pattern, or ``head`` is
            neither ``None`` nor a string.
        RobustFTConfigError: ``targets`` is empty, or ``head`` is the empty string.
    """
    for name, patterns in (("targets", targets), ("exclude", exclude)):
        if patterns is not None and (
            isinstance(patterns, str) or not all(isinstance(pat, str) and pat for pat in patterns)
        ):
            raise RobustFTConfigTypeError(
                f"`{name}`={patterns!r} must be a list of non-empty glob patterns over parameter names, e.g. {example}."
            )
    if targets is not None and not targets:
        raise RobustFTConfigError("`targets`=[] selects nothing; pass None for the default targets.")
    check_dotted_name("head", head, example="'head' or 'model.fc'", optional=True)


def matching_names(params: Mapping[str, Any], pattern: str) -> set[str]:
    """The keys of ``params`` that the shell-style glob ``pattern`` matches (case-sensitive; ``*`` crosses dots)."""
    return {name for name in params if fnmatch.fnmatchcase(name, pattern)}


def example_names(params: Mapping[str, Any], count: int = 8) -> list[str]:
    """The first ``count`` keys of ``params``: real names to show in an error, so the user can write a pattern."""
    return list(params)[:count]


def no_match_message(argument: str, pattern: str, params: Mapping[str, Any]) -> str:
    """The error message for a glob in ``argument`` that matches no key of ``params``, with some real names."""
    return (
        f"`{argument}` pattern {pattern!r} matches no parameter name (patterns are fnmatch globs, e.g. "
        f"'backbone.*.weight'). Some parameter names: {example_names(params)}."
    )


def select_parameters(
    module: nn.Module,
    targets: Sequence[str] | None,
    exclude: Sequence[str],
    head: str | None,
    *,
    default: Callable[[], Iterable[str]],
    frozen: str,
    why_trainable: str,
    nothing: str,
) -> list[str]:
    """Resolve ``targets`` / ``exclude`` globs to trainable floating-point parameter names (``named_parameters`` order).

    The callbacks that act on chosen tensors select them the same way, so a pattern that selects nothing fails with
    the same explanation (and real parameter names to copy) whichever callback it was given to.

    Args:
        module: the module whose ``named_parameters()`` are selected from.
        targets: globs selecting parameters; ``None`` takes ``default()``.
        exclude: globs removing parameters from the selection; each must match a parameter.
        head: the callback's ``head`` argument, only quoted when nothing is left (``default`` leaves the head out).
        default: the names selected when ``targets`` is ``None``; called only then, so it may raise (e.g. for a
            ``head`` that is not a submodule).
        frozen: what a ``targets`` pattern that matches no trainable parameter matched, e.g. ``"frozen parameters"``.
        why_trainable: why only trainable parameters can be selected, e.g. ``"GMixout mixes trainable ones only"``.
        nothing: the start of the error when nothing is left, e.g. ``"GMixoutCallback found no trainable weight to
            mix"``.

    Returns:
        The selected names: trainable floating-point parameters only.

    Raises:
        RobustFTConfigError: a pattern matches no parameter, a ``targets`` pattern matches only parameters that are
            frozen (or not floating point), ``default`` raises, or nothing is left.
    """
    params = dict(module.named_parameters())
    trainable = {name for name, param in params.items() if param.requires_grad and param.is_floating_point()}
    if targets is None:
        candidates = set(default()) & set(params)
    else:
        candidates = set()
        for pattern in targets:
            matched = matching_names(params, pattern)
            if not matched:
                raise RobustFTConfigError(no_match_message("targets", pattern, params))
            if not matched & trainable:
                raise RobustFTConfigError(
                    f"`targets` pattern {pattern!r} matches only {frozen} ({sorted(matched)[:5]}); {why_trainable}. "
                    "Unfreeze them or drop the pattern."
                )
            candidates |= matched
    for pattern in exclude:
        matched = matching_names(params, pattern)
        if not matched:
            raise RobustFTConfigError(no_match_message("exclude", pattern, params))
        candidates -= matched
    chosen = [name for name in params if name in candidates and name in trainable]
    if not chosen:
        raise RobustFTConfigError(
            f"{nothing} in {type(module).__name__} (targets={targets!r}, exclude={list(exclude)!r}, head={head!r}). "
            f"Name the tensors with `targets`, e.g. {example_names(params)}."
        )
    return chosen
