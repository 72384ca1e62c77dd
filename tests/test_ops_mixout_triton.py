"""GMixout Triton kernels: interpreted on CPU tensors (TRITON_INTERPRET=1), compiled on CUDA when a GPU run sets 0.

The mask bits are checked against an independent NumPy re-implementation of Triton's Philox and of the documented
counter layout, so the interpreted kernels here and the compiled kernels on a GPU are held to the same bits.
"""

from __future__ import annotations

import os

# Before any import of the kernels: @triton.jit decides interpreted vs compiled when the decorators run.
os.environ.setdefault("TRITON_INTERPRET", "1")

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from _gmixout_helpers import (
    anchor_reference,
    assert_mixed_close,
    check_pass_semantics,
    make_targets,
    mixin_reference,
    move,
)
from torch import nn

from lightning_robustft.ops.mixout import MixoutPasses, as_int64, flat_view, stream_seed

INTERPRETED = os.environ["TRITON_INTERPRET"] == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not INTERPRETED and not torch.cuda.is_available(), reason="compiled Triton needs CUDA"),
]

# Odd sizes, a conv shape, and one tensor spanning two interpreted blocks (16 * 4 * 512 = 32768 elements).
SHAPES = [(1,), (7,), (1000,), (4099,), (3, 5, 7), (40000,)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def triton_passes(params, p, seed):
    passes = MixoutPasses(params, p=p, seed=seed, backend="triton")
    assert passes.backend == "triton"
    return passes


# ----------------------------------------------------------------------------------------------------------------------
# Mask bits: an independent Philox-4x32-10 in NumPy, with the documented layout
# ----------------------------------------------------------------------------------------------------------------------


def philox4x32(key: int, counters: np.ndarray) -> list[np.ndarray]:
    """Philox-4x32-10 on counters (c0 = counter low word, c1 = high word, c2 = c3 = 0), as ``tl.randint4x`` runs it."""
    m32 = np.uint64(0xFFFFFFFF)
    c0, c1 = counters & m32, counters >> np.uint64(32)
    c2 = c3 = np.zeros_like(counters)
    k0, k1 = np.uint64(key & 0xFFFFFFFF), np.uint64(key >> 32)
    round_a, round_b = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    for _ in range(10):
        prod_b, prod_a = round_b * c2, round_a * c0
        c0, c1, c2, c3 = (
            (prod_b >> np.uint64(32)) ^ c1 ^ k0,
            prod_b & m32,
            (prod_a >> np.uint64(32)) ^ c3 ^ k1,
            prod_a & m32,
        )
        k0 = (k0 + np.uint64(0x9E3779B9)) & m32
        k1 = (k1 + np.uint64(0xBB67AE85)) & m32
    return [c0, c1, c2, c3]


def uniform(bits: np.ndarray) -> np.ndarray:
    """``tl.rand``'s int -> [0, 1) map: reinterpret as int32, fold negatives with ~, scale in fp32."""
    x = bits.astype(np.uint32).view(np.int32)
    x = np.where(x < 0, ~x, x)
    return x.astype(np.float32) * np.float32(4.6566127342e-10)


def reference_keep(numel: int, key: int, p: float, cols: int = 512) -> np.ndarray:
    """Element e keeps iff output (e // cols) % 4 of Philox counter (e // (4 cols)) * cols + e % cols is >= p."""
    e = np.arange(numel, dtype=np.uint64)
    counters = (e // np.uint64(4 * cols)) * np.uint64(cols) + e % np.uint64(cols)
    outputs = philox4x32(key, counters)
    which = ((e // np.uint64(cols)) % np.uint64(4)).astype(np.int64)
    u = np.choose(which, [uniform(o) for o in outputs])
    return u >= np.float32(p)


def test_mask_bits_follow_the_documented_philox_layout():
    params, _ = make_targets([(5000,), (3, 5, 7)], torch.float32, device=DEVICE)
    passes = triton_passes(params, p=0.7, seed=2**63 + 12345)  # a key above 2**63 exercises the signed table entry
    for index, param in enumerate(params):
        for period in (0, 9):
            expected = reference_keep(param.numel(), stream_seed(passes.seed, period, index), 0.7)
            got = flat_view(passes.mask(period, index)).cpu().numpy()
            assert np.array_equal(got, expected), (index, period)


def test_mask_bits_do_not_depend_on_the_block_size():
    # The private kernel is called directly: the block size is an internal launch setting the passes do not expose.
    from lightning_robustft.ops.mixout._triton import PHILOX_COLS, _mask_kernel

    n, key = 70000, as_int64(stream_seed(1, 2, 3))
    masks = []
    for rows in (1, 16):
        out = torch.empty(n, dtype=torch.int8, device=DEVICE)
        grid = (math.ceil(n / (rows * 4 * PHILOX_COLS)),)
        _mask_kernel[grid](out, n, key, 0.5, ROWS=rows, COLS=PHILOX_COLS)
        masks.append(out)
    assert torch.equal(masks[0], masks[1])
    assert np.array_equal(masks[0].bool().cpu().numpy(), reference_keep(n, stream_seed(1, 2, 3), 0.5))


# ----------------------------------------------------------------------------------------------------------------------
# Pass semantics
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_match_references(dtype):
    params, gen = make_targets(SHAPES, dtype, device=DEVICE)
    passes = triton_passes(params, p=0.7, seed=11)
    anchors = [a.clone() for a in passes.anchors]
    w = move(params, gen)
    check_pass_semantics(passes, params, anchors, w, period=4, p=0.7, gen=gen)
    passes.update_anchor(0.9)
    for a, a_prev, w_i in zip(passes.anchors, anchors, w, strict=True):
        torch.testing.assert_close(a, anchor_reference(a_prev, w_i, 0.9), rtol=4e-7, atol=4e-7)
    passes.update_anchor(0.0)
    assert all(torch.equal(a, w_i.float()) for a, w_i in zip(passes.anchors, w, strict=True))


def test_p_zero_is_identity():
    params, gen = make_targets(SHAPES, torch.bfloat16, device=DEVICE)
    passes = triton_passes(params, p=0.0, seed=0)
    w = move(params, gen)
    passes.mix_in(0)
    assert all(torch.equal(t, w_i) for t, w_i in zip(params, w, strict=True))
    grads = [torch.randn_like(t) for t in params]
    before = [g.clone() for g in grads]
    passes.mix_out(0, grads)
    assert all(torch.equal(g, g0) for g, g0 in zip(grads, before, strict=True))


def test_masks_deterministic_distinct_constant_within_period_and_rate():
    params, gen = make_targets([(100_000,), (100_000,)], torch.float32, device=DEVICE)
    passes = triton_passes(params, p=0.9, seed=5)
    again = triton_passes(make_targets([(100_000,), (100_000,)], torch.float32, seed=1, device=DEVICE)[0], 0.9, 5)
    m = passes.mask(3, 0)
    assert torch.equal(m, again.mask(3, 0)), "a pure function of the seed: other values, same mask"
    assert not torch.equal(m, passes.mask(4, 0)) and not torch.equal(m, passes.mask(3, 1))
    rate = m.float().mean().item()
    assert abs(rate - 0.1) <= 5 * math.sqrt(0.9 * 0.1 / m.numel())
    move(params, gen)
    for _ in range(2):  # the kernels regenerate the same mask for the same period
        passes.mix_in(3)
        assert torch.equal(params[0] == passes.anchors[0], ~m)
        passes.mix_out(3, [None, None])


def test_monte_carlo_expectation_is_w():
    p, periods = 0.5, 120
    params, gen = make_targets([(1000,)], torch.float32, device=DEVICE)
    passes = triton_passes(params, p=p, seed=3)
    (w,) = move(params, gen)
    total = torch.zeros(1000, dtype=torch.float64, device=DEVICE)
    for r in range(periods):
        passes.mix_in(r)
        total += params[0].double()
        passes.restore()
    sigma = (w.double() - passes.anchors[0].double()).abs() * math.sqrt(p / (1 - p) / periods)
    z = (total / periods - w.double()).abs() / sigma
    assert z.max() < 5.0 and z.mean() < 1.0


def test_gradient_equals_autograd_of_hand_written_mixout():
    torch.manual_seed(0)
    lin = nn.Linear(7, 5).to(DEVICE)
    x = torch.randn(11, 7, device=DEVICE)
    p, period = 0.6, 3
    passes = triton_passes([lin.weight], p=p, seed=9)
    with torch.no_grad():
        lin.weight.add_(torch.randn_like(lin.weight))
    w = lin.weight.detach().clone()
    passes.mix_in(period)
    (lin(x).tanh() ** 2).sum().backward()
    passes.mix_out(period, [lin.weight.grad])
    mask = passes.mask(period, 0)
    leaf = w.clone().requires_grad_(True)
    w_tilde = passes.anchors[0] + mask * (leaf - passes.anchors[0]) / (1 - p)
    (nn.functional.linear(x, w_tilde, lin.bias.detach()).tanh() ** 2).sum().backward()
    assert torch.equal(lin.weight.detach(), w)
    torch.testing.assert_close(lin.weight.grad, leaf.grad, rtol=1e-5, atol=1e-6)


def test_unaligned_views_and_moved_storage():
    """Addresses not 16-byte aligned take the unhinted kernels; a tensor whose storage moved gets new tables."""
    base = torch.randn(4100, device=DEVICE)
    params = [base[1:4100], torch.randn(3, 5, 7, device=DEVICE)]  # storage offset 1: 4-byte aligned only
    outside = base[0].clone()
    passes = triton_passes(params, p=0.5, seed=0)
    params[0].add_(1.0)
    params[1].set_(torch.randn(3, 5, 7, device=DEVICE))  # storage moves after the tables were built
    w = [t.clone() for t in params]
    passes.mix_in(1)
    for t, a, w_i, i in zip(params, passes.anchors, w, range(2), strict=True):
        m = passes.mask(1, i)
        assert torch.equal(t[~m], a[~m])
        assert_mixed_close(t, mixin_reference(w_i, a, m, 0.5), w_i, a, 0.5)
    passes.restore()
    assert all(torch.equal(t, w_i) for t, w_i in zip(params, w, strict=True))
    assert base[0] == outside  # the element before the view is not part of any block


def test_gradient_laid_out_unlike_its_parameter_is_refused():
    params = [torch.randn(6, 3, 5, 5, device=DEVICE).contiguous(memory_format=torch.channels_last)]
    passes = triton_passes(params, p=0.5, seed=0)
    passes.mix_in(0)
    with pytest.raises(ValueError, match=r"`grads\[0\]` has strides"):
        passes.mix_out(0, [torch.randn(6, 3, 5, 5, device=DEVICE)])
    passes.restore()


def test_one_launch_per_pass_and_dtype(monkeypatch):
    from lightning_robustft.ops.mixout import _triton

    # A private patch: the launches are counted at the one function every kernel launch goes through.
    launches = []
    real_run = _triton._run
    monkeypatch.setattr(_triton, "_run", lambda kernel, *a, **k: launches.append(kernel) or real_run(kernel, *a, **k))
    shapes = [(7,), (1000,), (4099,), (3, 5, 7)] * 3
    params = [
        t.to(dtype) for t, dtype in zip(make_targets(shapes, torch.float32, device=DEVICE)[0], DTYPES * 4, strict=True)
    ]
    passes = triton_passes(params, p=0.5, seed=0)
    passes.mix_in(0)
    passes.mix_out(0, [torch.ones_like(t) for t in params])
    passes.update_anchor(0.5)
    assert len(launches) == 3 * len(DTYPES), "12 tensors of 3 dtypes: one launch per pass and dtype"


@pytest.mark.slow
def test_kernels_compile_for_sm90_with_vector_accesses():
    """Compile for an H100 (no GPU needed): full blocks use 128-bit loads and stores; compiled kernels refuse CPU.

    Guards the pointer-table design: without the alignment hint on the int -> pointer cast, or with masks on full
    blocks, Triton emits scalar accesses (measured here while building it).
    """
    code = r"""
import re, triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from lightning_robustft.ops.mixout import _triton as mt
tables = {"numels": "*i64", "block_tensor": "*i32", "block_index": "*i32"}
def accesses(fn, sig, dtype):
    consts = dict(DTYPE=dtype, ALIGNED=True, ROWS=1, COLS=mt.PHILOX_COLS)
    src = triton.compiler.ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in consts}}, constexprs=consts)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]
    return set(re.findall(r"(?:ld|st)\.global\.v4\.b32", ptx))
mix = {"w_table": "*i64", "m_table": "*i64", "a_table": "*i64", "numels": "*i64", "keys": "*i64",
       "block_tensor": "*i32", "block_index": "*i32", "p": "fp32", "scale": "fp32"}
grad = {"g_table": "*i64", "numels": "*i64", "keys": "*i64", "block_tensor": "*i32", "block_index": "*i32",
        "p": "fp32", "scale": "fp32"}
anchor = {"a_table": "*i64", "w_table": "*i64", **tables, "weight": "fp32"}
for fn, sig in ((mt._mix_in_kernel, mix), (mt._grad_kernel, grad), (mt._anchor_kernel, anchor)):
    found = accesses(fn, sig, tl.float32)
    assert found == {"ld.global.v4.b32", "st.global.v4.b32"}, (fn.__name__, found)
for dtype in (tl.bfloat16, tl.float16):  # 16-bit params: they compile (bf16 rounding by integer ops included)
    accesses(mt._mix_in_kernel, mix, dtype), accesses(mt._grad_kernel, grad, dtype)
# Kernels defined compiled never receive CPU tensors, even if the environment changes afterwards.
import os, torch
from lightning_robustft.ops.mixout import MixoutPasses
os.environ["TRITON_INTERPRET"] = "1"
try:
    MixoutPasses([torch.zeros(3)], 0.5, 0, backend="triton")
except ValueError as err:
    assert "defined compiled" in str(err), err
else:
    raise AssertionError("compiled kernels accepted CPU tensors")
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
