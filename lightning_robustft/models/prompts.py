"""Prompts for CLIP's zero-shot head: class names as the text encoder should read them, and prompt templates.

Folder names are often identifiers (ImageNet's ``n01440764``) or use underscores (DomainNet's ``aircraft_carrier``);
the text encoder needs words. Named sets reuse open_clip's own ImageNet class names and templates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from lightning_robustft.errors import RobustFTConfigError

__all__ = ["DEFAULT_TEMPLATES", "Template", "resolve_prompt_names", "resolve_templates"]

Template = str | Callable[[str], str]
DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)


def _named_templates() -> dict[str, Sequence[Template]]:
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    return {"openai_imagenet": OPENAI_IMAGENET_TEMPLATES, "simple_imagenet": SIMPLE_IMAGENET_TEMPLATES}


def _named_class_names() -> dict[str, Sequence[str]]:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return {"imagenet": IMAGENET_CLASSNAMES}


def resolve_templates(templates: Sequence[str] | str | None) -> list[Template]:
    """Templates with a ``{}`` for the class name, or the name of a built-in set (``openai_imagenet``, ...)."""
    if templates is None:
        return list(DEFAULT_TEMPLATES)
    if isinstance(templates, str):
        named = _named_templates()
        if templates not in named:
            raise RobustFTConfigError(
                f"`templates`={templates!r} is not a built-in template set {sorted(named)}; give a list of templates "
                "with '{}' where the class name goes."
            )
        return list(named[templates])
    missing = [t for t in templates if "{}" not in t]
    if not templates or missing:
        raise RobustFTConfigError(f"Every template needs a '{{}}' for the class name; these have none: {missing}.")
    return list(templates)


def resolve_prompt_names(prompt_names: Sequence[str] | str | None, class_names: Sequence[str] | None) -> list[str]:
    """The words for each class in the prompts.

    ``prompt_names`` (a list, or a built-in set such as ``imagenet``), else the class names with ``_`` read as spaces.
    """
    if isinstance(prompt_names, str):
        named = _named_class_names()
        if prompt_names not in named:
            raise RobustFTConfigError(f"`prompt_names`={prompt_names!r} is not a built-in set {sorted(named)}.")
        names = list(named[prompt_names])
    elif prompt_names is not None:
        names = list(prompt_names)
    elif class_names:
        names = [name.replace("_", " ") for name in class_names]
    else:
        raise RobustFTConfigError("`head_init='zeroshot'` needs `class_names` or `prompt_names` for the prompts.")
    if class_names is not None and len(names) != len(class_names):
        raise RobustFTConfigError(
            f"`prompt_names` has {len(names)} names but there are {len(class_names)} classes; give one per class."
        )
    return names
