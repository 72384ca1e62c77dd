"""The checks every callback makes on what it is given: its arguments, the module and the trainer's strategy.

The callbacks are independent, but they refuse the same things in the same way: a dotted submodule name that does
not exist, a strategy that shards the weights they read whole, manual optimization that bypasses their optimizer
hooks, glob patterns that select nothing. Keeping those checks here keeps their error messages consistent (each names
the callback, the argument and its value, what is available and how to fix it) while every callback still states its
own reasons.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy, Strategy
from torch import nn

from lightning_robustft.errors import RobustFTConfigError

#: Strategies that shard parameters (or own the optimizer step), so no callback here can read whole weight tensors.
SHARDED_STRATEGIES: tuple[type[Strategy], ...] = (FSDPStrategy, ModelParallelStrategy, DeepSpeedStrategy)

#: The fix suggested when a strategy is refused, unless a callback needs another one.
USE_DDP = "Use strategy='ddp' (or a single device)."

#: The hint of an optional ``head`` argument that names the classification head.
HEAD_HINT = "Pass the dotted name of the classification head (e.g. 'model.fc'), or head=None if there is none."


def is_real(value: Any) -> bool:
    """Whether ``value`` is an ``int`` or ``float`` but not a ``bool`` (which Python counts as an ``int``).

    Constructors check numeric arguments with it so that ``p=True`` is refused instead of read as ``1``.
    """
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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
    why: Mapping[type[Strategy], str],
    fix: str = USE_DDP,
    manual_optimization: str | None = None,
) -> None:
    """Raise for a strategy or an optimization mode that ``callback`` cannot serve.

    Called in a callback's ``setup``, before any weight is touched, so that a run fails at once with the reason
    instead of training wrongly (a sharded weight read as a whole, an optimizer hook that never runs).

    Args:
        strategy: the trainer's strategy.
        pl_module: the module being fit; only read when ``manual_optimization`` is given.
        callback: the callback's class name, which starts every message.
        why: ``{strategy class: reason}``; a strategy that is an instance of a key is refused with that reason.
        fix: the sentence that ends a strategy's refusal (what to use instead).
        manual_optimization: ``None`` when the callback works with manual optimization; otherwise the rest of the
            sentence that starts "with manual optimization the module steps the optimizer itself", i.e. why the
            callback needs automatic optimization and what to do instead.

    Raises:
        RobustFTConfigError: the strategy is refused, or the module uses manual optimization and the callback needs
            automatic optimization.
    """
    for cls, reason in why.items():
        if isinstance(strategy, cls):
            raise RobustFTConfigError(
                f"{callback} does not support strategy {type(strategy).__name__}: {reason}. {fix}"
            )
    if manual_optimization is not None and pl_module is not None and not pl_module.automatic_optimization:
        raise RobustFTConfigError(
            f"{callback} needs automatic optimization, but {type(pl_module).__name__}.automatic_optimization is "
            f"False: with manual optimization the module steps the optimizer itself, {manual_optimization}"
        )


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
        RobustFTConfigError: a pattern list is a string, holds a non-string or empty pattern, ``targets`` is empty, or
            ``head`` is neither ``None`` nor a non-empty string.
    """
    for name, patterns in (("targets", targets), ("exclude", exclude)):
        if patterns is not None and (
            isinstance(patterns, str) or not all(isinstance(pat, str) and pat for pat in patterns)
        ):
            raise RobustFTConfigError(
                f"`{name}`={patterns!r} must be a list of non-empty glob patterns over parameter names, e.g. {example}."
            )
    if targets is not None and not targets:
        raise RobustFTConfigError("`targets`=[] selects nothing; pass None for the default targets.")
    if head is not None and (not isinstance(head, str) or not head):
        raise RobustFTConfigError(f"`head`={head!r} must be a dotted submodule name such as 'head', or None.")


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
