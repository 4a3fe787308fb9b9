"""Causal grouped-query attention for training and prefill, with optional segment ids for packed rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import cdiv, dot_precision, inner_offsets_fit, next_pow2, tl, triton

# enable_gqa lets SDPA share K/V heads without materialising repeated copies (torch >= 2.5).
_SDPA_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


def sdpa_gqa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False
) -> torch.Tensor:
    """SDPA over q (B, H, Tq, D) and k, v (B, KV, Tk, D) with H a multiple of KV."""
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1 and not _SDPA_GQA:
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    kw = {"enable_gqa": True} if n_rep > 1 and _SDPA_GQA else {}
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None, **kw)


def segment_mask(segment_ids: torch.Tensor, causal: bool) -> torch.Tensor:
    """Boolean (B, 1, T, T) mask: token i sees token j only inside its own segment (and j <= i when causal)."""
    T = segment_ids.shape[-1]
    mask = segment_ids[:, :, None] == segment_ids[:, None, :]
    if causal:
        mask &= torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    return mask[:, None]


def attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, segment_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """q (B, H, T, D), k and v (B, KV, T, D), segment_ids (B, T) int or None -> (B, H, T, D)."""
    if segment_ids is None:
        return sdpa_gqa(q, k, v, causal=causal)
    return sdpa_gqa(q, k, v, mask=segment_mask(segment_ids, causal))


def cached_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start: torch.Tensor):
    """T new queries per sequence at positions start[b] + i against a KV cache that already holds them.

    q (B, H, T, D); caches (B, KV, S, D); start (B,) int. Query i of sequence b sees keys j <= start[b] + i.
    """
    T, S = q.shape[2], k_cache.shape[2]
    qpos = start[:, None] + torch.arange(T, device=q.device)  # (B, T)
    mask = torch.arange(S, device=q.device)[None, None, :] <= qpos[:, :, None]  # (B, T, S)
    return sdpa_gqa(q, k_cache, v_cache, mask=mask[:, None])


# ---------------------------------------------------------------------------------------------------------------------
# Triton flash attention (FlashAttention-2 schedule): the forward keeps a running max and sum per query row and never
# writes the (T x T) scores; the backward recomputes them block by block from the saved log-sum-exp. Scores are kept
# in base 2 (scaled by log2 e) so the inner loop uses exp2. A masked score is NEG, a finite stand-in for -inf: a row
# that is fully masked inside one block then gives exp2(0) garbage that the next unmasked block's rescale factor
# exp2(NEG - m) = 0 wipes out, instead of the NaN that -inf - -inf would give.
# ---------------------------------------------------------------------------------------------------------------------

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 128


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, SEG, QSTART,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot, stride_segb,
    n_heads, n_rep, t_q, t_k, qk_scale,
    CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, HAS_QSTART: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    NEG: tl.constexpr = -1.0e30
    # (batch x heads) on grid axis 0, whose limit is 2^31 - 1: axis 1 stops at 65535, which B x H passes first.
    pid_bh = tl.program_id(0).to(tl.int64)  # int64: b * stride_b passes 2^31 on large batches or caches
    pid_m = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    kvh = h // n_rep  # grouped-query: read the shared K/V head in place, never a repeated copy
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < t_q
    q_start = 0
    if HAS_QSTART:  # queries of a KV-cache step sit at positions start[b] + i of the key axis
        q_start = tl.load(QSTART + b).to(tl.int32)
    q_pos = q_start + offs_m
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
        mask=m_ok[:, None] & d_ok[None, :], other=0.0,
    )  # fmt: skip
    if HAS_SEG:
        seg_q = tl.load(SEG + b * stride_segb + offs_m, mask=m_ok, other=-1)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    m_i = tl.full([BLOCK_M], NEG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    hi = t_k
    if CAUSAL:  # key blocks past the block's last query are all masked: skip them
        hi = tl.minimum(t_k, q_start + (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < t_k
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        valid = n_ok[None, :]
        if CAUSAL:
            valid = valid & (q_pos[:, None] >= offs_n[None, :])
        if HAS_SEG:
            seg_k = tl.load(SEG + b * stride_segb + offs_n, mask=n_ok, other=-2)
            valid = valid & (seg_q[:, None] == seg_k[None, :])
        s = tl.where(valid, s, NEG)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(
        O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
        acc.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :],
    )  # fmt: skip
    tl.store(LSE + pid_bh * t_q + offs_m, m_i + tl.log2(l_i), mask=m_ok)


@triton.jit
def _attn_bwd_delta_kernel(
    O, DO, DELTA, stride_ob, stride_oh, stride_ot, stride_dob, stride_doh, stride_dot,
    n_heads, t_q, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    # delta_i = sum_d dO_id * O_id = sum_j P_ij dP_ij, the row term of the softmax gradient.
    # (batch x heads) on grid axis 0, whose limit is 2^31 - 1: axis 1 stops at 65535, which B x H passes first.
    pid_bh = tl.program_id(0).to(tl.int64)  # int64: b * stride_b passes 2^31 on large batches or caches
    pid_m = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < t_q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(
        DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :], mask=mask, other=0.0
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + pid_bh * t_q + offs_m, delta, mask=offs_m < t_q)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, SEG,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot, stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt,
    stride_segb, n_heads, n_kv_heads, n_rep, seq_len, qk_scale, sm_scale,
    CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    # One program owns a block of keys of one K/V head and loops over every query head of its group, so the dK/dV
    # sums over the group happen in registers: no atomics and no repeated K/V.
    NEG: tl.constexpr = -1.0e30
    pid_bk = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    b = pid_bk // n_kv_heads
    kvh = pid_bk % n_kv_heads
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    n_ok = offs_n < seq_len
    kv_mask = n_ok[:, None] & d_ok[None, :]
    kv_offs = offs_n[:, None] * stride_kt + offs_d[None, :]
    k = tl.load(K + b * stride_kb + kvh * stride_kh + kv_offs, mask=kv_mask, other=0.0)
    v_offs = offs_n[:, None] * stride_vt + offs_d[None, :]
    v = tl.load(V + b * stride_vb + kvh * stride_vh + v_offs, mask=kv_mask, other=0.0)
    if HAS_SEG:
        seg_k = tl.load(SEG + b * stride_segb + offs_n, mask=n_ok, other=-2)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo = 0
    if CAUSAL:  # query blocks that end before this key block's first key never see it
        lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M
    for r in range(0, n_rep):
        h = kvh * n_rep + r
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        row_base = (b * n_heads + h) * seq_len
        for start_m in range(lo, seq_len, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_ok = offs_m < seq_len
            q_mask = m_ok[:, None] & d_ok[None, :]
            q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=q_mask, other=0.0)
            do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :], mask=q_mask, other=0.0)
            lse = tl.load(LSE + row_base + offs_m, mask=m_ok, other=0.0)
            delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
            s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale  # (BLOCK_N, BLOCK_M): scores transposed
            valid = n_ok[:, None] & m_ok[None, :]
            if CAUSAL:
                valid = valid & (offs_m[None, :] >= offs_n[:, None])
            if HAS_SEG:
                seg_q = tl.load(SEG + b * stride_segb + offs_m, mask=m_ok, other=-1)
                valid = valid & (seg_k[:, None] == seg_q[None, :])
            p_t = tl.exp2(tl.where(valid, s_t, NEG) - lse[None, :])
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PREC)
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PREC)
    dk = dk * sm_scale
    tl.store(
        DK + b * stride_dkb + kvh * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :],
        dk.to(DK.dtype.element_ty), mask=kv_mask,
    )  # fmt: skip
    tl.store(
        DV + b * stride_dvb + kvh * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :],
        dv.to(DV.dtype.element_ty), mask=kv_mask,
    )  # fmt: skip


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, SEG,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot, stride_dqb, stride_dqh, stride_dqt,
    stride_segb, n_heads, n_rep, seq_len, qk_scale, sm_scale,
    CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    NEG: tl.constexpr = -1.0e30
    # (batch x heads) on grid axis 0, whose limit is 2^31 - 1: axis 1 stops at 65535, which B x H passes first.
    pid_bh = tl.program_id(0).to(tl.int64)  # int64: b * stride_b passes 2^31 on large batches or caches
    pid_m = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    kvh = h // n_rep
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < seq_len
    q_mask = m_ok[:, None] & d_ok[None, :]
    q_offs = offs_m[:, None] * stride_qt + offs_d[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + q_offs, mask=q_mask, other=0.0)
    do = tl.load(
        DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :], mask=q_mask, other=0.0
    )
    lse = tl.load(LSE + pid_bh * seq_len + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(DELTA + pid_bh * seq_len + offs_m, mask=m_ok, other=0.0)
    if HAS_SEG:
        seg_q = tl.load(SEG + b * stride_segb + offs_m, mask=m_ok, other=-1)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    hi = seq_len
    if CAUSAL:
        hi = tl.minimum(seq_len, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < seq_len
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        valid = m_ok[:, None] & n_ok[None, :]
        if CAUSAL:
            valid = valid & (offs_m[:, None] >= offs_n[None, :])
        if HAS_SEG:
            seg_k = tl.load(SEG + b * stride_segb + offs_n, mask=n_ok, other=-2)
            valid = valid & (seg_q[:, None] == seg_k[None, :])
        p = tl.exp2(tl.where(valid, s, NEG) - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    dq = dq * sm_scale
    tl.store(
        DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :],
        dq.to(DQ.dtype.element_ty), mask=q_mask,
    )  # fmt: skip


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _fwd_blocks(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the forward: 128 queries x 64 keys, the FlashAttention-2 tile for sm80+.

    fp32 tiles are twice the bytes: at head dim 128 a 128 x 64 tile with 3 pipeline stages needs more than an
    H100's 227 KiB of shared memory, so fp32 (the precise path the tests use) takes 64 x 32.
    Untuned: no GPU was available when these were chosen; bench/kernels.py measures them.
    """
    if dtype == torch.float32:
        return 64, 32, 4
    return (128, 64, 8) if head_dim > 64 else (128, 64, 4)


def _bwd_blocks(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the backward: it holds two (BLOCK_N x D) fp32 accumulators, so smaller tiles."""
    if dtype == torch.float32:
        return 32, 32, 4
    return (64, 64, 8) if head_dim > 64 else (64, 64, 4)


def attention_unsupported(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_ids: torch.Tensor | None = None,
    same_positions: bool = True,
) -> str | None:
    """Why the flash-attention kernels cannot take these inputs, or None when they can.

    ``same_positions``: queries and keys are the same tokens (training and prefill), as opposed to a cache step.
    """
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        return f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} (needs (B, H, T, D) and equal k, v)"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}"
    if q.shape[1] % k.shape[1] or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        return f"q {tuple(q.shape)} against k {tuple(k.shape)}"
    if same_positions and q.shape[2] != k.shape[2]:
        return f"{q.shape[2]} queries against {k.shape[2]} keys"
    if not (q.dtype == k.dtype == v.dtype):
        return f"mixed dtypes {q.dtype}, {k.dtype}, {v.dtype}"
    if segment_ids is not None and segment_ids.shape != (q.shape[0], q.shape[2]):
        return f"segment ids {tuple(segment_ids.shape)} for {q.shape[0]} rows of {q.shape[2]} tokens"
    if not inner_offsets_fit(q, k, v):
        return "a (tokens x head dim) plane of 2^31 elements or more"
    return None


def flash_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    segment_ids: torch.Tensor | None = None,
    q_start: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward: q (B, H, Tq, D), k, v (B, KV, Tk, D) -> (out (B, H, Tq, D), lse (B, H, Tq) fp32 base 2).

    ``q_start`` (B,) places query i of row b at key position q_start[b] + i (a KV-cache step); by default the
    queries and keys are the same positions. ``block_m``/``block_n`` override the tile (tests use small tiles to
    cross many block edges cheaply).
    """
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    B, H, t_q, D = q.shape
    KV, t_k = k.shape[1], k.shape[2]
    bm, bn, warps = _fwd_blocks(D, q.dtype)
    bm, bn = block_m or bm, block_n or bn
    o = torch.empty_like(q)
    lse = torch.empty((B, H, t_q), dtype=torch.float32, device=q.device)
    # Placeholders for absent optional inputs: pointers the kernel never reads without HAS_SEG / HAS_QSTART.
    seg = _unit_last(segment_ids) if segment_ids is not None else q
    q_start = q_start.contiguous() if q_start is not None else None
    _attn_fwd_kernel[(B * H, cdiv(t_q, bm))](
        q, k, v, o, lse, seg, q_start if q_start is not None else q,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
        v.stride(2), o.stride(0), o.stride(1), o.stride(2), seg.stride(0) if segment_ids is not None else 0,
        H, H // KV, t_q, t_k, D**-0.5 * LOG2E,
        CAUSAL=causal, HAS_SEG=segment_ids is not None, HAS_QSTART=q_start is not None, HEAD_DIM=D,
        BLOCK_D=max(16, next_pow2(D)), BLOCK_M=bm, BLOCK_N=bn, DOT_PREC=dot_precision(q.dtype),
        num_warps=warps, num_stages=3,
    )  # fmt: skip
    return o, lse


def flash_attention_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    causal: bool = True,
    segment_ids: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of training attention (queries and keys at the same positions)."""
    do = _unit_last(do)
    B, H, T, D = q.shape
    KV = k.shape[1]
    bm, bn, warps = _bwd_blocks(D, q.dtype)
    bm, bn = block_m or bm, block_n or bn
    block_d = max(16, next_pow2(D))
    delta = torch.empty_like(lse)
    _attn_bwd_delta_kernel[(B * H, cdiv(T, bm))](
        o, do, delta, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2),
        H, T, HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=bm,
    )  # fmt: skip
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    has_seg = segment_ids is not None
    seg = _unit_last(segment_ids) if has_seg else q
    seg_stride = seg.stride(0) if has_seg else 0
    qk_scale, sm_scale, prec = D**-0.5 * LOG2E, D**-0.5, dot_precision(q.dtype)
    strides_qkv = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))
    strides_qkv += (v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2))
    _attn_bwd_dkdv_kernel[(B * KV, cdiv(T, bn))](
        q, k, v, do, lse, delta, dk, dv, seg, *strides_qkv,
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        seg_stride, H, KV, H // KV, T, qk_scale, sm_scale,
        CAUSAL=causal, HAS_SEG=has_seg, HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=bm, BLOCK_N=bn, DOT_PREC=prec,
        num_warps=warps, num_stages=2,
    )  # fmt: skip
    _attn_bwd_dq_kernel[(B * H, cdiv(T, bm))](
        q, k, v, do, lse, delta, dq, seg, *strides_qkv,
        dq.stride(0), dq.stride(1), dq.stride(2),
        seg_stride, H, H // KV, T, qk_scale, sm_scale,
        CAUSAL=causal, HAS_SEG=has_seg, HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=bm, BLOCK_N=bn, DOT_PREC=prec,
        num_warps=warps, num_stages=2,
    )  # fmt: skip
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, segment_ids, block_m, block_n):
        q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
        o, lse = flash_attention_forward(q, k, v, causal, segment_ids, None, block_m, block_n)
        ctx.save_for_backward(q, k, v, o, lse, segment_ids)
        ctx.causal, ctx.block_m, ctx.block_n = causal, block_m, block_n
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, segment_ids = ctx.saved_tensors
        dq, dk, dv = flash_attention_backward(do, q, k, v, o, lse, ctx.causal, segment_ids, ctx.block_m, ctx.block_n)
        return dq, dk, dv, None, None, None, None


def attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    segment_ids: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Same contract as ``attention_ref``, computed by the flash-attention kernels (forward and backward)."""
    return FlashAttentionFunction.apply(q, k, v, causal, segment_ids, block_m, block_n)


def cached_attention_triton(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start: torch.Tensor
) -> torch.Tensor:
    """Same contract as ``cached_attention_ref`` (forward only: it serves generation), by the flash forward kernel."""
    return flash_attention_forward(q, k_cache, v_cache, causal=True, q_start=start)[0]
