"""Rotary position embedding in Meta's interleaved layout: pairs (x[2i], x[2i+1]) rotate by angle pos * theta_i."""

from __future__ import annotations

import torch


def rotary_tables(head_dim: int, max_seq_len: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (max_seq_len, head_dim // 2), fp32, as Meta's ``precompute_freqs_cis``."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32)[: head_dim // 2] / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), freqs)
    return torch.cos(angles), torch.sin(angles)


def rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, H, D) at per-token positions (B, T) or (T,), with tables (S, D/2). Computes in fp32."""
    c = cos[positions].unsqueeze(-2)  # (B, T, 1, D/2) or (T, 1, D/2)
    s = sin[positions].unsqueeze(-2)
    xf = x.float().unflatten(-1, (-1, 2))  # (B, T, H, D/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
    return out.flatten(-2).type_as(x)
