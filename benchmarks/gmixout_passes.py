"""Effective bandwidth of the GMixout passes against a plain ``Tensor.copy_`` moving the same bytes.

Each pass is charged the bytes an ideal fused pass must move (per element, ``e`` = parameter bytes, anchors fp32):

| pass | reads | writes | bytes per element |
| --- | --- | --- | --- |
| mix_in | w, a | w~ (a buffer the parameter then points at) | 2e + 4 |
| mix_out | g | g (the parameter points back at w: no bytes) | 2e |
| update_anchor | a, w | a | 8 + e |

``restore`` (leaving a step early) is the same pointer swap back and moves no bytes, so it has no row.

The reference is ``dst.copy_(src)`` over a buffer of half those bytes (a copy reads and writes its size), timed after
the same setup as the pass so that both start from the same cache state, so
``ratio = pass time / copy time`` is 1.0 for a pass that runs at copy speed; the GMixout targets are ratio <= 1.5 on
CPU and >= 80% of copy bandwidth (ratio <= 1.25) for the Triton kernels on a GPU. The torch path's extra traffic (its
cached mask, 1 bit per element, and on a new period the mask draw) is not charged: it shows up as a higher ratio.

Run ``python benchmarks/gmixout_passes.py`` (``--help`` for options); ``benchmarks/gmixout.py`` imports
:func:`pass_bandwidth_rows` and :func:`format_table`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from lightning_robustft.ops.mixout import Backend, MixoutPasses


def vit_s16_shapes() -> list[tuple[int, ...]]:
    """Target shapes of a ViT-S/16 (timm ``vit_small_patch16_224``): patch embedding and 12 blocks' weight matrices.

    About 21.5 M parameters, what GMixoutCallback targets by default on that model (no head, norms or biases).
    """
    width, mlp = 384, 1536
    block = [(3 * width, width), (width, width), (mlp, width), (width, mlp)]
    return [(width, 3, 16, 16), *block * 12]


def _median_ms(fn: Callable[[], None], setup: Callable[[], None], repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats + 1):  # the first run warms up (allocations, kernel compilation, mask cache)
        setup()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times[1:])


def _copy_ms(num_bytes: int, setup: Callable[[], None], repeats: int, device: torch.device) -> float:
    """Median time of a copy moving ``num_bytes``, each run after the pass's own ``setup``.

    Running the setup first leaves the caches as the pass finds them (mix_out's setup streams hundreds of MB), so
    the copy is not timed on buffers still hot from its previous run while the pass is timed on evicted ones.
    """
    src = torch.ones(max(1, num_bytes // 8), dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return _median_ms(lambda: dst.copy_(src), setup, repeats, device)


def pass_bandwidth_rows(
    sizes: Sequence[Sequence[int]],
    dtype: torch.dtype = torch.float32,
    backend: Backend = "torch",
    device: str | torch.device = "cpu",
    p: float = 0.9,
    repeats: int = 10,
) -> list[dict[str, object]]:
    """Time each GMixout pass over tensors of ``sizes`` and the copy of the same bytes.

    Args:
        sizes: Shapes of the target tensors.
        dtype: Parameter dtype (fp32 / bf16 / fp16).
        backend: ``"torch"``, ``"triton"`` or ``"auto"`` (see ``resolve_backend``).
        device: Where the tensors live.
        p: Mask probability (the torch path's cost depends on it only through the mask draw).
        repeats: Timed repetitions per measurement; the median is reported.

    Returns:
        One dict per pass: ``device, backend, dtype, pass, numel, MB, ms, GB/s, copy_ms, copy GB/s, ratio``.
    """
    device = torch.device(device)
    generator = torch.Generator(device="cpu").manual_seed(0)
    params = [torch.randn(tuple(s), generator=generator).to(device=device, dtype=dtype) for s in sizes]
    passes = MixoutPasses(params, p=p, seed=0, backend=backend)
    for w in params:  # move w away from the anchor, as after some fine-tuning
        w.add_(torch.randn(w.shape, generator=generator).to(device=device, dtype=dtype), alpha=1e-2)
    fresh_grads = [torch.randn_like(w) for w in params]
    grads = [g.clone() for g in fresh_grads]

    def mix_in_with_fresh_grads() -> None:
        torch._foreach_copy_(grads, fresh_grads)  # mix_out scales them in place: keep them finite
        passes.mix_in(0)

    numel = sum(w.numel() for w in params)
    e = torch.empty((), dtype=dtype).element_size()
    period = iter(range(1, 10**9))
    cases: list[tuple[str, int, Callable[[], None], Callable[[], None]]] = [
        ("mix_in (mask of the period cached)", 2 * e + 4, lambda: passes.mix_in(0), passes.restore),
        ("mix_in (new period)", 2 * e + 4, lambda: passes.mix_in(next(period)), passes.restore),
        ("mix_out", 2 * e, lambda: passes.mix_out(0, grads), mix_in_with_fresh_grads),
        ("update_anchor", 8 + e, lambda: passes.update_anchor(0.999), passes.restore),
    ]
    rows: list[dict[str, object]] = []
    for name, bytes_per_element, fn, setup in cases:
        passes.restore()  # each case starts with the parameters holding w
        num_bytes = bytes_per_element * numel
        ms = _median_ms(fn, setup, repeats, device)
        copy_ms = _copy_ms(num_bytes, lambda setup=setup: (setup(), passes.restore()), repeats, device)
        rows.append(
            {
                "device": device.type,
                "backend": passes.backend,
                "dtype": str(dtype).removeprefix("torch."),
                "pass": name,
                "numel": numel,
                "MB": num_bytes / 1e6,
                "ms": ms,
                "GB/s": num_bytes / ms / 1e6,
                "copy_ms": copy_ms,
                "copy GB/s": num_bytes / copy_ms / 1e6,
                "ratio": ms / copy_ms,
            }
        )
    passes.restore()
    return rows


def format_table(rows: Sequence[dict[str, object]]) -> str:
    """Markdown table of :func:`pass_bandwidth_rows` rows."""
    columns = ["device", "backend", "dtype", "pass", "numel", "MB", "ms", "GB/s", "copy_ms", "copy GB/s", "ratio"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{row[c]:.2f}" if isinstance(row[c], float) else str(row[c]) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    dtypes = [getattr(torch, name) for name in args.dtypes]
    shapes = vit_s16_shapes()
    rows = []
    for dtype in dtypes:
        rows += pass_bandwidth_rows(shapes, dtype, "torch", "cpu", repeats=args.repeats)
    if torch.cuda.is_available():
        for dtype in dtypes:
            rows += pass_bandwidth_rows(shapes, dtype, "triton", "cuda", repeats=args.repeats)
            rows += pass_bandwidth_rows(shapes, dtype, "torch", "cuda", repeats=args.repeats)
    print(f"GMixout passes over ViT-S/16 targets ({len(shapes)} tensors), p=0.9, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads, median of {args.repeats}")  # fmt: skip
    print(format_table(rows))


if __name__ == "__main__":
    main()
