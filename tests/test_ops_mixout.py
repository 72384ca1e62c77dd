"""GMixout passes, torch path and dispatch: exact semantics, masks, gradient, validation."""

from __future__ import annotations

import ast
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _gmixout_helpers import (
    anchor_reference,
    assert_mixed_close,
    check_pass_semantics,
    make_targets,
    mixin_reference,
    mixout_grad_reference,
    move,
)
from torch import nn

from lightning_robustft.ops.mixout import (
    MixoutPasses,
    _inductor,
    _passes,
    _torch,
    bit_weights,
    block_key,
    draw_keep_mask,
    keep_threshold,
    pack_bits,
    resolve_backend,
    splitmix64,
    stream_seed,
    unpack_bits,
)

# Odd sizes, a conv-shaped tensor, and a larger one.
SHAPES = [(1,), (7,), (1000,), (4099,), (3, 5, 7), (70001,)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(params=["fused", "eager"])
def cpu_mode(request, monkeypatch):
    """Both evaluations of the torch path on CPU: Inductor's fused loops (with eager tails), and eager ops alone."""
    if request.param == "eager":
        monkeypatch.setattr(_inductor, "compiled_rows_supported", lambda: False)
    return request.param


def assert_mode(passes, mode):
    """The passes ran in ``mode``: a fused run that silently fell back to eager would test nothing new.

    A private read: which evaluation ran leaves no other trace (both give the same numbers, by design).
    """
    assert passes._impl._fused.enabled == (mode == "fused")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.3, 0.9])
def test_passes_match_references(dtype, p, cpu_mode, monkeypatch):
    monkeypatch.setattr(_torch, "MASK_BLOCK", 4096)  # block boundaries inside the 4099- and 70001-element tensors
    params, gen = make_targets(SHAPES, dtype)
    passes = MixoutPasses(params, p=p, seed=11, backend="torch")
    anchors = [a.clone() for a in passes.anchors]
    assert all(a.dtype == torch.float32 for a in anchors)
    w = move(params, gen)
    masks = check_pass_semantics(passes, params, anchors, w, period=4, p=p, gen=gen)
    assert_mode(passes, cpu_mode)
    kept = sum(m.sum().item() for m in masks) / sum(m.numel() for m in masks)
    assert abs(kept - (1 - p)) < 0.02


def test_p_zero_is_identity():
    params, gen = make_targets(SHAPES, torch.float32)
    passes = MixoutPasses(params, p=0.0, seed=0, backend="torch")
    w = move(params, gen)
    passes.mix_in(0)
    assert all(torch.equal(t, w_i) for t, w_i in zip(params, w, strict=True))
    grads = [torch.randn(t.shape, generator=gen) for t in params]
    before = [g.clone() for g in grads]
    passes.mix_out(0, grads)
    assert all(torch.equal(g, g0) for g, g0 in zip(grads, before, strict=True))
    assert passes.mask(0, 3).all()


def test_restore_and_state_machine():
    params, gen = make_targets(SHAPES[:3], torch.float32)
    passes = MixoutPasses(params, p=0.5, seed=0, backend="torch")
    w = move(params, gen)
    passes.mix_in(2)
    assert passes.mixed
    assert not all(torch.equal(t, w_i) for t, w_i in zip(params, w, strict=True))
    passes.restore()
    assert not passes.mixed
    assert all(torch.equal(t, w_i) for t, w_i in zip(params, w, strict=True))
    # Outside a mix-in restore is a no-op: it must not bring back a stale backup after an optimizer step.
    for t in params:
        t.add_(1.0)
    stepped = [t.clone() for t in params]
    passes.restore()
    assert all(torch.equal(t, s) for t, s in zip(params, stepped, strict=True))
    passes.mix_in(2)
    with pytest.raises(RuntimeError, match="mix_in"):
        passes.mix_in(2)
    with pytest.raises(RuntimeError, match="update_anchor"):
        passes.update_anchor(0.5)
    passes.mix_out(2, [None] * 3)
    with pytest.raises(RuntimeError, match="mix_out"):
        passes.mix_out(2, [None] * 3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_update_anchor(dtype):
    params, gen = make_targets(SHAPES, dtype)
    passes = MixoutPasses(params, p=0.9, seed=0, backend="torch")
    a0 = [a.clone() for a in passes.anchors]
    w = move(params, gen)
    passes.update_anchor(1.0)
    assert all(torch.equal(a, b) for a, b in zip(passes.anchors, a0, strict=True)), "decay=1 keeps a (Mixout)"
    passes.update_anchor(0.9)
    for a, a_prev, w_i in zip(passes.anchors, a0, w, strict=True):
        torch.testing.assert_close(a, anchor_reference(a_prev, w_i, 0.9), rtol=4e-7, atol=4e-7)
    passes.update_anchor(0.0)
    assert all(torch.equal(a, w_i.float()) for a, w_i in zip(passes.anchors, w, strict=True)), "decay=0 copies w"


def test_masks_deterministic_distinct_and_cached(monkeypatch):
    shapes = [(4099,), (4099,)]
    first = MixoutPasses(make_targets(shapes, torch.float32)[0], p=0.5, seed=5, backend="torch")
    second = MixoutPasses(make_targets(shapes, torch.float32, seed=1)[0], p=0.5, seed=5, backend="torch")
    other_seed = MixoutPasses(make_targets(shapes, torch.float32)[0], p=0.5, seed=6, backend="torch")
    m = first.mask(3, 0)
    assert torch.equal(m, second.mask(3, 0)), "a pure function of the seed: other values, same mask"
    assert not torch.equal(m, first.mask(4, 0)), "new mask each period"
    assert not torch.equal(m, first.mask(3, 1)), "independent across tensors"
    assert not torch.equal(m, other_seed.mask(3, 0))

    draws = []
    # One draw per block.
    block_draw = _torch._BlockDraws.draw
    monkeypatch.setattr(_torch._BlockDraws, "draw", lambda self, jobs: draws.extend(jobs) or block_draw(self, jobs))
    params, gen = make_targets(shapes, torch.float32)
    passes = MixoutPasses(params, p=0.5, seed=5, backend="torch")
    move(params, gen)
    passes.mix_in(3)
    assert len(draws) == 2
    held_first = [t == a for t, a in zip(params, passes.anchors, strict=True)]
    passes.mix_out(3, [None, None])
    passes.mix_in(3)  # same period (resample_every > 1): no redraw, same mask
    assert len(draws) == 2
    assert all(torch.equal(t == a, h) for t, a, h in zip(params, passes.anchors, held_first, strict=True))
    assert torch.equal(held_first[0], ~m), "the mask mix_in uses is the one mask() reports"
    passes.restore()
    passes.mix_in(4)
    assert len(draws) == 4
    assert not any(torch.equal(t == a, h) for t, a, h in zip(params, passes.anchors, held_first, strict=True))


def test_mask_is_the_documented_block_draw(monkeypatch):
    """Block j of tensor i in period r is draw_keep_mask(block, p, block_key(seed, r, i, j)), whatever else is drawn."""
    monkeypatch.setattr(_torch, "MASK_BLOCK", 4096)
    shapes = [(4099,), (3, 5, 7), (70001,)]
    params, gen = make_targets(shapes, torch.float32)
    passes = MixoutPasses(params, p=0.7, seed=21, backend="torch")
    move(params, gen)
    alone = passes.mask(5, 2)  # drawn on its own, before the period's masks exist
    passes.mix_in(5)
    masks = [passes.mask(5, i) for i in range(len(shapes))]
    held = [t == a for t, a in zip(params, passes.anchors, strict=True)]
    assert all(torch.equal(h, ~m) for h, m in zip(held, masks, strict=True))
    assert torch.equal(alone, masks[2])
    passes.restore()
    for i, (shape, mask) in enumerate(zip(shapes, masks, strict=True)):
        flat = mask.flatten()
        for j, lo in enumerate(range(0, flat.numel(), 4096)):
            n = min(4096, flat.numel() - lo)
            ref = draw_keep_mask(-(-n // 8) * 8, 0.7, block_key(21, 5, i, j), torch.device("cpu"))[:n]
            assert torch.equal(flat[lo : lo + n], ref), (shape, j)


@pytest.mark.parametrize("p", [0.0, 0.3, 229.5 / 256, 1 - 2**-30])
def test_block_draws_are_the_mask_rule(p, cpu_mode, monkeypatch):
    """The passes' packed block draws (compiled SWAR or eager byte ops) give exactly draw_keep_mask's bits.

    Odd block sizes, more blocks than one classification chunk holds, and thresholds at both ends of the byte range.
    """
    monkeypatch.setattr(_torch, "MASK_BLOCK", 4096)
    monkeypatch.setattr(_torch, "DRAW_CHUNK", 3)
    sizes = [4096, 8, 4000, 4096, 1000, 4096, 2048]
    outs = [torch.full((n // 8,), 0xA5, dtype=torch.uint8) for n in sizes]  # stale bytes must be overwritten
    fused = _inductor.FusedRows(torch.device("cpu"))
    _torch._BlockDraws(p, torch.device("cpu"), fused).draw([(1000 + k, out) for k, out in enumerate(outs)])
    assert fused.enabled == (cpu_mode == "fused")
    for k, (n, out) in enumerate(zip(sizes, outs, strict=True)):
        assert torch.equal(unpack_bits(out, n), draw_keep_mask(n, p, 1000 + k, torch.device("cpu"))), (k, n)


@pytest.mark.parametrize("high", [0, 1, 127, 128, 229, 254, 255])
def test_classify_bytes_compares_every_byte(high):
    """The SWAR loop, eager and compiled, on every byte value at every position of a word, and on random words."""
    every = [torch.arange(256, dtype=torch.uint8).roll(shift).view(torch.int64) for shift in range(8)]
    noise = torch.empty(999, dtype=torch.int64).random_(-(2**63), None, generator=torch.Generator().manual_seed(high))
    words = torch.cat([*every, noise])
    coarse = words.view(torch.uint8)
    above = torch.tensor(_inductor.byte_pattern(255 - high))
    equal = torch.tensor(_inductor.byte_pattern(high))
    expected = [pack_bits(coarse > high, torch.empty_like(words, dtype=torch.uint8)),
                pack_bits(coarse == high, torch.empty_like(words, dtype=torch.uint8))]  # fmt: skip
    compiled = torch.compile(_inductor.classify_bytes, fullgraph=True)
    for classify in (_inductor.classify_bytes, compiled):
        bits, tied = torch.empty_like(words, dtype=torch.uint8), torch.empty_like(words, dtype=torch.uint8)
        classify(words, bits, tied, above, equal)
        assert torch.equal(bits, expected[0]) and torch.equal(tied, expected[1])


def test_pack_and_unpack_bits():
    keep = torch.rand(8 * 1001, generator=torch.Generator().manual_seed(0)) < 0.3
    bits = pack_bits(keep, torch.empty(1001, dtype=torch.uint8))
    assert int(bits[0]) == sum(int(keep[k]) << k for k in range(8)), "bit k of byte j is element 8j+k"
    assert torch.equal(unpack_bits(bits, 8 * 1001), keep)
    assert torch.equal(unpack_bits(bits, 8 * 1001 - 5), keep[:-5])
    table = bit_weights(2.5, torch.device("cpu"))
    assert table.shape == (256, 8) and table.dtype == torch.float32
    assert torch.equal(table[bits.long()].flatten(), keep.float() * 2.5)


def test_mix_in_swaps_storage_and_keeps_w_and_the_version_counter():
    """w~ lives in a buffer the parameter points at; w is never written; the Parameter keeps its autograd identity."""
    lin = nn.Linear(9, 4)
    passes = MixoutPasses([lin.weight], p=0.5, seed=0, backend="torch")
    with torch.no_grad():
        lin.weight.add_(1.0)
    own = lin.weight.data  # an alias of the parameter's own storage
    w, ptr, version = own.clone(), own.data_ptr(), lin.weight._version
    passes.mix_in(0)
    assert lin.weight.data_ptr() != ptr and torch.equal(own, w), "w untouched in its own storage"
    assert not torch.equal(lin.weight, w)
    lin(torch.randn(3, 9)).sum().backward()  # autograd accepts the swapped parameter
    passes.mix_out(0, [lin.weight.grad])
    assert lin.weight.data_ptr() == ptr and torch.equal(lin.weight, w)
    assert lin.weight._version == version and isinstance(lin.weight, nn.Parameter)
    passes.mix_in(0)
    passes.restore()
    assert lin.weight.data_ptr() == ptr


def test_target_moved_after_building_is_refused():
    params = [torch.randn(5), torch.randn(3)]
    passes = MixoutPasses(params, p=0.5, seed=0, backend="torch")
    params[1].data = params[1].data.to(torch.float16)
    with pytest.raises(RuntimeError, match=r"Target 1 is now torch.float16.*build the passes after"):
        passes.mix_in(0)
    assert not passes.mixed
    with pytest.raises(RuntimeError, match="Target 1"):
        passes.update_anchor(0.5)


def test_persistent_memory_is_buffers_anchors_one_bit_per_entry_and_a_fixed_scratch(cpu_mode, monkeypatch):
    """Between steps the passes hold w~ buffers, fp32 anchors, the mask bits and a fixed scratch: nothing per step.

    The scratch is the eager ops': a tail's worth (32 entries) when the fused loops do the rows, else one block.
    """
    monkeypatch.setattr(_torch, "MASK_BLOCK", 4096)
    params = [torch.randn(4099), torch.randn(3, 5, 7)]
    passes = MixoutPasses(params, p=0.9, seed=0, backend="torch")
    passes.mix_in(0)
    passes.mix_out(0, [torch.ones(4099), None])
    assert_mode(passes, cpu_mode)
    owned = {t.data_ptr(): t for t in params}
    held = {}
    for obj in (passes, passes._impl):  # private reads: what the passes hold is the thing measured
        for value in vars(obj).values():
            for t in value if isinstance(value, list) else [value]:
                if isinstance(t, torch.Tensor) and t.data_ptr() not in owned:
                    held[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    numel = sum(t.numel() for t in params)
    bits = sum(4 * -(-t.numel() // 32) for t in params)  # whole int32 words
    block = 32 if cpu_mode == "fused" else 4096
    scratch = 4 * block + 4 * block // 8 + 256 * 8 * 4 + 2 * 4  # weights, codes, the (256, 8) table, s and 1 - s
    assert sum(held.values()) == 2 * 4 * numel + bits + scratch


def test_fused_and_eager_agree_to_fp32_rounding(monkeypatch):
    """Same mask, same law: gradients bitwise (the same product), mixed weights within the eager lerp's fused
    multiply-add (one fp32 rounding of the largest term)."""
    params, gen = make_targets([(4099,), (3, 5, 7), (70001,)], torch.float32)
    w = move(params, gen)
    anchors = [t.clone() - 0.5 for t in w]
    grads = [torch.randn(t.shape, generator=gen) for t in params]
    mixed, scaled = {}, {}
    for mode in ("fused", "eager"):
        if mode == "eager":
            monkeypatch.setattr(_inductor, "compiled_rows_supported", lambda: False)
        passes = MixoutPasses(params, p=0.8, seed=2, backend="torch")
        passes.anchors = anchors
        passes.mix_in(7)
        mixed[mode] = [t.clone() for t in params]
        scaled[mode] = [g.clone() for g in grads]
        passes.mix_out(7, scaled[mode])
        assert_mode(passes, mode)
    for f, e, a, w_i in zip(mixed["fused"], mixed["eager"], anchors, w, strict=True):
        terms = 5.0 * (w_i - a).abs() + w_i.abs()
        assert ((f - e).abs() <= torch.finfo(torch.float32).eps * terms).all()
    for f, e in zip(scaled["fused"], scaled["eager"], strict=True):
        assert torch.equal(f, e)


def test_compile_failure_falls_back_to_eager_with_one_warning(monkeypatch):
    """No C++ compiler (say): one warning, then the eager ops do everything, with the same results."""

    def broken(*args):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(_inductor, "_compiled", lambda: (broken,) * 3)
    params, gen = make_targets(SHAPES, torch.float32)
    passes = MixoutPasses(params, p=0.5, seed=4, backend="torch")
    w = move(params, gen)
    with pytest.warns(RuntimeWarning, match="could not compile the CPU passes.*no C\\+\\+ compiler"):
        passes.mix_in(1)
    assert_mode(passes, "eager")
    monkeypatch.setattr(_inductor, "compiled_rows_supported", lambda: False)
    eager_params = [t.clone() for t in w]
    eager = MixoutPasses(eager_params, p=0.5, seed=4, backend="torch")
    eager.anchors = passes.anchors
    eager.mix_in(1)
    assert all(torch.equal(t, e) for t, e in zip(params, eager_params, strict=True))
    passes.restore()
    assert all(torch.equal(t, w_i) for t, w_i in zip(params, w, strict=True))


@pytest.mark.parametrize("switch", ["TORCHDYNAMO_DISABLE", "TORCH_COMPILE_DISABLE"])
def test_dynamo_disabled_means_eager_passes(switch, monkeypatch):
    """PyTorch's two documented switches skip the compiler: ``TORCHDYNAMO_DISABLE=1`` in the environment (read by
    ``torch.compile`` at each call) and ``TORCH_COMPILE_DISABLE=1`` (read at import into ``config.disable``)."""
    params, gen = make_targets([(4099,)], torch.float32)
    if switch == "TORCHDYNAMO_DISABLE":
        monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")
        passes = MixoutPasses(params, p=0.5, seed=4, backend="torch")
    else:
        with torch._dynamo.config.patch(disable=True):
            passes = MixoutPasses(params, p=0.5, seed=4, backend="torch")
    move(params, gen)
    passes.mix_in(0)
    assert_mode(passes, "eager")


@pytest.mark.parametrize(("numel", "start"), [(20, 0), (20, 16), (20, 8), (20, 20), (16, 16), (16, 8), (0, 0)])
def test_blocks_after_start_tile_the_rest_of_the_tensor(numel, start, monkeypatch):
    """The eager tails after the fused rows: every entry from ``start`` on, once, each in its own mask block."""
    monkeypatch.setattr(_torch, "MASK_BLOCK", 8)
    spans = list(_torch._blocks(numel, start))
    assert [i for _, s in spans for i in range(s.start, s.stop)] == list(range(start, numel))
    assert all(j * 8 <= s.start < s.stop <= (j + 1) * 8 for j, s in spans)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate(p):
    n = 200_000
    keep = draw_keep_mask(n, p, stream_seed(0, 1, 2), torch.device("cpu"))
    rate = keep.float().mean().item()
    assert abs(rate - (1 - p)) <= 5 * math.sqrt(p * (1 - p) / n)


def test_keep_threshold_edges():
    assert keep_threshold(0.0) == 0  # every 32-bit draw is kept
    assert keep_threshold(0.5) == 2**31
    assert keep_threshold(1 - 2**-40) == 2**32 - 1  # something is still kept


@pytest.mark.parametrize("p", [0.0, 0.3, 229.5 / 256, 1 - 2**-30])
def test_high_byte_decides_and_ties_draw_their_low_bits(p):
    """The two-stage draw: entry e's high byte from the e-th byte of the stream; only ties draw 24 more bits.

    ``p = 229.5/256`` puts the threshold's low bits at 2**23, so a tied entry is kept with probability exactly 1/2:
    ties neither all kept nor all held shows their low bits are drawn and compared.
    """
    n = 300_001
    keep = draw_keep_mask(n, p, 77, torch.device("cpu"))
    generator = torch.Generator().manual_seed(77)
    coarse = torch.empty(-(-n // 8), dtype=torch.int64).random_(-(1 << 63), None, generator=generator)
    coarse = coarse.view(torch.uint8)[:n].long()
    t = keep_threshold(p)
    tied = coarse == t >> 24
    assert torch.equal(keep[~tied], coarse[~tied] > t >> 24)
    fine = torch.empty(int(tied.sum()), dtype=torch.int32).random_(0, 1 << 24, generator=generator)
    assert torch.equal(keep[tied], (coarse[tied] << 24 | fine) >= t)
    if p == 229.5 / 256:
        assert abs(keep[tied].float().mean().item() - 0.5) <= 5 * 0.5 / math.sqrt(tied.sum().item())


def test_splitmix64_is_the_reference_generator():
    """The first outputs of Vigna's splitmix64.c seeded with 0 (its state advances by the golden gamma per call)."""
    gamma = 0x9E3779B97F4A7C15
    outputs = [splitmix64(k * gamma % 2**64) for k in range(3)]
    assert outputs == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]


def test_stream_seed_is_a_64_bit_hash_of_all_three_arguments():
    seeds = {stream_seed(s, r, i) for s in range(3) for r in range(20) for i in range(20)}
    assert len(seeds) == 3 * 20 * 20
    assert all(0 <= x < 2**64 for x in seeds)
    assert stream_seed(7, 3, 2) == splitmix64(splitmix64(splitmix64(7) ^ 3) ^ 2), "the documented chain"
    assert stream_seed(7 + 2**64, 3, 2) == stream_seed(7, 3, 2), "only the seed's low 64 bits count"
    assert block_key(7, 3, 2, 5) == splitmix64(stream_seed(7, 3, 2) ^ 5)


def test_monte_carlo_expectation_is_w():
    p, periods = 0.5, 400
    params, gen = make_targets([(1000,)], torch.float32)
    passes = MixoutPasses(params, p=p, seed=3, backend="torch")
    (w,) = move(params, gen)
    total = torch.zeros(1000, dtype=torch.float64)
    for r in range(periods):
        passes.mix_in(r)
        total += params[0].double()
        passes.restore()
    mean = total / periods
    sigma = (w.double() - passes.anchors[0].double()).abs() * math.sqrt(p / (1 - p) / periods)
    z = (mean - w.double()).abs() / sigma
    assert z.max() < 5.0 and z.mean() < 1.0  # E|N(0,1)| = 0.8


def hand_written_mixout_grad(lin, x, a, mask, p):
    """Autograd's gradient of w for loss(x @ w~.T + b) with w~ = a + M*(w - a)/(1-p)."""
    w = lin.weight.detach().clone().requires_grad_(True)
    w_tilde = a + mask * (w - a) / (1 - p)
    loss = (nn.functional.linear(x, w_tilde, lin.bias.detach()).tanh() ** 2).sum()
    loss.backward()
    return w.grad, loss.detach()


def test_gradient_equals_autograd_of_hand_written_mixout():
    torch.manual_seed(0)
    lin = nn.Linear(7, 5)
    x = torch.randn(11, 7)
    p, period = 0.6, 3
    passes = MixoutPasses([lin.weight], p=p, seed=9, backend="torch")
    with torch.no_grad():
        lin.weight.add_(torch.randn_like(lin.weight))  # fine-tuned away from the anchor
    w = lin.weight.detach().clone()
    passes.mix_in(period)
    loss = (lin(x).tanh() ** 2).sum()
    loss.backward()
    passes.mix_out(period, [lin.weight.grad])
    ref_grad, ref_loss = hand_written_mixout_grad(lin, x, passes.anchors[0], passes.mask(period, 0), p)
    assert torch.equal(lin.weight.detach(), w)
    torch.testing.assert_close(loss.detach(), ref_loss)
    torch.testing.assert_close(lin.weight.grad, ref_grad, rtol=1e-5, atol=1e-6)


def test_channels_last_and_foreign_grad_layout():
    conv = torch.randn(6, 3, 5, 5).contiguous(memory_format=torch.channels_last)
    assert not conv.is_contiguous()
    params = [conv]
    passes = MixoutPasses(params, p=0.5, seed=1, backend="torch")
    conv.add_(1.0)
    w = conv.clone()
    passes.mix_in(0)
    m = passes.mask(0, 0)
    assert m.shape == conv.shape
    assert torch.equal(conv[~m], passes.anchors[0][~m])
    assert_mixed_close(conv, mixin_reference(w, passes.anchors[0], m, 0.5), w, passes.anchors[0], 0.5)
    g0 = torch.randn(6, 3, 5, 5)  # contiguous: laid out unlike its channels_last parameter
    g = g0.clone()
    passes.mix_out(0, [g])
    assert torch.equal(conv, w)
    torch.testing.assert_close(g, mixout_grad_reference(g0, m, 0.5), rtol=1.2e-7, atol=0)


def test_anchors_setter_copies_into_the_buffers():
    params, _ = make_targets([(7,), (3, 5, 7)], torch.bfloat16)
    passes = MixoutPasses(params, p=0.5, seed=0, backend="torch")
    before = [a.data_ptr() for a in passes.anchors]
    new = [torch.full((7,), 2.0), torch.full((3, 5, 7), -1.0)]
    passes.anchors = new
    assert [a.data_ptr() for a in passes.anchors] == before
    assert all(torch.equal(a, n) for a, n in zip(passes.anchors, new, strict=True))
    with pytest.raises(ValueError, match="`anchors`"):
        passes.anchors = new[:1]
    with pytest.raises(ValueError, match=r"`anchors\[1\]`.*shape \(3, 5, 7\), got \(3,\)"):
        passes.anchors = [new[0], torch.zeros(3)]
    with pytest.raises(TypeError, match=r"`anchors\[0\]`.*got list"):
        passes.anchors = [[2.0] * 7, new[1]]
    assert all(torch.equal(a, n) for a, n in zip(passes.anchors, new, strict=True)), "refused anchors change nothing"


@pytest.mark.parametrize(
    ("p", "error"),
    [(-0.1, ValueError), (1.0, ValueError), (1.5, ValueError), (float("nan"), ValueError), (True, TypeError),
     ("0.5", TypeError)],
)  # fmt: skip
def test_bad_p(p, error):
    """Out of range (NaN included): ValueError; not a number (a bool is not a probability): TypeError."""
    with pytest.raises(error, match=r"`p`.*\[0, 1\)"):
        MixoutPasses([torch.zeros(3)], p=p, seed=0)


def test_bad_arguments():
    ok = [torch.zeros(3)]
    cases = [
        (lambda: MixoutPasses(ok, 0.5, seed=-1), ValueError, "`seed`"),
        (lambda: MixoutPasses(ok, 0.5, seed=2**64), ValueError, r"`seed` must be an integer in \[0, "),
        (lambda: MixoutPasses(ok, 0.5, seed=1.5), TypeError, "`seed`"),
        (lambda: MixoutPasses([], 0.5, 0), ValueError, "`params` is empty"),
        (lambda: MixoutPasses([torch.zeros(3), [0.0]], 0.5, 0), TypeError, r"`params\[1\]` must be a torch.Tensor"),
        (lambda: MixoutPasses([torch.zeros(3, dtype=torch.int64)], 0.5, 0), ValueError, r"`params\[0\]`.*torch.int64"),
        (lambda: MixoutPasses([torch.zeros(3, dtype=torch.float64)], 0.5, 0), ValueError, r"`params\[0\]`.*float64"),
        (
            lambda: MixoutPasses([torch.zeros(3), torch.zeros(3, device="meta")], 0.5, 0),
            ValueError,
            r"`params\[1\]` is on meta",
        ),
        (lambda: MixoutPasses([torch.zeros(4, 4)[:, ::2]], 0.5, 0), ValueError, r"`params\[0\]`.*not dense"),
        (lambda: MixoutPasses(ok, 0.5, 0, backend="cuda"), ValueError, "`backend`"),
    ]
    for make, error, message in cases:
        with pytest.raises(error, match=message):
            make()
    passes = MixoutPasses([torch.zeros(3), torch.zeros(2, 2)], 0.5, 0, backend="torch")
    for call, error, message in [
        (lambda: passes.mix_in(-1), ValueError, "`period`"),
        (lambda: passes.mix_in(0.0), TypeError, "`period`"),
        (lambda: passes.mask(0, 2), ValueError, "`index`"),
        (lambda: passes.update_anchor(1.5), ValueError, "`decay`"),
        (lambda: passes.update_anchor(-0.1), ValueError, "`decay`"),
        (lambda: passes.update_anchor("0.5"), TypeError, "`decay`"),
    ]:
        with pytest.raises(error, match=message):
            call()
    assert not passes.mixed
    passes.mix_in(0)
    for grads, message in [
        ([None], "`grads` needs 2"),
        ([torch.zeros(4), None], r"`grads\[0\]`.*shape \(3,\)"),
        ([None, torch.zeros(2, 2, dtype=torch.float16)], r"`grads\[1\]`.*float16"),
    ]:
        with pytest.raises(ValueError, match=message):
            passes.mix_out(0, grads)
    assert passes.mixed, "a rejected mix_out leaves the state unchanged"


def test_resolve_backend(monkeypatch):
    cpu = [torch.zeros(2)]
    assert resolve_backend("torch", cpu) == "torch"
    assert resolve_backend("auto", cpu) == "torch"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", cpu) == "triton"
    with pytest.raises(ValueError, match="got tensors on"):
        resolve_backend("triton", [torch.zeros(2, device="meta")])
    monkeypatch.setattr(_passes, "_triton_importable", lambda: False)
    with pytest.raises(ImportError, match="needs the `triton` package"):
        resolve_backend("triton", cpu)
    assert resolve_backend("auto", cpu) == "torch"


@pytest.mark.slow
def test_works_without_triton():
    """The package and the torch path import and run where Triton is missing (macOS, Windows, CPU-only installs)."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, lightning_robustft\n"
        "from lightning_robustft.ops.mixout import MixoutPasses, resolve_backend\n"
        "passes = MixoutPasses([torch.randn(10)], 0.5, 0)\n"
        "assert passes.backend == 'torch'\n"
        "passes.mix_in(0); passes.mix_out(0, [torch.ones(10)])\n"
        "try:\n"
        "    resolve_backend('triton', [torch.zeros(1)])\n"
        "except ImportError as err:\n"
        "    assert 'needs the `triton` package' in str(err)\n"
        "else:\n"
        "    raise AssertionError('triton backend accepted without triton')\n"
        "assert 'lightning_robustft.ops.mixout._triton' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# The package's modules in import order: each may import only those before it (the Triton backend is imported lazily
# by the front end, and never imports it back).
LAYERS = ["_law", "_inductor", "_torch", "_triton", "_passes"]


def test_modules_import_only_the_layers_below_and_not_lightning():
    root = Path(_passes.__file__).parent
    assert sorted(p.stem for p in root.glob("*.py")) == sorted([*LAYERS, "__init__"]), "a new module needs a layer"
    for rank, name in enumerate(LAYERS):
        tree = ast.parse((root / f"{name}.py").read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        ours = {m for m in imported if m.split(".")[0] in ("lightning_robustft", "lightning")}
        assert ours <= {f"lightning_robustft.ops.mixout.{below}" for below in LAYERS[:rank]}, (name, ours)


@pytest.mark.slow
def test_importing_the_passes_does_not_import_lightning():
    """ops/ is plain PyTorch: its errors are built-in exceptions, so importing it pulls in no Lightning module.

    The parent packages are stubbed because ``lightning_robustft/__init__.py`` itself imports the callbacks.
    """
    code = (
        "import sys, types, pathlib, torch\n"
        f"root = pathlib.Path({str(Path(_passes.__file__).parents[2])!r})\n"
        "for name, path in (('lightning_robustft', root), ('lightning_robustft.ops', root / 'ops')):\n"
        "    sys.modules[name] = types.ModuleType(name); sys.modules[name].__path__ = [str(path)]\n"
        "from lightning_robustft.ops.mixout import MixoutPasses\n"
        "passes = MixoutPasses([torch.randn(100)], 0.5, 0, backend='torch')\n"
        "passes.mix_in(0); passes.mix_out(0, [torch.ones(100)])\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'lightning')\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_empty_target_is_carried_along():
    params = [torch.zeros(0), torch.randn(5)]
    passes = MixoutPasses(params, p=0.5, seed=0, backend="torch")
    params[1].add_(1.0)
    w = params[1].clone()
    passes.mix_in(0)
    passes.mix_out(0, [torch.zeros(0), torch.ones(5)])
    assert torch.equal(params[1], w) and passes.mask(0, 0).numel() == 0
