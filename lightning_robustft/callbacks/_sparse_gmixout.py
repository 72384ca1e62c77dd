"""Sparse GMixout's machinery: packed free entries as the only trainable tensors, ``w~`` built one layer at a time.

``GMixoutCallback(sparse=True)`` drives a `SparseMixout`. Per target weight ``w`` (``n`` entries) it keeps

* ``w`` itself, still the module's ``nn.Parameter`` under its own name, but with ``requires_grad=False`` during fit,
  so neither the optimizer nor DDP sees it; it is kept current (``w[I] = v``) after every optimizer step;
* a **packed** ``nn.Parameter`` ``v`` of ``m = round((1-p)*n)`` entries, registered on the module that owns ``w``
  next to it (as ``<name>_gmixout_free``), so that ``configure_optimizers`` finds it in ``self.parameters()`` or
  ``self.backbone.parameters()`` alike, with ``w``'s dtype and ``w``'s number of dimensions (shape ``(m, 1, ...)``:
  rules that decide weight decay by ``ndim`` treat it as the weight it stands for). It is hidden from
  ``state_dict()`` and ``load_state_dict()`` by hooks on the owner, so checkpoints hold plain ``w`` only;
* the fp32 anchor ``a`` and the period's sorted int32 indices ``I`` (callback state, not module state).

The mixed weight ``w~`` is never a tensor of the model. During a training step (from ``on_train_batch_start`` to
``on_after_backward``) each owner's class is swapped for a subclass whose attribute ``<name>`` is a property (the
mechanism of ``torch.nn.utils.parametrize``, applied only for the step): reading ``module.weight`` runs
`_SparseMix`, a custom autograd function that builds ``w~`` from ``a``, ``v`` and ``I`` and whose backward
turns the gradient of ``w~`` (full size, one layer at a time) into the packed gradient ``s * g[I]``. The layer would
normally keep ``w~`` for its own backward (a linear layer needs it for the input's gradient); a
``torch.autograd.graph.saved_tensors_hooks`` pair replaces any saved ``w~`` (or view of it) by a small token and
rebuilds it from ``a, v, I`` when the backward needs it. So ``w~`` lives only while its layer runs, forward or
backward, and the persistent memory per target entry is ``w`` + ``a`` + ``(1-p)`` x (``v``, its gradient, the
optimizer's state and an int32 index): about 10 bytes at ``p = 0.9`` with fp32 AdamW, against 16 for full
fine-tuning. The price is a second build of ``w~`` per layer in the backward.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from lightning_robustft.callbacks._shared import load_named_tensors
from lightning_robustft.errors import RobustFTConfigError
from lightning_robustft.ops.mixout import Backend as RequestedBackend
from lightning_robustft.ops.mixout import mix_scale, resolve_backend
from lightning_robustft.ops.sparse_mixout import (
    Backend,
    Workspace,
    draw_free_indices,
    free_count,
    gather,
    mix,
    packed_grad,
    scatter_,
    update_anchor_,
)

#: Suffix of the packed parameter registered next to each target (``weight`` -> ``weight_gmixout_free``).
PACKED_SUFFIX = "_gmixout_free"


@dataclass(eq=False)
class SparseTarget:
    """One mixed weight: where it lives, its packed free values, and (once training starts) anchor and indices."""

    name: str
    owner: nn.Module
    attr: str
    weight: nn.Parameter
    packed: nn.Parameter
    count: int
    anchor: torch.Tensor | None = None
    indices: torch.Tensor | None = None

    @property
    def packed_name(self) -> str:
        """The packed parameter's name in ``named_parameters()`` during fit."""
        prefix = self.name[: -len(self.attr)]
        return prefix + self.attr + PACKED_SUFFIX


@dataclass(frozen=True)
class _Saved:
    """What the saved-tensor hook keeps instead of a ``w~`` that a layer saves for its backward."""

    target: SparseTarget
    size: torch.Size
    stride: tuple[int, ...]
    offset: int


class _SparseMix(torch.autograd.Function):
    """``w~`` from the packed values (the only differentiable input); backward gathers ``s * g[I]``."""

    @staticmethod
    def forward(ctx: Any, packed: torch.Tensor, engine: SparseMixout, target: SparseTarget) -> torch.Tensor:
        ctx.engine, ctx.target = engine, target
        return engine.build(target)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        engine, target = ctx.engine, ctx.target
        weight = target.weight
        if grad.stride() != weight.stride():  # rare: autograd gave the gradient another layout; walk w's memory order
            grad = torch.empty_like(weight).copy_(grad)
        assert target.indices is not None
        packed = packed_grad(grad, target.indices, engine.scale, engine.backend)
        return packed.view(target.packed.shape), None, None


class SparseMixout:
    """The state and the steps of sparse GMixout over a fixed list of target parameters of one module.

    Lifecycle, driven by the callback: `attach` (``setup``, before ``configure_optimizers``), `start`
    (``on_train_start``: anchors, first subset, optimizer checks), then per step `begin_period` at a new
    period, `activate` / `deactivate` around forward and backward, `write_back` after each optimizer
    step (an optimizer step post-hook); `detach` at the end of fit or on an exception.

    Args:
        module: the module whose parameters are mixed (the ``LightningModule``).
        names: target parameter names, as in ``module.named_parameters()``.
        p: probability that an entry is held at the anchor, in ``[0, 1)``.
        seed: the mask seed, the same on every rank.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``, resolved in `start` on the training device.
    """

    def __init__(
        self, module: nn.Module, names: Sequence[str], p: float, seed: int, backend: RequestedBackend = "auto"
    ) -> None:
        self.p = p
        self.seed = seed
        self.scale = mix_scale(p)
        self.requested_backend = backend
        self.backend: Backend = "torch"
        self.targets: list[SparseTarget] = []
        params = dict(module.named_parameters())
        for name in names:
            owner_name, _, attr = name.rpartition(".")
            owner = module.get_submodule(owner_name)
            weight = params[name]
            if owner._parameters.get(attr) is not weight:
                raise RobustFTConfigError(
                    f"Sparse GMixout cannot mix {name!r}: it is not registered as a parameter of "
                    f"{type(owner).__name__} under {attr!r} (a shared or re-registered tensor?). Exclude it."
                )
            if hasattr(owner, attr + PACKED_SUFFIX):
                raise RobustFTConfigError(
                    f"Sparse GMixout needs the attribute name {attr + PACKED_SUFFIX!r} on {type(owner).__name__} for "
                    f"the free entries of {name!r}, but it is taken. Rename that attribute or exclude {name!r}."
                )
            count = free_count(weight.numel(), p)
            shape = (count,) + (1,) * (weight.ndim - 1)
            packed = nn.Parameter(torch.zeros(shape, dtype=weight.dtype, device=weight.device))
            self.targets.append(SparseTarget(name, owner, attr, weight, packed, count))
        self.period = 0
        self._handles: list[RemovableHandle] = []
        self._classes: dict[nn.Module, tuple[type[nn.Module], type[nn.Module]]] = {}
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None
        self._live: dict[int, tuple[SparseTarget, weakref.ref[torch.Tensor]]] = {}
        self._optimizers: list[Optimizer] = []
        self.attached = False
        self._workspace = Workspace()

    # ------------------------------------------------------------------------------------------------ lifecycle

    def attach(self) -> None:
        """Register the packed parameters next to their targets, freeze the targets, hide the packed from state dicts.

        Before ``configure_optimizers`` (and before DDP wraps the module), so both see the packed tensors as the
        trainable ones and the targets as frozen.
        """
        owners: dict[nn.Module, list[SparseTarget]] = {}
        for target in self.targets:
            target.owner.register_parameter(target.attr + PACKED_SUFFIX, target.packed)
            target.weight.requires_grad_(False)
            owners.setdefault(target.owner, []).append(target)
        for owner, targets in owners.items():
            keys = [t.attr + PACKED_SUFFIX for t in targets]
            self._handles.append(owner.register_state_dict_post_hook(_drop_keys(keys)))
            self._handles.append(owner.register_load_state_dict_pre_hook(_supply_keys(keys)))
            self._handles.append(owner.register_load_state_dict_post_hook(_regather(self, targets)))
            base = type(owner)
            props = {t.attr: property(self._getter(t)) for t in targets}
            swapped = type(
                base.__name__, (base,), {**props, "__module__": base.__module__, "__qualname__": base.__qualname__}
            )
            self._classes[owner] = (base, swapped)
        self.attached = True

    def start(self, period: int, optimizers: Sequence[Optimizer], anchors: Mapping[str, torch.Tensor] | None) -> None:
        """On the training device, after any restore: anchors, the subset of ``period``, its packed values, hooks.

        Raises:
            RobustFTConfigError: a packed tensor is in no optimizer (``configure_optimizers`` must build the optimizer
                from the module's parameters after ``setup``).
        """
        self.backend = resolve_backend(self.requested_backend, [t.weight for t in self.targets])
        owned = {id(param) for optimizer in optimizers for group in optimizer.param_groups for param in group["params"]}
        missing = [t.packed_name for t in self.targets if id(t.packed) not in owned]
        if missing:
            raise RobustFTConfigError(
                f"GMixoutCallback(sparse=True): the optimizer does not train {len(missing)} packed tensors "
                f"({missing[:3]}...). They are registered next to their weights in `setup`; build the optimizer in "
                "`configure_optimizers` from the module's parameters (e.g. `self.parameters()`), not from a list "
                "made before `trainer.fit`."
            )
        with torch.no_grad():
            for target in self.targets:
                w = target.weight
                target.anchor = torch.empty_like(w, dtype=torch.float32).copy_(w)
            if anchors is not None:
                self.load_anchors(anchors)
        self._optimizers = [opt for opt in optimizers if any(id(t.packed) in _param_ids(opt) for t in self.targets)]
        for optimizer in self._optimizers:
            self._handles.append(optimizer.register_step_post_hook(lambda *_: self.write_back()))
        self._draw(period)

    def begin_period(self, period: int, anchor_decay: float) -> None:
        """A new period: move the anchor toward ``w``, draw the new subset, gather it, reset its optimizer state.

        ``w`` is current (every optimizer step wrote the packed values back), so the anchor moves toward the learned
        weights exactly as in dense GMixout.
        """
        self.deactivate()
        with torch.no_grad():
            for target in self.targets:
                assert target.anchor is not None
                update_anchor_(target.anchor, target.weight, anchor_decay)
        self._draw(period)
        for optimizer in self._optimizers:
            for target in self.targets:
                optimizer.state.pop(target.packed, None)

    def activate(self) -> None:
        """Serve ``w~`` for the step's forward and backward: swap the owners' classes, install saved-tensor hooks."""
        if self._hooks is not None:
            return
        self._live.clear()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        for owner, (_, swapped) in self._classes.items():
            owner.__class__ = swapped

    def deactivate(self) -> None:
        """Back to the plain modules (``module.weight`` is ``w``); a no-op when not active."""
        if self._hooks is None:
            return
        for owner, (base, _) in self._classes.items():
            owner.__class__ = base
        self._hooks.__exit__(None, None, None)
        self._hooks = None
        self._live.clear()

    def write_back(self) -> None:
        """``w[I] <- v`` for every target: after each optimizer step, so ``w`` is current outside the step."""
        with torch.no_grad():
            for target in self.targets:
                assert target.indices is not None
                scatter_(target.weight, target.indices, target.packed, self.backend, self._workspace)

    def detach(self) -> None:
        """Remove everything: the packed parameters, hooks and class swaps; unfreeze the targets. Idempotent."""
        self.deactivate()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self.attached:
            for target in self.targets:
                target.owner._parameters.pop(target.attr + PACKED_SUFFIX, None)
                target.weight.requires_grad_(True)
        self.attached = False
        self._optimizers = []

    def resident_mixed(self) -> int:
        """How many ``w~`` built in this step are still alive (diagnostics: 0 between forward and backward)."""
        return sum(ref() is not None for _, ref in self._live.values())

    # ---------------------------------------------------------------------------------------------- internals

    def load_anchors(self, anchors: Mapping[str, torch.Tensor]) -> None:
        """Copy checkpointed anchors in, after checking they cover exactly the targets with the right shapes."""
        mine = [target.anchor for target in self.targets]
        assert all(anchor is not None for anchor in mine)
        load_named_tensors(mine, [t.name for t in self.targets], anchors, what="GMixout anchors")  # type: ignore[arg-type]

    def build(self, target: SparseTarget) -> torch.Tensor:
        """A fresh ``w~`` of ``target`` (no autograd), laid out like the weight."""
        assert target.anchor is not None and target.indices is not None
        with torch.no_grad():
            out = torch.empty_like(target.weight)
            return mix(target.anchor, target.packed, target.indices, self.scale, out, self.backend, self._workspace)

    def _draw(self, period: int) -> None:
        with torch.no_grad():
            for i, target in enumerate(self.targets):
                w = target.weight
                target.indices = draw_free_indices(w.numel(), target.count, self.seed, period, i, w.device)
                gather(w, target.indices, target.packed.data, self.backend)
        self.period = period

    def _getter(self, target: SparseTarget) -> Callable[[nn.Module], torch.Tensor]:
        def mixed(_: nn.Module) -> torch.Tensor:
            out = _SparseMix.apply(target.packed, self, target)
            if out.requires_grad:
                self._live[out.untyped_storage().data_ptr()] = (target, weakref.ref(out))
            return out

        return mixed

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor | _Saved:
        if not self._live or tensor.layout != torch.strided:
            return tensor
        entry = self._live.get(tensor.untyped_storage().data_ptr())
        if entry is None or entry[1]() is None or tensor.dtype != entry[0].weight.dtype:
            return tensor
        return _Saved(entry[0], tensor.size(), tensor.stride(), tensor.storage_offset())

    def _unpack(self, saved: torch.Tensor | _Saved) -> torch.Tensor:
        if not isinstance(saved, _Saved):
            return saved
        return self.build(saved.target).as_strided(saved.size, saved.stride, saved.offset)


def _param_ids(optimizer: Optimizer) -> set[int]:
    return {id(param) for group in optimizer.param_groups for param in group["params"]}


def _drop_keys(keys: Sequence[str]) -> Callable[..., None]:
    """A ``state_dict`` post-hook that removes the packed parameters: checkpoints hold the plain model."""

    def hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        for key in keys:
            state_dict.pop(prefix + key, None)

    return hook


def _supply_keys(keys: Sequence[str]) -> Callable[..., None]:
    """A ``load_state_dict`` pre-hook that supplies the packed parameters' current values.

    So strict loads of plain state dicts (a resume, WiSE-FT) do not report them missing; `_regather` then
    refreshes them from the loaded weights.
    """

    def hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        for key in keys:
            state_dict.setdefault(prefix + key, module._parameters[key].detach())

    return hook


def _regather(engine: SparseMixout, targets: Sequence[SparseTarget]) -> Callable[..., None]:
    """A ``load_state_dict`` post-hook: weights loaded during fit replace the packed values too (``v = w[I]``)."""

    def hook(module: nn.Module, incompatible_keys: Any) -> None:
        with torch.no_grad():
            for target in targets:
                if target.indices is not None:
                    gather(target.weight, target.indices, target.packed.data, engine.backend)

    return hook
