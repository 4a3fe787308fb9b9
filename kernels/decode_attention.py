"""Attention of one new query per sequence against its KV cache (the decode step of generation)."""

from __future__ import annotations

import torch

from .attention import sdpa_gqa


def decode_attention_ref(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seqlens: torch.Tensor
) -> torch.Tensor:
    """q (B, H, D); caches (B, KV, S, D); seqlens (B,) int: sequence b attends keys [0, seqlens[b]) -> (B, H, D)."""
    S = k_cache.shape[2]
    mask = torch.arange(S, device=q.device)[None, :] < seqlens[:, None]  # (B, S)
    return sdpa_gqa(q[:, :, None], k_cache, v_cache, mask=mask[:, None, None]).squeeze(2)
