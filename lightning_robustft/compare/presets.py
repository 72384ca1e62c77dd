"""Method presets of ``robustft compare``: what a method adds to the user's base config.

A preset is data, not code: callbacks to append to ``trainer.callbacks`` (``class_path`` + ``init_args``, exactly as
in a ``robustft fit`` YAML file) and overrides of the model's ``init_args``. So a new method is a few lines of YAML::

    # presets.yaml, passed as --presets presets.yaml
    gmixout_p97:
      callbacks:
        - class_path: lightning_robustft.GMixoutCallback
          init_args: {p: 0.97, resample_every: 10}
    kd_features:
      model: {distill: features, distill_weight: 0.5}
    lora_r4:
      callbacks:
        - class_path: lightning_robustft.LoRACallback
          init_args: {r: 4, alpha: 8}
      lr_scale: 3.0

Two kinds of method need no training of their own:

* ``<method>+wiseft`` (alias ``wiseft`` for ``ft+wiseft``): the trained method's weights interpolated with its
  starting weights at ``alpha = 0.5`` (WiSE-FT's recommendation when no OOD data may choose; ``--wiseft-alpha``).
  It is a point of the method's own WiSE-FT curve, so it costs nothing.
* ``greedy_soup``: per seed, the greedy soup (chosen on ID validation) of the baseline ``ft`` runs of every learning
  rate of the grid, as in Wortsman et al. (2022).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lightning_robustft.errors import RobustFTConfigError

__all__ = [
    "BUILTIN_PRESETS",
    "SOUP",
    "WISEFT_SUFFIX",
    "Method",
    "Preset",
    "check_preset",
    "import_class",
    "load_presets",
    "resolve_methods",
]

WISEFT_SUFFIX = "+wiseft"
SOUP = "greedy_soup"
_PRESET_KEYS = ("callbacks", "model", "lr_scale", "start", "description")


@dataclass(frozen=True)
class Preset:
    """A trained method: what it adds to the base config.

    Attributes:
        name: the method's name in the grid and the outputs.
        callbacks: ``[{"class_path": ..., "init_args": {...}}]`` appended to the base config's callbacks.
        model: overrides merged into the model's ``init_args`` (e.g. ``{"distill": "logits"}``).
        lr_scale: the method trains at ``lr_scale * lr`` for each ``--lrs`` value (LoRA and linear probes want
            larger rates than full fine-tuning).
        start: where the method's WiSE-FT curve starts: ``"init"`` (the weights fit starts from) or ``"probe"`` (the
            model after LP-FT's probe epochs, as in the WiSE-FT paper).
        description: the settings in words, for the tables.
    """

    name: str
    callbacks: tuple[Mapping[str, Any], ...] = ()
    model: Mapping[str, Any] = field(default_factory=dict)
    lr_scale: float = 1.0
    start: str = "init"
    description: str = ""


def _callback(class_path: str, **init_args: Any) -> dict[str, Any]:
    return {"class_path": class_path, "init_args": init_args}


BUILTIN_PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset("ft", description="full fine-tuning (the baseline)"),
        Preset("lp", model={"freeze_backbone": True}, lr_scale=30.0, description="linear probe, lr x30"),
        Preset(
            "gmixout",
            (_callback("lightning_robustft.GMixoutCallback", p=0.9, resample_every=5, anchor_decay=0.95),),
            description="GMixout p 0.9, k 5, anchor decay 0.95",
        ),
        Preset(
            "gmixout_sparse",
            (_callback("lightning_robustft.GMixoutCallback", p=0.9, resample_every=5, anchor_decay=0.95, sparse=True),),
            description="sparse GMixout p 0.9, k 5, anchor decay 0.95",
        ),
        Preset(
            "mixout",
            (_callback("lightning_robustft.GMixoutCallback", p=0.9, resample_every=1, anchor_decay=1.0),),
            description="Mixout p 0.9 (GMixout k 1, anchor decay 1)",
        ),
        Preset(
            "dropout_head",
            (_callback("lightning_robustft.DropoutHeadCallback", p=0.9),),
            description="very-large dropout p 0.9 on the head input",
        ),
        Preset(
            "l2sp",
            (_callback("lightning_robustft.WeightPenaltyCallback", strength=0.1, norm="l2"),),
            description="L2-SP strength 0.1",
        ),
        Preset(
            "kd",
            model={"distill": "logits", "distill_weight": 1.0, "distill_temperature": 2.0},
            description="distillation from the start, logits, weight 1, T 2",
        ),
        Preset(
            "lora",
            (_callback("lightning_robustft.LoRACallback", r=8, alpha=16),),
            lr_scale=3.0,
            description="LoRA r 8, alpha 16, lr x3",
        ),
        Preset(
            "lpft",
            (_callback("lightning_robustft.LPFTCallback"),),
            start="probe",
            description="LP-FT, probe 30% of the epochs; WiSE-FT from the probed model",
        ),
    )
}


@dataclass(frozen=True)
class Method:
    """One column of the comparison: a trained preset, its WiSE-FT point, or the greedy soup.

    Attributes:
        name: as given on the command line (``"gmixout+wiseft"``).
        trained: the preset whose cells it reads (``None`` for the soup, which reads the baseline ``ft`` cells).
        wiseft: the method is the trained preset's WiSE-FT point at ``alpha`` (``None``: its endpoint).
    """

    name: str
    trained: str | None
    wiseft: bool = False


def load_presets(path: str | Path | None) -> dict[str, Preset]:
    """The built-in presets, plus (overriding them by name) the user's from a YAML file.

    Raises:
        RobustFTConfigError: the file is missing, not a mapping, or a preset has unknown or ill-typed keys.
    """
    presets = dict(BUILTIN_PRESETS)
    if path is None:
        return presets
    file = Path(path)
    if not file.is_file():
        raise RobustFTConfigError(f"--presets {str(file)!r} does not exist or is not a file.")
    loaded = yaml.safe_load(file.read_text()) or {}
    if not isinstance(loaded, Mapping):
        raise RobustFTConfigError(f"{str(file)!r} must map preset names to {{callbacks: [...], model: {{...}}}}.")
    for name, spec in loaded.items():
        presets[str(name)] = _parse_preset(str(name), spec, file)
    return presets


def _parse_preset(name: str, spec: Any, file: Path) -> Preset:
    where = f"preset {name!r} in {str(file)!r}"
    if name == SOUP or name.endswith(WISEFT_SUFFIX) or name == "wiseft":
        raise RobustFTConfigError(f"{where}: the names 'greedy_soup', 'wiseft' and '*+wiseft' are reserved.")
    if not isinstance(spec, Mapping):
        raise RobustFTConfigError(f"{where} must be a mapping with keys among {list(_PRESET_KEYS)}.")
    unknown = sorted(set(spec) - set(_PRESET_KEYS))
    if unknown:
        raise RobustFTConfigError(f"{where} has unknown keys {unknown}; allowed: {list(_PRESET_KEYS)}.")
    callbacks = spec.get("callbacks") or []
    if not isinstance(callbacks, list) or not all(isinstance(c, Mapping) and "class_path" in c for c in callbacks):
        raise RobustFTConfigError(f"{where}: `callbacks` must be a list of {{class_path: ..., init_args: {{...}}}}.")
    model = spec.get("model") or {}
    if not isinstance(model, Mapping):
        raise RobustFTConfigError(f"{where}: `model` must map model arguments to values, e.g. {{distill: logits}}.")
    lr_scale = spec.get("lr_scale", 1.0)
    if isinstance(lr_scale, bool) or not isinstance(lr_scale, (int, float)) or not lr_scale > 0:
        raise RobustFTConfigError(f"{where}: `lr_scale`={lr_scale!r} must be a number > 0.")
    start = spec.get("start", "init")
    if start not in ("init", "probe"):
        raise RobustFTConfigError(f"{where}: `start`={start!r}; allowed: 'init', 'probe'.")
    return Preset(
        name,
        tuple(dict(c) for c in callbacks),
        dict(model),
        float(lr_scale),
        start,
        str(spec.get("description", "")),
    )


def resolve_methods(names: list[str], presets: Mapping[str, Preset]) -> list[Method]:
    """Turn the ``--methods`` names into `Method` entries; unknown names are an error listing the choices."""
    if not names:
        raise RobustFTConfigError("--methods is empty: name at least one method, e.g. `--methods ft gmixout`.")
    methods = []
    for name in dict.fromkeys(names):
        base = "ft" if name == "wiseft" else name.removesuffix(WISEFT_SUFFIX)
        if name == SOUP:
            methods.append(Method(name, None))
        elif base in presets:
            methods.append(Method(name, base, wiseft=base != name))
        else:
            choices = [*presets, SOUP, "wiseft", f"<method>{WISEFT_SUFFIX}"]
            raise RobustFTConfigError(f"Unknown method {name!r}. Known: {choices}; add your own with --presets.")
    return methods


def check_preset(preset: Preset, model_class: type | None) -> None:
    """Build the preset's callbacks and check its model overrides, so a typo fails before any training.

    Raises:
        RobustFTConfigError: a class that cannot be imported, an argument the class does not take, a value its
            constructor refuses, or a model override the model class does not take.
    """
    for spec in preset.callbacks:
        cls = import_class(spec["class_path"], f"preset {preset.name!r}")
        init_args = dict(spec.get("init_args") or {})
        _check_arguments(cls, init_args, f"preset {preset.name!r}: {spec['class_path']}")
        try:
            cls(**init_args)
        except RobustFTConfigError as error:
            raise RobustFTConfigError(f"preset {preset.name!r}: {error}") from error
        except (TypeError, ValueError) as error:
            raise RobustFTConfigError(f"preset {preset.name!r}: {spec['class_path']}({init_args}): {error}") from error
    if model_class is not None and preset.model:
        _check_arguments(model_class, dict(preset.model), f"preset {preset.name!r}: model {model_class.__name__}")


def _check_arguments(cls: type, init_args: Mapping[str, Any], where: str) -> None:
    parameters = inspect.signature(cls).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    unknown = sorted(set(init_args) - set(parameters))
    if unknown:
        raise RobustFTConfigError(
            f"{where} takes no argument(s) {unknown}; its arguments are {list(parameters)}. Is this version of the "
            "package older than the preset (e.g. `gmixout_sparse` needs `GMixoutCallback(sparse=...)`)?"
        )


def import_class(class_path: str, where: str) -> type:
    """Import ``package.module.Class``; an error that names ``where`` when it cannot."""
    module_name, _, class_name = str(class_path).rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as error:
        raise RobustFTConfigError(f"{where}: cannot import {class_path!r} ({error}).") from error
