"""``llamactl quantize`` and quantized checkpoints, checked against dequantization done by hand from the format's
definition (kernels/quant_matmul.py), against a plain model holding those dequantized weights, and GPTQ against its
defining properties."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from helpers import FIXTURES, peaked_model, run_cli

from llamactl.checkpoint import load_for_inference, load_tensors, read_meta, save_model
from llamactl.commands.quantize import QuantizeConfig, run
from llamactl.generate import SamplingParams, generate
from llamactl.model import ModelArgs, Transformer
from llamactl.quant import QuantLinear, QuantSpec, quantize_gptq, quantize_rtn
from llamactl.swap import PackedLinear
from llamactl.tokenizer import Tokenizer

LINEARS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1", "feed_forward.w2",
           "feed_forward.w3")  # fmt: skip


def _model() -> Transformer:
    """Two GQA layers whose input dims (128, 256) take every int4 group size, weights large enough for clear maxima."""
    return peaked_model(dim=128, hidden_dim=256, max_seq_len=64)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("q") / "model.safetensors")
    save_model(path, _model())
    return path


def _by_hand(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The weight a quantized layer stands for, read off the format's definition one nibble at a time."""
    q, s = tensors[f"{name}.qweight"], tensors[f"{name}.scales"].float()
    if q.dtype == torch.int8:
        return q.float() * s[:, None]
    z = tensors[f"{name}.zeros"].float()
    N, half = q.shape
    levels = torch.empty(N, 2 * half)
    levels[:, 0::2] = (q & 0x0F).float()  # even inputs in the low nibble
    levels[:, 1::2] = (q // 16).float()  # odd inputs in the high one
    group = 2 * half // s.shape[1]
    return (levels - z.repeat_interleave(group, dim=1)) * s.repeat_interleave(group, dim=1)


def _quantize(source: str, out: str, scheme: str, group: int | None = None, **kw) -> str:
    run(QuantizeConfig(model=source, output=out, scheme=scheme, group_size=group, **kw))
    return out


SCHEMES = [("int8", None), ("int4", 32), ("int4", 64), ("int4", 128)]


@pytest.mark.parametrize("scheme,group", SCHEMES, ids=["int8", "int4-g32", "int4-g64", "int4-g128"])
def test_file_holds_the_rounded_weights_and_says_how(source, tmp_path, scheme, group):
    out = _quantize(source, str(tmp_path / "q.safetensors"), scheme, group)
    spec = read_meta(out).quant
    assert spec == QuantSpec(scheme, group, "rtn", False, hashlib.sha256(open(source, "rb").read()).hexdigest())
    src, got = load_tensors(source), load_tensors(out)
    for i in range(2):
        for part in LINEARS:
            name = f"layers.{i}.{part}"
            assert f"{name}.weight" not in got
            w, back = src[f"{name}.weight"], _by_hand(got, name)
            scales = got[f"{name}.scales"].float()
            step = scales[:, None] if scheme == "int8" else scales.repeat_interleave(group, dim=1)
            # round to nearest: half a step (int8), a step at most at the ends of an int4 group (its zero point is
            # rounded too), plus the fp16 rounding of the scale over the levels
            bound = step * (0.5 + 127 * 2**-11) if scheme == "int8" else step * (1 + 15 * 2**-10)
            assert ((back - w).abs() <= bound).all(), name
            assert (back - w).norm() / w.norm() < (0.01 if scheme == "int8" else 0.2)
    for name in ("tok_embeddings.weight", "norm.weight", "output.weight", "layers.1.ffn_norm.weight"):
        assert torch.equal(got[name], src[name])  # embeddings, norms and (by default) the head as they were


def _plain_with(out: str, dtype=torch.float32) -> Transformer:
    """A plain model whose linear weights are the quantized file's, dequantized by hand."""
    tensors = load_tensors(out)
    state = {k: v for k, v in tensors.items() if not k.endswith((".qweight", ".scales", ".zeros"))}
    for k in tensors:
        if k.endswith(".qweight"):
            state[k.removesuffix(".qweight") + ".weight"] = _by_hand(tensors, k.removesuffix(".qweight"))
    m = Transformer(read_meta(out).args)
    m.load_state_dict(state)
    return m.to(dtype).eval()


@pytest.mark.parametrize("scheme,group", [("int8", None), ("int4", 32), ("int4", 128)], ids=["int8", "g32", "g128"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("decode", [False, True], ids=["plain", "decode"])
def test_quantized_model_computes_with_its_dequantized_weights(source, tmp_path, scheme, group, dtype, decode):
    if dtype == "bf16" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("no native bf16 on this CPU")
    out = _quantize(source, str(tmp_path / "q.safetensors"), scheme, group, head=True)
    model, meta = load_for_inference(out, torch.device("cpu"), dtype, "lm", "to test", False, decode)
    linear = model.layers[0].attention.wqkv if decode else model.layers[0].attention.wq
    assert isinstance(linear, QuantLinear) and isinstance(model.output, QuantLinear)
    # torch's CPU kernels in bf16; in fp32 (where they are slow) the reference: dequantize, multiply
    assert (linear._cpu is not None) == (dtype == "bf16")
    tokens = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model.logits(model.hidden(tokens))
        want = _plain_with(out)(tokens)  # fp32
        if dtype == "fp32":  # the same weights, summed in another order
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        else:
            # bf16 logits of this model are ~3% off fp32's whichever way they are computed (8 significant bits, two
            # layers of weights of 0.3): the quantized path must be no further from the fp32 truth than a plain
            # bf16 model holding the same dequantized weights (a wrong weight or scale would be off by ~100%)
            plain_bf16 = _plain_with(out, torch.bfloat16)(tokens)
            rel = lambda a: ((a.float() - want).norm() / want.norm()).item()  # noqa: E731
            assert rel(got) <= 1.25 * rel(plain_bf16), (rel(got), rel(plain_bf16))
    if dtype == "fp32":
        plain = _plain_with(out)
        params = SamplingParams(max_new_tokens=20, temperature=0)
        assert generate(model, [[1, 5, 9]], params, None) == generate(plain, [[1, 5, 9]], params, None)


def test_convert_info_describes_a_quantized_file(source, tmp_path):
    out = _quantize(source, str(tmp_path / "q.safetensors"), "int4", 64)
    proc = run_cli("convert", out, "--info")
    assert proc.returncode == 0, proc.stderr
    sha = hashlib.sha256(open(source, "rb").read()).hexdigest()
    assert f"quantized    int4 g64 (rtn) from sha256 {sha[:12]}" in proc.stdout
    params = sum(t.numel() for t in load_tensors(source).values())
    assert f"parameters   {params:,}" in proc.stdout  # the model's, not the packed tensors' element count


def test_decode_packing_is_one_swap_for_float_and_quantized_layers(source, tmp_path):
    """A float checkpoint loaded for decode has fused packed projections; a quantized one fused quantized ones."""
    model, _ = load_for_inference(source, torch.device("cpu"), "fp32", "lm", "to test", False, decode=True)
    assert isinstance(model.layers[1].feed_forward.w13, PackedLinear) and not hasattr(
        model.layers[1].feed_forward, "w1"
    )
    out = _quantize(source, str(tmp_path / "q.safetensors"), "int8")
    model, _ = load_for_inference(out, torch.device("cpu"), "fp32", "lm", "to test", False, decode=True)
    assert isinstance(model.layers[1].feed_forward.w13, QuantLinear)
    assert isinstance(model.packed_head, PackedLinear)  # the head stays float unless --head
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():  # --dtype auto: torch's int kernels are fast in bf16 only
        model, _ = load_for_inference(out, torch.device("cpu"), "auto", "lm", "to test", False, decode=True)
        assert model.tok_embeddings.weight.dtype == torch.bfloat16


def test_generate_and_score_load_quantized_files_with_no_flag(tmp_path):
    tok = Tokenizer.from_file(os.path.join(FIXTURES, "llama2-tokenizer.model"))
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=32000, hidden_dim=128, max_seq_len=64)  # g32 fits
    m = Transformer(args)
    m.init_weights(0)
    src = str(tmp_path / "m.safetensors")
    save_model(src, m, tokenizer=tok.model_bytes)
    q = _quantize(src, str(tmp_path / "q.safetensors"), "int4", 32)
    proc = run_cli("generate", "-m", q, "--max-new-tokens", "5", "--temperature", "0", stdin='{"prompt": "Hello"}\n')
    assert proc.returncode == 0, proc.stderr
    want = generate(_plain_with(q), [tok.encode("Hello", bos=True)], SamplingParams(5, temperature=0), None)
    assert json.loads(proc.stdout)["tokens"][len(tok.encode("Hello", bos=True)) :] == want[0].tokens
    # a reward model quantizes too (its one-row scalar head stays), and score reads it
    from helpers import save_reward_model

    rm = save_reward_model(src, str(tmp_path / "rm.safetensors"), seed=1)
    qrm = _quantize(rm, str(tmp_path / "qrm.safetensors"), "int8")
    dialog = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    scores = []
    for path in (rm, qrm):
        proc = run_cli("score", "-m", path, stdin=json.dumps(dialog) + "\n")
        assert proc.returncode == 0, proc.stderr
        scores.append(json.loads(proc.stdout)["score"])
    assert scores[1] == pytest.approx(scores[0], abs=0.05 * max(1.0, abs(scores[0])))


def test_gptq_without_input_correlation_is_round_to_nearest():
    """With X^T X diagonal no column's error can be compensated elsewhere: GPTQ must pick RTN's levels."""
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(2))
    h = torch.diag(torch.rand(128, generator=torch.Generator().manual_seed(3)) + 0.5)
    for spec in (QuantSpec("int8"), QuantSpec("int4", 32), QuantSpec("int4", 128)):
        g, r = quantize_gptq(w, h, spec), quantize_rtn(w, spec)
        for key in r.tensors:
            assert torch.equal(g.tensors[key], r.tensors[key]), (spec, key)


def test_gptq_lowers_the_output_error_on_correlated_inputs():
    gen = torch.Generator().manual_seed(4)
    K = 256
    x = torch.randn(2048, K, generator=gen) @ (torch.randn(K, K, generator=gen) / K**0.5)
    x += 0.1 * torch.randn(2048, K, generator=gen)
    w = torch.randn(64, K, generator=gen) * 0.02
    for spec in (QuantSpec("int8"), QuantSpec("int4", 64)):
        g, r = quantize_gptq(w, x.t() @ x, spec), quantize_rtn(w, spec)
        err = {k: ((x @ (q.dequantized(spec.scheme) - w).t()).norm() / (x @ w.t()).norm()).item()
               for k, q in (("gptq", g), ("rtn", r))}  # fmt: skip
        assert g.out_error == pytest.approx(err["gptq"], rel=1e-3)  # its own report, against the direct product
        assert err["gptq"] < 0.85 * err["rtn"], err


def test_calibrated_quantize_reports_each_layer(source, tmp_path):
    data = tmp_path / "calib.jsonl"
    data.write_text("".join(json.dumps({"tokens": list(range(1 + i, 90))}) + "\n" for i in range(4)))
    out = str(tmp_path / "q.safetensors")
    proc = run_cli("quantize", "-m", source, "-o", out, "--scheme", "int4", "--group-size", "32",
                   "--calibration", str(data), "--calibration-len", "32", "--calibration-samples", "8")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "output rel" in line]
    assert [line.split()[1] for line in lines] == [f"layers.{i}.{p}" for i in range(2) for p in LINEARS]
    assert read_meta(out).quant.method == "gptq"
    summary = json.loads(proc.stdout)
    assert summary["bytes_out"] == os.path.getsize(out)
