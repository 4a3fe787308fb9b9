import pytest
import torch
from llamactl.kernels.quant_matmul import (
    dequantize_int4,
    dequantize_int8,
    quant_matmul_ref,
    quant_matmul_triton,
    quantize_int4,
    quantize_int8,
)


def _weight(N, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, K, generator=g) * 0.02


def test_int8_round_trip_error_bound():
    w = _weight(100, 200)
    q, scales, err = quantize_int8(w)
    assert q.dtype == torch.int8 and q.shape == (100, 200) and scales.shape == (100,)
    back = dequantize_int8(q, scales)
    assert err == pytest.approx((back - w).abs().max().item())
    # Rounding to the nearest level: at most half a step of the row's own scale (plus the scale's fp16 rounding).
    bound = scales.float()[:, None] * (0.5 + 127 * 2**-11)
    assert ((back - w).abs() <= bound).all()


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_round_trip_error_bound(group):
    w = _weight(50, 256, seed=1)
    q, scales, err = quantize_int4(w, group)
    assert q.dtype == torch.uint8 and q.shape == (50, 128) and scales.shape == (50, 256 // group)
    back = dequantize_int4(q, scales)
    assert err == pytest.approx((back - w).abs().max().item())
    bound = scales.float().repeat_interleave(group, dim=1) * (0.5 + 7 * 2**-11)
    assert ((back - w).abs() <= bound).all()


def test_int4_packing_layout():
    """Even inputs in the low nibble, odd in the high one, stored as q + 8 with q in [-8, 7]."""
    w = torch.zeros(1, 32)
    w[0, 0], w[0, 1], w[0, 2] = 7.0, -7.0, 3.0  # group max 7 -> scale 1, so q = w
    q, scales, err = quantize_int4(w, 32)
    assert scales.item() == 1.0 and err == 0.0
    assert q[0, 0].item() == (7 + 8) | ((-7 + 8) << 4)
    assert q[0, 1].item() == (3 + 8) | (8 << 4)
    assert (q[0, 2:] == 8 | (8 << 4)).all()


def test_all_zero_rows_and_bad_groups():
    q, scales, err = quantize_int8(torch.zeros(3, 16))
    assert err == 0.0 and torch.isfinite(scales).all()
    with pytest.raises(ValueError, match="group size"):
        quantize_int4(_weight(4, 96), 48)
    with pytest.raises(ValueError, match="multiple of the group size"):
        quantize_int4(_weight(4, 96), 64)


# int8 with K = 200: no multiple of the 128-wide K block. int4 in every group size with K = 256.
SCHEMES = {"int8": ("int8", None, 200), "int4-g32": ("int4", 32, 256), "int4-g64": ("int4", 64, 256)}
SCHEMES["int4-g128"] = ("int4", 128, 256)


@pytest.mark.parametrize("scheme", SCHEMES.values(), ids=SCHEMES.keys())
@pytest.mark.parametrize("M", [1, 5, 33], ids=["batch1", "batch5", "rows33"])
def test_against_ref(scheme, M, dtype, device, assert_close):
    name, group, K = scheme
    w = _weight(100, K, seed=2)  # N = 100: no multiple of the column tile
    qw, scales, _ = quantize_int8(w) if name == "int8" else quantize_int4(w, group)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(3)).to(device, dtype)
    qw, scales = qw.to(device), scales.to(device)
    assert_close(quant_matmul_triton(x, qw, scales, name), quant_matmul_ref(x, qw, scales, name))


def test_leading_dims(device, assert_close):
    """Activations (B, T, K) as a linear layer receives them."""
    qw, scales, _ = quantize_int4(_weight(48, 128, seed=4), 64)
    x = torch.randn(2, 3, 128, generator=torch.Generator().manual_seed(5)).to(device)
    qw, scales = qw.to(device), scales.to(device)
    out = quant_matmul_triton(x, qw, scales, "int4")
    assert out.shape == (2, 3, 48)
    assert_close(out, quant_matmul_ref(x, qw, scales, "int4"))
