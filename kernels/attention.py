"""Causal grouped-query attention for training and prefill, with optional segment ids for packed rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
