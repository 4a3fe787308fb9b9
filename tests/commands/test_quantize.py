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

from llamactl.checkpoint import load_tensors, read_meta, save_model
from llamactl.commands.quantize import QuantizeConfig, run
from llamactl.generate import SamplingParams, generate
from llamactl.loading import load_for_inference
from llamactl.model import Transformer
from llamactl.quant import QuantLinear, QuantSpec, quantize_gptq, quantize_rtn
from llamactl.swap import PackedLinear, cpu_packing
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
            # round to nearest: half a step, plus the fp16 rounding of the scale (2^-11 of it) over the 127 levels of
            # int8 or the 15 steps of an int4 group (its zero point is the group's low end over the step, rounded,
            # so the group's range still ends within half a step of a level)
            bound = step * (0.5 + 127 * 2**-11) if scheme == "int8" else step * (0.5 + 15 * 2**-11) + 1e-7
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
    """A float checkpoint loaded for decode has fused projections, packed where this CPU's rule says it pays; a
    quantized one fused quantized ones."""
    model, _ = load_for_inference(source, torch.device("cpu"), "fp32", "lm", "to test", False, decode=True)
    w13 = model.layers[1].feed_forward.w13
    assert isinstance(w13, PackedLinear if cpu_packing(torch.float32) else torch.nn.Linear)
    assert not hasattr(model.layers[1].feed_forward, "w1")
    out = _quantize(source, str(tmp_path / "q.safetensors"), "int8")
    model, _ = load_for_inference(out, torch.device("cpu"), "fp32", "lm", "to test", False, decode=True)
    assert isinstance(model.layers[1].feed_forward.w13, QuantLinear)
    # the head stays float unless --head (packed where float layers are)
    assert isinstance(model.packed_head, PackedLinear) if cpu_packing(torch.float32) else model.packed_head is None
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():  # --dtype auto: torch's int kernels are fast in bf16 only
        model, _ = load_for_inference(out, torch.device("cpu"), "auto", "lm", "to test", False, decode=True)
        assert model.tok_embeddings.weight.dtype == torch.bfloat16


def test_generate_and_score_load_quantized_files_with_no_flag(tmp_path):
    tok = Tokenizer.from_file(os.path.join(FIXTURES, "llama2-tokenizer.model"))
    # large weights: clear maxima, so that greedy decoding in bf16 (the CLI's default for a quantized model) and in
    # fp32 (the plain model) cannot part on a near tie
    m = peaked_model(n_layers=1, vocab_size=32000, hidden_dim=128, max_seq_len=64)  # g32 fits dim 64 and 128
    src = str(tmp_path / "m.safetensors")
    save_model(src, m, tokenizer=tok.model_bytes)
    q = _quantize(src, str(tmp_path / "q.safetensors"), "int4", 32)
    proc = run_cli("generate", "-m", q, "--max-new-tokens", "5", "--temperature", "0", stdin='{"prompt": "Hello"}\n')
    assert proc.returncode == 0, proc.stderr
    want = generate(_plain_with(q), [tok.encode("Hello", bos=True)], SamplingParams(5, temperature=0), None)
    assert json.loads(proc.stdout)["tokens"][len(tok.encode("Hello", bos=True)) :] == want[0].tokens
    # a reward model quantizes too (its one-row scalar head stays), and score reads it: in fp32, from a model of
    # pretraining-sized weights (N(0, 0.02)), int8's ~0.7% relative weight error moves the score by a few percent
    from helpers import save_reward_model

    base = Transformer(m.args)
    base.init_weights(0)
    save_model(src, base, tokenizer=tok.model_bytes)
    rm = save_reward_model(src, str(tmp_path / "rm.safetensors"), seed=1)
    qrm = _quantize(rm, str(tmp_path / "qrm.safetensors"), "int8")
    dialog = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    scores = []
    for path in (rm, qrm):
        proc = run_cli("score", "-m", path, "--dtype", "fp32", stdin=json.dumps(dialog) + "\n")
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


def test_degenerate_calibration_inputs_are_one_line():
    """A rank-one X^T X that no damping within reach makes invertible: a UserError naming the layer, no traceback."""
    from llamactl.errors import UserError

    v = torch.randn(64, 1, generator=torch.Generator().manual_seed(5))
    with pytest.raises(UserError, match="layers.0.attention.wq"):
        quantize_gptq(torch.randn(8, 64), v @ v.t(), QuantSpec("int4", 32), 1e-12, "layers.0.attention.wq")


def test_damaged_files_are_one_line(source, tmp_path):
    from helpers import assert_user_error

    from llamactl.checkpoint import plan_from_tensors, write_safetensors

    # a source missing a projection: refused before anything is written, by round to nearest as by GPTQ
    tensors = dict(load_tensors(source))
    del tensors["layers.1.attention.wq.weight"]
    header = read_meta(source).to_header()
    broken = str(tmp_path / "broken.safetensors")
    write_safetensors(broken, plan_from_tensors(tensors), header)
    out = tmp_path / "q.safetensors"
    proc = run_cli("quantize", "-m", broken, "-o", str(out), "--scheme", "int8")
    assert_user_error(proc, broken, "layers.1.attention.wq.weight")
    assert not out.exists()
    # quantized files whose header does not fit them
    q = _quantize(source, str(tmp_path / "q4.safetensors"), "int4", 32)
    spec = json.loads(read_meta(q).to_header()["quantization"])
    for name, change in {
        "group": {"group_size": 96},
        "float": {"group_size": 32.0},
        "sha": {"source_sha256": 5},
    }.items():
        path = str(tmp_path / f"{name}.safetensors")
        write_safetensors(path, plan_from_tensors(load_tensors(q)), {**read_meta(q).to_header(),
                          "quantization": json.dumps({**spec, **change})})  # fmt: skip
        proc = run_cli("convert", path, "--info")
        assert_user_error(proc, path, "damaged checkpoint header (quantization")


def test_gptq_file_holds_the_levels_gptq_chose(source, tmp_path):
    """The file's tensors are the Quantized results of GPTQ run on the same windows (the writer's plans, sorted by
    element size, put every layer's tensors under the right names)."""
    from llamactl.commands.quantize import _calibration_sequences
    from llamactl.loading import load_model
    from llamactl.quant import quantize_calibrated

    data = tmp_path / "calib.jsonl"
    data.write_text("".join(json.dumps({"tokens": [(7 * i + j) % 97 for j in range(64)]}) + "\n" for i in range(6)))
    out = str(tmp_path / "q.safetensors")
    cfg = QuantizeConfig(model=source, output=out, scheme="int4", group_size=64, calibration=str(data),
                         calibration_len=32, calibration_samples=8)  # fmt: skip
    run(cfg)
    model, _ = load_model(source)
    sequences = _calibration_sequences(cfg, None, 97, 64)
    done = quantize_calibrated(model, sequences, read_meta(out).quant, cfg.damp, 8, lambda name, q: None)
    got = load_tensors(out)
    for name, q in done.items():
        for part, t in q.tensors.items():
            assert torch.equal(got[f"{name}.{part}"], t), (name, part)


def test_sharded_output_loads_as_the_single_file(source, tmp_path):
    one = _quantize(source, str(tmp_path / "one.safetensors"), "int8")
    sharded = str(tmp_path / "many.safetensors")
    run(QuantizeConfig(model=source, output=sharded, scheme="int8", shard_size="100KB"))
    assert os.path.exists(sharded + ".index.json") and not os.path.exists(sharded)
    assert read_meta(sharded).quant == read_meta(one).quant
    tokens = torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(3))
    logits = []
    for path in (one, sharded):
        model, _ = load_for_inference(path, torch.device("cpu"), "fp32", "lm", "to test", False)
        with torch.no_grad():
            logits.append(model(tokens))
    assert torch.equal(logits[0], logits[1])
