"""``WeightPenaltyCallback``: L2-SP and L1 penalties toward the weights at the start of fit, added to the gradients."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_robustft.callbacks._shared import (
    check_selection,
    checkpoint_entry,
    load_named_tensors,
    refuse_unsupported,
    resolve_submodule,
    select_parameters,
    warn_if_settings_changed,
)
from lightning_robustft.errors import RobustFTConfigError, check_config_number
from lightning_robustft.ops.penalty import STRENGTH_HINT, Norm, add_penalty_grad_, check_norm, make_anchors

__all__ = ["ANCHORS_CHECKPOINT_KEY", "WeightPenaltyCallback", "check_supported", "select_penalty_targets"]

#: Checkpoint key holding ``{callback state_key: {parameter name: anchor}}`` (fp32 anchors, fp64 for fp64 weights).
#: Keyed by the callback's ``state_key`` so that several instances (e.g. L1 and L2 together) keep their own anchors.
ANCHORS_CHECKPOINT_KEY = "weight_penalty_anchors"


class WeightPenaltyCallback(Callback):
    r"""L2-SP / L1 penalty toward the pretrained weights: fine-tune, but stay near where you started.

    Plain weight decay pulls every weight toward zero, which for a pretrained network means toward forgetting. L2-SP
    (Li, Grandvalet & Davoine, "Explicit Inductive Bias for Transfer Learning with Convolutional Networks", ICML 2018)
    pulls toward the *starting point* instead, adding ``strength/2 * ||w - w0||^2`` to the loss, where ``w0`` are the
    weights at the start of fit (the pretrained ones): the model moves only as far as the fine-tuning data asks,
    keeping more of the pretrained features that matter under distribution shift. ``norm="l1"`` uses
    ``strength * ||w - w0||_1``, a constant pull that keeps most entries at their pretrained values.

    The gradient of the penalty is known in closed form, so nothing is added to the loss or the graph: in
    ``on_before_optimizer_step`` (gradients complete, DDP-reduced, AMP-unscaled, before clipping) the callback adds
    ``strength * (w - w0)`` (L2) or ``strength * sign(w - w0)`` (L1; 0 where ``w == w0``) to each target's gradient,
    in one multi-tensor pass in fp32. So:

    * the result is the same as adding the penalty to the loss with this optimizer (including momentum, Adam's
      normalisation and gradient clipping, which see the penalised gradient), once per optimizer step whatever
      ``accumulate_grad_batches`` is;
    * every DDP rank adds the same penalty to the same reduced gradient, so the replicas stay identical;
    * a parameter whose ``grad`` is ``None`` in a step (frozen, or unused) gets no penalty in that step.

    The anchors ``w0`` are fp32 copies of the target tensors (fp64 for fp64 weights), taken on the training device
    when training starts (``on_train_start``); never a copy of the module. They go into every checkpoint under
    ``"weight_penalty_anchors"`` (`ANCHORS_CHECKPOINT_KEY`), so a resumed fit pulls toward the original
    ``w0``, not toward the weights it resumes from. After fit they move to the CPU to free accelerator memory. Nothing
    is added to the module: the trained model is the plain model. Sharded strategies (FSDP, DeepSpeed, model
    parallel) and manual optimization are refused in ``setup``.

    Targets are parameter names (as in ``pl_module.named_parameters()``) matched by shell-style globs (``fnmatch``;
    ``*`` also crosses dots). By default: every trainable floating-point parameter outside the ``head`` submodule,
    biases and norms included, as in L2-SP. The head is new, so it has no pretrained value to be pulled toward; L2-SP
    gives it plain weight decay, which the optimizer's ``weight_decay`` already provides. The targets are resolved in
    ``on_fit_start``, after every callback's ``setup``, so the place of this callback in ``trainer.callbacks`` does not
    matter: with [`LoRACallback`][lightning_robustft.callbacks.lora.LoRACallback] the trainable tensors are the LoRA
    factors (the base weights are frozen), so the penalty pulls ``lora_A`` toward its initial value and ``lora_B``
    toward zero, i.e. the update ``B @ A`` toward nothing and the merged weights toward the pretrained ones.

    Args:
        strength: the penalty coefficient (``alpha`` in the L2-SP paper), finite and ``>= 0``; 0 disables the
            penalty. With SGD, L2-SP's values are around 1e-3 to 1e-1; with Adam/AdamW the penalty gradient is
            normalised like the rest of the gradient, so useful values differ: tune it.
        norm: ``"l2"`` (L2-SP, ``strength/2 * ||w - w0||^2``) or ``"l1"`` (``strength * ||w - w0||_1``).
        targets: globs over parameter names selecting the penalised tensors (default: see above). Each must match
            a trainable parameter.
        exclude: globs removing parameters from the targets. Each must match a parameter.
        head: dotted name of the classification head, left out of the default targets; ``None`` when the module has
            no head to leave out (then every trainable parameter is penalised).

    Example::

        trainer = Trainer(callbacks=[WeightPenaltyCallback(strength=0.01, norm="l2")])
        trainer.fit(model, datamodule=dm)

    In a LightningCLI config::

        trainer:
          callbacks:
            - class_path: lightning_robustft.callbacks.weight_penalty.WeightPenaltyCallback
              init_args: {strength: 0.01, norm: l2, head: head}
    """

    def __init__(
        self,
        strength: float = 0.01,
        norm: Norm = "l2",
        targets: list[str] | None = None,
        exclude: list[str] | None = None,
        head: str | None = "head",
    ) -> None:
        self.strength = check_config_number("strength", strength, "[0, inf)", hint=STRENGTH_HINT)
        try:
            self.norm: Norm = check_norm(norm)
        except ValueError as error:
            raise RobustFTConfigError(str(error)) from None
        check_selection(targets, exclude, head, example="['backbone.*']")
        self.targets = list(targets) if targets is not None else None
        self.exclude = list(exclude) if exclude is not None else []
        self.head = head
        self._target_names: list[str] = []
        self._params: list[nn.Parameter] = []
        self._anchors: list[torch.Tensor] = []
        self._loaded_anchors: Mapping[str, torch.Tensor] | None = None

    @property
    def state_key(self) -> str:
        """Per-configuration key, so several instances (an L1 and an L2 one, different targets) can share a Trainer.

        ``strength`` is left out: a fit may resume with another strength and still find its anchors.
        """
        return self._generate_state_key(norm=self.norm, targets=self.targets, exclude=self.exclude, head=self.head)

    @property
    def target_names(self) -> list[str]:
        """Names of the penalised parameters, resolved when fit starts (``on_fit_start``)."""
        return list(self._target_names)

    @property
    def anchors(self) -> dict[str, torch.Tensor]:
        """``{name: w0}``: the anchors the targets are pulled toward (empty before training starts)."""
        return dict(zip(self._target_names, self._anchors, strict=False))

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Refuse what cannot be served and forget a previous fit; targets are resolved when fit starts."""
        if stage != TrainerFn.FITTING:
            return
        check_supported(trainer.strategy, pl_module)
        self._target_names = []
        self._params = []
        self._anchors = []
        self._loaded_anchors = None

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Resolve the targets once every callback's ``setup`` has shaped the module (e.g. LoRA's adapters)."""
        self._target_names = select_penalty_targets(pl_module, self.targets, self.exclude, self.head)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Snapshot ``w0`` on the training device, or take it from the checkpoint a fit resumes from."""
        params = dict(pl_module.named_parameters())
        self._params = [params[name] for name in self._target_names]
        self._anchors = make_anchors(self._params)
        source = "the weights at the start of fit"
        if self._loaded_anchors is not None:
            load_named_tensors(self._anchors, self._target_names, self._loaded_anchors, what="weight-penalty anchors")
            self._loaded_anchors = None
            source = "the checkpoint's anchors (the weights at the first start)"
        penalised = sum(param.numel() for param in self._params)
        trainable = sum(param.numel() for param in params.values() if param.requires_grad)
        rank_zero_info(
            f"WeightPenaltyCallback: {self.norm.upper()} penalty toward {source}, strength={self.strength}, on "
            f"{len(self._params)} tensors ({penalised:,} of {trainable:,} trainable entries)."
        )

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        """Add the penalty's gradient to the complete (reduced, unscaled) gradients, once per optimizer step."""
        if not self._anchors or self.strength == 0.0:
            return
        add_penalty_grad_(self._params, self._anchors, [param.grad for param in self._params], self.strength, self.norm)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Move the anchors to the CPU after fit: still available and checkpointed, but off the accelerator."""
        if stage == TrainerFn.FITTING and self._anchors:
            self._anchors = [anchor.cpu() for anchor in self._anchors]
            self._params = []

    @override
    def state_dict(self) -> dict[str, Any]:
        """The configuration (the anchors go into the checkpoint via ``on_save_checkpoint``)."""
        return {"strength": self.strength, "norm": self.norm}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Warn when resuming with another strength; the constructor's value is used."""
        warn_if_settings_changed("WeightPenaltyCallback", state_dict, {"strength": self.strength})

    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """Store the anchors under ``"weight_penalty_anchors"`` / this callback's ``state_key``."""
        anchors = self.anchors or self._loaded_anchors
        if anchors:
            checkpoint.setdefault(ANCHORS_CHECKPOINT_KEY, {})[self.state_key] = dict(anchors)

    @override
    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """Keep the checkpoint's anchors for ``on_train_start``; warn when a fit resumes from a checkpoint without."""
        without = "the penalty pulls toward the weights the fit resumes from, not toward the pretrained ones"
        stored = checkpoint_entry(
            trainer, checkpoint, ANCHORS_CHECKPOINT_KEY, callback="WeightPenaltyCallback", without=without
        )
        if not stored:
            return
        if self.state_key in stored:
            self._loaded_anchors = stored[self.state_key]
        elif len(stored) == 1:
            # One penalty callback before and one now, configured differently (e.g. `targets` spelled otherwise):
            # its anchors are the best available w0; `on_train_start` checks they cover exactly the current targets.
            self._loaded_anchors = next(iter(stored.values()))
        else:
            rank_zero_warn(
                f"WeightPenaltyCallback: the checkpoint's {ANCHORS_CHECKPOINT_KEY!r} holds the anchors of "
                f"{len(stored)} other penalty callbacks but none for {self.state_key}, so {without}."
            )


def check_supported(strategy: Strategy, pl_module: LightningModule) -> None:
    """Raise for what the penalty cannot serve: sharded strategies and manual optimization."""
    refuse_unsupported(
        strategy,
        pl_module,
        callback="WeightPenaltyCallback",
        needs="the penalty reads whole weight tensors and adds to their full gradients",
        manual_optimization="and the callback's `on_before_optimizer_step` would not see the gradients of every "
        "step. Use automatic optimization, or add the penalty to your loss "
        "(`lightning_robustft.ops.penalty.penalty_value`).",
    )


def select_penalty_targets(
    module: nn.Module, targets: Sequence[str] | None, exclude: Sequence[str], head: str | None
) -> list[str]:
    """Resolve the penalised parameter names: trainable floating tensors, in ``named_parameters`` order.

    Without ``targets``: every trainable floating-point parameter outside ``head``.

    Raises:
        RobustFTConfigError: a pattern matches no parameter, ``targets`` matches only frozen ones, ``head`` is not a
            submodule, or nothing is left to penalise.
    """

    def outside_head() -> list[str]:
        if head is not None:
            resolve_submodule(module, head)
        return [name for name, _ in module.named_parameters() if head is None or not name.startswith(head + ".")]

    return select_parameters(
        module,
        targets,
        exclude,
        head,
        default=outside_head,
        frozen="frozen or non-floating parameters",
        why_trainable="the penalty acts through gradients, so only trainable ones can be penalised",
        nothing="WeightPenaltyCallback found no trainable parameter to penalise",
    )
