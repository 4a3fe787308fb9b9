"""Attention of one new query per sequence against its KV cache (the decode step of generation)."""

from __future__ import annotations

import torch

from ._triton import cdiv, dot_precision, inner_offsets_fit, next_pow2, num_sms, tl, triton
from .attention import sdpa_gqa


def decode_attention_ref(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seqlens: torch.Tensor
) -> torch.Tensor:
    """q (B, H, D); caches (B, KV, S, D); seqlens (B,) int: sequence b attends keys [0, seqlens[b]) -> (B, H, D)."""
    S = k_cache.shape[2]
    mask = torch.arange(S, device=q.device)[None, :] < seqlens[:, None]  # (B, S)
    return sdpa_gqa(q[:, :, None], k_cache, v_cache, mask=mask[:, None, None]).squeeze(2)


def decode_attention_torch(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seqlens: torch.Tensor
) -> torch.Tensor:
    """The CPU path: the reference's result as two matmuls over the filled part of the cache only.

    NOTE: on this 2-core CPU, SDPA's flash kernel took 216 us per bf16 decode call of the 60M preset (a masked pass
    over the whole preallocated cache), 18% of a decode step; this takes a fraction of that.
    """
    S = int(seqlens.max())
    k, v = k_cache[:, :, :S], v_cache[:, :, :S]  # (B, KV, S, D)
    if S <= 512 and q.dtype != torch.float32:
        # NOTE: a bf16 batched matmul this small costs 26 us here against 12 us in fp32 (S=20); from S ~ 1000 on,
        # converting the cache costs more than it saves.
        out_dtype = q.dtype
        q, k, v = q.float(), k.float(), v.float()
    else:
        out_dtype = None
    out = _grouped_attention(q, k, v, seqlens, bool((seqlens != S).any()))
    return out.to(out_dtype or out.dtype)


def decode_attention_masked(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seqlens: torch.Tensor
) -> torch.Tensor:
    """The same result over the whole cache under a mask: shapes that do not change from step to step and no read of
    ``seqlens`` on the host, what a compiled decode step needs (the compiler fuses the mask and the softmax)."""
    return _grouped_attention(q, k_cache, v_cache, seqlens, True)


def _grouped_attention(q, k, v, seqlens, masked: bool) -> torch.Tensor:
    """q (B, H, D) against k, v (B, KV, S, D) as two matmuls, fp32 scores; with ``masked``, key j of row b is left
    out where j >= seqlens[b]."""
    B, H, D = q.shape
    KV, S = k.shape[1], k.shape[2]
    qg = q.reshape(B, KV, H // KV, D)  # the query heads of a group share one K/V head: no copies
    scores = torch.matmul(qg, k.transpose(-1, -2))
    scores = (scores if scores.dtype == torch.float32 else scores.float()) * D**-0.5  # (B, KV, H/KV, S)
    if masked:
        scores.masked_fill_(torch.arange(S, device=q.device) >= seqlens.view(B, 1, 1, 1), float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)  # (B, KV, H/KV, D)
    return out.reshape(B, H, D)


# ---------------------------------------------------------------------------------------------------------------------
# Flash-decoding: one query per sequence is too little work to fill a GPU if one program reads a whole cache, so the
# cache is cut into splits read in parallel. Each split program handles one K/V head and all query heads of its group
# (grouped-query: the K/V block is read once for the group), writes a partial output normalised by its own softmax sum
# and that sum's log (base 2); a second kernel merges the splits by their log-sum-exps.
# ---------------------------------------------------------------------------------------------------------------------

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 128
MAX_GROUP = 64  # query heads per K/V head that one program holds
MAX_SPLITS = 64


@triton.jit
def _decode_split_kernel(
    Q, K, V, SEQLENS, PART_O, PART_LSE,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    n_kv_heads, n_rep, cache_len, split_len, num_splits, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr,
):  # fmt: skip
    NEG: tl.constexpr = -1.0e30
    pid_bk = tl.program_id(0).to(tl.int64)  # int64: b * stride_kb passes 2^31 on a large cache
    split = tl.program_id(1)
    b = pid_bk // n_kv_heads
    kvh = pid_bk % n_kv_heads
    seqlen = tl.load(SEQLENS + b).to(tl.int32)
    g = tl.arange(0, BLOCK_G)  # query heads of this group, padded to a tl.dot-sized tile
    g_ok = g < n_rep
    h = kvh * n_rep + g
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_mask = g_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * stride_qb + h[:, None] * stride_qh + offs_d[None, :], mask=q_mask, other=0.0)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    lo = split * split_len
    hi = tl.minimum(tl.minimum(lo + split_len, seqlen), cache_len)  # never read past the cache, whatever seqlens say
    m_i = tl.full([BLOCK_G], NEG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        s = tl.where(n_ok[None, :], s, NEG)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    # A split wholly past the sequence's end read nothing: it gets weight exp2(NEG - m) = 0 in the merge.
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), NEG)
    row = (b * n_kv_heads * n_rep + h) * num_splits + split  # (B, H, splits) laid out flat
    tl.store(PART_O + row[:, None] * HEAD_DIM + offs_d[None, :], out, mask=q_mask)
    tl.store(PART_LSE + row, lse, mask=g_ok)


@triton.jit
def _decode_merge_kernel(
    PART_O, PART_LSE, O, stride_ob, stride_oh, n_heads, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    NEG: tl.constexpr = -1.0e30
    pid = tl.program_id(0).to(tl.int64)  # b * n_heads + h
    b = pid // n_heads
    h = pid % n_heads
    sp = tl.arange(0, BLOCK_S)
    s_ok = sp < num_splits
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    lse = tl.load(PART_LSE + pid * num_splits + sp, mask=s_ok, other=NEG)
    w = tl.where(s_ok, tl.exp2(lse - tl.max(lse, axis=0)), 0.0)
    part_rows = (pid * num_splits + sp)[:, None] * HEAD_DIM
    part = tl.load(PART_O + part_rows + offs_d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    out = tl.sum(w[:, None] * part, axis=0) / tl.sum(w, axis=0)
    tl.store(O + b * stride_ob + h * stride_oh + offs_d, out.to(O.dtype.element_ty), mask=d_ok)


def decode_attention_unsupported(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> str | None:
    """Why the decode kernels cannot take these inputs, or None when they can."""
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        return f"q {tuple(q.shape)}, caches {tuple(k_cache.shape)}, {tuple(v_cache.shape)}"
    if q.shape[-1] > MAX_HEAD_DIM or q.shape[-1] != k_cache.shape[-1]:
        return f"head dim {q.shape[-1]} (cache {k_cache.shape[-1]}, at most {MAX_HEAD_DIM})"
    if q.shape[1] % k_cache.shape[1] or q.shape[1] // k_cache.shape[1] > MAX_GROUP:
        return f"{q.shape[1]} query heads over {k_cache.shape[1]} K/V heads"
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        return f"mixed dtypes {q.dtype}, {k_cache.dtype}, {v_cache.dtype}"
    if not inner_offsets_fit(k_cache, v_cache):
        return "a cache (positions x head dim) plane of 2^31 elements or more"
    return None


def decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seqlens: torch.Tensor,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Same contract as ``decode_attention_ref`` (forward only), by the split-cache kernels.

    ``num_splits`` overrides how many pieces each cache is read in; by default enough to give every SM two programs.
    """
    B, H, D = q.shape
    KV, S = k_cache.shape[1], k_cache.shape[2]
    if q.stride(-1) != 1:
        q = q.contiguous()
    k_cache = k_cache if k_cache.stride(-1) == 1 else k_cache.contiguous()
    v_cache = v_cache if v_cache.stride(-1) == 1 else v_cache.contiguous()
    block_n = 64
    if num_splits is None:
        # Splits are sized by the cache length, not the live lengths, so choosing them needs no device sync.
        num_splits = cdiv(2 * num_sms(q.device), B * KV)
    num_splits = max(1, min(num_splits, MAX_SPLITS, cdiv(S, block_n)))
    split_len = cdiv(cdiv(S, num_splits), block_n) * block_n
    num_splits = cdiv(S, split_len)
    part_o = torch.empty((B, H, num_splits, D), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((B, H, num_splits), dtype=torch.float32, device=q.device)
    block_d = max(16, next_pow2(D))
    _decode_split_kernel[(B * KV, num_splits)](
        q, k_cache, v_cache, seqlens.contiguous(), part_o, part_lse,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        KV, H // KV, S, split_len, num_splits, D**-0.5 * LOG2E,
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_G=max(16, next_pow2(H // KV)), BLOCK_N=block_n,
        DOT_PREC=dot_precision(q.dtype), num_warps=4,
    )  # fmt: skip
    out = torch.empty((B, H, D), dtype=q.dtype, device=q.device)
    _decode_merge_kernel[(B * H,)](
        part_o, part_lse, out, out.stride(0), out.stride(1), H, num_splits,
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_S=max(2, next_pow2(num_splits)),
    )  # fmt: skip
    return out
