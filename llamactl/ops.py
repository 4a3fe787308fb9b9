"""One dispatch function per op of the model core.

The model calls only these. Each picks an implementation from ``llamactl.kernels``: the plain-torch path on the CPU,
the Triton kernels on CUDA (issue: kernels). ``LLAMACTL_KERNELS=ref|triton`` forces one.
"""

from __future__ import annotations

import torch

from llamactl.kernels.attention import attention_ref, cached_attention_ref
from llamactl.kernels.decode_attention import decode_attention_ref
from llamactl.kernels.fused_linear_ce import IGNORE_INDEX, linear_cross_entropy_chunked
from llamactl.kernels.rmsnorm import rms_norm_ref
from llamactl.kernels.rotary import rotary_ref
from llamactl.kernels.swiglu import swiglu_ref


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    return rms_norm_ref(x, weight, eps, residual)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return rotary_ref(x, cos, sin, positions)


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return swiglu_ref(a, b)


def attention(q, k, v, causal: bool = True, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    return attention_ref(q, k, v, causal, segment_ids)


def cached_attention(q, k_cache, v_cache, start: torch.Tensor) -> torch.Tensor:
    return cached_attention_ref(q, k_cache, v_cache, start)


def decode_attention(q, k_cache, v_cache, seqlens: torch.Tensor) -> torch.Tensor:
    return decode_attention_ref(q, k_cache, v_cache, seqlens)


def linear_cross_entropy(h, weight, targets, mask=None, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    return linear_cross_entropy_chunked(h, weight, targets, mask, ignore_index)
