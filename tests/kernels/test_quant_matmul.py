import pytest
import torch
from llamactl.kernels.quant_matmul import (
    dequantize_int4,
    dequantize_int8,
    quant_matmul_ref,
    quant_matmul_triton,
    quantize,
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
    q, scales, zeros, err = quantize_int4(w, group)
    assert q.dtype == torch.uint8 and q.shape == (50, 128) and scales.shape == zeros.shape == (50, 256 // group)
    back = dequantize_int4(q, scales, zeros)
    assert err == pytest.approx((back - w).abs().max().item())
    # The 16 levels span each group's range (widened to 0) in 15 steps of its scale.
    wg = w.reshape(50, -1, group)
    step = (wg.amax(-1).clamp(min=0) - wg.amin(-1).clamp(max=0)) / 15
    assert torch.allclose(scales.float(), step, rtol=2**-10)
    # Round to nearest: half a step, plus the scale's fp16 rounding (2^-11 of it) over the group's 15 steps; the zero
    # point, rounded too, keeps the group's ends within half a step of a level.
    bound = scales.float().repeat_interleave(group, dim=1) * (0.5 + 15 * 2**-11) + 1e-7
    assert ((back - w).abs() <= bound).all()


def test_int4_packing_layout():
    """Levels q = round(w / s) + z in [0, 15]: even inputs in the low nibble, odd in the high one."""
    w = torch.zeros(1, 32)
    w[0, 0], w[0, 1], w[0, 2] = 10.0, -5.0, 3.0  # range [-5, 10] -> scale 1, zero point 5, so q = w + 5
    q, scales, zeros, err = quantize_int4(w, 32)
    assert scales.item() == 1.0 and zeros.item() == 5 and err == 0.0
    assert q[0, 0].item() == (10 + 5) | ((-5 + 5) << 4)
    assert q[0, 1].item() == (3 + 5) | (5 << 4)
    assert (q[0, 2:] == 5 | (5 << 4)).all()


def test_int4_keeps_zero_exact_and_one_signed_groups():
    """A group of positive weights still has 0 among its levels (its range is widened to 0)."""
    w = torch.linspace(0.1, 1.5, 32)[None, :]
    q, scales, zeros, _ = quantize_int4(w, 32)
    assert zeros.item() == 0 and scales.item() == pytest.approx(0.1, rel=1e-3)
    w[0, 5] = 0.0
    q, scales, zeros, _ = quantize_int4(w, 32)
    assert dequantize_int4(q, scales, zeros)[0, 5].item() == 0.0


def test_all_zero_rows_and_bad_groups():
    q, scales, err = quantize_int8(torch.zeros(3, 16))
    assert err == 0.0 and torch.isfinite(scales).all()
    q, scales, zeros, err = quantize_int4(torch.zeros(3, 32), 32)
    assert err == 0.0 and torch.isfinite(scales).all()
    with pytest.raises(ValueError, match="group size"):
        quantize_int4(_weight(4, 96), 48)
    with pytest.raises(ValueError, match="multiple of the group size"):
        quantize_int4(_weight(4, 96), 64)


# int8 with K = 200: no multiple of the 128-wide K block. int4 in every group size with K = 256.
SCHEMES = {"int8": ("int8", None, 200), "int4-g32": ("int4", 32, 256), "int4-g64": ("int4", 64, 256)}
SCHEMES["int4-g128"] = ("int4", 128, 256)


# The launcher's own tiles, and split-K: two partial sums over halves of K (int8's halves in whole 64-wide blocks,
# the second one ragged at K = 200), added after.
CONFIGS = {"default": None, "split2": dict(SPLIT_K=2, BLOCK_N=16, BLOCK_K=64)}


@pytest.mark.parametrize("scheme", SCHEMES.values(), ids=SCHEMES.keys())
@pytest.mark.parametrize("M", [1, 5, 33], ids=["batch1", "batch5", "rows33"])
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_against_ref(scheme, M, config, dtype, device, assert_close):
    name, group, K = scheme
    w = _weight(100, K, seed=2)  # N = 100: no multiple of the column tile
    qw, scales, zeros = (t.to(device) if t is not None else None for t in quantize(w, name, group)[:3])
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(3)).to(device, dtype)
    if config is not None and name == "int4":
        config = {k: v for k, v in config.items() if k != "BLOCK_K"}  # int4 steps one group at a time
    got = quant_matmul_triton(x, qw, scales, zeros, name, config)
    assert_close(got, quant_matmul_ref(x, qw, scales, zeros, name))


def test_ref_is_the_product_with_the_dequantized_weight():
    """The reference against a hand dequantization: (q - z) * s per group, from the nibbles read one by one."""
    w = _weight(6, 64, seed=6)
    qw, scales, zeros, _ = quantize_int4(w, 32)
    by_hand = torch.empty(6, 64)
    for n in range(6):
        for k in range(64):
            level = (qw[n, k // 2].item() >> (4 * (k % 2))) & 0xF
            by_hand[n, k] = (level - zeros[n, k // 32].item()) * scales[n, k // 32].item()
    x = torch.randn(3, 64)
    assert torch.allclose(quant_matmul_ref(x, qw, scales, zeros, "int4"), x @ by_hand.t(), atol=1e-6)


def test_leading_dims(device, assert_close):
    """Activations (B, T, K) as a linear layer receives them."""
    qw, scales, zeros, _ = quantize_int4(_weight(48, 128, seed=4), 64)
    x = torch.randn(2, 3, 128, generator=torch.Generator().manual_seed(5)).to(device)
    qw, scales, zeros = qw.to(device), scales.to(device), zeros.to(device)
    out = quant_matmul_triton(x, qw, scales, zeros, "int4")
    assert out.shape == (2, 3, 48)
    assert_close(out, quant_matmul_ref(x, qw, scales, zeros, "int4"))
