"""A tiny model trained with the kernels follows, step for step, the same model trained with the references."""

import pytest
import torch

from llamactl.model import ModelArgs, Transformer

# Per-step loss tolerance, fp32. The two runs differ only in summation order inside the ops (~1e-7 relative per
# step); AdamW's normalised updates carry such differences forward without damping, so they may grow over the run.
# Measured: at most 5e-7 over 30 steps. 1e-4 leaves room for other CPUs' BLAS while a wrong gradient anywhere
# (a transposed weight, a dropped mask) moves the loss by more than 1e-2 within a few steps.
LOSS_ATOL = 1e-4


def _train(steps: int, device: torch.device) -> list[float]:
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=32, max_seq_len=64)
    model = Transformer(args)
    model.init_weights(seed=0)
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    # A fixed batch that the model can memorise: the loss falls by an order of magnitude within 30 steps.
    data = torch.randint(0, 128, (2, 33), generator=torch.Generator().manual_seed(1)).to(device)
    losses = []
    for _ in range(steps):
        loss = model.loss(data[:, :-1], data[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.slow  # ~60 s in Triton's interpreter on 2 cores; make test-all and make gpu-check run it
def test_losses_match_references(kernels, device):
    kernels("ref")
    ref = _train(30, device)
    kernels("triton")
    with_kernels = _train(30, device)
    assert ref[-1] < 0.2 * ref[0]  # the run does train
    for step, (a, e) in enumerate(zip(with_kernels, ref, strict=True)):
        assert abs(a - e) <= LOSS_ATOL, f"step {step}: kernels {a:.7f} vs references {e:.7f}"
