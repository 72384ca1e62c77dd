"""``LPFTCallback``: linear probing, then full fine-tuning (LP-FT), in one fit with one optimizer."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from typing_extensions import override

from lightning_robustft.callbacks._shared import (
    check_dotted_name,
    refuse_unsupported,
    renamed_argument,
    require_unused_parameters,
    resolve_submodule,
    warn_if_settings_changed,
)
from lightning_robustft.errors import check_config_number

__all__ = ["LPFTCallback"]

_FIND_UNUSED = "Use strategy='ddp_find_unused_parameters_true' (or a single device)."


class LPFTCallback(Callback):
    """Train the head alone for ``probe_epochs`` epochs (a linear probe), then fine-tune the whole model.

    Kumar et al. ("Fine-Tuning can Distort Pretrained Features and Underperform Out-of-Distribution", ICLR 2022)
    show that fine-tuning from a random head distorts the pretrained features: while the head is still bad, large
    gradients flow into the backbone and change the features of the fine-tuning distribution more than the others.
    Fitting the head first (linear probing, LP) and then fine-tuning everything (FT) from that head keeps the
    features closer to the pretrained ones and improves accuracy out of distribution.

    All parameters stay in the optimizer from the start (the callback never freezes anything in ``setup``, which runs
    before ``configure_optimizers``). At each ``on_train_epoch_start``:

    * epochs ``< probe_epochs`` (the probe): ``requires_grad_(False)`` on the submodule ``backbone`` and its norm layers
      with running statistics (``BatchNorm``, ``InstanceNorm``) in eval mode. Its parameters get no gradient, so
      the optimizers skip them entirely (``torch.optim`` optimizers skip parameters whose ``.grad`` is ``None``: no
      update, no weight decay, no momentum or Adam state), and its running statistics do not move: the submodule is
      bitwise unchanged and only the rest of the model (the head) trains.
    * from epoch ``probe_epochs`` on (the fine-tuning stage): the submodule's ``requires_grad`` flags are the ones it
      had when the probe began (so adapters and freezing by other callbacks' ``setup`` are kept) and its norm layers
      follow the model's mode again. Adam-type optimizers start the submodule's moments and bias correction at this
      point, as a fresh optimizer would; the learning-rate schedule is the run's one schedule, continued (the paper
      trains the two stages as two runs with their own schedules).

    This is why it is not Lightning's ``BaseFinetuning``: that callback freezes the backbone before the optimizer is
    built and adds it as a new parameter group when it unfreezes, which breaks learning-rate schedulers that zip
    their state with the optimizer's parameter groups (``LambdaLR``; ``SequentialLR`` at its next milestone, as in
    ``ImageClassifier``'s warm-up + cosine default while the warm-up is still running).

    The stage is a function of ``trainer.current_epoch``: there is no state beyond the arguments, and a resumed run
    (also across the stage boundary) continues exactly. At the end of fit (or when it fails) every flag and mode is
    restored. With DDP the probe leaves the submodule without gradients, which DDP accepts only with
    ``find_unused_parameters=True`` (``strategy="ddp_find_unused_parameters_true"``; checked when fit starts, on the
    wrapped model); sharded strategies are refused.

    Args:
        probe_epochs: number of linear-probe epochs before fine-tuning (``>= 1``).
        backbone: dotted name of the pretrained submodule held fixed during the probe (resolved with
            ``get_submodule``).
        module: deprecated name of ``backbone``.

    Example::

        trainer = Trainer(max_epochs=10, callbacks=[LPFTCallback(probe_epochs=2, backbone="backbone")])
        trainer.fit(model, datamodule=dm)

    In a LightningCLI config::

        trainer:
          callbacks:
            - class_path: lightning_robustft.callbacks.LPFTCallback
              init_args: {probe_epochs: 2, backbone: backbone}
    """

    def __init__(self, probe_epochs: int = 1, backbone: str = "backbone", module: str | None = None) -> None:
        self.probe_epochs = check_config_number(
            "probe_epochs",
            probe_epochs,
            "[1, inf)",
            integer=True,
            hint="epochs of linear probing before fine-tuning; without a probe, leave the callback out",
        )
        backbone = renamed_argument("LPFTCallback", "module", module, "backbone", backbone, "backbone")
        check_dotted_name("backbone", backbone, example="'backbone'")
        self.backbone = backbone
        self._submodule: nn.Module | None = None
        self._requires_grad: dict[str, bool] = {}
        self._norm_modes: dict[str, bool] = {}
        self._frozen = False

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Check the strategy and the submodule; remember its ``requires_grad`` flags (nothing is frozen here)."""
        if stage != TrainerFn.FITTING:
            return
        refuse_unsupported(
            trainer.strategy,
            pl_module,
            callback="LPFTCallback",
            needs="the callback toggles `requires_grad` of parameters that the strategy shards and flattens",
            fix=_FIND_UNUSED,
        )
        submodule = resolve_submodule(
            pl_module,
            self.backbone,
            argument="backbone",
            hint="Pass the dotted name of the pretrained part held fixed during the probe (e.g. 'backbone').",
        )
        self._submodule = submodule
        self._frozen = False
        self._requires_grad = {}
        self._norm_modes = {}
        if not any(param.requires_grad for param in submodule.parameters()):
            rank_zero_warn(
                f"LPFTCallback: `{self.backbone}` has no trainable parameter, so there is nothing to fine-tune after "
                "the probe (is the backbone frozen, e.g. `freeze_backbone=True`?)."
            )
        max_epochs = trainer.max_epochs
        if max_epochs is not None and 0 <= max_epochs <= self.probe_epochs:
            rank_zero_warn(
                f"LPFTCallback: `probe_epochs`={self.probe_epochs} >= max_epochs={max_epochs}, so the whole fit is a "
                f"linear probe and `{self.backbone}` is never fine-tuned."
            )

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Refuse DDP without ``find_unused_parameters``: the probe leaves the submodule without gradients."""
        require_unused_parameters(
            trainer,
            callback="LPFTCallback",
            why="during the probe the submodule gets no gradients",
            fix=_FIND_UNUSED,
        )

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Hold the submodule fixed in probe epochs; give it back its flags from epoch ``probe_epochs`` on."""
        probing = self.probing(trainer.current_epoch)
        if probing:
            self._freeze()
        else:
            self._restore()
        if trainer.current_epoch in (0, self.probe_epochs):
            what = f"linear probe, `{self.backbone}` fixed" if probing else f"fine-tuning, `{self.backbone}` trains"
            rank_zero_info(f"LPFTCallback: epoch {trainer.current_epoch}: {what}.")

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        """Keep the norm layers in eval mode during the probe, even if validation put the model back in train mode."""
        if self.probing(trainer.current_epoch):
            self._norms_eval()

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Leave the model as it came: flags and norm modes restored (a fit that ends inside the probe)."""
        self._restore()

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """Restore flags and norm modes when fit fails."""
        self._restore()

    @override
    def state_dict(self) -> dict[str, Any]:
        """The configuration (the stage is in the trainer's epoch), so a checkpoint records how it was trained."""
        return {"probe_epochs": self.probe_epochs, "backbone": self.backbone}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the constructor's configuration; warn when the checkpoint was trained with another one."""
        warn_if_settings_changed("LPFTCallback", state_dict, self.state_dict())

    def probing(self, epoch: int) -> bool:
        """Whether ``epoch`` belongs to the linear probe."""
        return epoch < self.probe_epochs

    def _freeze(self) -> None:
        if self._submodule is None:
            return
        if not self._frozen:
            # The flags as the probe finds them, not as they were at `setup`: callbacks listed after this one may
            # add or freeze parameters in their own `setup` (LoRACallback injects adapters and freezes the base).
            self._requires_grad = {name: param.requires_grad for name, param in self._submodule.named_parameters()}
        self._submodule.requires_grad_(False)
        self._frozen = True
        self._norms_eval()

    def _norms_eval(self) -> None:
        assert self._submodule is not None
        for name, sub in self._submodule.named_modules():
            if isinstance(sub, _NormBase) and sub.training:
                self._norm_modes.setdefault(name, True)
                sub.eval()

    def _restore(self) -> None:
        if self._submodule is None or not self._frozen:
            return
        self._frozen = False
        for name, param in self._submodule.named_parameters():
            param.requires_grad_(self._requires_grad.get(name, param.requires_grad))
        modules = dict(self._submodule.named_modules())
        for name, training in self._norm_modes.items():
            if name in modules:
                modules[name].train(training and self._submodule.training)
        self._norm_modes = {}
