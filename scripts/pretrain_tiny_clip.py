"""Rebuild the shipped tiny CLIP: contrastive pretraining on the demo's ``pretrain`` digits under broad augmentation.

    python scripts/pretrain_tiny_clip.py --out lightning_robustft/assets/tiny_clip_mnist.pt

About 10 minutes on 2 CPU cores. The model is the open_clip architecture ``robustft-tiny-clip``; images are the 3,000
``pretrain`` digits (disjoint from every ID and OOD set) under broad augmentation (rotation, scale, shift, stroke
weight, colours, inversion, textured backgrounds, noise, blur, low contrast); captions are
``DEMO_TEMPLATES`` filled with the class name. Hollow outlined strokes (the demo's ID style) are never shown, so the
ID task stays one that fine-tuning can improve, as ImageNet is for CLIP. The loss is CLIP's symmetric contrastive
loss with every same-class caption in the batch counted as a positive (UniCL): with ten classes, many captions in a
batch describe the image equally well and must not be pushed away. Weights are saved in fp16 (open_clip loads them
into an fp32 model). At the end the script prints the zero-shot accuracy of the saved file on every demo set.

    python scripts/pretrain_tiny_clip.py --evaluate-only --out lightning_robustft/assets/tiny_clip_mnist.pt
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Sequence

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from lightning_robustft.data import demo
from lightning_robustft.models.tiny_clip import register_tiny_clip

# ----------------------------------------------------------------------------------------------------------------
# Augmentation: broad, but filled strokes only (the ID style, hollow outlines, stays out of pretraining).
# ----------------------------------------------------------------------------------------------------------------


def _ink_for(background: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random ink colour that contrasts with the background's mean brightness: dark on light, light on dark."""
    n = len(background)
    light = background.mean(axis=(1, 2, 3), keepdims=True) > 0.5
    dark_ink = rng.uniform(0.0, 0.35, size=(n, 1, 1, 3))
    light_ink = rng.uniform(0.65, 1.0, size=(n, 1, 1, 3))
    return np.where(light, dark_ink, light_ink).astype(np.float32)


def augment(masks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Broadly augmented RGB images ``(N, 32, 32, 3)`` in [0, 1] from ``(N, 32, 32)`` stroke masks."""
    n = len(masks)
    angles = np.where(rng.random(n) < 0.5, rng.uniform(-60.0, 60.0, n), 0.0)
    masks = demo.affine(masks, angles, rng.uniform(0.85, 1.15, n), rng.uniform(-2.0, 2.0, (n, 2)).astype(np.float32))
    weight = rng.random(n)[:, None, None]
    masks = np.where(weight < 0.25, demo.dilate(masks), np.where(weight > 0.9, demo.erode(masks), masks))

    # Backgrounds: black (plain digits), white (inverted), a flat colour, or a smooth colour texture.
    scheme = rng.choice(4, size=n, p=[0.35, 0.15, 0.25, 0.25])
    background = np.zeros((n, 32, 32, 3), np.float32)
    background[scheme == 1] = 1.0
    background[scheme == 2] = rng.uniform(0.0, 1.0, size=((scheme == 2).sum(), 1, 1, 3))
    textured = int((scheme == 3).sum())
    base = np.where(rng.random((textured, 1, 1, 1)) < 0.5, 0.05, 0.55)  # dark or light, so the ink stands out
    background[scheme == 3] = base + 0.4 * demo.wave_texture(rng, textured, cycles=(0.5, 4.0))
    images = demo.composite(background, _ink_for(background, rng), masks)

    # Corruptions: colour or grey Gaussian noise, blur, low contrast.
    noisy = np.flatnonzero(rng.random(n) < 0.4)
    noise = rng.normal(0.0, 1.0, (len(noisy), 32, 32, 3)).astype(np.float32)
    noise = np.where(rng.random((len(noisy), 1, 1, 1)) < 0.5, noise[..., :1], noise)
    images[noisy] += noise * rng.uniform(0.05, 0.35, (len(noisy), 1, 1, 1)).astype(np.float32)
    blurry = np.flatnonzero(rng.random(n) < 0.3)
    images[blurry] = demo.gaussian_blur(images[blurry], rng.uniform(0.5, 1.8, len(blurry)))
    contrast = np.where(rng.random(n) < 0.2, rng.uniform(0.4, 1.0, n), 1.0).astype(np.float32)[:, None, None, None]
    mean = images.mean(axis=(1, 2, 3), keepdims=True)
    return np.clip(mean + (images - mean) * contrast, 0.0, 1.0).astype(np.float32)


def to_model_input(images: np.ndarray) -> torch.Tensor:
    """``(N, 32, 32, 3)`` floats in [0, 1] -> normalised ``(N, 3, 32, 32)``, as open_clip's preprocess would give."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


# ----------------------------------------------------------------------------------------------------------------
# Loss, schedule, evaluation.
# ----------------------------------------------------------------------------------------------------------------


def multi_positive_clip_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, labels: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric CLIP loss where every pair with the same class is a positive (targets spread evenly over them)."""
    logits = logit_scale * image_features @ text_features.T
    same = (labels[:, None] == labels[None, :]).float()
    targets = same / same.sum(dim=1, keepdim=True)  # symmetric, so it serves both directions
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to zero."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def zero_shot_accuracy(model: torch.nn.Module, tokenizer, preprocess, splits: Sequence[str]) -> dict[str, float]:
    """Top-1 zero-shot accuracy per demo split through the real path: PIL images -> open_clip preprocess."""
    model.eval()
    weights = open_clip.build_zero_shot_classifier(
        model, tokenizer, demo.DEMO_CLASSES, demo.DEMO_TEMPLATES, use_tqdm=False
    )
    accuracy = {}
    for split in splits:
        dataset = demo.DemoDigits(split)
        images = torch.stack([preprocess(image) for image, _ in dataset])
        features = F.normalize(model.encode_image(images), dim=-1)
        predictions = (features @ weights).argmax(dim=-1)
        accuracy[split] = float((predictions == torch.tensor(dataset.targets)).float().mean())
    return accuracy


def format_table(accuracy: dict[str, float]) -> str:
    """A Markdown table of zero-shot accuracy, with the OOD average."""
    ood = [accuracy[name] for name in demo.DEMO_OOD_SETS if name in accuracy]
    rows = [f"| {name} | {100 * value:.1f} |" for name, value in accuracy.items()]
    if ood:
        rows.append(f"| OOD average | {100 * sum(ood) / len(ood):.1f} |")
    return "\n".join(["| set | zero-shot top-1 (%) |", "| --- | --- |", *rows])


# ----------------------------------------------------------------------------------------------------------------
# Training.
# ----------------------------------------------------------------------------------------------------------------


def train(args: argparse.Namespace) -> torch.nn.Module:
    """Pretrain a fresh tiny CLIP on the augmented ``pretrain`` split and return it (fp32)."""
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    name = register_tiny_clip()
    model = open_clip.create_model(name)
    tokenizer = open_clip.get_tokenizer(name)

    digits, labels = demo.render_split(demo.DEMO_PRETRAIN_SET)
    masks = digits[..., 0].astype(np.float32) / 255.0  # the pretrain split is plain white-on-black digits
    n_templates = len(demo.DEMO_TEMPLATES)
    captions = [template.format(c) for c in demo.DEMO_CLASSES for template in demo.DEMO_TEMPLATES]
    caption_tokens = tokenizer(captions)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    model.train()
    start = time.perf_counter()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        batch = rng.choice(len(masks), size=args.batch_size, replace=False)
        images = to_model_input(augment(masks[batch], rng))
        batch_labels = torch.from_numpy(labels[batch])
        templates = torch.from_numpy(rng.integers(0, n_templates, size=args.batch_size))
        image_features = model.encode_image(images, normalize=True)
        text_features = model.encode_text(caption_tokens, normalize=True)[batch_labels * n_templates + templates]
        loss = multi_positive_clip_loss(image_features, text_features, batch_labels, model.logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            elapsed = time.perf_counter() - start
            eta = elapsed / (step + 1) * (args.steps - step - 1)
            print(
                f"step {step + 1:5d}/{args.steps}  loss {loss.item():.4f}  "
                f"logit_scale {model.logit_scale.exp().item():6.2f}  {elapsed:6.0f}s elapsed, ~{eta:4.0f}s left",
                flush=True,
            )
    return model


def save_fp16(model: torch.nn.Module, path: str, args: argparse.Namespace) -> None:
    """Save the state dict in half precision under ``state_dict`` (the key open_clip's loader looks for)."""
    state_dict = {key: value.detach().half() for key, value in model.state_dict().items()}
    recipe = {key: getattr(args, key) for key in ("steps", "batch_size", "lr", "warmup", "weight_decay", "seed")}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save({"state_dict": state_dict, "model_name": register_tiny_clip(), "recipe": recipe}, path)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="lightning_robustft/assets/tiny_clip_mnist.pt", help="checkpoint path")
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--evaluate-only", action="store_true", help="only print the zero-shot table of --out")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.evaluate_only:
        model = train(args)
        save_fp16(model, args.out, args)
        print(f"saved {args.out} ({os.path.getsize(args.out) / 2**20:.1f} MiB)")
    name = register_tiny_clip()
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=args.out)
    splits = [split for split in demo.DEMO_SETS if split != demo.DEMO_PRETRAIN_SET]
    print(format_table(zero_shot_accuracy(model, open_clip.get_tokenizer(name), preprocess, splits)))


if __name__ == "__main__":
    main()
