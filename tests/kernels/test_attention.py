import math

import pytest
import torch
from llamactl.kernels.attention import attention_ref, attention_triton, cached_attention_ref, cached_attention_triton


def _qkv(B, H, KV, T, D, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g).to(device, dtype).requires_grad_()
    k = torch.randn(B, KV, T, D, generator=g).to(device, dtype).requires_grad_()
    v = torch.randn(B, KV, T, D, generator=g).to(device, dtype).requires_grad_()
    do = torch.randn(B, H, T, D, generator=g).to(device, dtype)
    return q, k, v, do


def _fwd_bwd(fn, q, k, v, do, **kw):
    o = fn(q, k, v, **kw)
    return (o, *torch.autograd.grad(o, (q, k, v), do))


def _packed_segments(B, T, lengths, device):
    """Segment ids (B, T): each row packs sequences of the given lengths, ids 0, 1, 2, ..."""
    ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    assert ids.numel() == T
    return ids.expand(B, T).contiguous().to(device)


def test_ref_matches_softmax_formula():
    # softmax(q k^T / sqrt(d) + mask) v with K/V heads repeated, written out independently of SDPA.
    q, k, v, _ = _qkv(2, 4, 2, 11, 8, torch.float64, "cpu")
    seg = _packed_segments(2, 11, [4, 7], "cpu")
    kr, vr = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    scores = q @ kr.transpose(-1, -2) / math.sqrt(8)
    allowed = torch.ones(11, 11, dtype=torch.bool).tril() & (seg[:, :, None] == seg[:, None, :])[:, None]
    expected = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ vr
    torch.testing.assert_close(attention_ref(q, k, v, causal=True, segment_ids=seg), expected)


# (B, H, KV, T, D): grouped-query with a group of 3 and a head dim that is no power of two, and the two Llama head
# dims; T = 77 is not a multiple of any block.
SHAPES = {
    "gqa3-hd48": (2, 6, 2, 77, 48),
    "mha-hd64": (1, 2, 2, 77, 64),
    "gqa2-hd128": (1, 4, 2, 77, 128),
}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_forward_backward(shape, causal, dtype, device, assert_close):
    q, k, v, do = _qkv(*shape, dtype, device)
    out = _fwd_bwd(attention_triton, q, k, v, do, causal=causal)
    ref = _fwd_bwd(attention_ref, q, k, v, do, causal=causal)
    for a, e in zip(out, ref, strict=True):  # output, dq, dk, dv
        assert_close(a, e)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_small_tiles_cross_many_blocks(causal, device, assert_close):
    """16 x 32 tiles over 77 tokens: many key blocks per query block, partial blocks on both axes, and (with 32-key
    blocks wider than 16-query blocks) causal blocks that the skip logic must not cut short."""
    q, k, v, do = _qkv(2, 4, 1, 77, 32, torch.float32, device, seed=3)
    out = _fwd_bwd(attention_triton, q, k, v, do, causal=causal, block_m=16, block_n=32)
    ref = _fwd_bwd(attention_ref, q, k, v, do, causal=causal)
    for a, e in zip(out, ref, strict=True):
        assert_close(a, e)


@pytest.mark.parametrize("lengths", [[30, 20, 27], [1, 76]], ids=["30+20+27", "1+76"])
def test_segments_equal_separate_sequences(lengths, dtype, device, assert_close):
    """Packed sequences never see each other: output and gradients equal those of each sequence alone."""
    B, H, KV, T, D = 2, 4, 2, 77, 32
    q, k, v, do = _qkv(B, H, KV, T, D, dtype, device, seed=1)
    seg = _packed_segments(B, T, lengths, device)
    packed = _fwd_bwd(attention_triton, q, k, v, do, causal=True, segment_ids=seg, block_m=32, block_n=16)
    start = 0
    for n in lengths:
        part = [t[:, :, start : start + n].detach().requires_grad_() for t in (q, k, v)]
        alone = _fwd_bwd(attention_triton, *part, do[:, :, start : start + n], causal=True)
        for a, e in zip(packed, alone, strict=True):
            assert_close(a[:, :, start : start + n], e)
        start += n
    ref = _fwd_bwd(attention_ref, q, k, v, do, causal=True, segment_ids=seg)
    for a, e in zip(packed, ref, strict=True):
        assert_close(a, e)


@pytest.mark.parametrize("D", [64, 128])
def test_longer_sequence(D, dtype, device, assert_close):
    """Several default-size query and key blocks per row (T = 333), both Llama head dims."""
    q, k, v, do = _qkv(1, 2, 1, 333, D, dtype, device, seed=4)
    out = _fwd_bwd(attention_triton, q, k, v, do, causal=True)
    ref = _fwd_bwd(attention_ref, q, k, v, do, causal=True)
    for a, e in zip(out, ref, strict=True):
        assert_close(a, e)


def test_cached_attention(dtype, device, assert_close):
    """New queries at per-sequence offsets against a longer cache; keys past each query's position are masked."""
    g = torch.Generator().manual_seed(5)
    B, H, KV, S, T, D = 3, 4, 2, 90, 7, 64
    q = torch.randn(B, H, T, D, generator=g).to(device, dtype)
    kc = torch.randn(B, KV, S, D, generator=g).to(device, dtype)
    vc = torch.randn(B, KV, S, D, generator=g).to(device, dtype)
    start = torch.tensor([0, 40, S - T], device=device)
    assert_close(cached_attention_triton(q, kc, vc, start), cached_attention_ref(q, kc, vc, start))
