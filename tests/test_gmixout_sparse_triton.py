"""Sparse GMixout's Triton kernels, interpreted on CPU (TRITON_INTERPRET=1) against the torch path; sm_90 code."""

from __future__ import annotations

import os

# Before any import of the kernels: @triton.jit decides interpreted vs compiled when the decorators run.
os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess
import sys

import pytest
import torch
from _gmixout_helpers import make_loader, make_model, make_trainer, params_of
from test_gmixout_sparse_ops import case, reference_mix

from lightning_robustft.callbacks.gmixout import GMixoutCallback
from lightning_robustft.ops.mixout import mix_scale
from lightning_robustft.ops.sparse_mixout import gather, mix, packed_grad, scatter_

INTERPRETED = os.environ["TRITON_INTERPRET"] == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not INTERPRETED and not torch.cuda.is_available(), reason="compiled Triton needs CUDA"),
]

# Odd sizes, a conv shape, and a tensor spanning two interpreted blocks of 1 << 16 elements.
SHAPES = [(1,), (7,), (1000,), (4099,), (3, 5, 7), (70001,)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_kernels_match_the_torch_path(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    p = 0.7
    w, anchor, indices = (t.to(DEVICE) for t in case(shape, dtype, p))
    free = indices.long()
    packed = gather(w, indices, torch.empty(indices.numel(), dtype=dtype, device=DEVICE), "triton")
    assert torch.equal(packed, gather(w, indices, torch.empty_like(packed)))
    packed = packed + 0.25
    mixed = mix(anchor, packed, indices, mix_scale(p), torch.empty_like(w), "triton")
    torch_mixed = mix(anchor, packed, indices, mix_scale(p), torch.empty_like(w))
    held = torch.ones(w.numel(), dtype=torch.bool, device=DEVICE)
    held[free] = False
    assert torch.equal(mixed.flatten()[held], torch_mixed.flatten()[held])
    tol = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {}
    torch.testing.assert_close(mixed, torch_mixed, **tol)
    torch.testing.assert_close(mixed.cpu(), reference_mix(anchor.cpu(), packed.cpu(), indices.cpu(), p, dtype), **tol)
    grad = torch.randn(shape, device=DEVICE).to(dtype)
    assert torch.equal(packed_grad(grad, indices, mix_scale(p), "triton"), packed_grad(grad, indices, mix_scale(p)))
    assert torch.equal(scatter_(w.clone(), indices, packed, "triton"), scatter_(w.clone(), indices, packed))


@pytest.mark.skipif(not INTERPRETED, reason="trains on CPU tensors")
def test_callback_with_the_kernels_trains_like_the_torch_path() -> None:
    def run(backend: str) -> dict[str, torch.Tensor]:
        model = make_model()
        callback = GMixoutCallback(p=0.6, resample_every=2, anchor_decay=0.5, seed=3, sparse=True, backend=backend)
        make_trainer([callback], max_steps=4).fit(model, make_loader(4))
        assert callback.sparse_mixout.backend == backend
        return params_of(model)

    kernels, torch_path = run("triton"), run("torch")
    for name, value in torch_path.items():
        torch.testing.assert_close(kernels[name], value, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not INTERPRETED, reason="interpreter check")
def test_interpreted_kernels_refuse_cuda_and_compiled_refuse_cpu() -> None:
    from lightning_robustft.ops import sparse_mixout_triton as kernels

    assert kernels.kernels_interpreted()
    with pytest.raises(ValueError, match="interpreter"):
        kernels._check(torch.empty(1, device="meta"))


def test_kernels_compile_for_sm90() -> None:
    """Compile every kernel for an H100 (no GPU needed), fp32 and the 16-bit dtypes, int32 indices."""
    code = r"""
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from lightning_robustft.ops import sparse_mixout_triton as k
assert not k.kernels_interpreted()
def compile(fn, sig):
    src = triton.compiler.ASTSource(fn=fn, signature={**sig, "BLOCK": "constexpr"}, constexprs={"BLOCK": 1024})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]
for t in ("fp32", "bf16", "fp16"):
    compile(k._gather_kernel, {"src_ptr": f"*{t}", "idx_ptr": "*i32", "out_ptr": f"*{t}", "m": "i32"})
    compile(k._scatter_kernel, {"dst_ptr": f"*{t}", "idx_ptr": "*i32", "val_ptr": f"*{t}", "m": "i32"})
    compile(k._anchor_copy_kernel, {"a_ptr": "*fp32", "out_ptr": f"*{t}", "n": "i32"})
    compile(k._mix_free_kernel, {"a_ptr": "*fp32", "v_ptr": f"*{t}", "idx_ptr": "*i32", "out_ptr": f"*{t}",
                                 "m": "i32", "scale": "fp32"})
    compile(k._packed_grad_kernel, {"g_ptr": f"*{t}", "idx_ptr": "*i32", "out_ptr": f"*{t}", "m": "i32",
                                    "scale": "fp32"})
import torch

try:
    k.triton_gather(torch.zeros(3), torch.zeros(1, dtype=torch.int32), torch.zeros(1))
except ValueError as err:
    assert "defined compiled" in str(err), err
else:
    raise AssertionError("compiled kernels accepted CPU tensors")
print("ok")
"""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
