"""Peak memory of the fused loss on a GPU at Llama-2-7B sizes, against the full-logits reference. Skipped without CUDA.

Speed is a benchmark's business, never an assert: bench/kernels.py (run by `make gpu-check`) times every kernel
against eager torch and torch.compile.
"""

import pytest
import torch
from llamactl.kernels.fused_linear_ce import linear_cross_entropy_ref, linear_cross_entropy_triton

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: memory is measured on a GPU"),
]


def _bf16(*shape, grad=True):
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16).requires_grad_(grad)


def test_fused_cross_entropy_memory():
    """At vocab 32000 the fused loss must use >= 4x less peak memory than full logits (8192 tokens: the logits alone
    are 8192 x 32000 fp32 = 1 GiB, their gradient as much again; the fused loss holds one chunk of them)."""
    h, w = _bf16(8192, 4096), (torch.randn(32000, 4096, device="cuda") * 4096**-0.5).bfloat16().requires_grad_()
    targets = torch.randint(0, 32000, (8192,), device="cuda")

    def peak(fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        torch.autograd.grad(fn(h, w, targets), (h, w))
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    ours_mem, eager_mem = peak(linear_cross_entropy_triton), peak(linear_cross_entropy_ref)
    assert 4 * ours_mem <= eager_mem, f"peak {ours_mem / 2**20:.0f} MiB vs eager {eager_mem / 2**20:.0f} MiB"
