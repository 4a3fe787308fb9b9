import pytest
import torch
from llamactl.kernels.rotary import rotary_ref, rotary_tables, rotary_triton


def test_ref_matches_meta_complex_form():
    # Meta's apply_rotary_emb: view pairs as complex numbers and multiply by e^(i * pos * theta_j).
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 3, 16, generator=g)
    pos = torch.arange(9) + 4
    freqs = 1.0 / (10000.0 ** (torch.arange(0, 16, 2).float() / 16))
    cis = torch.polar(torch.ones(9, 8), torch.outer(pos.float(), freqs))  # (T, D/2)
    expected = torch.view_as_real(torch.view_as_complex(x.reshape(2, 9, 3, 8, 2)) * cis[None, :, None]).flatten(-2)
    cos, sin = rotary_tables(16, 32)
    torch.testing.assert_close(rotary_ref(x, cos, sin, pos), expected)


@pytest.mark.parametrize("shape", [(2, 77, 3, 64), (3, 5, 7, 6)], ids=["2x77x3x64", "3x5x7x6"])
@pytest.mark.parametrize("per_row", [False, True], ids=["positions(T)", "positions(B,T)"])
def test_forward_backward(shape, per_row, dtype, device, assert_close):
    B, T, H, D = shape
    g = torch.Generator().manual_seed(0)
    cos, sin = (t.to(device) for t in rotary_tables(D, 256))
    # Per-row positions are what a KV-cache step and packed rows use: arbitrary offsets, here random.
    pos = torch.randint(0, 256, (B, T), generator=g) if per_row else torch.arange(T) + 11
    pos = pos.to(device)
    x = torch.randn(shape, generator=g).to(device, dtype).requires_grad_()
    dy = torch.randn(shape, generator=g).to(device, dtype)
    y = rotary_triton(x, cos, sin, pos)
    (dx,) = torch.autograd.grad(y, x, dy)
    y_ref = rotary_ref(x, cos, sin, pos)
    (dx_ref,) = torch.autograd.grad(y_ref, x, dy)
    assert_close(y, y_ref)
    assert_close(dx, dx_ref)


def test_kv_cache_offset(device, assert_close):
    """Rotating new tokens at positions start + i equals the same tokens' slice of a full-sequence rotation."""
    g = torch.Generator().manual_seed(1)
    cos, sin = (t.to(device) for t in rotary_tables(32, 64))
    x = torch.randn(1, 40, 2, 32, generator=g).to(device)
    full = rotary_triton(x, cos, sin, torch.arange(40, device=device))
    step = rotary_triton(x[:, 29:], cos, sin, 29 + torch.arange(11, device=device))
    assert_close(step, full[:, 29:])


def test_non_contiguous_input(device, assert_close):
    """The model rotates views of a projection: a strided input must give the same result."""
    g = torch.Generator().manual_seed(2)
    cos, sin = (t.to(device) for t in rotary_tables(16, 32))
    x = torch.randn(2, 4, 10, 16, generator=g).to(device).transpose(1, 2)  # (B, T, H, D) view, not contiguous
    pos = torch.arange(10, device=device)
    assert_close(rotary_triton(x, cos, sin, pos), rotary_ref(x, cos, sin, pos))


def test_position_outside_tables_is_nan_not_a_stray_read(device):
    """A position past the tables (or negative) gives NaN for that token and leaves every other token exact; the
    tables are padded with finite sentinels so that a read past their end would show up as a finite wrong value."""
    g = torch.Generator().manual_seed(3)
    cos, sin = rotary_tables(16, 40)
    # Rows 32..39 are poison: the kernel is handed the first 32 rows as a view, so a read past row 31 lands on them.
    cos[32:], sin[32:] = 7.0, 7.0
    cos, sin = cos[:32].to(device), sin[:32].to(device)
    x = torch.randn(1, 6, 2, 16, generator=g).to(device)
    pos = torch.tensor([0, 31, 32, 35, -1, 5], device=device)
    y = rotary_triton(x, cos, sin, pos)
    bad = torch.tensor([False, False, True, True, True, False], device=device)
    assert torch.isnan(y[0, bad]).all()
    ok = ~bad
    torch.testing.assert_close(y[0, ok], rotary_ref(x[:, ok], cos, sin, pos[ok])[0])
