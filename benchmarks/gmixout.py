"""GMixout benchmark: fused-pass bandwidth, training-step overhead and memory; prints Markdown tables.

    python benchmarks/gmixout.py            # full run (about 11 minutes on 2 CPU cores)
    python benchmarks/gmixout.py --quick    # one round (a smoke run)

(a) Each fused pass's effective bandwidth against a plain copy of the same bytes (``benchmarks/gmixout_passes.py``).
(b) Training-step time with and without ``GMixoutCallback`` (Lightning ``Trainer``, AdamW, random init): timm
    ViT-S/16 at 112 px, batch 32, and the open_clip ViT-B-32 image tower at 224 px (batch 8 on CPU, 32 on CUDA).
    The settings are **interleaved in one process per model and optimizer** (AdamW, default and ``fused=True``, see
    ``OPTIMIZERS``): ``--rounds`` rounds, each fitting the same module once per setting for 1 untimed + 10 timed
    optimizer steps (so ``resample_every=10`` pays exactly one redraw and anchor update per 10 timed steps).
    Interleaving cancels the drift between processes and over time (about 5-10% on a shared machine) that a step
    overhead of a few percent would otherwise drown in. Also the wall time spent inside the callback's hooks per
    step (in-hook): the callback's own cost.
(c) Memory, one fresh process per (model, setting) so peaks do not leak between runs: the callback's extra
    persistent bytes counted exactly from the tensors its passes hold, next to the peak RSS (CPU) or
    ``torch.cuda.max_memory_allocated`` (CUDA) of the run.

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
from _common import RepeatedBatch, reachable_tensors, storage_bytes  # benchmarks/, the script's own folder
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

    def __init__(self, model: str, optimizer: str = "adamw") -> None:
        super().__init__()
        self.optimizer_name = optimizer
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
        return torch.optim.AdamW(self.parameters(), lr=1e-5, fused=self.optimizer_name == "adamw-fused")


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


def held_bytes(obj: Any, exclude: set[int]) -> int:
    """Bytes of the distinct tensor storages reachable from ``obj``'s attributes, except those in ``exclude``."""
    return storage_bytes(reachable_tensors(obj), set(exclude))


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def fit_once(module: Classifier, model: str, setting: str, steps: int) -> tuple[list[float], list[float], Any]:
    """Fit ``module`` for ``steps`` optimizer steps under ``setting``: per-step wall times, in-hook times, callback."""
    timer = StepTimer()
    callbacks: list[Callback] = [timer]
    gmixout, clock = None, None
    if SETTINGS[setting] is not None:
        gmixout = GMixoutCallback(seed=0, **SETTINGS[setting])
        clock = HookClock(gmixout, timer)
        callbacks.append(gmixout)
    trainer = Trainer(
        accelerator=_device(),
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    data = RepeatedBatch(batch_size(model, _device()), IMAGE_SIZE[model], steps, NUM_CLASSES)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=None))
    times = [end - start for start, end in zip(timer.starts, timer.starts[1:], strict=False)]
    hooks = [clock.per_step.get(step, 0.0) if clock else 0.0 for step in range(len(times))]
    return times, hooks, gmixout


def run_timing_child(model: str, rounds: int, optimizer: str) -> dict[str, Any]:
    """(b) in one process: ``rounds`` rounds of one fit per setting, 1 untimed + 10 timed steps each."""
    torch.manual_seed(0)
    module = Classifier(model, optimizer)
    times: dict[str, list[float]] = {setting: [] for setting in SETTINGS}
    hooks: dict[str, list[float]] = {setting: [] for setting in SETTINGS}
    backends: dict[str, str] = {}
    for _ in range(rounds):
        for setting in SETTINGS:
            step_times, hook_times, gmixout = fit_once(module, model, setting, steps=11)
            times[setting] += step_times[1:]
            hooks[setting] += hook_times[1:]
            backends[setting] = gmixout.passes.backend if gmixout is not None else "-"
    return {
        "device": torch.cuda.get_device_name() if _device() == "cuda" else f"CPU x{torch.get_num_threads()} threads",
        "times": times,
        "hooks": hooks,
        "backends": backends,
    }


def run_memory_child(model: str, setting: str) -> dict[str, Any]:
    """(c) in a fresh process: a 3-step fit, the passes' persistent bytes and the process's peak memory."""
    torch.manual_seed(0)
    module = Classifier(model)
    target_names = select_targets(module, None, [], "head")
    params = dict(module.named_parameters())
    if _device() == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _, _, gmixout = fit_once(module, model, setting, steps=3)
    extra = 0
    if gmixout is not None and gmixout.passes is not None:
        extra = held_bytes(gmixout.passes, {p.untyped_storage().data_ptr() for p in module.parameters()})
    return {
        "peak_bytes": torch.cuda.max_memory_allocated()
        if _device() == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "target_numel": sum(params[name].numel() for name in target_names),
        "extra_bytes": extra,
    }


def spawn(*child_args: str) -> dict[str, Any]:
    """Run ``--child ARGS`` of this script in a fresh interpreter and return its JSON line."""
    done = subprocess.run([sys.executable, __file__, "--child", *child_args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{child_args} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


OPTIMIZERS = ("adamw", "adamw-fused")
"""``torch.optim.AdamW`` with its default implementation, and with ``fused=True``. Both are timed because Mixout's
held entries get exactly-zero gradients, so early in a run many second moments are exactly 0, and the default CPU
implementation's ``sqrt`` is about 2.5x slower on zeros than on other values (measured here); the fused kernel is
not affected (and is 4-6x faster on CPU anyway)."""


def step_tables(models: list[str], rounds: int) -> str:
    """(b) interleaved timing, one process per (model, optimizer); (c) memory, one process per (model, setting)."""
    time_lines = [
        "| model | optimizer | setting | backend | steps timed | median step (s) | min step (s) | ratio of medians "
        "| ratio of mins | in-hook (ms/step) | in-hook / plain median step |",
        "|" + " --- |" * 11,
    ]
    memory_lines = [
        "| model | setting | target entries (M) | fp32 copy of targets (MiB) | extra persistent (MiB) "
        "| in fp32 target copies | peak memory (MiB) | Δ peak (MiB) |",
        "|" + " --- |" * 8,
    ]
    device = ""
    plain = next(iter(SETTINGS))
    for model in models:
        for optimizer in OPTIMIZERS:
            timing = spawn("time", model, str(rounds), optimizer)
            device = timing["device"]
            base_median, base_min = statistics.median(timing["times"][plain]), min(timing["times"][plain])
            for setting in SETTINGS:
                times, hook = timing["times"][setting], statistics.median(timing["hooks"][setting])
                median = statistics.median(times)
                time_lines.append(
                    f"| {MODEL_LABEL[model]} | {optimizer} | {setting} | {timing['backends'][setting]} | {len(times)} "
                    f"| {median:.3f} | {min(times):.3f} | {median / base_median:.3f} | {min(times) / base_min:.3f} "
                    f"| {1e3 * hook:.0f} | {hook / base_median:.3f} |"
                )
        base_memory: dict[str, Any] = {}
        for setting in SETTINGS:
            memory = spawn("memory", model, setting)
            base_memory = base_memory or memory
            copy_bytes = 4 * memory["target_numel"]
            peak_delta = memory["peak_bytes"] - base_memory["peak_bytes"]
            memory_lines.append(
                f"| {MODEL_LABEL[model]} | {setting} | {memory['target_numel'] / 1e6:.1f} | {copy_bytes / 2**20:.1f} "
                f"| {memory['extra_bytes'] / 2**20:.1f} | {memory['extra_bytes'] / copy_bytes:.2f} "
                f"| {memory['peak_bytes'] / 2**20:.0f} | {peak_delta / 2**20:+.0f} |"
            )
    memory_kind = "torch.cuda.max_memory_allocated" if "CPU" not in device else "peak RSS of the run's process"
    return "\n".join(
        [
            f"Training step ({device}; settings interleaved, {rounds} rounds of 1 untimed + 10 timed steps each)",
            *time_lines,
            "",
            f"Memory (extra persistent: the tensors the callback's passes hold; peak: {memory_kind})",
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
    parser.add_argument("--quick", action="store_true", help="one round and fewer pass repeats (a smoke run)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds of the step timing (default 3)")
    parser.add_argument("--models", nargs="+", default=list(IMAGE_SIZE), choices=list(IMAGE_SIZE))
    parser.add_argument("--skip-passes", action="store_true", help="only the training-step and memory tables")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, model, *rest = args.child
        result = run_timing_child(model, int(rest[0]), rest[1]) if kind == "time" else run_memory_child(model, rest[0])
        print(json.dumps(result))
        return
    if not args.skip_passes:
        print(pass_table(repeats=3 if args.quick else 10))
        print()
    print(step_tables(args.models, rounds=args.rounds or (1 if args.quick else 3)))


if __name__ == "__main__":
    main()
