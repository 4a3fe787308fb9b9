"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight, optionally fused with a residual add."""

from __future__ import annotations

import torch

from ._triton import cdiv, next_pow2, num_sms, tl, triton

# Widest row one program holds in registers; Llama rows are 4096-8192 wide.
MAX_COLS = 32768


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Meta's RMSNorm: normalise in fp32, cast back to x's dtype, then scale.

    With ``residual`` the input is ``x + residual`` and the sum is returned too: ``(normed, summed)``.
    """
    if residual is not None:
        x = x + residual
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight
    return (y, x) if residual is not None else y


def rms_norm_torch(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The CPU path: the reference's math with torch's one-op RMSNorm (4 ops instead of 8, for decode's sake)."""
    if residual is not None:
        x = x + residual
    if x.dtype == torch.float32:  # no casts to dispatch (each is an operator call of a decode step)
        y = torch.nn.functional.rms_norm(x, (x.shape[-1],), eps=eps) * weight
    else:
        y = torch.nn.functional.rms_norm(x.float(), (x.shape[-1],), eps=eps).type_as(x) * weight
    return (y, x) if residual is not None else y


@triton.jit
def _rms_norm_fwd_kernel(
    X, R, W, Y, S, RSTD,
    n_rows, n_cols, stride_x, stride_r, stride_y, stride_s, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: rows * stride passes 2^31
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols[None, :] < n_cols)
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
        # Round the sum to the input dtype first: the reference adds in that dtype, and the sum is an output.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(S + rows[:, None] * stride_s + cols[None, :], x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=1) / n_cols + eps)
    w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    # Meta casts the normalised row back to the input dtype before scaling by the weight; so do we.
    xhat = (xf * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32)
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], (xhat * w[None, :]).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _rms_norm_bwd_kernel(
    DY, DS, X, W, RSTD, DX, DW_PARTIAL,
    n_rows, n_cols, rows_per_program, stride_dy, stride_ds, stride_x, stride_dx,
    HAS_DS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # Each program owns a contiguous run of rows and writes one partial weight gradient; the host sums the
    # partials, so no two programs ever touch the same address (no atomics, no contention).
    pid = tl.program_id(0).to(tl.int64)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(row_start, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        xhat = x * rstd[:, None]
        dw += tl.sum(dy * xhat.to(X.dtype.element_ty).to(tl.float32), axis=0)
        g = dy * w[None, :]
        # d/dx of x * rstd(x): rstd * (g - xhat * mean(g * xhat))
        dx = rstd[:, None] * (g - xhat * (tl.sum(g * xhat, axis=1) / n_cols)[:, None])
        if HAS_DS:
            dx += tl.load(DS + rows[:, None] * stride_ds + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=col_ok)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., D) -> (rows, D) with unit column stride, copying only when the layout needs it."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _block_rows(block_n: int) -> int:
    # About 4096 elements per program: one row at Llama widths, many rows of a narrow test tensor.
    return max(1, min(64, 4096 // block_n))


def rms_norm_unsupported(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None) -> str | None:
    """Why the kernel cannot take these inputs, or None when it can."""
    if x.shape[-1] > MAX_COLS:
        return f"rows of {x.shape[-1]} > {MAX_COLS} elements"
    if weight.shape != (x.shape[-1],):
        return f"weight of shape {tuple(weight.shape)} for rows of {x.shape[-1]}"
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        return "a residual whose shape or dtype differs from x"
    return None


def rms_norm_forward(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Launch the forward kernel: returns (y, x + residual or None, rstd (rows,) fp32)."""
    shape, n_cols = x.shape, x.shape[-1]
    x2 = _rows(x)
    n_rows = x2.shape[0]
    y = torch.empty((n_rows, n_cols), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    r2 = _rows(residual) if residual is not None else x2
    s = torch.empty_like(x2) if residual is not None else x2
    block_n = next_pow2(n_cols)
    block_m = _block_rows(block_n)
    _rms_norm_fwd_kernel[(cdiv(n_rows, block_m),)](
        x2, r2, weight, y, s, rstd,
        n_rows, n_cols, x2.stride(0), r2.stride(0), y.stride(0), s.stride(0), eps,
        HAS_RESIDUAL=residual is not None, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=8 if block_n >= 4096 else 4,
    )  # fmt: skip
    return y.view(shape), (s.view(shape) if residual is not None else None), rstd


def rms_norm_backward(
    dy: torch.Tensor, ds: torch.Tensor | None, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (dx, dweight) from the output gradient ``dy`` and, when the residual sum is used later, its
    gradient ``ds``; ``x`` is the normalised input (the sum when a residual was added)."""
    shape, n_cols = x.shape, x.shape[-1]
    x2, dy2 = _rows(x), _rows(dy)
    ds2 = _rows(ds) if ds is not None else dy2
    n_rows = x2.shape[0]
    dx = torch.empty_like(x2)
    block_n = next_pow2(n_cols)
    block_m = _block_rows(block_n)
    n_programs = max(1, min(2 * num_sms(x.device), cdiv(n_rows, block_m)))
    rows_per_program = cdiv(n_rows, n_programs)
    dw_partial = torch.empty((n_programs, n_cols), dtype=torch.float32, device=x.device)
    _rms_norm_bwd_kernel[(n_programs,)](
        dy2, ds2, x2, weight, rstd, dx, dw_partial,
        n_rows, n_cols, rows_per_program, dy2.stride(0), ds2.stride(0), x2.stride(0), dx.stride(0),
        HAS_DS=ds is not None, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=8 if block_n >= 4096 else 4,
    )  # fmt: skip
    return dx.view(shape), dw_partial.sum(0).to(weight.dtype)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, residual):
        y, s, rstd = rms_norm_forward(x, weight, eps, residual)
        ctx.has_residual = residual is not None
        ctx.save_for_backward(s if residual is not None else x, weight, rstd)
        # The residual sum is often consumed only by the next norm: let autograd hand us None instead of zeros.
        ctx.set_materialize_grads(False)
        return (y, s) if residual is not None else y

    @staticmethod
    def backward(ctx, dy, ds=None):
        x, weight, rstd = ctx.saved_tensors
        if dy is None:  # only the residual sum was used downstream
            return ds, None, None, ds
        dx, dw = rms_norm_backward(dy, ds, x, weight, rstd)
        return dx, dw, None, (dx if ctx.has_residual else None)


def rms_norm_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``rms_norm_ref``, computed by the Triton kernels."""
    return RMSNormFunction.apply(x, weight, eps, residual)
