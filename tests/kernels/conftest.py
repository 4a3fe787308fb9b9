"""Shared pieces of the kernel tests: every Triton kernel against its torch reference, forward and every gradient.

Without CUDA the kernels run in Triton's interpreter, which has to be chosen before anything imports triton (this
file is imported before the test modules here; ``llamactl.kernels._triton`` makes the same choice for the other
test folders, which may import llamactl first). The interpreter runs every program instance one after another in
numpy, so the shapes here are small; they are chosen odd (not multiples of any block) so that every masked edge runs.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()

# bf16 runs only on a GPU: Triton's interpreter computes bf16 arithmetic and bf16 tl.dot wrongly (measured with
# triton 3.9), so a CPU result would test the interpreter, not the kernel. The kernels compute in fp32 internally.
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA: bf16 and speed are only meaningful on a GPU")
BF16 = pytest.param(torch.bfloat16, marks=[pytest.mark.gpu, needs_cuda], id="bf16")

# dtype -> (atol, rtol) for a kernel against its reference run on the same inputs in the same dtype.
TOLERANCE = {
    # torch.testing's default for fp32.
    torch.float32: (1e-5, 1.3e-6),
    # torch.testing's default rtol (one fp16 ulp). atol 5e-3 instead of 1e-5: both sides compute through O(1-4)
    # intermediates (an RMSNorm'd row, a residual sum, attention scores) but round them at different points (the
    # reference after every op, the kernels once from fp32), and one fp16 ulp at 4 is 3.9e-3, so an output near zero
    # that came from such terms differs by that much (measured: both are equally far from an fp64 result).
    torch.float16: (5e-3, 1e-3),
    # torch.testing's default rtol; atol raised for the same reason as fp16, scaled by bf16's 8x coarser ulp.
    torch.bfloat16: (4e-2, 1.6e-2),
}


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float | None = None, rtol: float | None = None):
    """torch.testing.assert_close with the table's tolerance for ``expected``'s dtype unless given."""
    table_atol, table_rtol = TOLERANCE.get(expected.dtype, TOLERANCE[torch.float32])
    torch.testing.assert_close(
        actual,
        expected,
        atol=table_atol if atol is None else atol,
        rtol=table_rtol if rtol is None else rtol,
        equal_nan=False,
    )


@pytest.fixture
def assert_close():
    """The tolerance-table comparison; a test that passes its own atol/rtol says why next to them."""
    return _assert_close


@pytest.fixture(params=[torch.float32, torch.float16, BF16], ids=["fp32", "fp16", "bf16"])
def dtype(request) -> torch.dtype:
    return request.param


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture
def kernels(monkeypatch):
    """Set LLAMACTL_KERNELS for one test: ``kernels("triton")`` or ``kernels("ref")``."""

    def set_mode(mode: str) -> None:
        monkeypatch.setenv("LLAMACTL_KERNELS", mode)

    return set_mode
