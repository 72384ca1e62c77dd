"""Sparse vs dense GMixout vs full fine-tuning vs LoRA: training-state bytes, peak memory, DDP traffic, step time.

    python benchmarks/gmixout_memory.py            # everything (about 50 minutes on 2 shared CPU cores)
    python benchmarks/gmixout_memory.py --quick    # 3 timed steps per setting, one model (a smoke run)

Models (random init, ``pretrained=False``): timm ViT-B/16 (at 112 px, so that a CPU step stays short; the parameters
do not depend on the image size) and the open_clip ViT-B-32 image tower at 224 px, each with a linear ``head``;
batch 8; AdamW (``fused=True``, lr 1e-4, weight decay 0.05). Settings: full fine-tuning, dense GMixout (p = 0.9),
sparse GMixout at p = 0.9 and p = 0.97 (all three with ``resample_every = 10``, ``anchor_decay = 0.99``), and LoRA
r = 8 (``LoRACallback``, peft) on the blocks' layers (timm: ``qkv``, ``proj``, ``fc1``, ``fc2``; open_clip: the
attention modules, ``c_fc``, ``c_proj``), the head trained fully.

(1) **Training-state bytes**, counted exactly from the tensors (distinct storages) at the optimizer step of the
    third step, when gradients and optimizer state both exist: the module's parameters (trainable or not), their
    gradients, the optimizer state, and the callback's own tensors (dense: anchors, ``w~`` buffers and mask bits;
    sparse: anchors and free indices). Plus the peak RSS of a fresh process that builds the model and runs the three
    steps (CPU: the allocator's peak includes the activations and every transient, e.g. one layer's full gradient).
(2) **Bytes all-reduced per optimizer step** under DDP, 2 CPU processes over gloo (``ddp_spawn``): a comm hook
    counts the bytes of every gradient bucket it reduces, batch 2, 2 steps.
(3) **Step time** of sparse vs dense GMixout (``resample_every = 10``), settings interleaved in one process per
    model, rounds of 1 untimed + 10 timed steps; so a period's redraw is paid once per 10 timed steps.

Targets (issue 15): sparse at p = 0.9 <= 0.65x full fine-tuning's training-state bytes; DDP traffic <= 0.15x full
fine-tuning's; step time <= 1.3x dense GMixout's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F
from _common import RepeatedBatch, reachable_tensors, storage_bytes  # benchmarks/, the script's own folder
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from lightning_robustft.callbacks.gmixout import GMixoutCallback
from lightning_robustft.callbacks.lora import LoRACallback

NUM_CLASSES = 10
BATCH = 8
IMAGE_SIZE = {"vit_b16": 112, "clip_b32": 224}
MODEL_LABEL = {"vit_b16": "timm ViT-B/16 @112", "clip_b32": "open_clip ViT-B-32 image tower @224"}
LORA_MODULES = {"vit_b16": ["qkv", "proj", "fc1", "fc2"], "clip_b32": ["attn", "c_fc", "c_proj"]}
GMIXOUT = {"resample_every": 10, "anchor_decay": 0.99}
SETTINGS: dict[str, dict[str, Any] | None] = {
    "full fine-tuning": None,
    "dense GMixout p=0.9": {"p": 0.9, **GMIXOUT},
    "sparse GMixout p=0.9": {"p": 0.9, "sparse": True, **GMIXOUT},
    "sparse GMixout p=0.97": {"p": 0.97, "sparse": True, **GMIXOUT},
    "LoRA r=8": {"lora": 8},
}
TIMED = ("dense GMixout p=0.9", "sparse GMixout p=0.9", "sparse GMixout p=0.97")


class Classifier(LightningModule):
    """A backbone + ``head`` trained with fused AdamW on random images: only the costs matter here."""

    def __init__(self, model: str) -> None:
        super().__init__()
        if model == "vit_b16":
            import timm

            self.backbone = timm.create_model(
                "vit_base_patch16_224", pretrained=False, img_size=IMAGE_SIZE[model], num_classes=0
            )
            width = self.backbone.num_features
        else:
            import open_clip

            self.backbone = open_clip.create_model("ViT-B-32", pretrained=None).visual
            width = self.backbone.output_dim
        self.head = nn.Linear(width, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05, fused=True)


def callback_tensors(callback: GMixoutCallback | None) -> list[torch.Tensor]:
    """The tensors a GMixout callback holds beyond the module: dense passes' anchors, buffers and bits; sparse
    anchors and indices (the packed tensors are module parameters)."""
    if callback is None:
        return []
    if callback.sparse_mixout is not None:
        return [t for target in callback.sparse_mixout.targets for t in (target.anchor, target.indices)]
    return reachable_tensors(callback.passes)  # anchors, buffers, bits


class StateCounter(Callback):
    """At the optimizer step of step ``at``: the bytes of parameters, gradients, optimizer state, callback state."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.counts: dict[str, int] = {}

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if trainer.global_step != self.at:
            return
        gmixout = next((cb for cb in trainer.callbacks if isinstance(cb, GMixoutCallback)), None)
        seen: set[int] = set()
        params = list(pl_module.parameters())
        self.counts = {
            "params": storage_bytes(params, seen),
            "grads": storage_bytes([p.grad for p in params], seen),
            "optimizer": storage_bytes([t for state in optimizer.state.values() for t in state.values()], seen),
            "callback": storage_bytes(callback_tensors(gmixout), seen),
        }


class StepTimer(Callback):
    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self.starts.append(time.perf_counter())

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.starts.append(time.perf_counter())


def method_callbacks(model: str, setting: str) -> list[Callback]:
    options = SETTINGS[setting]
    if options is None:
        return []
    if "lora" in options:
        return [LoRACallback(r=options["lora"], target_modules=LORA_MODULES[model])]
    return [GMixoutCallback(seed=0, **options)]


def fit(
    module: Classifier, model: str, setting: str, steps: int, extra: list[Callback], batch: int = BATCH, **trainer: Any
) -> None:
    options = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": steps,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        **trainer,
    }
    data = torch.utils.data.DataLoader(RepeatedBatch(batch, IMAGE_SIZE[model], steps, NUM_CLASSES), batch_size=None)
    Trainer(callbacks=[*method_callbacks(model, setting), *extra], **options).fit(module, data)


def child_memory(model: str, setting: str) -> dict[str, Any]:
    """(1) in a fresh process: three steps, the training state counted at the third, and the peak RSS."""
    torch.manual_seed(0)
    module = Classifier(model)
    counter = StateCounter(at=2)
    fit(module, model, setting, 3, [counter])
    return {**counter.counts, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


_REDUCED = [0]


def counting_allreduce(state, bucket):
    """DDP's default all-reduce, counting bucket bytes (unannotated: DDP checks hook annotations at runtime)."""
    _REDUCED[0] += bucket.buffer().numel() * bucket.buffer().element_size()
    return allreduce_hook(state, bucket)


class TrafficCounter(Callback):
    """Registers the counting comm hook on the DDP wrapper; rank 0 writes the bytes of each optimizer step."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.per_step: list[int] = []

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        trainer.strategy.model.register_comm_hook(None, counting_allreduce)  # Lightning registers hooks on CUDA only

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        self.per_step.append(_REDUCED[0])
        _REDUCED[0] = 0

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_rank == 0:
            Path(self.path).write_text(json.dumps(self.per_step))


def child_ddp(model: str, setting: str) -> dict[str, Any]:
    """(2) two CPU ranks over gloo, batch 2, 2 steps: bytes all-reduced per optimizer step."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "traffic.json")
        fit(Classifier(model), model, setting, 2, [TrafficCounter(path)], strategy="ddp_spawn", devices=2, batch=2)
        per_step = json.loads(Path(path).read_text())
    return {"per_step": per_step}


def child_time(model: str, rounds: int, timed_steps: int, threads: int) -> dict[str, Any]:
    """(3) interleaved rounds in one process: per-step wall times of each GMixout setting."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    module = Classifier(model)
    times: dict[str, list[float]] = {setting: [] for setting in TIMED}
    for _ in range(rounds):
        for setting in TIMED:
            timer = StepTimer()
            fit(module, model, setting, timed_steps + 1, [timer])
            steps = [end - start for start, end in zip(timer.starts, timer.starts[1:], strict=False)]
            times[setting] += steps[1:]
    return {"times": times, "threads": torch.get_num_threads()}


def spawn(*args: str) -> dict[str, Any]:
    """Run ``--child ARGS`` of this script in a fresh interpreter and return its JSON line."""
    done = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{args} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def mib(value: float) -> str:
    return f"{value / 2**20:.0f}"


def tables(models: list[str], rounds: int, timed_steps: int, threads: int) -> str:
    state_lines = [
        "| model | setting | params (MiB) | grads (MiB) | optimizer (MiB) | callback (MiB) | training state (MiB) "
        "| × full FT | peak RSS (MiB) | Δ peak vs full FT (MiB) |",
        "|" + " --- |" * 10,
    ]
    traffic_lines = ["| model | setting | all-reduced per step (MiB) | × full FT |", "|" + " --- |" * 4]
    time_lines = [
        "| model | setting | steps timed | median step (s) | min step (s) | × dense (medians) | × dense (mins) |",
        "|" + " --- |" * 7,
    ]
    for model in models:
        label = MODEL_LABEL[model]
        base: dict[str, Any] = {}
        for setting in SETTINGS:
            got = spawn("memory", model, setting)
            total = got["params"] + got["grads"] + got["optimizer"] + got["callback"]
            base = base or {**got, "total": total}
            state_lines.append(
                f"| {label} | {setting} | {mib(got['params'])} | {mib(got['grads'])} | {mib(got['optimizer'])} "
                f"| {mib(got['callback'])} | {mib(total)} | {total / base['total']:.3f} | {mib(got['peak_rss'])} "
                f"| {(got['peak_rss'] - base['peak_rss']) / 2**20:+.0f} |"
            )
        base_traffic = 0
        for setting in SETTINGS:
            per_step = spawn("ddp", model, setting)["per_step"]
            traffic = statistics.median(per_step)
            base_traffic = base_traffic or traffic
            traffic_lines.append(f"| {label} | {setting} | {traffic / 2**20:.1f} | {traffic / base_traffic:.3f} |")
        timing = spawn("time", model, str(rounds), str(timed_steps), str(threads))
        dense = timing["times"][TIMED[0]]
        for setting in TIMED:
            times = timing["times"][setting]
            time_lines.append(
                f"| {label} | {setting} | {len(times)} | {statistics.median(times):.3f} | {min(times):.3f} "
                f"| {statistics.median(times) / statistics.median(dense):.3f} | {min(times) / min(dense):.3f} |"
            )
    return "\n".join(
        [
            "Training state at a step (parameters + gradients + optimizer state + callback state, exact; AdamW), "
            "and the peak RSS of a fresh process running 3 steps",
            *state_lines,
            "",
            "Bytes all-reduced per optimizer step under DDP (2 CPU ranks, gloo; a counting comm hook)",
            *traffic_lines,
            "",
            f"Step time vs dense GMixout (CPU, {timing['threads']} intra-op thread(s); resample_every=10; interleaved, "
            f"{rounds} rounds of 1 untimed + {timed_steps} timed steps)",
            *time_lines,
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one model, 1 round of 3 timed steps (a smoke run)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the step timing")
    parser.add_argument("--models", nargs="+", default=list(IMAGE_SIZE), choices=list(IMAGE_SIZE))
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads of the step timing (default 1: on a machine shared beyond its cores, OpenMP threads "
        "that wait for each other make multi-threaded step times swing by 2x between runs)",
    )
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, model, *rest = args.child
        if kind == "memory":
            result = child_memory(model, rest[0])
        elif kind == "ddp":
            result = child_ddp(model, rest[0])
        else:
            result = child_time(model, int(rest[0]), int(rest[1]), int(rest[2]))
        print(json.dumps(result))
        return
    models = args.models[:1] if args.quick else args.models
    rounds, timed = (1, 3) if args.quick else (args.rounds, 10)
    print(tables(models, rounds, timed, args.threads))


if __name__ == "__main__":
    main()
