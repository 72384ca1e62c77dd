"""Distillation from the frozen pretrained model: the two distillation terms and the frozen teacher copy.

``ImageClassifier(distill="logits" | "features")`` uses these; they hold no Lightning code. The teacher is a copy of
the ``backbone`` and ``head`` modules (never of the ``LightningModule``), frozen and in eval mode.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DISTILL_MODES",
    "TEACHER_CHECKPOINT_KEY",
    "DistillMode",
    "FrozenTeacher",
    "feature_distillation_loss",
    "frozen_copy",
    "logit_distillation_loss",
]

DistillMode = Literal["none", "logits", "features"]

#: The distillation modes ``ImageClassifier`` accepts.
DISTILL_MODES: tuple[str, ...] = ("none", "logits", "features")

#: Checkpoint key holding the teacher's weights, ``{"backbone.<...>": tensor, "head.<...>": tensor}`` (the same keys as
#: the plain model's ``state_dict``, so ``model.load_state_dict(checkpoint["distill_teacher"])`` gives the teacher).
TEACHER_CHECKPOINT_KEY = "distill_teacher"

# Module attributes that hold hooks: a teacher copy starts with none of them (a callback's hook on the student's head,
# e.g. DropoutHeadCallback's, must not act on the teacher, and deepcopy must not drag the hook's owner along).
_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def logit_distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Hinton's KD term ``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch.

    The ``T^2`` factor keeps the gradient's size independent of the temperature. Computed in fp32.

    Args:
        student_logits: ``(batch, classes)`` logits of the model being trained.
        teacher_logits: ``(batch, classes)`` logits of the frozen teacher (no gradient needed).
        temperature: softening temperature ``T > 0``.

    Returns:
        A scalar tensor.
    """
    log_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


def feature_distillation_loss(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the squared L2 distance ``||f_student - f_teacher||^2`` between feature vectors.

    Computed in fp32.

    Args:
        student_features: ``(batch, dim)`` penultimate features (the head's input) of the model being trained.
        teacher_features: ``(batch, dim)`` features of the frozen teacher.

    Returns:
        A scalar tensor.
    """
    return (student_features.float() - teacher_features.float()).pow(2).sum(-1).mean()


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with no hooks, no gradients and in eval mode (same device and dtype)."""
    memo: dict[int, object] = {}
    for sub in module.modules():
        for name in _HOOK_DICTS:
            hooks = sub.__dict__.get(name)
            if hooks is not None:
                memo[id(hooks)] = type(hooks)()
    copied = copy.deepcopy(module, memo)
    return copied.requires_grad_(False).eval()


class FrozenTeacher(nn.Module):
    """The model at the start of fine-tuning, ``backbone -> (normalise) -> head``, frozen and always in eval mode.

    Args:
        backbone: the student's backbone; it is copied (`frozen_copy`), never shared.
        head: the student's head; copied likewise.
        normalize_features: L2-normalise the backbone's features before the head (CLIP backbones).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, normalize_features: bool = False) -> None:
        super().__init__()
        self.backbone = frozen_copy(backbone)
        self.head = frozen_copy(head)
        self.normalize_features = normalize_features
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> FrozenTeacher:
        """Stay in eval mode whatever is asked: the teacher's dropout and batch-norm statistics never change."""
        return super().train(False)

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (the head's input), as ``ImageClassifier.features`` computes them."""
        features = self.backbone(x)
        return F.normalize(features, dim=-1) if self.normalize_features else features

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits over all classes."""
        return self.head(self.features(x))
