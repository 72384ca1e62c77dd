"""``GMixoutCallback``: Mixout with a moving anchor and a resampling period, as a weight swap around the optimizer.

Dense by default (every entry of a target is a trainable parameter); ``sparse=True`` trains only each period's free
entries through packed tensors (`lightning_robustft.callbacks._sparse_gmixout`, which explains its design).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

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
    matching_names,
    refuse_unsupported,
    resolve_submodule,
    select_parameters,
    warn_if_settings_changed,
)
from lightning_robustft.callbacks._sparse_gmixout import SparseMixout
from lightning_robustft.errors import RobustFTConfigError, check_config_number
from lightning_robustft.ops.mixout import MixoutPasses, splitmix64

__all__ = [
    "ANCHORS_CHECKPOINT_KEY",
    "MAX_SEED",
    "MIN_ADAPTIVE_PERIOD",
    "Backend",
    "GMixoutCallback",
    "check_supported",
    "default_target_names",
    "derive_seed",
    "grad_scale",
    "select_targets",
    "step_was_skipped",
]

Backend = Literal["auto", "triton", "torch"]

#: Checkpoint key holding ``{parameter name: fp32 anchor}``; seed and counters live in the callback state.
ANCHORS_CHECKPOINT_KEY = "gmixout_anchors"

#: Seeds are kept in ``[0, 2**31 - 1]`` so every backend (a Triton ``tl.rand`` seed is 32-bit) can take them.
MAX_SEED = 2**31 - 1

#: With Adam-type optimizers, sparse GMixout warns below this many steps per subset (their moments restart each period).
MIN_ADAPTIVE_PERIOD = 10

_ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


class GMixoutCallback(Callback):
    r"""Generalised Mixout: train random subnetworks mixed with a (moving) anchor; deploy the learned weights.

    Mixout (Lee et al., ICLR 2020) regularises fine-tuning toward the pretrained weights ``a``: every step trains on
    ``w~ = a + M * (w - a) / (1 - p)`` with an elementwise keep-mask ``M ~ Bernoulli(1 - p)``, so ``E[w~] = w``; the
    model kept is ``w``, an implicit ensemble of the subnetworks. Entries held at the anchor cannot drift from what
    pretraining learned in that step, which protects the features that matter under distribution shift. GMixout
    (our reading of "Revisiting Mixout", arXiv 2510.06982) adds two levers: the mask is redrawn every
    ``resample_every`` optimizer steps, and at each redraw the anchor moves, ``a <- anchor_decay * a +
    (1 - anchor_decay) * w``. ``resample_every=1, anchor_decay=1`` is Mixout exactly, and is the default.

    No module is replaced, so any ``LightningModule`` works and the model left after ``fit`` is the plain one. Per
    optimizer step ``t`` (period ``r = t // resample_every``):

    1. before the first forward of the step (``on_train_batch_start``, once even with gradient accumulation): at the
       start of a period ``r >= 1``, move the anchor; then compute ``w~`` into a buffer and point each target at it
       (``param.data``; ``w`` stays in the parameter's own storage);
    2. forward and backward run unchanged on ``w~``;
    3. ``on_before_optimizer_step`` (gradients complete, DDP-reduced, AMP-unscaled): point the targets back at ``w``
       and turn the gradient into the exact gradient of ``w``, ``g <- M * g / (1 - p)``;
    4. the user's optimizer, clipping and schedulers step ``w`` as usual.

    Outside a training step the parameters hold ``w``: validation (even mid-accumulation), checkpoints (a checkpoint
    saved mid-step gets ``w``), exceptions and the end of fit all see the learned weights. An fp16-AMP step that the
    ``GradScaler`` skips (non-finite gradients) does not count: the period and the anchor stay where they were. The
    seed, the step counter and the fp32 anchors are checkpointed (anchors under ``"gmixout_anchors"``), so a resumed
    run continues exactly, also in the middle of a period. Every rank uses the same seed, hence the same masks, so
    DDP replicas stay identical. Sharded strategies (FSDP, DeepSpeed, model parallel) and manual optimization are
    refused in ``setup``.

    Targets are parameter names (as in ``pl_module.named_parameters()``) matched by shell-style globs
    (``fnmatch``; ``*`` also crosses dots). By default they are the ``weight`` of every ``nn.Linear`` and convolution
    and the raw attention projections (``in_proj_weight`` of ``nn.MultiheadAttention`` and open_clip) outside the
    ``head`` submodule: never norms, biases, embeddings or the head, which a user can still name in ``targets``.
    Frozen parameters (``requires_grad=False``) are never targets.

    Args:
        p: probability that an entry is held at the anchor, in ``[0, 1)``; 0.9 is Mixout's usual value for large
            pretrained models.
        resample_every: the mask is redrawn every this many optimizer steps (``>= 1``; 1 is Mixout).
        anchor_decay: EMA factor of the anchor at each redraw, in ``[0, 1]``: 1 keeps the pretrained weights (Mixout),
            0 moves the anchor to the current weights.
        targets: globs over parameter names selecting the tensors to mix (default: see above). Each must match a
            trainable parameter.
        exclude: globs removing parameters from the targets. Each must match a parameter.
        head: dotted name of the classification head, left out of the default targets; ``None`` when the module has
            no head to leave out.
        seed: seed of the masks in ``[0, 2**31 - 1]``. ``None`` derives it from ``torch.initial_seed()`` (which
            ``seed_everything`` sets) without consuming the global generator, then takes rank zero's value. So
            every fit in one process draws the same masks unless the process is re-seeded in between
            (``seed_everything(other)``) or ``seed`` is given: pass distinct seeds to compare mask draws.
        backend: ``"auto"`` (Triton kernels for CUDA tensors when Triton imports, else PyTorch), ``"triton"`` or
            ``"torch"``.
        sparse: train only the free entries (the paper's sparse implementation). In each period exactly
            ``round((1 - p) * n)`` entries of each target (a seeded uniform subset) are free; they live in one packed
            ``nn.Parameter`` per target, registered next to it as ``<name>_gmixout_free`` during fit, which is all
            the optimizer and DDP see of the target (the target itself is frozen during fit). ``w~`` is built one
            layer at a time and not kept for the backward, so training state drops below full fine-tuning's (about
            0.63x at ``p = 0.9`` with AdamW). At each new period the packed values are written back, the anchor
            moves, a new subset is drawn and the packed tensors' optimizer state is reset (Adam's moments restart:
            keep ``resample_every >= 10`` with Adam-type optimizers; a warning says so). Under plain SGD it equals
            dense GMixout with the same masks; with momentum or weight decay the held entries of ``w`` stay put
            (dense GMixout lets the optimizer move them). The optimizer must be built in ``configure_optimizers``
            from the module's parameters; a ``torch.compile``'d model is not supported in this mode. See
            docs/gmixout.md, "Sparse GMixout".

    Example::

        trainer = Trainer(callbacks=[GMixoutCallback(p=0.9, resample_every=10, anchor_decay=0.99)])
        # or, training only the free entries (less memory and DDP traffic than full fine-tuning):
        trainer = Trainer(callbacks=[GMixoutCallback(p=0.9, resample_every=10, anchor_decay=0.99, sparse=True)])
        trainer.fit(model, datamodule=dm)

    In a LightningCLI config::

        trainer:
          callbacks:
            - class_path: lightning_robustft.callbacks.GMixoutCallback
              init_args: {p: 0.9, resample_every: 10, anchor_decay: 0.99}
    """

    def __init__(
        self,
        p: float = 0.9,
        resample_every: int = 1,
        anchor_decay: float = 1.0,
        targets: list[str] | None = None,
        exclude: list[str] | None = None,
        head: str | None = "head",
        seed: int | None = None,
        backend: Backend = "auto",
        sparse: bool = False,
    ) -> None:
        self.p = check_config_number(
            "p", p, "[0, 1)", hint="probability that an entry is held at the anchor; 0.9 is usual"
        )
        self.resample_every = check_config_number(
            "resample_every", resample_every, "[1, inf)", integer=True, hint="optimizer steps per mask; 1 is Mixout"
        )
        self.anchor_decay = check_config_number(
            "anchor_decay", anchor_decay, "[0, 1]", hint="1 keeps the pretrained anchor, as Mixout does"
        )
        check_selection(targets, exclude, head, example="['backbone.*.weight']")
        if seed is not None:
            check_config_number("seed", seed, f"[0, {MAX_SEED}]", integer=True, hint="None derives it from the process")
        if backend not in ("auto", "triton", "torch"):
            raise RobustFTConfigError(f"`backend`={backend!r} must be one of 'auto', 'triton', 'torch'.")
        if not isinstance(sparse, bool):
            raise RobustFTConfigError(f"`sparse`={sparse!r} must be True or False.")
        self.targets = list(targets) if targets is not None else None
        self.exclude = list(exclude) if exclude is not None else []
        self.head = head
        self.backend: Backend = backend
        self.sparse = sparse
        self._sparse: SparseMixout | None = None
        self._warned_head = False
        self._requested_seed = seed
        self._seed: int | None = seed
        self._target_names: list[str] = []
        self._passes: MixoutPasses | None = None
        self._params: list[nn.Parameter] = []
        self._loaded_anchors: dict[str, torch.Tensor] | None = None
        self._step = 0
        self._anchor_period = 0
        self._mixed_period = 0
        self._scale_before_step: float | None = None

    @property
    def seed(self) -> int | None:
        """The mask seed in use (resolved at ``setup``; a resumed run takes the checkpoint's)."""
        return self._seed

    @property
    def step(self) -> int:
        """Optimizer steps taken under GMixout, AMP-skipped ones excluded; the period is ``step // resample_every``."""
        return self._step

    @property
    def target_names(self) -> list[str]:
        """Names of the mixed parameters, resolved at ``setup``."""
        return list(self._target_names)

    @property
    def passes(self) -> MixoutPasses | None:
        """The fused passes (anchors, masks) over the targets; built when training starts, kept for checkpoints."""
        return self._passes

    @property
    def sparse_mixout(self) -> SparseMixout | None:
        """With ``sparse=True``: the packed tensors, anchors and the period's free indices (built in ``setup``)."""
        return self._sparse

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Refuse what cannot be served, resolve the targets and the seed (shared by all ranks), reset the counters."""
        if stage != TrainerFn.FITTING:
            return
        check_supported(trainer.strategy, pl_module)
        others = [cb for cb in trainer.callbacks if isinstance(cb, GMixoutCallback) and cb is not self]
        if others:
            raise RobustFTConfigError(
                "Found more than one GMixoutCallback in `trainer.callbacks`; mixing the same weights twice is not "
                "meaningful. Keep one and select its tensors with `targets` / `exclude`."
            )
        if self._sparse is not None:  # a previous fit that ended without teardown
            self._sparse.detach()
        self._target_names = select_targets(pl_module, self.targets, self.exclude, self.head)
        self._warn_head_targets(pl_module)
        seed = self._requested_seed if self._requested_seed is not None else derive_seed(torch.initial_seed())
        self._seed = int(trainer.strategy.broadcast(seed, src=0))
        self._step = self._anchor_period = self._mixed_period = 0
        self._scale_before_step = None
        self._passes = None
        self._sparse = None
        self._loaded_anchors = None
        if self.sparse:
            # Before configure_optimizers and DDP: both must see the packed tensors as trainable, the targets frozen.
            self._sparse = SparseMixout(pl_module, self._target_names, self.p, self._seed, self.backend)
            self._sparse.attach()

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Build the passes once the model is on its device and any checkpoint is restored (anchors from it)."""
        params = dict(pl_module.named_parameters())
        self._params = [params[name] for name in self._target_names]
        assert self._seed is not None
        if self._sparse is not None:
            self._start_sparse(trainer, params)
            return
        # The passes swap the parameters' `.data` (w~ in, w back), which keeps each Parameter object, its autograd
        # version counter, its optimizer state and DDP's hooks: backward sees w~, the optimizer steps w.
        self._passes = MixoutPasses(self._params, self.p, self._seed, self.backend)
        if self._loaded_anchors is not None:
            load_named_tensors(self._passes.anchors, self._target_names, self._loaded_anchors, what="GMixout anchors")
            self._loaded_anchors = None
        mixed = sum(params[name].numel() for name in self._target_names)
        trainable = sum(param.numel() for param in params.values() if param.requires_grad)
        rank_zero_info(
            f"GMixoutCallback: {len(self._target_names)} tensors ({mixed:,} of {trainable:,} trainable entries) with "
            f"p={self.p}, resample_every={self.resample_every}, anchor_decay={self.anchor_decay}, "
            f"backend={self._passes.backend}, seed={self._seed}, starting at step {self._step}."
        )

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        """Before the first forward of an optimizer step: move the anchor at a new period, then write ``w~``."""
        sparse = self._sparse
        if sparse is not None:
            self._settle_skipped_step(trainer)
            period = self._step // self.resample_every
            if period > self._anchor_period:
                sparse.begin_period(period, self.anchor_decay)
                self._anchor_period = period
            sparse.activate()
            return
        passes = self._passes
        if passes is None or passes.mixed:
            return
        self._settle_skipped_step(trainer)
        period = self._step // self.resample_every
        if period > self._anchor_period:
            if self.anchor_decay < 1.0:
                passes.update_anchor(self.anchor_decay)
            self._anchor_period = period
        passes.mix_in(period)
        self._mixed_period = period

    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Sparse: the micro-batch's backward is done; the modules show ``w`` again until the next forward."""
        if self._sparse is not None:
            self._sparse.deactivate()

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        """Restore ``w`` and turn the (reduced, unscaled) gradient of ``w~`` into the gradient of ``w``.

        Sparse: the packed gradients are complete already; only the step is counted.
        """
        if self._sparse is not None:
            self._sparse.deactivate()
            self._step += 1
            self._scale_before_step = grad_scale(trainer)
            return
        passes = self._passes
        if passes is None:
            return
        if passes.mixed:
            passes.mix_out(self._mixed_period, [param.grad for param in self._params])
        self._step += 1
        self._scale_before_step = grad_scale(trainer)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Take back the step count of an optimizer step that the AMP ``GradScaler`` skipped."""
        if self._sparse is not None:
            self._sparse.deactivate()
        self._settle_skipped_step(trainer)

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Validate the learned weights: restore ``w`` mid-step; the next training batch mixes again."""
        self._restore()
        if self._sparse is not None:
            self._sparse.deactivate()

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Give ``w`` back before any callback's ``on_train_end`` (WiSE-FT reads it), whatever the callback order."""
        self._restore()

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Leave ``w`` in the model if fit stopped between a mix-in and its optimizer step; sparse: the plain model."""
        self._restore()
        if self._sparse is not None:
            self._sparse.detach()

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """Leave ``w`` in the model when fit fails mid-step (Lightning calls no other hook then)."""
        self._restore()
        if self._sparse is not None:
            self._sparse.detach()

    @override
    def state_dict(self) -> dict[str, Any]:
        """The seed and counters (the anchors go into the checkpoint via ``on_save_checkpoint``)."""
        return {
            "seed": self._seed,
            "step": self._step,
            "anchor_period": self._anchor_period,
            "p": self.p,
            "resample_every": self.resample_every,
            "anchor_decay": self.anchor_decay,
            "sparse": self.sparse,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the checkpointed run: its seed and counters win over the constructor's seed."""
        if state_dict.get("sparse", False) != self.sparse:
            raise RobustFTConfigError(
                f"The checkpoint was trained with GMixoutCallback(sparse={state_dict.get('sparse', False)}), this run "
                f"has sparse={self.sparse}: their optimizer states hold different tensors (packed free entries vs "
                "full weights). Resume with the same `sparse`, or load only the weights (not `ckpt_path`)."
            )
        levers = ("p", "resample_every", "anchor_decay")
        warn_if_settings_changed("GMixoutCallback", state_dict, {key: getattr(self, key) for key in levers})
        if state_dict.get("seed") is not None:
            self._seed = int(state_dict["seed"])
        self._step = int(state_dict.get("step", self._step))
        self._anchor_period = int(state_dict.get("anchor_period", self._step // self.resample_every))

    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """Store the fp32 anchors; if saved mid-step, put ``w`` (not ``w~``) in the checkpoint's ``state_dict``."""
        if self._sparse is not None:
            # The model's state_dict holds w (current after every optimizer step) and not the packed tensors; the
            # subset is redrawn from the seed and the period, the packed values gathered from w, the packed
            # optimizer state is in the checkpoint's optimizer states.
            anchors = [target.anchor for target in self._sparse.targets]
            if all(anchor is not None for anchor in anchors):
                checkpoint[ANCHORS_CHECKPOINT_KEY] = dict(zip(self._target_names, anchors, strict=True))
            return
        passes = self._passes
        if passes is None:
            return
        checkpoint[ANCHORS_CHECKPOINT_KEY] = dict(zip(self._target_names, passes.anchors, strict=True))
        if passes.mixed:
            # Lightning reads the module's state_dict before this hook, while the parameters still hold w~.
            passes.restore()
            state = checkpoint["state_dict"]
            for name, param in zip(self._target_names, self._params, strict=True):
                if name in state:
                    state[name] = param.detach().clone()
            passes.mix_in(self._mixed_period)

    @override
    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """Keep the checkpoint's anchors for the passes that are built when training starts."""
        without = "the anchors start at the checkpoint's weights, not at the pretrained ones"
        anchors = checkpoint_entry(
            trainer, checkpoint, ANCHORS_CHECKPOINT_KEY, callback="GMixoutCallback", without=without
        )
        if anchors is not None:
            self._loaded_anchors = anchors

    def _start_sparse(self, trainer: Trainer, params: Mapping[str, nn.Parameter]) -> None:
        assert self._sparse is not None
        self._sparse.start(self._anchor_period, trainer.optimizers, self._loaded_anchors)
        self._loaded_anchors = None
        adaptive = [type(opt).__name__ for opt in trainer.optimizers if "betas" in opt.defaults]
        if adaptive and self.resample_every < MIN_ADAPTIVE_PERIOD:
            rank_zero_warn(
                f"GMixoutCallback(sparse=True) resets the optimizer state of the packed tensors at every new subset, "
                f"and {adaptive[0]} keeps moment estimates: with resample_every={self.resample_every} they restart "
                f"every {self.resample_every} steps, so an update is about lr * sign(gradient) and the second moment "
                f"never warms up. Use resample_every >= {MIN_ADAPTIVE_PERIOD} (e.g. 10-100) with Adam-type optimizers."
            )
        mixed = sum(target.count for target in self._sparse.targets)
        total = sum(target.weight.numel() for target in self._sparse.targets)
        rank_zero_info(
            f"GMixoutCallback(sparse=True): {len(self._target_names)} tensors, {mixed:,} of their {total:,} entries "
            f"free per period, p={self.p}, resample_every={self.resample_every}, anchor_decay={self.anchor_decay}, "
            f"backend={self._sparse.backend}, seed={self._seed}, starting at step {self._step}."
        )

    def _warn_head_targets(self, pl_module: LightningModule) -> None:
        """Say once that explicit ``targets`` reach into the head, which the default targets leave out."""
        if self.targets is None or self.head is None or self._warned_head:
            return
        resolve_submodule(pl_module, self.head)
        in_head = [name for name in self._target_names if name.startswith(self.head + ".")]
        if in_head:
            self._warned_head = True
            rank_zero_warn(
                f"GMixoutCallback: `targets` select {len(in_head)} tensors of the head {self.head!r} ({in_head[:3]}); "
                "they are mixed like the others (the default targets leave the head out, since a new head has no "
                "pretrained weights to anchor to). Add the head to `exclude` if that is not intended."
            )

    def _restore(self) -> None:
        if self._passes is not None and self._passes.mixed:
            self._passes.restore()

    def _settle_skipped_step(self, trainer: Trainer) -> None:
        if self._scale_before_step is None:
            return
        scale_after = grad_scale(trainer)
        if scale_after is not None and step_was_skipped(self._scale_before_step, scale_after):
            self._step -= 1
        self._scale_before_step = None


def check_supported(strategy: Strategy, pl_module: LightningModule) -> None:
    """Raise for what GMixout cannot serve: sharded strategies and manual optimization."""
    refuse_unsupported(
        strategy,
        pl_module,
        callback="GMixoutCallback",
        needs="GMixout swaps whole weight tensors in place around the optimizer step, draws its masks over full "
        "tensors and rescales full gradients",
        manual_optimization="so the callback cannot place the weight swap around the step. Use automatic optimization.",
    )


def default_target_names(module: nn.Module, head: str | None) -> list[str]:
    """Weights of Linear / conv layers and raw attention projections, outside ``head``: Mixout's weight matrices."""
    if head is not None:
        resolve_submodule(module, head)
    names = []
    for module_name, sub in module.named_modules():
        if head is not None and (module_name == head or module_name.startswith(head + ".")):
            continue
        prefix = f"{module_name}." if module_name else ""
        if isinstance(sub, (nn.Linear, nn.modules.conv._ConvNd)) and isinstance(sub.weight, nn.Parameter):
            names.append(prefix + "weight")
        names.extend(prefix + attr for attr in _ATTENTION_WEIGHTS if isinstance(getattr(sub, attr, None), nn.Parameter))
    return names


def select_targets(
    module: nn.Module, targets: Sequence[str] | None, exclude: Sequence[str], head: str | None
) -> list[str]:
    """Resolve target parameter names: trainable floating tensors, in ``named_parameters`` order.

    Raises:
        RobustFTConfigError: a pattern matches no parameter, ``targets`` matches only frozen ones, ``head`` is not a
            submodule, or nothing is left to mix (then the names it suggests are trainable ones).
    """
    if targets is None:
        params = dict(module.named_parameters())
        trainable = [name for name, param in params.items() if param.requires_grad and param.is_floating_point()]
        excluded = {name for pattern in exclude for name in matching_names(params, pattern)}
        defaults = set(default_target_names(module, head)) - excluded
        if defaults and not defaults & set(trainable) and all(matching_names(params, pat) for pat in exclude):
            # E.g. ImageClassifier(freeze_backbone=True): every default weight is frozen. Suggest what can be mixed.
            raise RobustFTConfigError(
                f"GMixoutCallback: all {len(defaults)} default targets of {type(module).__name__} (Linear / conv "
                f"weights outside head={head!r}) are frozen (requires_grad=False, e.g. freeze_backbone=True), and "
                "GMixout mixes trainable weights only. Unfreeze them, or name trainable tensors in `targets`: "
                f"{trainable[:8] if trainable else 'none is trainable'}."
            )
    return select_parameters(
        module,
        targets,
        exclude,
        head,
        default=lambda: default_target_names(module, head),
        frozen="frozen parameters",
        why_trainable="GMixout mixes trainable ones only",
        nothing="GMixoutCallback found no trainable weight to mix",
    )


def derive_seed(initial_seed: int) -> int:
    """A mask seed from the process seed (splitmix64 finaliser), decorrelated from the streams that seed drives."""
    return splitmix64(initial_seed) % (MAX_SEED + 1)


def step_was_skipped(scale_before: float, scale_after: float) -> bool:
    """Whether a ``GradScaler`` skipped the step: its scale shrinks (``backoff_factor < 1``) only on inf/NaN grads."""
    return scale_after < scale_before


def grad_scale(trainer: Trainer) -> float | None:
    """The AMP loss scale of an enabled ``GradScaler``, or ``None`` when the run has none (fp32, bf16)."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return None
    return float(scaler.get_scale())
