"""ops.sparse_mixout (torch path): gather / scatter / mix / packed gradient against float64 references."""

from __future__ import annotations

import pytest
import torch

from lightning_robustft.ops.mixout import mix_scale
from lightning_robustft.ops.sparse_mixout import (
    Workspace,
    draw_free_indices,
    free_count,
    gather,
    mix,
    packed_grad,
    scatter_,
    update_anchor_,
)

SHAPES = [(1,), (7,), (1000,), (4099,), (3, 5, 7)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def case(shape: tuple[int, ...], dtype: torch.dtype, p: float = 0.7, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=generator).to(dtype)
    anchor = torch.randn(shape, generator=generator)
    n = w.numel()
    indices = draw_free_indices(n, max(1, round((1 - p) * n)), seed, 0, 0, torch.device("cpu"))
    return w, anchor, indices


def reference_mix(anchor: torch.Tensor, packed: torch.Tensor, indices: torch.Tensor, p: float, dtype: torch.dtype):
    a64 = anchor.double().flatten()
    out = a64.clone()
    free = indices.long()
    out[free] = a64[free] + (packed.double().flatten() - a64[free]) / (1 - p)
    return out.to(dtype).view_as(anchor)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_ops_match_float64_references(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    p = 0.7
    w, anchor, indices = case(shape, dtype, p)
    free = indices.long()
    packed = gather(w, indices, torch.empty(indices.numel(), dtype=dtype))
    assert torch.equal(packed, w.flatten()[free])
    packed = packed + 0.25  # the packed values move during the period
    workspace = Workspace()
    mixed = mix(anchor, packed, indices, mix_scale(p), torch.empty_like(w), workspace=workspace)
    expected = reference_mix(anchor, packed, indices, p, dtype)
    held = torch.ones(w.numel(), dtype=torch.bool)
    held[free] = False
    assert torch.equal(mixed.flatten()[held], anchor.flatten()[held].to(dtype))  # held entries are exactly a
    tol = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {}
    torch.testing.assert_close(mixed, expected, **tol)
    grad = torch.randn(shape).to(dtype)
    torch.testing.assert_close(
        packed_grad(grad, indices, mix_scale(p)), (grad.double().flatten()[free] / (1 - p)).to(dtype), **tol
    )
    written = scatter_(w.clone(), indices, packed, workspace=workspace)
    assert torch.equal(written.flatten()[free], packed) and torch.equal(written.flatten()[held], w.flatten()[held])


def test_channels_last_weights_are_walked_in_memory_order() -> None:
    w = torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last)
    anchor = torch.empty_like(w, dtype=torch.float32).copy_(torch.randn(4, 3, 5, 5))
    indices = draw_free_indices(w.numel(), 90, 1, 0, 0, torch.device("cpu"))
    packed = gather(w, indices, torch.empty(90))
    memory_order = w.permute(0, 2, 3, 1).flatten()
    assert torch.equal(packed, memory_order[indices.long()])
    mixed = mix(anchor, packed, indices, 1.0, torch.empty_like(w))  # s = 1 (p = 0): w~ = w at free entries
    assert mixed.stride() == w.stride()
    assert torch.equal(mixed.permute(0, 2, 3, 1).flatten()[indices.long()], packed)


def test_anchor_update_is_the_dense_ema() -> None:
    anchor, w = torch.randn(100), torch.randn(100).bfloat16()
    expected = (0.9 * anchor.double() + 0.1 * w.double()).float()
    torch.testing.assert_close(update_anchor_(anchor.clone(), w, 0.9), expected)
    assert torch.equal(update_anchor_(anchor.clone(), w, 1.0), anchor)
    assert torch.equal(update_anchor_(anchor.clone(), w, 0.0), w.float())


def test_workspace_is_reused_and_grows() -> None:
    workspace = Workspace()
    small = workspace.take(10, torch.float32, torch.device("cpu"))
    again = workspace.take(5, torch.float32, torch.device("cpu"))
    assert again.data_ptr() == small.data_ptr()
    assert workspace.take(20, torch.float32, torch.device("cpu")).numel() == 20
    wide = workspace.wide(torch.tensor([3, 1], dtype=torch.int32))
    assert wide.dtype == torch.int64 and wide.tolist() == [3, 1]


def test_free_count_is_rounded() -> None:
    assert free_count(1000, 0.9) == 100 and free_count(16, 0.75) == 4 and free_count(10, 0.0) == 10
