import pytest
import torch
import torch.nn.functional as F
from llamactl.kernels.fused_linear_ce import (
    IGNORE_INDEX,
    linear_cross_entropy_chunked,
    linear_cross_entropy_ref,
    linear_cross_entropy_triton,
    linear_logprobs_chunked,
    linear_logprobs_ref,
    linear_logprobs_triton,
)

LOSSES = {"triton": linear_cross_entropy_triton, "torch-chunked": linear_cross_entropy_chunked}
LOGPROBS = {"triton": linear_logprobs_triton, "torch-chunked": linear_logprobs_chunked}


def _inputs(N, D, V, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(V, D, generator=g) / D**0.5).to(device, dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::7] = IGNORE_INDEX
    mask = torch.rand(N, generator=g) > 0.3
    return h, w, targets.to(device), mask.to(device)


def test_ref_matches_formula():
    # Mean of -log softmax at the target over tokens that are neither ignored nor masked, written out in fp64.
    h, w, targets, mask = _inputs(20, 8, 11, torch.float32, "cpu")
    logp = torch.log_softmax(h.double() @ w.double().t(), dim=-1)
    keep = (targets != IGNORE_INDEX) & mask
    expected = -logp[keep, targets[keep]].mean()
    torch.testing.assert_close(linear_cross_entropy_ref(h, w, targets, mask), expected.float())
    lp = linear_logprobs_ref(h, w, targets)
    valid = targets != IGNORE_INDEX
    torch.testing.assert_close(lp[valid], logp[valid, targets[valid]].float())
    assert (lp[~valid] == 0).all()


# (N, D, V): a vocab and a token count that are no block multiples; chunks of 16 do not divide 77 either. The
# 9000-word vocab is wider than one 8192-column block, so the kernel's vocab loop runs more than once.
SHAPES = {"77x48x123": (77, 48, 123), "9x16x9000": (9, 16, 9000)}


@pytest.mark.parametrize("impl", LOSSES.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_loss_forward_backward(impl, shape, dtype, device, assert_close):
    h, w, targets, mask = _inputs(*shape, dtype, device)
    # 2.5 x loss: an upstream gradient other than 1 must scale the gradients computed in the forward.
    loss = LOSSES[impl](h, w, targets, mask, chunk_size=16)
    grads = torch.autograd.grad(2.5 * loss, (h, w))
    ref = linear_cross_entropy_ref(h, w, targets, mask)
    ref_grads = torch.autograd.grad(2.5 * ref, (h, w))
    assert_close(loss, ref)
    assert_close(grads[0], ref_grads[0])
    # 16-bit: the weight gradient is accumulated chunk by chunk in the weight's dtype (an fp32 accumulator would
    # double the memory the fused loss saves), so it carries one rounding per chunk: 5 chunks here.
    atol = None if dtype == torch.float32 else 5 * torch.finfo(dtype).eps * ref_grads[1].abs().max().item()
    assert_close(grads[1], ref_grads[1], atol=atol)


@pytest.mark.parametrize("impl", LOSSES.keys())
def test_nothing_counted(impl, device):
    """Every target ignored or masked: the loss is 0 (not NaN) and so are the gradients."""
    h, w, targets, _ = _inputs(10, 8, 13, torch.float32, device)
    loss = LOSSES[impl](h, w, targets, torch.zeros(10, dtype=torch.bool, device=device))
    grads = torch.autograd.grad(loss, (h, w))
    assert loss.item() == 0.0
    assert all((g == 0).all() for g in grads)


@pytest.mark.parametrize("impl", LOSSES.keys())
def test_mask_equals_ignore_index(impl, device, assert_close):
    """sft's answer-only loss: a mask is the same as setting the masked targets to the ignore index."""
    h, w, targets, mask = _inputs(30, 8, 13, torch.float32, device, seed=2)
    masked = LOSSES[impl](h, w, targets, mask, chunk_size=8)
    ignored = LOSSES[impl](h, w, torch.where(mask, targets, IGNORE_INDEX), None, chunk_size=8)
    assert_close(masked, ignored)


@pytest.mark.parametrize("impl", LOGPROBS.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_logprobs_forward_backward(impl, shape, dtype, device, assert_close):
    h, w, targets, _ = _inputs(*shape, dtype, device, seed=1)
    g = torch.Generator().manual_seed(3)
    upstream = torch.randn(shape[0], generator=g).to(device)  # ppo weighs each token's log-prob differently
    lp = LOGPROBS[impl](h, w, targets, chunk_size=16)
    grads = torch.autograd.grad((lp * upstream).sum(), (h, w))
    ref = linear_logprobs_ref(h, w, targets)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), (h, w))
    assert lp.dtype == torch.float32
    # 16-bit: a log-prob is (target logit - logsumexp) of 16-bit logits of magnitude ~5, so the two sides may
    # differ by one ulp of the logits' magnitude (fp16: 4e-3) even though the result is returned in fp32.
    assert_close(lp, ref, atol=None if dtype == torch.float32 else 2 * torch.finfo(dtype).eps * 4)
    assert_close(grads[0], ref_grads[0])
    # Same per-chunk rounding of the 16-bit weight gradient as for the loss.
    atol = None if dtype == torch.float32 else 5 * torch.finfo(dtype).eps * ref_grads[1].abs().max().item()
    assert_close(grads[1], ref_grads[1], atol=atol)


def test_matches_torch_cross_entropy(device, assert_close):
    """Plain torch's cross_entropy with ignore_index on full logits, as a check independent of our reference."""
    h, w, targets, _ = _inputs(40, 16, 37, torch.float32, device, seed=4)
    expected = F.cross_entropy(h @ w.t(), targets, ignore_index=IGNORE_INDEX)
    assert_close(linear_cross_entropy_triton(h, w, targets, chunk_size=16), expected)


@pytest.mark.parametrize("impl", ["torch-chunked", "triton"])
def test_no_gradient_work_under_no_grad(impl, monkeypatch, device):
    """Evaluation under no_grad must not compute the gradients the training forward computes in passing (two extra
    matmuls per chunk): the chunk op is then asked for no gradient, and the result is still the mean loss."""
    from llamactl.kernels import fused_linear_ce as ce

    name = "_ce_chunk_torch" if impl == "torch-chunked" else "_ce_chunk_triton"
    original, asked = getattr(ce, name), []

    def spy(logits, targets, scale):
        asked.append(scale is not None)
        return original(logits, targets, scale)

    monkeypatch.setattr(ce, name, spy)
    h, w, t = _inputs(40, 16, 50, torch.float32, device)[:3]
    with torch.no_grad():
        loss = LOSSES[impl](h, w, t)
    assert asked and not any(asked)
    torch.testing.assert_close(loss, linear_cross_entropy_ref(h.detach(), w.detach(), t))
    asked.clear()
    LOSSES[impl](h, w, t).backward()  # with grad enabled the same call does compute them
    assert asked and all(asked)
