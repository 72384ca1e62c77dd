"""GMixout benchmark: fused-pass bandwidth, training-step overhead and memory; prints Markdown tables.

    python benchmarks/gmixout.py            # full run (several minutes on 2 CPU cores)
    python benchmarks/gmixout.py --quick    # fewer steps

(a) Each fused pass's effective bandwidth against a plain copy of the same bytes (``benchmarks/gmixout_passes.py``).
(b) Median training-step time with and without ``GMixoutCallback`` (Lightning ``Trainer``, AdamW, random init): timm
    ViT-S/16 at 112 px, batch 32, and the open_clip ViT-B-32 image tower at 224 px (batch 8 on CPU, 32 on CUDA).
    Also the wall time spent inside the callback's hooks per step (in-hook): the callback's own cost, which stays
    readable when other jobs share the CPU and make the difference of two step medians noisy.
(c) Memory: the callback's extra persistent bytes counted exactly from the tensors its passes hold, next to the peak
    RSS (CPU) or ``torch.cuda.max_memory_allocated`` (CUDA) of the run.

Every (model, setting) pair runs in a fresh subprocess, so peaks and allocator state do not leak between runs.
Targets (issue 3): step ratio <= 1.05 on ViT-S/16; pass time <= 1.5x a copy of the same bytes; extra memory <= 2 fp32
copies of the target weights.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

from lightning_robustft.callbacks.gmixout import GMixoutCallback, select_targets

NUM_CLASSES = 10
SETTINGS: dict[str, dict[str, Any] | None] = {
    "plain fine-tuning": None,
    "GMixout p=0.9 (Mixout: k=1, β=1)": {"p": 0.9},
    "GMixout p=0.9, k=10, β=0.99": {"p": 0.9, "resample_every": 10, "anchor_decay": 0.99},
}


class Classifier(LightningModule):
    """A backbone + ``head`` trained with AdamW on random images: only the step cost matters here."""

    def __init__(self, model: str) -> None:
        super().__init__()
        if model == "vit_s16":
            import timm

            self.backbone = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=112, num_classes=0)
        elif model == "clip_b32":
            import open_clip

            self.backbone = open_clip.create_model("ViT-B-32", pretrained=None).visual
        else:
            raise ValueError(f"unknown model {model!r}")
        with torch.no_grad():
            width = self.backbone(torch.zeros(1, 3, IMAGE_SIZE[model], IMAGE_SIZE[model])).shape[-1]
        self.head = nn.Linear(width, NUM_CLASSES)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.head(self.backbone(x)), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-5)


IMAGE_SIZE = {"vit_s16": 112, "clip_b32": 224}
MODEL_LABEL = {"vit_s16": "timm ViT-S/16 @112, batch 32", "clip_b32": "open_clip ViT-B-32 image tower @224"}


def batch_size(model: str, device: str) -> int:
    return 8 if model == "clip_b32" and device == "cpu" else 32


class StepTimer(Callback):
    """Wall time between consecutive ``on_train_batch_start`` calls: one whole step, every callback included."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        _sync()
        self.starts.append(time.perf_counter())

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.on_train_batch_start(trainer, pl_module, None, -1)  # closes the last step


class HookClock:
    """Wall time spent inside a callback's per-step hooks, attributed to the step the ``StepTimer`` is in."""

    HOOKS = ("on_train_batch_start", "on_before_optimizer_step", "on_train_batch_end")

    def __init__(self, callback: Callback, timer: StepTimer) -> None:
        self.timer = timer
        self.per_step: dict[int, float] = {}
        for name in self.HOOKS:
            setattr(callback, name, self._timed(getattr(callback, name)))

    def _timed(self, hook: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> None:
            _sync()
            start = time.perf_counter()
            hook(*args, **kwargs)
            _sync()
            step = len(self.timer.starts) - 1
            self.per_step[step] = self.per_step.get(step, 0.0) + time.perf_counter() - start

        return timed


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class _Batches(torch.utils.data.Dataset):
    """The same random batch over and over (no data-loading cost in the timing)."""

    def __init__(self, size: int, image_size: int, steps: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(size, 3, image_size, image_size, generator=generator)
        self.y = torch.randint(0, NUM_CLASSES, (size,), generator=generator)
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x, self.y


def held_bytes(obj: Any, exclude: set[int]) -> int:
    """Bytes of the distinct tensor storages reachable from ``obj``'s attributes, except those in ``exclude``."""
    seen: set[int] = set(exclude)
    total = 0
    stack = [obj]
    visited: set[int] = set()
    while stack:
        item = stack.pop()
        if id(item) in visited:
            continue
        visited.add(id(item))
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set)):
            stack.extend(item)
        elif hasattr(item, "__dict__") and not isinstance(item, type):
            stack.extend(vars(item).values())
    return total


def run_child(model: str, setting: str, steps: int, warmup: int) -> dict[str, Any]:
    """One fit of ``warmup + steps`` optimizer steps; returns the median step time and the memory figures."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    module = Classifier(model)
    target_names = select_targets(module, None, [], "head")
    params = dict(module.named_parameters())
    target_numel = sum(params[name].numel() for name in target_names)
    timer = StepTimer()
    callbacks: list[Callback] = [timer]
    gmixout, clock = None, None
    if SETTINGS[setting] is not None:
        gmixout = GMixoutCallback(seed=0, **SETTINGS[setting])
        clock = HookClock(gmixout, timer)
        callbacks.append(gmixout)
    trainer = Trainer(
        accelerator=device,
        devices=1,
        max_steps=warmup + steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    data = _Batches(batch_size(model, device), IMAGE_SIZE[model], warmup + steps)
    loader = torch.utils.data.DataLoader(data, batch_size=None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, loader)
    times = [end - start for start, end in zip(timer.starts, timer.starts[1:], strict=False)][warmup:]
    extra = 0
    if gmixout is not None and gmixout.passes is not None:
        extra = held_bytes(gmixout.passes, {p.untyped_storage().data_ptr() for p in module.parameters()})
    hook_times = [clock.per_step.get(step, 0.0) for step in range(warmup, warmup + steps)] if clock else [0.0]
    return {
        "hook_median_s": statistics.median(hook_times),
        "device": torch.cuda.get_device_name() if device == "cuda" else f"CPU x{torch.get_num_threads()} threads",
        "median_s": statistics.median(times),
        "min_s": min(times),
        "steps_timed": len(times),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "cuda_peak_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None,
        "target_numel": target_numel,
        "extra_bytes": extra,
        "backend": gmixout.passes.backend if gmixout is not None and gmixout.passes is not None else "-",
    }


def spawn(model: str, setting: str, steps: int, warmup: int) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", model, setting, "--steps", str(steps), "--warmup", str(warmup)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{model} / {setting} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def step_tables(models: list[str], steps: int, warmup: int) -> str:
    """(b) and (c): one fresh process per (model, setting); the first setting of each model is the baseline."""
    time_lines = [
        "| model | setting | backend | median step (s) | min step (s) | ratio of medians | ratio of mins "
        "| in-hook (ms/step) | in-hook / plain min step |",
        "|" + " --- |" * 9,
    ]
    memory_lines = [
        "| model | setting | target entries (M) | fp32 copy of targets (MiB) | extra persistent (MiB) "
        "| in fp32 target copies | peak memory (MiB) | Δ peak (MiB) |",
        "|" + " --- |" * 8,
    ]
    device = ""
    for model in models:
        base: dict[str, Any] = {}
        for setting in SETTINGS:
            row = spawn(model, setting, steps, warmup)
            device = row["device"]
            row["peak"] = row["cuda_peak_bytes"] if row["cuda_peak_bytes"] is not None else row["peak_rss_bytes"]
            base = base or row
            copy_bytes = 4 * row["target_numel"]
            time_lines.append(
                f"| {MODEL_LABEL[model]} | {setting} | {row['backend']} | {row['median_s']:.3f} | {row['min_s']:.3f} "
                f"| {row['median_s'] / base['median_s']:.3f} | {row['min_s'] / base['min_s']:.3f} "
                f"| {1e3 * row['hook_median_s']:.0f} | {row['hook_median_s'] / base['min_s']:.3f} |"
            )
            memory_lines.append(
                f"| {MODEL_LABEL[model]} | {setting} | {row['target_numel'] / 1e6:.1f} | {copy_bytes / 2**20:.1f} "
                f"| {row['extra_bytes'] / 2**20:.1f} | {row['extra_bytes'] / copy_bytes:.2f} "
                f"| {row['peak'] / 2**20:.0f} | {(row['peak'] - base['peak']) / 2**20:+.0f} |"
            )
    memory = "torch.cuda.max_memory_allocated" if "CPU" not in device else "peak RSS of the run's process"
    return "\n".join(
        [
            f"Training step ({device}; {steps} steps timed after {warmup} warm-up)",
            *time_lines,
            "",
            f"Memory (extra persistent: the tensors the callback's passes hold; peak: {memory})",
            *memory_lines,
        ]
    )


def pass_table(repeats: int) -> str:
    """(a) The fused passes over ViT-S/16's targets: PyTorch path on CPU, and Triton kernels where CUDA is present."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gmixout_passes import format_table, pass_bandwidth_rows, vit_s16_shapes

    shapes, rows = vit_s16_shapes(), []
    for dtype in (torch.float32, torch.bfloat16):
        rows += pass_bandwidth_rows(shapes, dtype, "torch", "cpu", repeats=repeats)
        if torch.cuda.is_available():
            rows += pass_bandwidth_rows(shapes, dtype, "triton", "cuda", repeats=repeats)
    title = (
        f"Fused passes over ViT-S/16 targets ({len(shapes)} tensors), p=0.9, median of {repeats}; ratio = pass / copy"
    )
    return f"{title}\n{format_table(rows)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=None, help="untimed optimizer steps first")
    parser.add_argument("--models", nargs="+", default=list(IMAGE_SIZE), choices=list(IMAGE_SIZE))
    parser.add_argument("--skip-passes", action="store_true", help="only the training-step table")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "SETTING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    steps = args.steps or (4 if args.quick else 12)
    warmup = args.warmup or 2
    if args.child:
        print(json.dumps(run_child(args.child[0], args.child[1], steps, warmup)))
        return
    if not args.skip_passes:
        print(pass_table(repeats=3 if args.quick else 10))
        print()
    print(step_tables(args.models, steps, warmup))


if __name__ == "__main__":
    main()
