"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight, optionally fused with a residual add."""

from __future__ import annotations

import torch


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
