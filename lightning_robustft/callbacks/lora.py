"""``LoRACallback``: low-rank adapters (through ``peft``) while fitting, merged back into a plain model at the end."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_robustft._optional import require
from lightning_robustft.callbacks._shared import (
    check_dotted_name,
    refuse_unsupported,
    renamed_argument,
    resolve_submodule,
    warn_if_settings_changed,
)
from lightning_robustft.errors import RobustFTConfigError, RobustFTConfigTypeError, check_config_number

if TYPE_CHECKING:
    from peft import LoraModel

__all__ = ["LoRACallback", "check_strategy", "refuse_incompatible_callbacks"]

#: Layer types that peft's LoRA can wrap when named in ``target_modules``.
_SUPPORTED_LAYERS = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention)

_ADAPTER = "default"


class LoRACallback(Callback):
    r"""Fine-tune a submodule through LoRA adapters (``peft``), then merge them so that fit leaves a plain model.

    LoRA (Hu et al., ICLR 2022) freezes a pretrained weight ``W`` and trains a low-rank update, ``W + (alpha / r) *
    B @ A`` with ``A`` (``r x in``) and ``B`` (``out x r``, zero at the start, so training starts at the pretrained
    model). Few parameters move and the pretrained weights stay in place, which keeps fine-tuning close to the
    pretrained model: a regulariser in the same family as WiSE-FT or weight penalties toward the pretrained weights.

    In ``setup(stage="fit")`` (before optimizers exist, and before a checkpoint is restored) the callback injects
    ``peft`` LoRA layers into the submodule ``backbone`` with ``peft.LoraModel`` and freezes every other parameter of
    that submodule (its biases and norms included); parameters outside it (the head) keep training unless
    ``train_head=False``. At the end of fit (``on_train_end``, or ``on_exception`` when fit fails) it merges the
    adapters into the base weights with ``peft``'s ``merge_and_unload`` and restores every parameter's
    ``requires_grad``, so the module is structurally the model it was before: the same classes, the same
    ``state_dict`` keys, no ``peft`` wrapper, no inference overhead, and the outputs of the adapted model.

    Checkpoints saved during fit hold the adapted structure (``...base_layer.weight``, ``...lora_A.default.weight``,
    ``...lora_B.default.weight``). Resume such a run with the same callback in the Trainer (``ckpt_path=``): the
    adapters are injected in ``setup``, before Lightning loads the checkpoint, so the run continues exactly. To turn
    such a checkpoint into a plain model without training, use
    [`inject`][lightning_robustft.callbacks.lora.LoRACallback.inject], load the state dict, then
    [`merge`][lightning_robustft.callbacks.lora.LoRACallback.merge]. A checkpoint saved after fit (merged) is a plain
    model: load its weights into a new model and start a new fit rather than resuming it with ``ckpt_path``.

    Default targets (``target_modules=None`` and ``target_parameters=None``) are the ``nn.Linear`` layers of the
    submodule, and the fused query/key/value weight ``in_proj_weight`` of every ``nn.MultiheadAttention`` (through
    ``peft``'s ``target_parameters``, which adds the low-rank update to the raw parameter during the attention's
    forward). For open_clip's ViT this adapts, in every block, ``attn.in_proj_weight`` (q, k, v), ``mlp.c_fc`` and
    ``mlp.c_proj``. The attention output projection ``attn.out_proj`` is **not** adapted: ``nn.MultiheadAttention``
    reads ``out_proj.weight`` directly and never calls ``out_proj``'s forward, so a LoRA wrapper on it would be
    silently ignored (naming such a layer in ``target_modules`` is refused). Patch embeddings (convolutions), class and
    positional embeddings, norms and open_clip's ``proj`` stay frozen. ``peft`` cannot apply dropout to a raw
    parameter, so with ``dropout > 0`` the default leaves ``in_proj_weight`` out (with a warning).
    ``target_modules=["attn"]`` selects ``peft``'s own ``nn.MultiheadAttention`` LoRA instead (q, k, v and the output
    projection), which merges and unmerges the update into the frozen weights at every forward, so those weights
    drift in their last bits during training.

    Args:
        r: rank of the update (``>= 1``).
        alpha: scale numerator; the update is scaled by ``alpha / r`` (``> 0``).
        dropout: dropout on the input of the LoRA branch, in ``[0, 1)``.
        target_modules: names of the layers to adapt, relative to ``backbone``, with ``peft``'s rule: a layer matches
            a name when its dotted name equals it or ends with ``"." + name`` (e.g. ``["c_fc", "c_proj"]``). Each
            name must match a Linear, convolution, embedding or ``nn.MultiheadAttention`` layer. ``None``: see above.
        target_parameters: names of raw weight parameters to adapt, relative to ``backbone``, same matching rule (e.g.
            ``["attn.in_proj_weight"]``); needs ``dropout=0``. ``None`` with ``target_modules=None``: see above;
            ``None`` with ``target_modules`` given: none.
        backbone: dotted name of the submodule to adapt (resolved with ``get_submodule``).
        train_head: keep the parameters outside ``backbone`` (the classification head) trainable as they are;
            ``False`` freezes them during fit, so that only the LoRA weights train.
        module: deprecated name of ``backbone``.

    ``WiSEFTCallback`` and ``GMixoutCallback`` are refused in the same Trainer (in either order), since they would
    act on the LoRA factors instead of the model's weights; ``WeightPenaltyCallback`` composes (it penalises the
    factors, pulling the update toward zero), and so does ``LPFTCallback``.

    Example::

        trainer = Trainer(callbacks=[LoRACallback(r=8, alpha=16, backbone="backbone")])
        trainer.fit(model, datamodule=dm)  # afterwards `model` is the plain model with the update merged

    In a LightningCLI config::

        trainer:
          callbacks:
            - class_path: lightning_robustft.callbacks.LoRACallback
              init_args: {r: 8, alpha: 16, backbone: backbone}
    """

    def __init__(
        self,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        target_modules: list[str] | None = None,
        target_parameters: list[str] | None = None,
        backbone: str = "backbone",
        train_head: bool = True,
        module: str | None = None,
    ) -> None:
        self.r = check_config_number("r", r, "[1, inf)", integer=True, hint="the rank of the LoRA update; 8 is usual")
        self.alpha = check_config_number("alpha", alpha, "(0, inf)", hint="the update is scaled by alpha / r")
        self.dropout = check_config_number("dropout", dropout, "[0, 1)", hint="dropout on the LoRA branch's input")
        for name, names in (("target_modules", target_modules), ("target_parameters", target_parameters)):
            if names is not None and (
                isinstance(names, str) or not names or not all(isinstance(item, str) and item for item in names)
            ):
                raise RobustFTConfigTypeError(
                    f"`{name}`={names!r} must be None or a non-empty list of dotted names, e.g. ['c_fc', 'c_proj']."
                )
        if target_parameters is not None and dropout > 0:
            raise RobustFTConfigError(
                f"`target_parameters`={target_parameters!r} needs `dropout`=0 (got {dropout}): peft cannot apply "
                "dropout on the input of an update added to a raw parameter."
            )
        backbone = renamed_argument("LoRACallback", "module", module, "backbone", backbone, "backbone")
        check_dotted_name("backbone", backbone, example="'backbone'")
        if not isinstance(train_head, bool):
            raise RobustFTConfigTypeError(f"`train_head`={train_head!r} must be True or False.")
        self.target_modules = list(target_modules) if target_modules is not None else None
        self.target_parameters = list(target_parameters) if target_parameters is not None else None
        self.backbone = backbone
        self.train_head = train_head
        self._tuner: LoraModel | None = None
        self._requires_grad: dict[str, bool] = {}
        self._order: dict[str, list[str]] = {}
        self._adapted: list[str] = []

    @property
    def adapted(self) -> list[str]:
        """Dotted names (relative to ``backbone``) of the layers and parameters that carry LoRA weights in this fit."""
        return list(self._adapted)

    @property
    def scaling(self) -> float:
        """The factor of the update, ``alpha / r``."""
        return self.alpha / self.r

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Refuse sharded strategies, then inject the adapters (before optimizers exist and a checkpoint loads)."""
        if stage != TrainerFn.FITTING:
            return
        check_strategy(trainer.strategy)
        refuse_incompatible_callbacks(trainer.callbacks)
        self.inject(pl_module)
        lora = sum(p.numel() for n, p in pl_module.named_parameters() if "lora_" in n)
        trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        rank_zero_info(
            f"LoRACallback: r={self.r}, alpha={self.alpha:g}, dropout={self.dropout:g} on {len(self._adapted)} "
            f"targets of `{self.backbone}` ({lora:,} LoRA parameters; {trainable:,} trainable in all)."
        )

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Merge the adapters into the base weights: the model is the plain one from here on (``on_fit_end``)."""
        self.merge(pl_module)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Merge after a fit that had nothing to train (Lightning then skips ``on_train_end``); else a no-op."""
        if stage == TrainerFn.FITTING:
            self.merge(pl_module)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """Merge the adapters when fit fails, so the model is plain and holds what was learned."""
        self.merge(pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        """The configuration and the adapted names, so a checkpoint records how its LoRA keys came about."""
        return {
            "r": self.r,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "backbone": self.backbone,
            "adapted": list(self._adapted),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the constructor's configuration; warn when the checkpoint was trained with another one."""
        warn_if_settings_changed("LoRACallback", state_dict, self.state_dict())

    def inject(self, pl_module: nn.Module) -> None:
        """Inject LoRA layers into ``pl_module.<backbone>`` and set which parameters train (what ``setup`` does).

        Raises:
            RobustFTConfigError: ``backbone`` is not a submodule, or a target name matches nothing or a layer that
                LoRA cannot serve.
            ImportError: ``peft`` is not installed (``pip install 'lightning-robustft[lora]'``).
        """
        if self._tuner is not None:
            self.merge(pl_module)
        submodule = resolve_submodule(
            pl_module,
            self.backbone,
            argument="backbone",
            hint="Pass the dotted name of the pretrained part to adapt (e.g. 'backbone').",
        )
        if isinstance(submodule, _SUPPORTED_LAYERS):
            raise RobustFTConfigError(
                f"`backbone`={self.backbone!r} is a single {type(submodule).__name__}; LoRACallback adapts the layers "
                f"inside a submodule. Pass its parent and name the layer in `target_modules`."
            )
        peft = require("peft", "lora", feature="LoRACallback")
        target_modules, target_parameters = self._resolve_targets(submodule, peft)
        self._requires_grad = {name: param.requires_grad for name, param in pl_module.named_parameters()}
        self._order = {name: list(sub._parameters) for name, sub in submodule.named_modules()}
        config_kwargs: dict[str, Any] = {"target_parameters": target_parameters} if target_parameters else {}
        config = peft.LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=target_modules,
            bias="none",
            **config_kwargs,
        )
        try:
            self._tuner = peft.LoraModel(submodule, config, _ADAPTER)
        except (ValueError, TypeError) as error:
            raise RobustFTConfigError(f"peft could not inject LoRA into `{self.backbone}`: {error}") from error
        if not self.train_head:
            prefix = self.backbone + "."
            for name, param in pl_module.named_parameters():
                if not name.startswith(prefix):
                    param.requires_grad_(False)

    def merge(self, pl_module: nn.Module) -> None:
        """Merge the adapters into the base weights, remove every ``peft`` wrapper and restore ``requires_grad``.

        A no-op when no adapter is injected (so it is safe to call twice).
        """
        tuner = self._tuner
        if tuner is None:
            return
        self._tuner = None
        tuner.merge_and_unload()
        # Unwrapping a raw parameter re-registers it last in its module: put every module's parameters back in their
        # original order, so that the state_dict (and named_parameters) lists them exactly as before.
        for name, sub in tuner.model.named_modules():
            order = self._order.get(name)
            params = sub._parameters
            if order is not None and list(params) != order and set(params) == set(order):
                ordered = {key: params[key] for key in order}
                params.clear()
                params.update(ordered)
        self._order = {}
        for name, param in pl_module.named_parameters():
            if name in self._requires_grad:
                param.requires_grad_(self._requires_grad[name])
        self._requires_grad = {}
        rank_zero_info(f"LoRACallback: merged the adapters into `{self.backbone}`; it is the plain module again.")

    def _resolve_targets(self, submodule: nn.Module, peft: Any) -> tuple[str | list[str], list[str]]:
        modules = dict(submodule.named_modules())
        params = dict(submodule.named_parameters())
        ignored = _ignored_linears(submodule)
        supports_parameters = "target_parameters" in getattr(peft.LoraConfig, "__dataclass_fields__", {})
        if self.target_modules is None and self.target_parameters is None:
            layers = [name for name, sub in modules.items() if isinstance(sub, nn.Linear) and name not in ignored]
            attention = [
                f"{name}.in_proj_weight"
                for name, sub in modules.items()
                if isinstance(sub, nn.MultiheadAttention) and isinstance(sub.in_proj_weight, nn.Parameter)
            ]
            if attention and (self.dropout > 0 or not supports_parameters):
                why = "dropout > 0" if self.dropout > 0 else f"peft {peft.__version__} has no `target_parameters`"
                rank_zero_warn(
                    f"LoRACallback: the `in_proj_weight` of {len(attention)} nn.MultiheadAttention layers is not "
                    f"adapted ({why}); only Linear layers are."
                )
                attention = []
            if not layers and not attention:
                raise RobustFTConfigError(
                    f"`backbone`={self.backbone!r} ({type(submodule).__name__}) has no nn.Linear layer and no "
                    "nn.MultiheadAttention to adapt. Name the layers in `target_modules`; some submodule names: "
                    f"{[name for name in modules if name][:8]}."
                )
            self._adapted = layers + attention
            # A regex is matched in full by peft, so only these exact names are wrapped (a list matches suffixes).
            return ("|".join(re.escape(name) for name in layers) if layers else []), attention
        chosen: list[str] = []
        for target in self.target_modules or []:
            matched = [name for name in modules if name and _matches(name, target)]
            if not matched:
                raise RobustFTConfigError(
                    f"`target_modules` name {target!r} matches no layer of `{self.backbone}` (a layer matches when its "
                    f"dotted name equals the name or ends with '.' + name). Some layer names: "
                    f"{[name for name in modules if name][:8]}."
                )
            for name in matched:
                if name in ignored:
                    raise RobustFTConfigError(
                        f"`target_modules` name {target!r} matches {name!r}, the output projection of an "
                        "nn.MultiheadAttention: its forward is never called, so a LoRA layer there would be ignored. "
                        "Target the attention module itself (peft's MultiheadAttention LoRA) or its "
                        "'in_proj_weight' with `target_parameters`."
                    )
                if not isinstance(modules[name], _SUPPORTED_LAYERS):
                    raise RobustFTConfigError(
                        f"`target_modules` name {target!r} matches {name!r}, a {type(modules[name]).__name__}; LoRA "
                        "serves nn.Linear, convolutions, nn.Embedding and nn.MultiheadAttention."
                    )
            chosen += matched
        for target in self.target_parameters or []:
            matched = [name for name in params if _matches(name, target)]
            if not matched:
                raise RobustFTConfigError(
                    f"`target_parameters` name {target!r} matches no parameter of `{self.backbone}`. Some parameter "
                    f"names: {list(params)[:8]}."
                )
            if not supports_parameters:
                raise RobustFTConfigError(
                    f"`target_parameters` needs a peft release with LoRA on raw parameters; peft {peft.__version__} "
                    "has none. Upgrade peft or leave `target_parameters` out."
                )
            chosen += matched
        self._adapted = sorted(set(chosen), key=chosen.index)
        return list(self.target_modules or []), list(self.target_parameters or [])


def check_strategy(strategy: Strategy) -> None:
    """Refuse sharded strategies: merging needs the whole base weights and adapters on every rank."""
    refuse_unsupported(
        strategy,
        None,
        callback="LoRACallback",
        needs="the callback replaces layers in place and merges whole weights at the end of fit",
    )


def _ignored_linears(module: nn.Module) -> set[str]:
    """Names of the ``out_proj`` Linear of every ``nn.MultiheadAttention``: read as a weight, never called."""
    return {
        f"{name}.out_proj" if name else "out_proj"
        for name, sub in module.named_modules()
        if isinstance(sub, nn.MultiheadAttention) and isinstance(getattr(sub, "out_proj", None), nn.Linear)
    }


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def refuse_incompatible_callbacks(callbacks: list[Callback]) -> None:
    """Refuse callbacks that would act on the adapters' factors instead of the model's weights, in either order.

    Checked in ``setup``, before the adapters are injected, whatever the place of the other callback in
    ``trainer.callbacks`` (its own ``setup`` changes nothing that must be undone).

    * ``WiSEFTCallback`` snapshots ``theta_0`` when fit starts, after the adapters are injected, so it would mix
      ``lora_A`` and ``lora_B`` separately, and ``B @ A`` is not linear in them. The correct WiSE-FT of a LoRA
      fine-tune interpolates the merged (plain) weights, which ``run_wiseft`` does after the fact.
    * ``GMixoutCallback`` mixes whole weight tensors with their pretrained values; under LoRA those weights are
      frozen and the trainable tensors are the factors, which start at zero (``lora_B``) or at random (``lora_A``),
      not at pretrained values. It also resolves its targets before the adapters rename them (``weight`` becomes
      ``base_layer.weight``).

    Raises:
        RobustFTConfigError: one of those callbacks is in ``callbacks``.
    """
    from lightning_robustft.callbacks.gmixout import GMixoutCallback
    from lightning_robustft.callbacks.wise_ft import WiSEFTCallback

    if any(isinstance(callback, WiSEFTCallback) for callback in callbacks):
        raise RobustFTConfigError(
            "LoRACallback and WiSEFTCallback cannot share a Trainer: WiSE-FT would interpolate the LoRA factors "
            "(lora_A, lora_B) instead of the merged weights, and B @ A is not linear in them. Fine-tune with "
            "LoRACallback, save the merged model (e.g. `torch.save({'state_dict': model.state_dict()}, "
            "'lora.ckpt')`), then run `run_wiseft(model, 'lora.ckpt', val_loaders, zeroshot='zeroshot.ckpt')`."
        )
    if any(isinstance(callback, GMixoutCallback) for callback in callbacks):
        raise RobustFTConfigError(
            "LoRACallback and GMixoutCallback cannot share a Trainer: GMixout mixes weights with their pretrained "
            "values, but under LoRA the pretrained weights are frozen and only the LoRA factors train, which start "
            "at zero or at random. Use one of them: GMixoutCallback alone (at p=0.9 each step trains a random 10% "
            "of the entries, a sparse update as LoRA's is low-rank), or LoRACallback alone (with "
            "`WeightPenaltyCallback` to keep the update small, if you want a pull toward the pretrained weights)."
        )
