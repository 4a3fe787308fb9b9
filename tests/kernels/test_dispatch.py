"""llamactl.ops: which implementation runs, and the model's paths through the kernels."""

import logging

import pytest
import torch
from llamactl.kernels import attention as attention_module
from llamactl.kernels import rmsnorm
from llamactl.kernels.rotary import rotary_tables

from llamactl import ops
from llamactl.errors import UserError
from llamactl.model import KVCache, ModelArgs, Transformer


def _spy(monkeypatch, module, name):
    """Replace ``module.name`` (and ops' own binding of it) by a wrapper that counts its calls."""
    calls = []
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(ops, name, wrapper)
    return calls


def test_unknown_mode_is_an_error(kernels):
    kernels("cuda")
    with pytest.raises(UserError, match="LLAMACTL_KERNELS='cuda': use one of auto, ref, triton"):
        ops.swiglu(torch.ones(3), torch.ones(3))


@pytest.mark.parametrize("mode, expect_kernel", [("ref", False), ("triton", True)])
def test_mode_forces_implementation(mode, expect_kernel, kernels, monkeypatch, device):
    kernels(mode)
    kernel_calls = _spy(monkeypatch, rmsnorm, "rms_norm_triton")
    torch_calls = _spy(monkeypatch, rmsnorm, "rms_norm_torch")  # the plain-torch path that "ref" selects
    ops.rms_norm(torch.randn(4, 8, device=device), torch.ones(8, device=device), 1e-5)
    assert (kernel_calls, torch_calls) == ((["rms_norm_triton"], []) if expect_kernel else ([], ["rms_norm_torch"]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU default; a CUDA machine picks the kernels")
def test_auto_uses_reference_on_cpu(kernels, monkeypatch):
    kernels("auto")
    kernel_calls = _spy(monkeypatch, rmsnorm, "rms_norm_triton")
    ops.rms_norm(torch.randn(4, 8), torch.ones(8), 1e-5)
    assert kernel_calls == []


def test_forced_kernel_rejects_shape_it_cannot_take(kernels, device):
    kernels("triton")
    q = torch.randn(1, 2, 8, 256, device=device)  # head dim 256 > 128
    with pytest.raises(UserError, match="attention kernel cannot take head dim 256"):
        ops.attention(q, q, q)


def test_auto_on_gpu_reports_fallback_once(kernels, monkeypatch, caplog):
    """No silent fallback: an input the kernel cannot take on a GPU runs the reference and says so, once."""
    kernels("auto")

    class FakeCuda(torch.Tensor):  # what _use_triton sees of a CUDA tensor, without needing one
        @property
        def is_cuda(self):
            return True

    monkeypatch.setattr(ops, "_reported", set())
    q = torch.randn(1, 2, 8, 256)
    with caplog.at_level(logging.WARNING, logger="llamactl.ops"):
        assert ops._use_triton("attention", q.as_subclass(FakeCuda), "head dim 256 > 128") is False
        assert ops._use_triton("attention", q.as_subclass(FakeCuda), "head dim 256 > 128") is False
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "attention: the Triton kernel cannot take head dim 256 > 128; running the torch reference instead"
    ]


def test_auto_on_gpu_runs_sdpa_for_unpacked_attention(kernels, monkeypatch):
    """auto on a GPU: 16-bit attention without segment ids goes to SDPA (measured faster), packed rows and fp32 to
    the kernel."""
    kernels("auto")

    class FakeCuda(torch.Tensor):
        @property
        def is_cuda(self):
            return True

    kernel_calls = _spy(monkeypatch, attention_module, "attention_triton")
    monkeypatch.setattr(ops, "attention_triton", lambda *a, **k: kernel_calls.append("attention_triton"))
    ref_calls = []
    monkeypatch.setattr(ops, "attention_ref", lambda *a, **k: ref_calls.append("attention_ref"))
    q = torch.randn(1, 2, 8, 16, dtype=torch.bfloat16).as_subclass(FakeCuda)
    ops.attention(q, q, q)
    ops.attention(q, q, q, segment_ids=torch.zeros(1, 8, dtype=torch.long))
    ops.attention(q.float().as_subclass(FakeCuda), q.float(), q.float())
    assert ref_calls == ["attention_ref"]
    assert kernel_calls == ["attention_triton", "attention_triton"]


def test_ops_quant_matmul_validates_format(kernels):
    kernels("ref")
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="int8 needs qweight int8"):
        ops.quant_matmul(x, torch.zeros(8, 64, dtype=torch.uint8), torch.ones(8), None, "int8")
    with pytest.raises(ValueError, match="scheme 'int3'"):
        ops.quant_matmul(x, torch.zeros(8, 64, dtype=torch.int8), torch.ones(8), None, "int3")
    with pytest.raises(ValueError, match="int4 needs zeros uint8"):
        ops.quant_matmul(x, torch.zeros(8, 32, dtype=torch.uint8), torch.ones(8, 2), None, "int4")


def test_ops_rotary_with_model_tables(kernels, assert_close, device):
    """The model's rotary call under both modes, with its own fp32 tables."""
    cos, sin = (t.to(device) for t in rotary_tables(16, 64))
    x, pos = torch.randn(2, 9, 3, 16, device=device), torch.arange(9, device=device) + 30
    kernels("ref")
    expected = ops.rotary(x, cos, sin, pos)
    kernels("triton")
    assert_close(ops.rotary(x, cos, sin, pos), expected)


def _tiny_model(device: torch.device, seed: int = 0, vocab: int = 128) -> Transformer:
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab, multiple_of=32, max_seq_len=64)
    model = Transformer(args)
    model.init_weights(seed)
    return model.to(device)


def _under(kernels, mode, fn):
    kernels(mode)
    return fn()


def test_model_packed_rows_loss_and_grads(kernels, assert_close, device):
    """sft packing through the model: segment ids, per-segment positions and an answer-only mask."""
    model = _tiny_model(device)
    g = torch.Generator().manual_seed(1)
    tokens, targets = torch.randint(0, 128, (2, 30), generator=g), torch.randint(0, 128, (2, 30), generator=g)
    seg = torch.cat([torch.zeros(2, 12), torch.ones(2, 18)], 1).long()
    positions = torch.cat([torch.arange(12), torch.arange(18)]).expand(2, 30)
    mask = torch.rand(2, 30, generator=g) > 0.5
    tokens, targets, seg, positions, mask = (t.to(device) for t in (tokens, targets, seg, positions, mask))

    def loss_and_grads():
        model.zero_grad()
        loss = model.loss(tokens, targets, mask, positions=positions, segment_ids=seg)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    ref_loss, ref_grads = _under(kernels, "ref", loss_and_grads)
    loss, grads = _under(kernels, "triton", loss_and_grads)
    assert_close(loss, ref_loss)
    for a, e in zip(grads, ref_grads, strict=True):
        assert_close(a, e)


def test_model_generation_path(kernels, assert_close, device):
    """Prefill, a multi-token cache step (cached attention) and single-token decode steps, kernels against refs."""
    model = _tiny_model(device, seed=2).eval()
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, 128, (2, 11), generator=g).to(device)
    steps = torch.randint(0, 128, (2, 6), generator=g).to(device)

    @torch.no_grad()
    def run():
        cache = KVCache(model.args, batch=2, max_len=40, device=device, dtype=torch.float32)
        outs = [model.hidden(prompt, cache=cache)]
        start = torch.full((2,), 11, device=device)
        outs.append(model.hidden(steps[:, :3], cache=cache, start=start))  # T = 3 new tokens: cached attention
        for i in range(3, 6):  # one token at a time: decode attention
            outs.append(model.hidden(steps[:, i : i + 1], cache=cache, start=start + i))
        return outs

    with_kernels, with_refs = _under(kernels, "triton", run), _under(kernels, "ref", run)
    for a, e in zip(with_kernels, with_refs, strict=True):
        assert_close(a, e)
