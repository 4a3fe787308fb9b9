"""SwiGLU gate of the feed-forward: silu(a) * b."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import cdiv, tl, triton

BLOCK = 2048


def swiglu_ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.silu(a) * b


@triton.jit
def _swiglu_fwd_kernel(A, B, C, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(C + offs, (a * tl.sigmoid(a) * b).to(C.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DC, A, B, DA, DB, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dc = tl.load(DC + offs, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
    # Recompute the activation instead of saving it: one more sigmoid is cheaper than a tensor of HBM traffic.
    sig = tl.sigmoid(a)
    silu = a * sig
    tl.store(DB + offs, (dc * silu).to(DB.dtype.element_ty), mask=mask)
    # d silu / da = sig * (1 + a * (1 - sig))
    tl.store(DA + offs, (dc * b * sig * (1.0 + a * (1.0 - sig))).to(DA.dtype.element_ty), mask=mask)


def swiglu_unsupported(a: torch.Tensor, b: torch.Tensor) -> str | None:
    """Why the kernel cannot take these inputs, or None when it can (it does not broadcast)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return f"operands of shapes {tuple(a.shape)}, {tuple(b.shape)} and dtypes {a.dtype}, {b.dtype}"
    return None


def swiglu_forward(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.contiguous(), b.contiguous()
    c = torch.empty_like(a)
    n = a.numel()
    _swiglu_fwd_kernel[(cdiv(n, BLOCK),)](a, b, c, n, BLOCK=BLOCK, num_warps=8)
    return c


def swiglu_backward(dc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dc = dc.contiguous()
    da, db = torch.empty_like(a), torch.empty_like(b)
    n = a.numel()
    _swiglu_bwd_kernel[(cdiv(n, BLOCK),)](dc, a, b, da, db, n, BLOCK=BLOCK, num_warps=8)
    return da, db


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        a, b = a.contiguous(), b.contiguous()
        ctx.save_for_backward(a, b)
        return swiglu_forward(a, b)

    @staticmethod
    def backward(ctx, dc):
        a, b = ctx.saved_tensors
        return swiglu_backward(dc, a, b)


def swiglu_triton(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Same contract as ``swiglu_ref`` for equal shapes and dtypes, computed by the Triton kernels."""
    return SwiGLUFunction.apply(a, b)
