import pytest
import torch
from llamactl.kernels.swiglu import swiglu_ref, swiglu_triton


def test_ref_matches_formula():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    torch.testing.assert_close(swiglu_ref(a, b), a / (1 + torch.exp(-a)) * b)


@pytest.mark.parametrize("shape", [(5, 123, 123), (77,), (3, 2048)], ids=["5x123x123", "77", "3x2048"])
def test_forward_backward(shape, dtype, device, assert_close):
    g = torch.Generator().manual_seed(0)
    # Scale a so that silu's saturating tails (|a| > 6) are exercised too.
    a = (3 * torch.randn(shape, generator=g)).to(device, dtype).requires_grad_()
    b = torch.randn(shape, generator=g).to(device, dtype).requires_grad_()
    dc = torch.randn(shape, generator=g).to(device, dtype)
    c = swiglu_triton(a, b)
    da, db = torch.autograd.grad(c, (a, b), dc)
    c_ref = swiglu_ref(a, b)
    da_ref, db_ref = torch.autograd.grad(c_ref, (a, b), dc)
    assert_close(c, c_ref)
    assert_close(da, da_ref)
    assert_close(db, db_ref)
