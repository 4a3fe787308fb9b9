"""Speed and memory of the kernels on a GPU, against the eager references at Llama-2-7B sizes. Skipped without CUDA.

Only the claims a kernel must never break are asserted here (never slower than eager torch, the fused loss's memory
saving); bench/kernels.py measures the rest against the device's peaks.
"""

import statistics

import pytest
import torch
from llamactl.kernels.attention import attention_ref, attention_triton
from llamactl.kernels.fused_linear_ce import linear_cross_entropy_ref, linear_cross_entropy_triton
from llamactl.kernels.rmsnorm import rms_norm_ref, rms_norm_triton
from llamactl.kernels.swiglu import swiglu_ref, swiglu_triton

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: speed and memory are measured on a GPU"),
]


def _ms(fn, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _fwd_bwd(fn, inputs, **kw):
    def run():
        out = fn(*inputs, **kw)
        torch.autograd.grad(out, [t for t in inputs if t.requires_grad], torch.ones_like(out))

    return run


def _bf16(*shape, grad=True):
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16).requires_grad_(grad)


# Timing noise on a shared GPU is a few percent: "never slower" is checked with 10% slack.
SLACK = 1.10


def test_rms_norm_not_slower_than_eager():
    x, w = _bf16(8192, 4096), _bf16(4096)
    ours, eager = _ms(_fwd_bwd(rms_norm_triton, (x, w), eps=1e-5)), _ms(_fwd_bwd(rms_norm_ref, (x, w), eps=1e-5))
    assert ours <= SLACK * eager, f"triton {ours:.3f} ms vs eager {eager:.3f} ms"


def test_swiglu_not_slower_than_eager():
    a, b = _bf16(8192, 11008), _bf16(8192, 11008)
    ours, eager = _ms(_fwd_bwd(swiglu_triton, (a, b))), _ms(_fwd_bwd(swiglu_ref, (a, b)))
    assert ours <= SLACK * eager, f"triton {ours:.3f} ms vs eager {eager:.3f} ms"


def test_attention_forward_not_slower_than_sdpa():
    q, k, v = _bf16(2, 32, 4096, 128), _bf16(2, 32, 4096, 128), _bf16(2, 32, 4096, 128)
    with torch.no_grad():
        ours = _ms(lambda: attention_triton(q, k, v, causal=True))
        sdpa = _ms(lambda: attention_ref(q, k, v, causal=True))
    assert ours <= SLACK * sdpa, f"triton {ours:.3f} ms vs SDPA {sdpa:.3f} ms"


def test_fused_cross_entropy_memory_and_speed():
    """At vocab 32000 the fused loss must use >= 4x less peak memory than full logits, and be no slower."""
    h, w = _bf16(8192, 4096), (torch.randn(32000, 4096, device="cuda") * 4096**-0.5).bfloat16().requires_grad_()
    targets = torch.randint(0, 32000, (8192,), device="cuda")

    def peak(fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    def step(fn):
        return lambda: torch.autograd.grad(fn(h, w, targets), (h, w))

    ours_mem, eager_mem = peak(step(linear_cross_entropy_triton)), peak(step(linear_cross_entropy_ref))
    assert 4 * ours_mem <= eager_mem, f"peak {ours_mem / 2**20:.0f} MiB vs eager {eager_mem / 2**20:.0f} MiB"
    ours, eager = _ms(step(linear_cross_entropy_triton), reps=5), _ms(step(linear_cross_entropy_ref), reps=5)
    assert ours <= SLACK * eager, f"triton {ours:.3f} ms vs eager {eager:.3f} ms"
