"""``DropoutHeadCallback``: very large dropout on the penultimate features while fine-tuning."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_robustft.callbacks._shared import check_dotted_name, resolve_submodule, warn_if_settings_changed
from lightning_robustft.errors import RobustFTConfigError, check_config_number

__all__ = ["DropoutHeadCallback"]


class DropoutHeadCallback(Callback):
    """Inverted dropout at a very large rate on the input of the classification head, during training only.

    Zhang & Bottou ("Fine-tuning with very large dropout", arXiv 2403.00946) fine-tune with dropout of rate about 0.9
    on the penultimate representation: the head must then use many redundant features instead of the few that fit
    the fine-tuning distribution best, which keeps features the pretrained model learned for other distributions
    in use and improves OOD accuracy. Placing the dropout by a forward pre-hook instead of inserting an
    ``nn.Dropout`` means any ``LightningModule`` works unchanged and the module left after ``fit`` is exactly the
    plain model: the hook is installed when fit starts (``setup``), removed when training ends (``on_train_end``;
    ``teardown`` when there was nothing to train) or fails (``on_exception``), and a no-op whenever the head is in
    eval mode (validation, test, predict).

    The mask comes from PyTorch's global generator, so ``seed_everything`` makes runs reproducible. Survivors are
    scaled by ``1 / (1 - p)`` so the head sees features of the same expected size in training and in evaluation.
    The head must receive the features as its first positional argument (as ``nn.Linear`` does).

    Args:
        p: the dropout rate, in ``[0, 1)`` (``0`` disables it). The paper's recommendation is about 0.9.
        head: dotted path of the head submodule whose input is dropped (resolved with ``get_submodule``).

    Example::

        trainer = Trainer(callbacks=[DropoutHeadCallback(p=0.9, head="head")])
        trainer.fit(model, datamodule=dm)

    In a LightningCLI config::

        trainer:
          callbacks:
            - class_path: lightning_robustft.callbacks.DropoutHeadCallback
              init_args: {p: 0.9, head: head}
    """

    def __init__(self, p: float = 0.9, head: str = "head") -> None:
        self.p = check_config_number("p", p, "[0, 1)", hint="the dropout rate; 0.9 is the usual very-large rate")
        check_dotted_name("head", head, example="'head' or 'model.fc'")
        self.head = head
        self._handle: RemovableHandle | None = None

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Install the dropout pre-hook on the head when fit begins (before optimizers or DDP wrapping exist)."""
        if stage != TrainerFn.FITTING:
            return
        self._remove_hook()
        module = resolve_submodule(
            pl_module,
            self.head,
            hint="Pass the dotted name of the layer that maps features to logits (e.g. 'head' or 'model.fc').",
        )
        self._handle = module.register_forward_pre_hook(self._drop_input)
        rank_zero_info(f"DropoutHeadCallback: dropout p={self.p} on the input of `{self.head}` while training.")

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Remove the hook when training ends, so the trained model is the plain one."""
        self._remove_hook()

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Remove the hook after a fit that had nothing to train (Lightning then skips ``on_train_end``)."""
        if stage == TrainerFn.FITTING:
            self._remove_hook()

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """Remove the hook when fit fails (Lightning calls neither ``on_train_end`` nor ``teardown`` then)."""
        self._remove_hook()

    @override
    def state_dict(self) -> dict[str, Any]:
        """The configuration, so a checkpoint records how the model was trained."""
        return {"p": self.p, "head": self.head}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the constructor's configuration (it is what the user asked for now); warn if the checkpoint differs."""
        warn_if_settings_changed("DropoutHeadCallback", state_dict, self.state_dict())

    def _drop_input(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if not module.training or self.p == 0.0:
            return None
        if not args:
            raise RobustFTConfigError(
                f"`head`={self.head!r} was called without positional arguments; DropoutHeadCallback drops the first "
                "positional argument (the features). Call the head as `head(features)`."
            )
        return (F.dropout(args[0], p=self.p, training=True), *args[1:])

    def _remove_hook(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
