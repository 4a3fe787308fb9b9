"""Output projection fused with cross-entropy: the loss from hidden states without the full (tokens x vocab) logits.

Tokens are processed in chunks. Per chunk: logits = h_c @ W^T (a cuBLAS/CPU matmul in h's dtype), then one pass of a
chunk op turns the logits, in place, into the gradient of the loss with respect to them and returns each row's
log-sum-exp and target logit; the gradient then flows into dh_c = g @ W and dW += g^T @ h_c. Only one
(chunk x vocab) block is ever alive. The chunk op is plain torch (``_ce_chunk_torch``, the CPU path) or one Triton
kernel (``_ce_chunk_triton``), behind the same contract, so both paths share the chunk loop.

The loss's gradients are computed during the forward (the upstream gradient of a scalar loss only scales them), as
Liger-Kernel does; per-token log-probabilities get an arbitrary upstream vector, so their backward recomputes the
chunk logits instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ._triton import cdiv, next_pow2, tl, triton

IGNORE_INDEX = -100

# A chunk op: (logits (C, V), targets (C,) in [0, V), row scale (C,) fp32 or None) -> (lse (C,), target logit (C,)),
# both fp32. Given a scale, it overwrites the logits with (softmax - onehot(target)) * scale.
ChunkOp = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]]


def _weights(targets: torch.Tensor, mask: torch.Tensor | None, ignore_index: int) -> torch.Tensor:
    """Per-token loss weight: 1 where the token counts (target not ignored, mask set), else 0."""
    keep = targets != ignore_index
    if mask is not None:
        keep &= mask.bool()
    return keep.float()


def linear_cross_entropy_ref(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Mean cross-entropy over counted tokens; h (N, D), weight (V, D), targets (N,), mask (N,) or None."""
    logits = (h @ weight.t()).float()
    w = _weights(targets, mask, ignore_index)
    nll = F.cross_entropy(logits, targets.clamp(min=0), reduction="none")
    return (nll * w).sum() / w.sum().clamp(min=1)


def linear_logprobs_ref(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Log-probability (N,) fp32 of each target under softmax(h @ W^T); 0 (and no gradient) where ignored."""
    logits = (h @ weight.t()).float()
    keep = targets != ignore_index
    lp = torch.log_softmax(logits, dim=-1).gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    return lp * keep


def _ce_chunk_torch(
    logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    xf = logits.float()  # the logits themselves when already fp32: they are overwritten below anyway
    lse = torch.logsumexp(xf, dim=-1)
    target_logit = xf.gather(1, targets[:, None]).squeeze(1)
    if scale is not None:
        g = torch.exp_(xf.sub_(lse[:, None]))
        g[torch.arange(g.shape[0], device=g.device), targets] -= 1.0
        g.mul_(scale[:, None])
        if g is not logits:
            logits.copy_(g)
    return lse, target_logit


@triton.jit
def _ce_chunk_kernel(
    LOGITS, TARGETS, SCALE, LSE, TARGET_LOGIT, n_rows, n_cols, stride_l,
    HAS_GRAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    NEG: tl.constexpr = -1.0e30
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    base = LOGITS + rows.to(tl.int64)[:, None] * stride_l
    tgt = tl.load(TARGETS + rows, mask=row_ok, other=0)
    m = tl.full([BLOCK_R], NEG, dtype=tl.float32)
    s = tl.zeros([BLOCK_R], dtype=tl.float32)
    x_t = tl.zeros([BLOCK_R], dtype=tl.float32)
    # Pass 1: online log-sum-exp over the vocabulary, picking up the target's logit on the way.
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = row_ok[:, None] & (cols < n_cols)[None, :]
        x = tl.where(mask, tl.load(base + cols[None, :], mask=mask, other=0.0).to(tl.float32), NEG)
        m_new = tl.maximum(m, tl.max(x, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
        m = m_new
        x_t += tl.sum(tl.where(cols[None, :] == tgt[:, None], x, 0.0), axis=1)
    lse = m + tl.log(s)
    tl.store(LSE + rows, lse, mask=row_ok)
    tl.store(TARGET_LOGIT + rows, x_t, mask=row_ok)
    if HAS_GRAD:
        # Pass 2: overwrite the logits with their gradient; the chunk never needs a second buffer.
        scale = tl.load(SCALE + rows, mask=row_ok, other=0.0)
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = row_ok[:, None] & (cols < n_cols)[None, :]
            x = tl.where(mask, tl.load(base + cols[None, :], mask=mask, other=0.0).to(tl.float32), NEG)
            g = tl.exp(x - lse[:, None]) - tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0)
            tl.store(base + cols[None, :], (g * scale[:, None]).to(LOGITS.dtype.element_ty), mask=mask)


def _ce_chunk_triton(
    logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    n_rows, n_cols = logits.shape
    lse = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    target_logit = torch.empty_like(lse)
    block_v = min(next_pow2(n_cols), 8192)
    block_r = max(1, min(16, 8192 // block_v))  # one row per program at Llama's vocab, several for small ones
    _ce_chunk_kernel[(cdiv(n_rows, block_r),)](
        logits, targets, scale if scale is not None else lse, lse, target_logit, n_rows, n_cols, logits.stride(0),
        HAS_GRAD=scale is not None, BLOCK_R=block_r, BLOCK_V=block_v, num_warps=16 if block_v >= 8192 else 4,
    )  # fmt: skip
    return lse, target_logit


def default_chunk_size(n_tokens: int, vocab: int, dim: int) -> int:
    """Chunk rows so one chunk of logits is about as large as the hidden states h: the extra memory is then bounded
    by the input's own size (Liger-Kernel's rule)."""
    return max(16, min(next_pow2(cdiv(n_tokens, cdiv(vocab, dim))), 4096))


def _accumulate(grad_w: torch.Tensor | None, g: torch.Tensor, hc: torch.Tensor) -> None:
    if grad_w is not None:
        # In the weight's dtype: an fp32 (V x D) accumulator would be twice the weight, more than all the chunks.
        grad_w.addmm_(g.t(), hc)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """The *sum* of the counted tokens' cross-entropies: a training loop divides once by the tokens it counted over
    all micro-steps and ranks (a mean per micro-batch would weight unequal micro-batches wrongly)."""

    @staticmethod
    def forward(ctx, h, weight, targets, w, chunk_size: int, chunk_op: ChunkOp, grad_enabled: bool):
        h = h.contiguous()  # the gradient rows below are written in place as contiguous slices
        N = h.shape[0]
        # Inside forward grad mode is always off and needs_input_grad follows requires_grad alone: under the
        # caller's no_grad (evaluation) the gradients would be computed for nothing (two matmuls per chunk).
        need_h, need_w = ctx.needs_input_grad[0] and grad_enabled, ctx.needs_input_grad[1] and grad_enabled
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        scale = w
        tgt = targets.clamp(min=0)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, N, chunk_size):
            hc, tc = h[s : s + chunk_size], tgt[s : s + chunk_size]
            logits = hc @ weight.t()  # (C, V) in h's dtype
            lse, target_logit = chunk_op(logits, tc, scale[s : s + chunk_size] if need_h or need_w else None)
            loss += ((lse - target_logit) * w[s : s + chunk_size]).sum()
            if grad_h is not None:
                torch.mm(logits, weight, out=grad_h[s : s + chunk_size])
            _accumulate(grad_w, logits, hc)
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h * grad_out.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = grad_w * grad_out.to(grad_w.dtype)
        return grad_h, grad_w, None, None, None, None, None


class LinearLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, keep, chunk_size: int, chunk_op: ChunkOp):
        h = h.contiguous()
        N = h.shape[0]
        tgt = targets.clamp(min=0)
        out = torch.empty(N, dtype=torch.float32, device=h.device)
        for s in range(0, N, chunk_size):
            lse, target_logit = chunk_op(h[s : s + chunk_size] @ weight.t(), tgt[s : s + chunk_size], None)
            out[s : s + chunk_size] = target_logit - lse
        out.mul_(keep)
        ctx.save_for_backward(h, weight, tgt, keep)
        ctx.chunk_size, ctx.chunk_op = chunk_size, chunk_op
        return out

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, tgt, keep = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        # d logp_t / d logits = onehot(t) - softmax: the chunk op's (softmax - onehot) with the sign in the scale.
        scale = -(grad_out.float() * keep)
        cs = ctx.chunk_size
        for s in range(0, h.shape[0], cs):
            hc = h[s : s + cs]
            logits = hc @ weight.t()
            ctx.chunk_op(logits, tgt[s : s + cs], scale[s : s + cs])
            if grad_h is not None:
                torch.mm(logits, weight, out=grad_h[s : s + cs])
            _accumulate(grad_w, logits, hc)
        return grad_h, grad_w, None, None, None, None


def _chunk(h: torch.Tensor, weight: torch.Tensor, chunk_size: int | None) -> int:
    return chunk_size if chunk_size is not None else default_chunk_size(h.shape[0], weight.shape[0], weight.shape[1])


def _ce_sum(h, weight, targets, mask, ignore_index, chunk_size, chunk_op) -> tuple[torch.Tensor, torch.Tensor]:
    w = _weights(targets, mask, ignore_index)
    total = LinearCrossEntropyFunction.apply(h, weight, targets, w, chunk_size, chunk_op, torch.is_grad_enabled())
    return total, w.sum()


def linear_cross_entropy_sum_chunked(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the counted tokens' cross-entropies, number of counted tokens), both fp32, in plain torch, never
    holding more than a chunk of logits."""
    return _ce_sum(h, weight, targets, mask, ignore_index, chunk_size, _ce_chunk_torch)


def linear_cross_entropy_sum_triton(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """As ``linear_cross_entropy_sum_chunked``, with the softmax/gradient pass of each chunk in Triton."""
    return _ce_sum(h, weight, targets, mask, ignore_index, _chunk(h, weight, chunk_size), _ce_chunk_triton)


def linear_cross_entropy_chunked(h, weight, targets, mask=None, ignore_index: int = IGNORE_INDEX, chunk_size=1024):
    """Same result as ``linear_cross_entropy_ref`` (the mean), in plain torch."""
    total, count = linear_cross_entropy_sum_chunked(h, weight, targets, mask, ignore_index, chunk_size)
    return total / count.clamp(min=1)


def linear_cross_entropy_triton(h, weight, targets, mask=None, ignore_index: int = IGNORE_INDEX, chunk_size=None):
    """Same result as ``linear_cross_entropy_ref`` (the mean), with the chunk pass in Triton."""
    total, count = linear_cross_entropy_sum_triton(h, weight, targets, mask, ignore_index, chunk_size)
    return total / count.clamp(min=1)


def linear_logprobs_chunked(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Same result as ``linear_logprobs_ref``, in plain torch, never holding more than a chunk of logits."""
    keep = (targets != ignore_index).float()
    return LinearLogprobsFunction.apply(h, weight, targets, keep, chunk_size, _ce_chunk_torch)


def linear_logprobs_triton(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Same result as ``linear_logprobs_ref``, with the softmax/gradient pass of each chunk in Triton."""
    keep = (targets != ignore_index).float()
    return LinearLogprobsFunction.apply(h, weight, targets, keep, _chunk(h, weight, chunk_size), _ce_chunk_triton)


def linear_cross_entropy_unsupported(h: torch.Tensor, weight: torch.Tensor) -> str | None:
    """Why the Triton path cannot take these inputs, or None when it can."""
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        return f"h {tuple(h.shape)} against weight {tuple(weight.shape)}"
    if h.dtype != weight.dtype:
        return f"h in {h.dtype} against a weight in {weight.dtype}"
    return None
