import pytest
import torch
from llamactl.kernels.attention import attention_ref
from llamactl.kernels.decode_attention import decode_attention_ref, decode_attention_torch, decode_attention_triton

# (B, H, KV, S, D): grouped-query groups of 2, 1 (MHA) and 8, caches that are not block multiples, head dims 64,
# 128 and one that is no power of two.
SHAPES = {
    "gqa2-hd64": (3, 4, 2, 200, 64),
    "mha-hd128": (2, 2, 2, 77, 128),
    "gqa8-hd48": (2, 8, 1, 130, 48),
}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("num_splits", [None, 3], ids=["auto-splits", "3-splits"])
def test_against_ref(shape, num_splits, dtype, device, assert_close):
    B, H, KV, S, D = shape
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, D, generator=g).to(device, dtype)
    kc = torch.randn(B, KV, S, D, generator=g).to(device, dtype)
    vc = torch.randn(B, KV, S, D, generator=g).to(device, dtype)
    # Lengths of 1 (a single cached token), the full cache, and one in between; some splits are then empty.
    seqlens = torch.tensor([1, S, S // 2 + 3][:B], device=device)
    out = decode_attention_triton(q, kc, vc, seqlens, num_splits=num_splits)
    assert_close(out, decode_attention_ref(q, kc, vc, seqlens))


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("lengths", ["mixed", "equal"])
def test_cpu_torch_path_against_ref(shape, lengths, dtype, assert_close):
    B, H, KV, S, D = shape
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, D, generator=g).to(dtype)
    kc, vc = torch.randn(B, KV, S, D, generator=g).to(dtype), torch.randn(B, KV, S, D, generator=g).to(dtype)
    # the tail past the longest sequence holds garbage that must not be read
    seqlens = torch.tensor([1, S - 5, S // 2 + 3][:B]) if lengths == "mixed" else torch.full((B,), S // 2)
    kc[:, :, int(seqlens.max()) :] = float("nan")
    assert_close(decode_attention_torch(q, kc, vc, seqlens), decode_attention_ref(q, kc.nan_to_num(), vc, seqlens))


def test_equals_last_row_of_causal_attention(device, assert_close):
    """Decoding token t against a cache of t + 1 tokens is row t of causal attention over those tokens."""
    g = torch.Generator().manual_seed(1)
    B, H, KV, T, D = 2, 4, 2, 45, 32
    q = torch.randn(B, H, T, D, generator=g).to(device)
    k = torch.randn(B, KV, T, D, generator=g).to(device)
    v = torch.randn(B, KV, T, D, generator=g).to(device)
    full = attention_ref(q, k, v, causal=True)
    cache_k = torch.zeros(B, KV, 64, D, device=device)
    cache_v = torch.zeros(B, KV, 64, D, device=device)
    cache_k[:, :, :T], cache_v[:, :, :T] = k, v
    seqlens = torch.full((B,), T, device=device)
    assert_close(decode_attention_triton(q[:, :, -1], cache_k, cache_v, seqlens, num_splits=2), full[:, :, -1])
