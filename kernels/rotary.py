"""Rotary position embedding in Meta's interleaved layout: pairs (x[2i], x[2i+1]) rotate by angle pos * theta_i."""

from __future__ import annotations

import torch

from ._triton import cdiv, next_pow2, tl, triton

# Pairs (heads x head_dim / 2) of one token that one program holds; Llama-2-7B q has 32 x 64 = 2048.
MAX_PAIRS = 16384


def rotary_tables(head_dim: int, max_seq_len: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (max_seq_len, head_dim // 2), fp32, as Meta's ``precompute_freqs_cis``."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32)[: head_dim // 2] / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), freqs)
    return torch.cos(angles), torch.sin(angles)


def rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, H, D) at per-token positions (B, T) or (T,), with tables (S, D/2). Computes in fp32."""
    c = cos[positions].unsqueeze(-2)  # (B, T, 1, D/2) or (T, 1, D/2)
    s = sin[positions].unsqueeze(-2)
    fp32 = x.dtype == torch.float32  # no casts to dispatch then
    xf = (x if fp32 else x.float()).unflatten(-1, (-1, 2))  # (B, T, H, D/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)
    return out if fp32 else out.type_as(x)


@triton.jit
def _rotary_kernel(
    X, Y, COS, SIN, POS,
    n_tokens, n_pairs, half, head_dim, stride_x, stride_y, stride_cs, n_positions,
    INVERSE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    # One tile = BLOCK_T tokens x every (head, pair) of those tokens; pair j is head j // half, index j % half.
    toks = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # int64: toks * stride passes 2^31
    j = tl.arange(0, BLOCK_P)
    tok_ok = toks < n_tokens
    mask = tok_ok[:, None] & (j < n_pairs)[None, :]
    i = j % half
    col = (j // half) * head_dim + 2 * i  # offset of the pair's first element inside the token's row
    pos = tl.load(POS + toks, mask=tok_ok, other=0).to(tl.int64)
    # A position outside the tables is never read: its token comes out NaN (the reference raises an IndexError;
    # a kernel cannot, and a silent read past the table would rotate by garbage).
    pos_ok = (pos >= 0) & (pos < n_positions)
    cs_mask = mask & pos_ok[:, None]
    c = tl.load(COS + pos[:, None] * stride_cs + i[None, :], mask=cs_mask, other=float("nan")).to(tl.float32)
    s = tl.load(SIN + pos[:, None] * stride_cs + i[None, :], mask=cs_mask, other=float("nan")).to(tl.float32)
    if INVERSE:  # the backward pass rotates the gradient by the opposite angle (the rotation's transpose)
        s = -s
    xp = X + toks[:, None] * stride_x + col[None, :]
    x0 = tl.load(xp, mask=mask, other=0.0).to(tl.float32)
    x1 = tl.load(xp + 1, mask=mask, other=0.0).to(tl.float32)
    yp = Y + toks[:, None] * stride_y + col[None, :]
    tl.store(yp, (x0 * c - x1 * s).to(Y.dtype.element_ty), mask=mask)
    tl.store(yp + 1, (x0 * s + x1 * c).to(Y.dtype.element_ty), mask=mask)


def rotary_unsupported(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> str | None:
    """Why the kernel cannot take these inputs, or None when it can."""
    if x.dim() < 3:
        return f"x of {x.dim()} dims (needs (..., T, H, D))"
    n_pairs = x.shape[-2] * x.shape[-1] // 2
    if n_pairs > MAX_PAIRS:
        return f"{n_pairs} rotary pairs per token > {MAX_PAIRS}"
    if cos.shape[-1] * 2 != x.shape[-1]:
        return f"tables of width {cos.shape[-1]} for head dim {x.shape[-1]}"
    if sin.shape != cos.shape or cos.stride(-1) != 1 or sin.stride() != cos.stride():
        return "cos and sin tables that are not laid out alike with unit column stride"
    try:
        torch.broadcast_shapes(positions.shape, x.shape[:-2])
    except RuntimeError:
        return f"positions {tuple(positions.shape)} that do not broadcast to tokens {tuple(x.shape[:-2])}"
    return None


def rotary_apply(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, inverse: bool = False
) -> torch.Tensor:
    """Launch the kernel on x (..., T, H, D); ``inverse`` rotates by minus the angle."""
    shape = x.shape
    head_dim = shape[-1]
    x2 = x.reshape(-1, shape[-2] * head_dim)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    pos = torch.broadcast_to(positions, shape[:-2]).reshape(-1).contiguous()
    n_tokens, n_pairs = x2.shape[0], x2.shape[1] // 2
    y = torch.empty((n_tokens, x2.shape[1]), dtype=x.dtype, device=x.device)
    block_p = next_pow2(n_pairs)
    block_t = max(1, min(64, 4096 // block_p))
    _rotary_kernel[(cdiv(n_tokens, block_t),)](
        x2, y, cos, sin, pos,
        n_tokens, n_pairs, head_dim // 2, head_dim, x2.stride(0), y.stride(0), cos.stride(0), cos.shape[0],
        INVERSE=inverse, BLOCK_T=block_t, BLOCK_P=block_p,
    )  # fmt: skip
    return y.view(shape)


class RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, positions):
        ctx.save_for_backward(cos, sin, positions)
        return rotary_apply(x, cos, sin, positions)

    @staticmethod
    def backward(ctx, dy):
        cos, sin, positions = ctx.saved_tensors
        return rotary_apply(dy, cos, sin, positions, inverse=True), None, None, None


def rotary_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Same contract as ``rotary_ref``, computed by the Triton kernel."""
    return RotaryFunction.apply(x, cos, sin, positions)
