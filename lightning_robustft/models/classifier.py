"""``ImageClassifier``: a backbone plus a linear ``head``, with per-set metrics for ID and several OOD sets."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_robustft.errors import RobustFTConfigError, check_config_number
from lightning_robustft.evaluation.loop import dataloader_names
from lightning_robustft.metrics import (
    OOD_AVERAGE,
    MetricName,
    format_results_table,
    make_metric_collection,
    ood_average,
    restrict_to_subset,
    sanitize_set_name,
)
from lightning_robustft.models.backbones import build_backbone
from lightning_robustft.models.distillation import (
    DISTILL_MODES,
    TEACHER_CHECKPOINT_KEY,
    DistillMode,
    FrozenTeacher,
    feature_distillation_loss,
    logit_distillation_loss,
)
from lightning_robustft.models.prompts import resolve_prompt_names, resolve_templates
from lightning_robustft.models.schedules import WarmupCosineLR

__all__ = ["ImageClassifier"]


class ImageClassifier(LightningModule):
    """Fine-tune an image backbone with a linear head; validate on an ID set and any number of named OOD sets.

    The model is always a plain ``backbone -> (normalise for CLIP) -> head``: robust fine-tuning methods come as
    callbacks that leave this structure untouched, so the fine-tuned checkpoint loads into this class (or any code
    that rebuilds it) with no wrapper modules.

    Validation sets are named. Each has its own metric objects (so sets never mix and each syncs across DDP ranks),
    is logged as ``val/<set>/<metric>`` and, for every set but the ID one, enters ``val/ood_avg/<metric>``. The names
    come from ``val_sets`` or, when it is ``None``, from the data module's ``val_set_names`` (or the keys of the dict
    that ``val_dataloader()`` returns) at ``setup``.

    With ``distill="logits"`` or ``"features"`` the training loss is ``CE + distill_weight * D`` toward the model as
    fit started (``docs/distillation.md``). It is a loss term here, not a callback: a callback could only add it with
    a second backward, which AMP scaling and DDP's reducer do not allow. The teacher, a frozen eval-mode copy of
    ``backbone`` and ``head`` taken at ``on_fit_start``, is held outside the module's registration, so
    ``state_dict()`` and the model left after fit stay plain; checkpoints carry it under ``"distill_teacher"``, so a
    run resumed with ``ckpt_path`` distills toward the original model (rebuilding it from the backbone spec would not
    be exact for a random or zero-shot head or a module backbone).

    Args:
        backbone: a spec string (``open_clip:ViT-B-32:openai``, ``timm:<name>[:random]``,
            ``torchvision:<name>[:<weights>|random]``) or an ``nn.Module`` mapping images to features.
        num_classes: number of classes; inferred from ``class_names`` when given.
        class_names: class names, in label order (needed for ``head_init="zeroshot"``).
        head_init: ``"random"`` (a freshly initialised linear head) or ``"zeroshot"`` (CLIP's zero-shot classifier
            built from ``class_names`` x ``templates``: the starting point of WiSE-FT / FLYP-style fine-tuning).
        templates: prompt templates with a ``{}`` for the class name, for the zero-shot head, or the name of
            open_clip's sets ``"openai_imagenet"`` (80 templates) / ``"simple_imagenet"``.
        prompt_names: the words for each class in the prompts when the class names are identifiers (a list, or
            ``"imagenet"`` for open_clip's ImageNet class names); default: class names with ``_`` read as spaces.
        feature_dim: feature width of a backbone given as a module, when it cannot be read from the module.
        val_sets: names of the validation sets, in the order of the validation dataloaders.
        id_set: the in-distribution validation set (default: the first one); every other set is OOD.
        class_subsets: ``{set name: [class indices]}`` for sets that cover only some classes; they are scored among
            those classes (the logits of other classes are ignored). Labels stay indexed in the full class list.
        metrics: metrics per set besides top-1 ``acc``: ``acc5``, ``macro_acc``, ``macro_f1``.
        label_smoothing: label smoothing of the training cross-entropy.
        optimizer: an optimizer factory (LightningCLI ``OptimizerCallable``); default AdamW with ``lr`` and
            ``weight_decay`` (no decay on biases and norm parameters).
        lr_scheduler: a scheduler factory; default: linear warm-up over ``warmup_steps`` then cosine decay to zero,
            stepped every optimizer step (``WarmupCosineLR``: a fit resumed with a larger ``max_epochs`` follows the
            longer schedule from the checkpoint's step).
        lr: learning rate of the default optimizer.
        weight_decay: weight decay of the default optimizer.
        warmup_steps: warm-up of the default schedule, in optimizer steps (an ``int``) or as a fraction of all
            steps (a ``float`` in ``[0, 1)``).
        head_lr_scale: the head trains at ``head_lr_scale`` times the learning rate of the rest (the default
            optimizer's ``lr``, or the injected optimizer's): a new, random head often wants about 10x, so that it
            fits quickly (an LP-FT probe converges in its few epochs) while the pretrained backbone moves slowly.
        freeze_backbone: train the head only (linear probing).
        print_table: print a per-set table at the end of each validation (rank zero, not during the sanity check).
        distill: distillation from the model at the start of fit: ``"none"``, ``"logits"`` (KD on the logits) or
            ``"features"`` (squared distance of the penultimate features).
        distill_weight: weight of the distillation term (finite, ``>= 0``; ``0`` only logs ``train/distill_loss``).
        distill_temperature: softening temperature ``T > 0`` of logit distillation.
    """

    def __init__(
        self,
        backbone: str | nn.Module = "open_clip:ViT-B-32:openai",
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        head_init: str = "random",
        templates: list[str] | str | None = None,
        prompt_names: list[str] | str | None = None,
        feature_dim: int | None = None,
        val_sets: list[str] | None = None,
        id_set: str | None = None,
        class_subsets: dict[str, list[int]] | None = None,
        metrics: list[MetricName] | None = None,
        label_smoothing: float = 0.0,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr: float = 1e-5,
        weight_decay: float = 0.1,
        warmup_steps: int | float = 0.1,
        head_lr_scale: float = 1.0,
        freeze_backbone: bool = False,
        print_table: bool = True,
        distill: DistillMode = "none",
        distill_weight: float = 1.0,
        distill_temperature: float = 1.0,
    ) -> None:
        super().__init__()
        ignored = ["optimizer", "lr_scheduler", *(["backbone"] if isinstance(backbone, nn.Module) else [])]
        self.save_hyperparameters(ignore=ignored)
        num_classes = _resolve_num_classes(num_classes, class_names)
        if head_init not in ("random", "zeroshot"):
            raise RobustFTConfigError(f"`head_init`={head_init!r}; allowed: 'random', 'zeroshot'.")
        if not 0.0 <= label_smoothing < 1.0:
            raise RobustFTConfigError(f"`label_smoothing`={label_smoothing} must be in [0, 1).")
        if (isinstance(warmup_steps, float) and not 0.0 <= warmup_steps < 1.0) or warmup_steps < 0:
            raise RobustFTConfigError(
                f"`warmup_steps`={warmup_steps}: give a number of steps (int >= 0) or a fraction in [0, 1) (float)."
            )
        _check_distill(distill, distill_weight, distill_temperature)
        check_config_number("head_lr_scale", head_lr_scale, "(0, inf)", hint="1 trains the head at the model's rate")

        built = build_backbone(backbone, feature_dim)
        self.backbone = built.module
        self.head = nn.Linear(built.feature_dim, num_classes)
        self.normalize_features = built.normalize_features
        self.train_transform = built.train_transform
        self.eval_transform = built.eval_transform
        if head_init == "zeroshot":
            self._init_zeroshot_head(built.zeroshot_weights, class_names, prompt_names, templates)
        if freeze_backbone:
            self.backbone.requires_grad_(False)

        self.num_classes = num_classes
        self.metric_names = list(metrics or ["acc"])
        self.val_set_names: list[str] = list(val_sets or [])
        self.id_set = id_set
        self.class_subsets = {name: sorted(idx) for name, idx in (class_subsets or {}).items()}
        self._check_subsets()
        self.val_metrics = nn.ModuleDict()
        self.test_metrics = nn.ModuleDict()
        self._add_metrics(self.val_metrics, self.val_set_names)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        # A list, not an attribute: a module attribute would register the teacher and put it into `state_dict`.
        self._teacher: list[FrozenTeacher] = []
        self._loaded_teacher: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------------ model
    def _init_zeroshot_head(
        self,
        zeroshot_weights: Any,
        class_names: list[str] | None,
        prompt_names: list[str] | str | None,
        templates: list[str] | str | None,
    ) -> None:
        if zeroshot_weights is None:
            raise RobustFTConfigError(
                "`head_init='zeroshot'` needs a CLIP backbone ('open_clip:<model>:<pretrained>'); this backbone has no "
                "text tower. Use head_init='random'."
            )
        names = resolve_prompt_names(prompt_names, class_names)
        if len(names) != self.head.out_features:
            raise RobustFTConfigError(f"{len(names)} prompt names for {self.head.out_features} classes.")
        weights = zeroshot_weights(names, resolve_templates(templates))
        with torch.no_grad():
            self.head.weight.copy_(weights)
            self.head.bias.zero_()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (the head's input): L2-normalised for CLIP backbones, as CLIP's classifier expects."""
        features = self.backbone(x)
        return F.normalize(features, dim=-1) if self.normalize_features else features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits over all classes."""
        return self.head(self.features(x))

    # --------------------------------------------------------------- training
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Cross-entropy (+ the distillation term) on one batch; logs ``train/loss``, ``acc``, ``distill_loss``."""
        x, y = batch
        features = self.features(x)
        logits = self.head(features)
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
        if self.hparams.distill != "none":
            distill_loss = self.distillation_loss(x, features, logits)
            self.log("train/distill_loss", distill_loss)
            loss = loss + self.hparams.distill_weight * distill_loss
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", (logits.argmax(-1) == y).float().mean())
        return loss

    @property
    def teacher(self) -> FrozenTeacher | None:
        """The frozen model that fit started from (``None`` outside a fit that distills)."""
        return self._teacher[0] if self._teacher else None

    def distillation_loss(self, x: torch.Tensor, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The distillation term ``D`` of a batch, given the student's ``features`` and ``logits`` of images ``x``."""
        teacher = self.teacher
        if teacher is None:
            raise RuntimeError("No teacher: the distillation term exists only during a fit with `distill` set.")
        if self.hparams.distill == "features":
            return feature_distillation_loss(features, teacher.features(x))
        return logit_distillation_loss(logits, teacher(x), self.hparams.distill_temperature)

    def on_fit_start(self) -> None:
        """Snapshot the teacher (backbone and head as fit starts), or restore the one a resumed checkpoint holds."""
        self._teacher.clear()
        if self.hparams.distill == "none":
            return
        self._teacher.append(FrozenTeacher(self.backbone, self.head, self.normalize_features))
        if self._loaded_teacher is not None:
            self._load_teacher(self._loaded_teacher)
            self._loaded_teacher = None
            rank_zero_info(f"ImageClassifier: {self.hparams.distill} distillation toward the checkpoint's teacher.")
        else:
            rank_zero_info(f"ImageClassifier: {self.hparams.distill} distillation toward the weights at fit start.")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the teacher's weights under ``"distill_teacher"``, so a resumed fit distills toward the same one."""
        if self.teacher is not None:
            checkpoint[TEACHER_CHECKPOINT_KEY] = self.teacher.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """When resuming a fit that distills, take the checkpoint's teacher (it wins over the resumed weights)."""
        trainer = self._trainer
        if self.hparams.distill == "none" or trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return
        if TEACHER_CHECKPOINT_KEY not in checkpoint:
            rank_zero_warn(
                f"ImageClassifier: the checkpoint has no {TEACHER_CHECKPOINT_KEY!r} (it was not trained with "
                "distillation), so the teacher is the checkpoint's weights, not the pretrained model."
            )
            return
        if self.teacher is not None:  # strategies that restore after `on_fit_start`
            self._load_teacher(checkpoint[TEACHER_CHECKPOINT_KEY])
        else:
            self._loaded_teacher = checkpoint[TEACHER_CHECKPOINT_KEY]

    def teardown(self, stage: str) -> None:
        """Release the teacher when fit ends (the next fit snapshots its own)."""
        if stage == TrainerFn.FITTING:
            self._teacher.clear()
            self._loaded_teacher = None

    def _load_teacher(self, state: Mapping[str, torch.Tensor]) -> None:
        teacher = self._teacher[0]
        missing = sorted(set(teacher.state_dict()) ^ set(state))
        if missing:
            raise RobustFTConfigError(
                f"The checkpoint's {TEACHER_CHECKPOINT_KEY!r} does not match this model's backbone and head; keys in "
                f"one but not the other: {missing[:10]}."
            )
        teacher.load_state_dict(state)

    def configure_optimizers(self) -> Any:
        """The injected optimizer / scheduler factories, or AdamW + warm-up cosine by default."""
        head_scale = self.hparams.head_lr_scale
        groups = _decay_groups(self, head=self.head if head_scale != 1.0 else None)
        if not groups:
            raise RobustFTConfigError("No parameter requires gradients: nothing to optimise.")
        if self.optimizer_factory is not None:
            optimizer = self.optimizer_factory(groups)
        else:
            optimizer = torch.optim.AdamW(groups, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        for group in optimizer.param_groups:  # before the scheduler, which records each group's starting rate
            if group.get("head"):
                group["lr"] *= head_scale
        if self.lr_scheduler_factory is not None:
            scheduler = self.lr_scheduler_factory(optimizer)
        else:
            total = int(self.trainer.estimated_stepping_batches)
            warmup = self.hparams.warmup_steps
            warmup = int(warmup * total) if isinstance(warmup, float) else int(warmup)
            scheduler = WarmupCosineLR(optimizer, warmup_steps=min(warmup, max(total - 1, 0)), total_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------- evaluation
    def setup(self, stage: str) -> None:
        """Take set names and class subsets from the data module when they were not given to the constructor."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None:
            if not self.val_set_names:
                self.val_set_names = list(getattr(datamodule, "val_set_names", []) or [])
            if self.id_set is None:
                self.id_set = getattr(datamodule, "id_set", None)
            if not self.class_subsets:
                self.class_subsets = dict(getattr(datamodule, "class_subsets", {}) or {})
                self._check_subsets()
        self._add_metrics(self.val_metrics, self.val_set_names)
        self._add_metrics(self.test_metrics, list(getattr(datamodule, "test_set_names", []) or []))

    def _add_metrics(self, store: nn.ModuleDict, names: Sequence[str]) -> None:
        for name in names:
            key = sanitize_set_name(name)
            if key not in store:
                num_classes = len(self.class_subsets.get(name, ())) or self.num_classes
                store[key] = make_metric_collection(num_classes, self.metric_names).to(self.device)

    def _check_subsets(self) -> None:
        for name, subset in self.class_subsets.items():
            bad = [i for i in subset if not 0 <= i < self.num_classes]
            if bad or len(set(subset)) != len(subset):
                raise RobustFTConfigError(
                    f"`class_subsets[{name!r}]` must hold distinct class indices in [0, {self.num_classes}); got {bad}."
                )

    def _set_names(self, stage: str) -> list[str]:
        loaders = self.trainer.val_dataloaders if stage == "val" else self.trainer.test_dataloaders
        names = self.val_set_names if stage == "val" else list(getattr(self.trainer.datamodule, "test_set_names", []))
        return dataloader_names(loaders, names, prefix=stage)

    def update_val_metrics(self, set_name: str, logits: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of logits to a set's validation metrics (restricted to the set's class subset, if any)."""
        self._update(self.val_metrics, set_name, logits, target)

    def compute_val_metrics(self, set_name: str) -> dict[str, float]:
        """Compute (synced across ranks) and reset a set's validation metrics."""
        return _compute_and_reset(self.val_metrics[sanitize_set_name(set_name)])

    def _update(self, store: nn.ModuleDict, set_name: str, logits: torch.Tensor, target: torch.Tensor) -> None:
        key = sanitize_set_name(set_name)
        if key not in store:
            self._add_metrics(store, [set_name])
        if set_name in self.class_subsets:
            subset = torch.as_tensor(self.class_subsets[set_name], device=logits.device)
            logits, target = restrict_to_subset(logits, target, subset)
        store[key].update(logits, target)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Score one batch of the ``dataloader_idx``-th validation set."""
        x, y = batch
        self._update(self.val_metrics, self._set_names("val")[dataloader_idx], self(x), y)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Score one batch of the ``dataloader_idx``-th test set."""
        x, y = batch
        self._update(self.test_metrics, self._set_names("test")[dataloader_idx], self(x), y)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        """Class probabilities for a batch of images (``(x, y)`` or ``x``)."""
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(x).softmax(-1)

    def on_validation_epoch_end(self) -> None:
        """Log ``val/<set>/<metric>`` for every set and ``val/ood_avg/<metric>``; print the table."""
        self._log_results("val", self.val_metrics, self._set_names("val"))

    def on_test_epoch_end(self) -> None:
        """Log ``test/<set>/<metric>`` for every set and ``test/ood_avg/<metric>``; print the table."""
        self._log_results("test", self.test_metrics, self._set_names("test"))

    def _log_results(self, stage: str, store: nn.ModuleDict, names: list[str]) -> None:
        results = {name: _compute_and_reset(store[sanitize_set_name(name)]) for name in names}
        id_set = self.id_set if self.id_set in results else (names[0] if names else None)
        logged = {f"{stage}/{name}/{metric}": value for name, row in results.items() for metric, value in row.items()}
        for metric in self.metric_names if results else []:
            average = ood_average(results, id_set or "", metric)
            if average is not None:
                logged[f"{stage}/{OOD_AVERAGE}/{metric}"] = average
        # Values are already synced by torchmetrics; sync_dist only silences Lightning's epoch-level warning.
        self.log_dict(logged, sync_dist=True, add_dataloader_idx=False)
        if self.hparams.print_table and results and not self.trainer.sanity_checking:
            title = f"{stage} results (epoch {self.current_epoch}, step {self.global_step})"
            rank_zero_info("\n" + format_results_table(results, id_set, title))


def _resolve_num_classes(num_classes: int | None, class_names: list[str] | None) -> int:
    if class_names is not None and num_classes is not None and len(class_names) != num_classes:
        raise RobustFTConfigError(
            f"`num_classes`={num_classes} disagrees with len(class_names)={len(class_names)}: give one of them."
        )
    resolved = len(class_names) if class_names is not None else num_classes
    if resolved is None or resolved < 2:
        raise RobustFTConfigError(f"Give `num_classes` (>= 2) or `class_names`; got num_classes={num_classes}.")
    return resolved


def _check_distill(distill: str, weight: float, temperature: float) -> None:
    if distill not in DISTILL_MODES:
        raise RobustFTConfigError(f"`distill`={distill!r}; allowed: 'none', 'logits', 'features'.")
    check_config_number("distill_weight", weight, "[0, inf)", hint="the weight of the distillation loss")
    check_config_number("distill_temperature", temperature, "(0, inf)", hint="the softmax temperature, e.g. 2")


def _compute_and_reset(collection: Any) -> dict[str, float]:
    values = {name: float(value) for name, value in collection.compute().items()}
    collection.reset()
    return values


def _decay_groups(module: nn.Module, head: nn.Module | None = None) -> list[dict[str, Any]]:
    """Parameter groups with no weight decay on biases, norms and scales (decaying them hurts fine-tuning).

    The decayed group carries no ``weight_decay`` key, so an injected optimizer's own ``weight_decay`` applies. With
    ``head``, its parameters get groups of their own marked ``"head": True`` (for their own learning rate); without,
    the two groups are those of earlier versions, so their checkpoints resume.
    """
    head_ids = {id(param) for param in head.parameters()} if head is not None else set()
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for param in module.parameters():
        if param.requires_grad:
            groups.setdefault((id(param) in head_ids, param.ndim >= 2), []).append(param)
    built = []
    for in_head in (False, True):
        for decayed in (True, False):
            params = groups.get((in_head, decayed))
            if params:
                group: dict[str, Any] = {"params": params, **({} if decayed else {"weight_decay": 0.0})}
                built.append({**group, "head": True} if in_head else group)
    return built
