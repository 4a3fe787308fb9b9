"""Weight-only quantized matmul: y = x @ dequant(W)^T with W stored in int8 or int4, dequantized inside the kernel.

Packed formats (a weight W is (N, K): N output channels, K inputs, as ``nn.Linear.weight``):

``int8``  qweight int8 (N, K), scales fp16 (N,). Symmetric per output channel: W[n, k] ~= qweight[n, k] * scales[n],
          qweight in [-127, 127], scales[n] = max_k |W[n, k]| / 127.
``int4``  qweight uint8 (N, K / 2), scales fp16 (N, K / G), zeros uint8 (N, K / G) for group size G in (32, 64, 128),
          K a multiple of G. Asymmetric per group of G consecutive inputs: W[n, k] ~= (q[n, k] - z) * s with
          q in [0, 15], z = zeros[n, k // G] in [0, 15], s = scales[n, k // G]; round to nearest takes the group's
          range widened to include 0 (so a zero weight stays exactly zero), s = range / 15, z = round(-min / s).
          Two values per byte: q[n, 2j] in the low nibble of qweight[n, j], q[n, 2j + 1] in the high nibble.

Scales are fp16: fp32 would add a quarter to the bytes an int4 group-32 weight moves, and bf16's 8-bit mantissa would
add up to 0.4% error to every weight; fp16 covers the range of real weight scales. Each ``quantize_*`` returns the
largest absolute error of its round trip, so the caller can report it. Inference only: there is no backward.
"""

from __future__ import annotations

import torch

from ._triton import cdiv, dot_precision, tl, triton

SCHEMES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)


def _safe_scale(step: torch.Tensor) -> torch.Tensor:
    # An all-zero row or group gets scale 1 (any scale reproduces zeros) instead of a division by zero.
    return torch.where(step > 0, step, torch.ones_like(step)).to(torch.float16)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """W (N, K) -> (qweight int8 (N, K), scales fp16 (N,), max abs error of the round trip)."""
    wf = w.float()
    scales = _safe_scale(wf.abs().amax(dim=1) / 127)
    q = torch.round(wf / scales.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    err = (dequantize_int8(q, scales) - wf).abs().max().item() if w.numel() else 0.0
    return q, scales, err


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The fp32 weight (N, K) that an int8 pair stands for."""
    return qweight.float() * scales.float()[:, None]


def check_group(K: int, group_size: int) -> None:
    if group_size not in GROUP_SIZES:
        raise ValueError(f"int4 group size {group_size}: use one of {', '.join(map(str, GROUP_SIZES))}")
    if K % group_size:
        raise ValueError(f"int4 needs the input dim {K} to be a multiple of the group size {group_size}")


def int4_params(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest (scales fp16, zeros uint8) for groups laid along the last dim of ``w`` (..., G)."""
    w = w.float()
    lo, hi = w.amin(dim=-1).clamp(max=0), w.amax(dim=-1).clamp(min=0)
    scales = _safe_scale((hi - lo) / 15)
    zeros = torch.round(-lo / scales.float()).clamp_(0, 15).to(torch.uint8)
    return scales, zeros


def int4_levels(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """The levels q in [0, 15] (uint8) of weights ``w`` (..., G) under one (scale, zero) per row of groups (...)."""
    q = torch.round(w.float() / scales.float()[..., None]) + zeros.float()[..., None]
    return q.clamp_(0, 15).to(torch.uint8)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Levels (N, K) uint8 in [0, 15] -> (N, K / 2) uint8, even inputs in the low nibble."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """(N, K / 2) packed -> levels (N, K) uint8."""
    return torch.stack((qweight & 0xF, qweight >> 4), dim=-1).reshape(qweight.shape[0], -1)


def quantize_int4(w: torch.Tensor, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """W (N, K) -> (qweight uint8 (N, K/2), scales fp16 (N, K/G), zeros uint8 (N, K/G), max abs error)."""
    N, K = w.shape
    check_group(K, group_size)
    wg = w.float().reshape(N, K // group_size, group_size)
    scales, zeros = int4_params(wg)
    packed = pack_int4(int4_levels(wg, scales, zeros).reshape(N, K))
    err = (dequantize_int4(packed, scales, zeros) - w.float()).abs().max().item() if w.numel() else 0.0
    return packed, scales, zeros, err


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """The fp32 weight (N, K) that an int4 triple stands for; the group size is K / scales.shape[1]."""
    N = qweight.shape[0]
    q = unpack_int4(qweight).float()  # (N, K)
    group = q.shape[1] // scales.shape[1]
    w = (q.reshape(N, -1, group) - zeros.float()[..., None]) * scales.float()[..., None]
    return w.reshape(N, -1)


def quantize(
    w: torch.Tensor, scheme: str, group_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]:
    """W (N, K) in ``scheme``, round to nearest: (qweight, scales, zeros or None for int8, max abs error)."""
    if scheme == "int8":
        qweight, scales, err = quantize_int8(w)
        return qweight, scales, None, err
    if scheme == "int4":
        return quantize_int4(w, group_size)
    raise ValueError(f"quantization scheme {scheme!r}: use one of {', '.join(SCHEMES)}")


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, scheme: str) -> torch.Tensor:
    if scheme == "int8":
        return dequantize_int8(qweight, scales)
    if scheme == "int4":
        return dequantize_int4(qweight, scales, zeros)
    raise ValueError(f"quantization scheme {scheme!r}: use one of {', '.join(SCHEMES)}")


def quant_matmul_ref(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, scheme: str
) -> torch.Tensor:
    """x (..., K) @ dequant(W)^T -> (..., N) in x's dtype, the product taken in fp32."""
    return (x.float() @ dequantize(qweight, scales, zeros, scheme).t()).to(x.dtype)


@triton.jit
def _int8_matmul_kernel(
    X, QW, SCALES, Y, M, N, K, K_SPLIT, stride_xm, stride_qn, stride_ym, stride_ys,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    # program (m, n, s) sums inputs [s * K_SPLIT, (s + 1) * K_SPLIT) into its own slice s of Y (split-K: a decode
    # step's few output tiles are too few programs to keep the memory system busy; the slices are summed after)
    rm = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: M x N outputs pass 2^31
    rn = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_lo = tl.program_id(2) * K_SPLIT
    m_ok, n_ok = rm < M, rn < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_lo + K_SPLIT, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        x = tl.load(X + rm[:, None] * stride_xm + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        q = tl.load(QW + rn[:, None] * stride_qn + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
        # |q| <= 127 is exact in fp16 and bf16: the dot runs on the activation's tensor-core path.
        acc += tl.dot(x, tl.trans(q.to(x.dtype)), input_precision=DOT_PREC)
    scale = tl.load(SCALES + rn, mask=n_ok, other=0.0).to(tl.float32)
    y = acc * scale[None, :]  # the per-channel scale is constant along K: apply it once, after the sum
    out = Y + tl.program_id(2).to(tl.int64) * stride_ys + rm[:, None] * stride_ym + rn[None, :]
    tl.store(out, y.to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _int4_matmul_kernel(
    X, QW, SCALES, ZEROS, Y, M, N, K, GROUPS_SPLIT, stride_xm, stride_qn, stride_sn, stride_ym, stride_ys,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    rm = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: M x N outputs pass 2^31
    rn = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    g_lo = tl.program_id(2) * GROUPS_SPLIT  # split-K as in the int8 kernel, in whole groups
    m_ok, n_ok = rm < M, rn < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    rb = tl.arange(0, GROUP // 2)  # the bytes of one group
    for g in range(g_lo, g_lo + GROUPS_SPLIT):
        # One K step is one group, so its scale multiplies a whole partial dot product instead of every weight. The
        # group's bytes are read once, contiguously; low nibbles meet the even inputs, high nibbles the odd ones.
        byte = g * (GROUP // 2) + rb
        packed = tl.load(QW + rn[:, None] * stride_qn + byte[None, :], mask=n_ok[:, None], other=0).to(tl.int32)
        zero = tl.load(ZEROS + rn * stride_sn + g, mask=n_ok, other=0).to(tl.int32)
        lo = ((packed & 0xF) - zero[:, None]).to(X.dtype.element_ty)  # |q - z| <= 15: exact in fp16 and bf16
        hi = ((packed >> 4) - zero[:, None]).to(X.dtype.element_ty)
        x_even = tl.load(X + rm[:, None] * stride_xm + (2 * byte)[None, :], mask=m_ok[:, None], other=0.0)
        x_odd = tl.load(X + rm[:, None] * stride_xm + (2 * byte + 1)[None, :], mask=m_ok[:, None], other=0.0)
        part = tl.dot(x_even, tl.trans(lo), input_precision=DOT_PREC)
        part += tl.dot(x_odd, tl.trans(hi), input_precision=DOT_PREC)
        scale = tl.load(SCALES + rn * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)
        acc += part * scale[None, :]
    out = Y + tl.program_id(2).to(tl.int64) * stride_ys + rm[:, None] * stride_ym + rn[None, :]
    tl.store(out, acc.to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def quant_matmul_unsupported(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, scheme: str) -> str | None:
    """Why the kernels cannot take these inputs, or None when they can."""
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"activations in {x.dtype}"
    return None


def check_quantized(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, scheme: str
) -> None:
    """Raise ValueError naming what does not fit the packed format of ``scheme`` (see the module docstring)."""
    K = x.shape[-1]
    if scheme == "int8":
        if qweight.dtype != torch.int8 or qweight.dim() != 2 or qweight.shape[1] != K:
            raise ValueError(f"int8 needs qweight int8 (N, {K}), got {qweight.dtype} {tuple(qweight.shape)}")
        if scales.shape != (qweight.shape[0],):
            raise ValueError(f"int8 needs scales ({qweight.shape[0]},), got {tuple(scales.shape)}")
        if zeros is not None:
            raise ValueError("int8 is symmetric: it takes no zero points")
    elif scheme == "int4":
        if qweight.dtype != torch.uint8 or qweight.dim() != 2 or qweight.shape[1] * 2 != K:
            raise ValueError(f"int4 needs qweight uint8 (N, {K // 2}), got {qweight.dtype} {tuple(qweight.shape)}")
        if scales.dim() != 2 or scales.shape[0] != qweight.shape[0] or K % max(scales.shape[1], 1):
            raise ValueError(f"int4 needs scales (N, K / group), got {tuple(scales.shape)} for K = {K}")
        if K // scales.shape[1] not in GROUP_SIZES:
            raise ValueError(f"int4 group size {K // scales.shape[1]}: use one of {GROUP_SIZES}")
        if zeros is None or zeros.dtype != torch.uint8 or zeros.shape != scales.shape:
            got = "none" if zeros is None else f"{zeros.dtype} {tuple(zeros.shape)}"
            raise ValueError(f"int4 needs zeros uint8 {tuple(scales.shape)} beside its scales, got {got}")
    else:
        raise ValueError(f"quantization scheme {scheme!r}: use one of {', '.join(SCHEMES)}")


# Tiles and split-K per scheme for decode (a few rows: bound by the weight bytes) and for prefill (bound by compute).
# NOTE: the decode tiles are those measured on an H100 before (int8 read its weights at 38% of the copy bandwidth;
# int4, in the old symmetric format with a nibble gather, at 2%). Split-K and the int4 kernel's one read per group
# are built and tested (interpreter) but not yet timed on a GPU: bench/gpu_quant.py sweeps the tiles at 7B shapes.
DECODE = {"int8": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, SPLIT_K=1, num_warps=4),
          "int4": dict(BLOCK_M=16, BLOCK_N=32, SPLIT_K=1, num_warps=4)}  # fmt: skip
PREFILL = {"int8": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, SPLIT_K=1, num_warps=4),
           "int4": dict(BLOCK_M=64, BLOCK_N=64, SPLIT_K=1, num_warps=4)}  # fmt: skip


def quant_matmul_triton(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    scheme: str,
    config: dict | None = None,
) -> torch.Tensor:
    """Same contract as ``quant_matmul_ref``, by the Triton kernels (forward only). ``config`` overrides the tiles
    (BLOCK_M, BLOCK_N, BLOCK_K for int8, SPLIT_K, num_warps, num_stages) that DECODE/PREFILL choose."""
    check_quantized(x, qweight, scales, zeros, scheme)
    shape, K = x.shape, x.shape[-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    # the kernels index the weight, its scales and zero points row-major with unit inner strides
    qweight, scales = qweight.contiguous(), scales.contiguous()
    zeros = zeros.contiguous() if zeros is not None else None
    M, N = x2.shape[0], qweight.shape[0]
    cfg = dict((DECODE if M <= 16 else PREFILL)[scheme])
    cfg.update(config or {})
    split, block_m, block_n = cfg.pop("SPLIT_K"), cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
    prec = dot_precision(x.dtype)
    if scheme == "int8":
        block_k = cfg.pop("BLOCK_K")
        chunk = cdiv(cdiv(K, split), block_k) * block_k  # each split's inputs, whole K blocks
        split = cdiv(K, chunk)
    else:
        groups = K // scales.shape[1]
        n_groups = scales.shape[1]
        split = split if n_groups % split == 0 else 1
        chunk = n_groups // split
    y = torch.empty((split, M, N), dtype=x.dtype if split == 1 else torch.float32, device=x.device)
    grid = (cdiv(M, block_m), cdiv(N, block_n), split)
    if scheme == "int8":
        _int8_matmul_kernel[grid](
            x2, qweight, scales, y, M, N, K, chunk, x2.stride(0), qweight.stride(0), y.stride(1), y.stride(0),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, DOT_PREC=prec, **cfg,
        )  # fmt: skip
    else:
        assert scales.stride() == zeros.stride(), "scales and zeros are laid out alike"
        _int4_matmul_kernel[grid](
            x2, qweight, scales, zeros, y, M, N, K, chunk, x2.stride(0), qweight.stride(0), scales.stride(0),
            y.stride(1), y.stride(0), GROUP=groups, BLOCK_M=block_m, BLOCK_N=block_n, DOT_PREC=prec, **cfg,
        )  # fmt: skip
    out = y[0] if split == 1 else y.sum(0).to(x.dtype)
    return out.view(*shape[:-1], N)
