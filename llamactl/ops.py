"""One dispatch function per op of the model core.

The model calls only these. Each picks an implementation from ``llamactl.kernels``: the Triton kernels when the
tensors are on CUDA and Triton imports, the plain-torch references otherwise. ``LLAMACTL_KERNELS`` overrides:

``auto``    (default) as above. A GPU input that a kernel cannot take runs the reference, and the log says so once
            per op and reason: nothing falls back silently.
``ref``     always the references.
``triton``  always the kernels; an input they cannot take is an error (``UserError``). On a machine without CUDA
            the kernels run in Triton's interpreter (slow; this is what the kernel tests use).
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch

from llamactl.errors import UserError
from llamactl.kernels._triton import HAS_TRITON, interpreting
from llamactl.kernels.attention import (
    attention_ref,
    attention_triton,
    attention_unsupported,
    cached_attention_ref,
    cached_attention_triton,
)
from llamactl.kernels.decode_attention import (
    decode_attention_masked,
    decode_attention_torch,
    decode_attention_triton,
    decode_attention_unsupported,
)
from llamactl.kernels.fused_linear_ce import (
    IGNORE_INDEX,
    linear_cross_entropy_sum_chunked,
    linear_cross_entropy_sum_triton,
    linear_cross_entropy_unsupported,
    linear_logprobs_chunked,
    linear_logprobs_triton,
)
from llamactl.kernels.quant_matmul import (
    check_quantized,
    quant_matmul_ref,
    quant_matmul_triton,
    quant_matmul_unsupported,
)
from llamactl.kernels.rmsnorm import rms_norm_torch, rms_norm_triton, rms_norm_unsupported
from llamactl.kernels.rotary import rotary_ref, rotary_triton, rotary_unsupported
from llamactl.kernels.swiglu import swiglu_ref, swiglu_triton, swiglu_unsupported

log = logging.getLogger(__name__)

MODES = ("auto", "ref", "triton")
_reported: set[str] = set()  # warnings already logged: each is said once per process


def kernel_mode() -> str:
    """The ``LLAMACTL_KERNELS`` setting, read at every call so that tests and tools can switch it."""
    mode = os.environ.get("LLAMACTL_KERNELS", "auto") or "auto"
    if mode not in MODES:
        raise UserError(f"LLAMACTL_KERNELS={mode!r}: use one of {', '.join(MODES)}")
    return mode


def _use_triton(op: str, x: torch.Tensor, why_not: str | None) -> bool:
    """Whether ``op`` runs its Triton kernel for input ``x``; ``why_not`` is the kernel's objection to the shapes."""
    mode = kernel_mode()
    if mode == "ref" or (torch.compiler.is_compiling() and op != "quant_matmul"):
        # under torch.compile the references are what the compiler fuses into kernels of its own
        return False
    if mode == "triton":
        if not HAS_TRITON:
            raise UserError("LLAMACTL_KERNELS=triton, but triton is not installed")
        if not x.is_cuda and not interpreting():
            raise UserError(
                f"LLAMACTL_KERNELS=triton with {x.device.type} tensors needs Triton's interpreter: set "
                "TRITON_INTERPRET=1 before anything imports triton"
            )
        if why_not is not None:
            raise UserError(f"LLAMACTL_KERNELS=triton: the {op} kernel cannot take {why_not}")
        return True
    if not x.is_cuda:
        return False
    if not HAS_TRITON:
        _report_once("Triton is not installed: every op runs its torch reference on the GPU")
        return False
    if why_not is not None:
        _report_once(f"{op}: the Triton kernel cannot take {why_not}; running the torch reference instead")
        return False
    return True


def _report_once(message: str) -> None:
    if message not in _reported:
        _reported.add(message)
        log.warning(message)


def _grad_needed(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """RMSNorm of x (..., D); with ``residual``, of x + residual, returning ``(normed, summed)``."""
    if _use_triton("rms_norm", x, rms_norm_unsupported(x, weight, residual)):
        return rms_norm_triton(x, weight, eps, residual)
    return rms_norm_torch(x, weight, eps, residual)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x (B, T, H, D) at positions (B, T) or (T,) from fp32 tables (S, D/2)."""
    if _use_triton("rotary", x, rotary_unsupported(x, cos, sin, positions)):
        return rotary_triton(x, cos, sin, positions)
    return rotary_ref(x, cos, sin, positions)


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) * b."""
    if _use_triton("swiglu", a, swiglu_unsupported(a, b)):
        return swiglu_triton(a, b)
    return swiglu_ref(a, b)


def attention(q, k, v, causal: bool = True, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, H, T, D), k and v (B, KV, T, D); ``segment_ids`` (B, T) keep packed sequences apart.

    On a GPU in ``auto`` mode, rows without segment ids in 16-bit dtypes run SDPA (its FlashAttention kernel), and
    the Triton kernel serves packed rows, for which SDPA would need a dense (T x T) mask and leave its flash path.
    NOTE: measured on an H100 (make gpu-check, 2026-11-27), causal bf16 2 x 32 x 4096 x 128: SDPA 0.52 ms forward
    and 2.10 ms forward + backward, the Triton kernel 0.85 and 5.09 ms (docs/benchmarks.md).
    """
    if segment_ids is None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and kernel_mode() == "auto":
        return attention_ref(q, k, v, causal)
    if _use_triton("attention", q, attention_unsupported(q, k, v, segment_ids)):
        return attention_triton(q, k, v, causal, segment_ids)
    return attention_ref(q, k, v, causal, segment_ids)


def cached_attention(q, k_cache, v_cache, start: torch.Tensor) -> torch.Tensor:
    """T new queries per sequence, at positions start[b] + i, against a KV cache that already holds them."""
    why_not = attention_unsupported(q, k_cache, v_cache, same_positions=False)
    if why_not is None and _grad_needed(q, k_cache, v_cache):
        why_not = "a gradient (the cached-attention kernel is forward only)"
    if _use_triton("cached_attention", q, why_not):
        return cached_attention_triton(q, k_cache, v_cache, start)
    return cached_attention_ref(q, k_cache, v_cache, start)


def decode_attention(q, k_cache, v_cache, seqlens: torch.Tensor) -> torch.Tensor:
    """One query per sequence, q (B, H, D), against caches (B, KV, S, D) holding seqlens[b] tokens -> (B, H, D).
    Under ``torch.compile`` (the compiled decode step), the whole cache under a mask: fixed shapes."""
    if torch.compiler.is_compiling():
        return decode_attention_masked(q, k_cache, v_cache, seqlens)
    why_not = decode_attention_unsupported(q, k_cache, v_cache)
    if why_not is None and _grad_needed(q, k_cache, v_cache):
        why_not = "a gradient (the decode kernel is forward only)"
    if _use_triton("decode_attention", q, why_not):
        return decode_attention_triton(q, k_cache, v_cache, seqlens)
    return decode_attention_torch(q, k_cache, v_cache, seqlens)


def _autocast_pair(h: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Under autocast, the fused loss takes h and the weight already in the autocast dtype and runs with autocast
    off (its chunk matmuls would otherwise come out in another dtype than its gradient buffers); the casts carry
    the gradients back to fp32 master weights. Returns (h, weight, autocast was on)."""
    kind = h.device.type
    if not torch.is_autocast_enabled(kind):
        return h, weight, False
    dtype = torch.get_autocast_dtype(kind)
    return h.to(dtype), weight.to(dtype), True


def linear_cross_entropy_sum(
    h, weight, targets, mask=None, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Sum of the counted tokens' cross-entropies under softmax(h @ weight^T), number of counted tokens), both fp32,
    without materialising the logits. The sum, not the mean: a training loop normalises once by the tokens counted
    over all its micro-steps and ranks.

    h (N, D), weight (V, D), targets (N,); a token counts when its target is not ``ignore_index`` and ``mask``
    (N,), if given, is set.
    """
    h, weight, autocast = _autocast_pair(h, weight)
    with torch.autocast(h.device.type, enabled=False) if autocast else contextlib.nullcontext():
        if _use_triton("linear_cross_entropy", h, linear_cross_entropy_unsupported(h, weight)):
            return linear_cross_entropy_sum_triton(h, weight, targets, mask, ignore_index)
        return linear_cross_entropy_sum_chunked(h, weight, targets, mask, ignore_index)


def linear_cross_entropy(h, weight, targets, mask=None, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean cross-entropy over the counted tokens (``linear_cross_entropy_sum`` divided by its count)."""
    total, count = linear_cross_entropy_sum(h, weight, targets, mask, ignore_index)
    return total / count.clamp(min=1)


def linear_logprobs(h, weight, targets, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Log-probability (N,) fp32 of each target under softmax(h @ weight^T), with gradient, without the full logits.

    Where a target is ``ignore_index`` the result is 0 and passes no gradient.
    """
    h, weight, autocast = _autocast_pair(h, weight)
    with torch.autocast(h.device.type, enabled=False) if autocast else contextlib.nullcontext():
        if _use_triton("linear_logprobs", h, linear_cross_entropy_unsupported(h, weight)):
            return linear_logprobs_triton(h, weight, targets, ignore_index)
        return linear_logprobs_chunked(h, weight, targets, ignore_index)


def quant_matmul(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, scheme: str
) -> torch.Tensor:
    """x (..., K) @ W^T for a weight W (N, K) stored as ``scheme`` ("int8" or "int4", the latter with its zero
    points): see ``llamactl.kernels.quant_matmul`` for the packed formats. Inference only."""
    check_quantized(x, qweight, scales, zeros, scheme)
    if _use_triton("quant_matmul", x, quant_matmul_unsupported(x, qweight, scales, scheme)):
        return quant_matmul_triton(x, qweight, scales, zeros, scheme)
    return quant_matmul_ref(x, qweight, scales, zeros, scheme)
