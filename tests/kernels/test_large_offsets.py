"""Kernels on tensors of more than 2^31 elements, where an int32 pointer offset would wrap (GPU only: each test
allocates 9-18 GB). The last batch row sits past 2^31 elements; it is compared with the reference on a slice that
starts at 0, so the reference itself never needs a large offset."""

import pytest
import torch
from llamactl.kernels.attention import attention_ref, attention_triton
from llamactl.kernels.decode_attention import decode_attention_ref, decode_attention_triton
from llamactl.kernels.rmsnorm import rms_norm_ref, rms_norm_triton

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA and about 20 GB of device memory"),
]

BIG = 2**31


def _randn(*shape):
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)


def test_decode_attention_cache_past_2_31():
    B, H, KV, S, D = 17, 32, 8, 131072, 128  # 17 x 8 x 131072 x 128 = 2.28e9 elements per cache
    assert B * KV * S * D > BIG
    q = _randn(B, H, D)
    kc = torch.empty(B, KV, S, D, device="cuda", dtype=torch.bfloat16)
    vc = torch.empty_like(kc)
    kc[-2:].normal_(), vc[-2:].normal_()  # only the rows that are compared need values
    kc[:-2].fill_(float("nan")), vc[:-2].fill_(float("nan"))  # a wrapped offset lands here and poisons the output
    seqlens = torch.full((B,), 300, device="cuda")
    out = decode_attention_triton(q, kc, vc, seqlens)
    ref = decode_attention_ref(q[-2:], kc[-2:].clone(), vc[-2:].clone(), seqlens[-2:])
    torch.testing.assert_close(out[-2:], ref, atol=4e-2, rtol=1.6e-2)  # the kernel-test table's bf16 tolerance


def test_attention_batch_past_2_31():
    B, H, T, D = 8200, 32, 64, 128  # 8200 x 32 x 64 x 128 = 2.15e9 elements in each of q, k, v and the output
    assert B * H * T * D > BIG
    q, k, v = (torch.full((B, H, T, D), float("nan"), device="cuda", dtype=torch.bfloat16) for _ in range(3))
    for t in (q, k, v):
        t[-1].normal_()
    with torch.no_grad():
        out = attention_triton(q, k, v, causal=True)
    ref = attention_ref(q[-1:].clone(), k[-1:].clone(), v[-1:].clone(), causal=True)
    torch.testing.assert_close(out[-1:], ref, atol=4e-2, rtol=1.6e-2)


def test_rms_norm_rows_past_2_31():
    D = 4096
    rows = BIG // D + 64
    x = torch.full((rows, D), float("nan"), device="cuda", dtype=torch.bfloat16)
    x[-64:].normal_()
    w = torch.rand(D, device="cuda", dtype=torch.bfloat16) + 0.5
    with torch.no_grad():
        y = rms_norm_triton(x, w, 1e-5)
    torch.testing.assert_close(y[-64:], rms_norm_ref(x[-64:].clone(), w, 1e-5), atol=4e-2, rtol=1.6e-2)
