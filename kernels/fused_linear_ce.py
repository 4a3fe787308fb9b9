"""Output projection fused with cross-entropy: the loss from hidden states without the full (tokens x vocab) logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


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


class _ChunkedLinearCE(torch.autograd.Function):
    """Computes the loss and both gradients chunk by chunk in the forward pass; backward only scales them.

    Peak extra memory is one (chunk x vocab) fp32 block instead of (N x vocab) logits plus their gradient.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, w, chunk_size):
        N = h.shape[0]
        denom = w.sum().clamp(min=1)
        need_grad = h.requires_grad or weight.requires_grad
        grad_h = torch.empty_like(h) if need_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad else None
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, N, chunk_size):
            hc, tc, wc = h[s : s + chunk_size], targets[s : s + chunk_size].clamp(min=0), w[s : s + chunk_size]
            logits = (hc @ weight.t()).float()  # (C, V)
            lse = torch.logsumexp(logits, dim=-1)
            loss += ((lse - logits.gather(1, tc[:, None]).squeeze(1)) * wc).sum()
            if need_grad:
                # d loss / d logits = (softmax - onehot) * w / denom
                g = torch.exp_(logits.sub_(lse[:, None]))
                g[torch.arange(g.shape[0], device=g.device), tc] -= 1.0
                g.mul_((wc / denom)[:, None])
                gl = g.to(h.dtype)
                grad_h[s : s + chunk_size] = gl @ weight
                grad_w += (gl.t() @ hc).float()
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if need_grad else None)
        return loss / denom

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, grad_w * grad_out, None, None, None


def linear_cross_entropy_chunked(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Same result as ``linear_cross_entropy_ref``, in plain torch, never holding more than a chunk of logits."""
    return _ChunkedLinearCE.apply(h, weight, targets, _weights(targets, mask, ignore_index), chunk_size)
