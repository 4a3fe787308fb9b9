import pytest
import torch
from llamactl.kernels.rmsnorm import rms_norm_ref, rms_norm_torch, rms_norm_triton


def _inputs(shape, dtype, device, residual: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(device, dtype).requires_grad_()
    w = (torch.rand(shape[-1], generator=g) + 0.5).to(device, dtype).requires_grad_()
    r = torch.randn(shape, generator=g).to(device, dtype).requires_grad_() if residual else None
    return x, w, r


def _run(fn, x, w, r, grads_of):
    """Outputs and the gradients of a fixed random projection of them, for x, w (and the residual)."""
    out = fn(x, w, 1e-5, r)
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(o.shape, generator=g).to(o.device) for o in outs]
    loss = sum((o.float() * wt).sum() for o, wt, use in zip(outs, weights, grads_of, strict=True) if use)
    inputs = [x, w] + ([r] if r is not None else [])
    return outs, torch.autograd.grad(loss, inputs, allow_unused=True)


def test_ref_matches_formula():
    # Meta's formula in fp64, written out independently of the reference (which computes in fp32).
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 7, 33, generator=g), torch.rand(33, generator=g)
    xd, wd = x.double(), w.double()
    expected = xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * wd
    torch.testing.assert_close(rms_norm_ref(x, w, 1e-6), expected.float())
    y, s = rms_norm_ref(x, w, 1e-6, residual=x)
    torch.testing.assert_close(s, 2 * x)
    torch.testing.assert_close(y, rms_norm_ref(2 * x, w, 1e-6))


@pytest.mark.parametrize("shape", [(5, 123, 123), (3, 77, 64)], ids=["5x123x123", "3x77x64"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_forward_backward(shape, residual, dtype, device, assert_close):
    x, w, r = _inputs(shape, dtype, device, residual)
    uses = (True, True) if residual else (True,)
    outs, grads = _run(rms_norm_triton, x, w, r, uses)
    ref_outs, ref_grads = _run(rms_norm_ref, x, w, r, uses)
    for o, e in zip(outs, ref_outs, strict=True):
        assert_close(o, e)
    assert_close(grads[0], ref_grads[0])
    if r is not None:
        assert_close(grads[2], ref_grads[2])
    # The weight gradient sums hundreds of rows. fp32: in a different order (partials per program), which moves the
    # result by ~1e-6 of the terms' magnitude. 16-bit: the reference rounds every row's product to 16 bits before
    # summing and the kernel does not, so they may differ by 2 ulps of the largest sum.
    atol = 1e-4 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps * ref_grads[1].abs().max().item()
    assert_close(grads[1], ref_grads[1], atol=atol)


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dtype_", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cpu_torch_path_against_ref(residual, dtype_):
    x, w, r = _inputs((5, 123, 123), dtype_, "cpu", residual)
    uses = (True, True) if residual else (True,)
    outs, grads = _run(rms_norm_torch, x, w, r, uses)
    ref_outs, ref_grads = _run(rms_norm_ref, x, w, r, uses)
    # Both normalise in fp32 and round once to x's dtype; bf16 may land one rounding step apart (1 ulp).
    tol = {} if dtype_ == torch.float32 else dict(rtol=2 * torch.finfo(dtype_).eps, atol=2 * torch.finfo(dtype_).eps)
    for o, e in zip(outs, ref_outs, strict=True):
        torch.testing.assert_close(o, e, **tol)
    # bf16 gradients: the two backward graphs round intermediate products to bf16 at different places, and the
    # weight gradient sums 615 rows of them; 0.02 is about 2-3 bf16 ulps (2^-7) of values near 1.
    for g, e in zip(grads, ref_grads, strict=True):
        if e is not None:
            torch.testing.assert_close(g, e, **({} if dtype_ == torch.float32 else dict(rtol=0.02, atol=0.02)))


def test_only_residual_sum_used(device, assert_close):
    """The next layer may consume only the residual sum: the gradient must still reach x and the residual."""
    x, w, r = _inputs((4, 9, 40), torch.float32, device, residual=True)
    _, grads = _run(rms_norm_triton, x, w, r, (False, True))
    _, ref_grads = _run(rms_norm_ref, x, w, r, (False, True))
    assert_close(grads[0], ref_grads[0])
    assert_close(grads[2], ref_grads[2])
    assert grads[1] is None and ref_grads[1] is None


def test_many_rows_weight_gradient(device, assert_close):
    """More rows than programs: each program reduces its own run of rows into a partial weight gradient."""
    x, w, _ = _inputs((2050, 24), torch.float32, device, residual=False, seed=3)
    _, grads = _run(rms_norm_triton, x, w, None, (True,))
    _, ref_grads = _run(rms_norm_ref, x, w, None, (True,))
    assert_close(grads[0], ref_grads[0])
    # fp32 sums of 2050 terms in a different order: relative error up to ~1e-6 of the sum's magnitude (~50).
    assert_close(grads[1], ref_grads[1], atol=1e-4)
