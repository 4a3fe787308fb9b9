"""convert --to gguf and GGUF in: what the gguf package's reader sees, Q8_0 within its bound computed by hand, round
trips of weights, config and tokenizer, the chat template against chat_format, bad inputs; llama.cpp itself (slow)."""

import json
import os
import re
import shutil

import gguf  # a runtime dependency: its absence is a failure, not a skip
import numpy as np
import pytest
import sentencepiece as spm
import torch
from helpers import FIXTURES, assert_user_error, run_cli

from llamactl.chat_format import encode_dialog
from llamactl.checkpoint import CheckpointMeta, load_tensors, plan_from_tensors, read_meta, save_plans
from llamactl.commands.convert import ConvertConfig, run
from llamactl.loading import load_model
from llamactl.model import ModelArgs, Transformer
from llamactl.quant import QuantSpec
from llamactl.tokenizer import Tokenizer, train_bpe

LLAMA_TOKENIZER = os.path.join(FIXTURES, "llama2-tokenizer.model")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEXTS = [
    "Hello world",
    "  two leading spaces, then  double  spaces and a trailing one ",
    "lines\nand\n\nblank lines\n",
    "\ttabs\tand digits 1234567890 3.14159 2024-01-02",
    "unicode: naïve café, Ελληνικά, русский, 日本語のテキスト, 한국어",
    "emoji 🦙🔥 and rare characters ꙮ 𝔘𝔫𝔦",
    "[INST] tags <s> as text </s> [/INST]",
    "",
    " ",
    "x",
]
# The names llama.cpp's llama architecture looks up, written out here rather than taken from the converter.
LAYER_NAMES = {
    "attention.wq": "attn_q",
    "attention.wk": "attn_k",
    "attention.wv": "attn_v",
    "attention.wo": "attn_output",
    "feed_forward.w1": "ffn_gate",
    "feed_forward.w2": "ffn_down",
    "feed_forward.w3": "ffn_up",
    "attention_norm": "attn_norm",
    "ffn_norm": "ffn_norm",
}


def gguf_name(name: str) -> str:
    top = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight"}
    if name in top or name == "output.weight":
        return top.get(name, name)
    _, layer, *mid, last = name.split(".")
    return f"blk.{layer}.{LAYER_NAMES['.'.join(mid)]}.{last}"


def save_chat_model(path, dtype=torch.float32, tie=False, hidden_dim=None, scale=0.3) -> tuple[Transformer, str]:
    """A tiny GQA model with Llama 2's tokenizer; every weight random (norms too, so swapped names show) and large
    enough that greedy decoding has clear maxima."""
    args = ModelArgs(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000, multiple_of=32, max_seq_len=128,
        tie_embeddings=tie, hidden_dim=hidden_dim, rope_theta=10000.0,
    )  # fmt: skip
    model = Transformer(args).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if name.endswith("norm.weight") else noise * scale)
    tok = Tokenizer.from_file(LLAMA_TOKENIZER)
    state = {k: v.to(dtype) for k, v in model.state_dict().items()}
    save_plans(str(path), plan_from_tensors(state), CheckpointMeta(args, tok.model_bytes))
    return model, str(path)


@pytest.fixture(scope="module")
def fp32_model(tmp_path_factory):
    return save_chat_model(tmp_path_factory.mktemp("m") / "m.safetensors")


@pytest.fixture(scope="module")
def f32_gguf(fp32_model, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("g") / "m.gguf")
    run(ConvertConfig(src=fp32_model[1], output=out, to="gguf"))
    return out


def field(reader, key):
    f = reader.get_field(key)
    assert f is not None, key
    return f.contents()


def test_reader_sees_llama_metadata_vocabulary_and_f32_tensors(fp32_model, f32_gguf):
    model, src = fp32_model
    r = gguf.GGUFReader(f32_gguf)
    expected = {
        "general.architecture": "llama",
        "general.file_type": 0,  # ALL_F32
        "llama.context_length": 128,
        "llama.embedding_length": 64,
        "llama.block_count": 2,
        "llama.feed_forward_length": model.args.hidden_dim,
        "llama.rope.dimension_count": 16,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.rope.freq_base": 10000.0,
        "llama.vocab_size": 32000,
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
        "tokenizer.ggml.add_space_prefix": True,
    }
    for key, value in expected.items():
        assert field(r, key) == value, key
    assert field(r, "llama.attention.layer_norm_rms_epsilon") == np.float32(1e-5)
    assert r.get_field("tokenizer.ggml.padding_token_id") is None  # Llama 2 has no pad piece

    sp = spm.SentencePieceProcessor(model_file=LLAMA_TOKENIZER)
    n = sp.get_piece_size()
    assert field(r, "tokenizer.ggml.tokens") == [sp.id_to_piece(i) for i in range(n)]
    assert field(r, "tokenizer.ggml.scores") == [np.float32(sp.get_score(i)) for i in range(n)]

    def kind(i):  # GGUF's token types: 1 normal, 2 unknown, 3 control, 6 byte
        return 2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1

    assert field(r, "tokenizer.ggml.token_type") == [kind(i) for i in range(n)]

    state = model.state_dict()
    tensors = {t.name: t for t in r.tensors}
    assert sorted(tensors) == sorted(gguf_name(k) for k in state)
    assert "blk.1.ffn_gate.weight" in tensors and "output.weight" in tensors
    for k, v in state.items():
        t = tensors[gguf_name(k)]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32, k
        assert list(t.shape) == list(reversed(v.shape)), k  # ggml's ne: the contiguous dimension first
        assert np.array_equal(t.data, v.numpy()), k  # Meta's q/k layout, as stored


def q8_0_blocks(t) -> tuple[np.ndarray, np.ndarray]:
    """Scales (fp16, one per block) and int8 values (32 per block) of a Q8_0 tensor, decoded from its raw bytes."""
    raw = np.asarray(t.data).reshape(-1, 34)
    return raw[:, :2].copy().view(np.float16).ravel(), raw[:, 2:].copy().view(np.int8)


def test_q8_0_within_the_bound_of_each_block(fp32_model, tmp_path):
    model, src = save_chat_model(tmp_path / "m.safetensors", hidden_dim=176)  # w2's rows (176) are not whole blocks
    out = str(tmp_path / "q.gguf")
    run(ConvertConfig(src=src, output=out, to="gguf", gguf_type="q8_0"))
    r = gguf.GGUFReader(out)
    assert field(r, "general.file_type") == 7  # MOSTLY_Q8_0
    tensors = {t.name: t for t in r.tensors}
    q8 = 0
    for k, v in model.state_dict().items():
        t = tensors[gguf_name(k)]
        if v.dim() == 1 or v.shape[1] % 32:  # norms always, and rows Q8_0 cannot hold, stay F32
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, k
            assert np.array_equal(t.data, v.numpy()), k
            continue
        assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0, k
        q8 += 1
        w = v.numpy().reshape(-1, 32).astype(np.float64)
        scale, q = q8_0_blocks(t)
        d = np.abs(w).max(axis=1) / 127  # each block's scale, by hand
        d16 = d.astype(np.float16).astype(np.float64)
        np.testing.assert_allclose(scale.astype(np.float64), d16, rtol=1e-3)  # stored as fp16
        err = np.abs(w - q.astype(np.float64) * scale.astype(np.float64)[:, None])
        # rounding to the nearest step (d/2), plus the scale's fp16 rounding times the largest int8, plus float32
        bound = d / 2 + 127 * np.abs(d - d16) + 1e-6 * np.abs(w).max(axis=1)
        assert (err.max(axis=1) <= bound).all(), k
    assert q8 == 14  # 16 matrices, the two w2 left in F32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_round_trip_reproduces_weights_config_and_tokenizer(tmp_path, dtype):
    model, src = save_chat_model(tmp_path / "m.safetensors", dtype=dtype)
    out, back = str(tmp_path / "m.gguf"), str(tmp_path / "back.safetensors")
    run(ConvertConfig(src=src, output=out, to="gguf"))
    ggml = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}[dtype]
    assert {t.tensor_type.name for t in gguf.GGUFReader(out).tensors if len(t.shape) == 2} == {ggml}
    run(ConvertConfig(src=out, output=back))
    a, b = load_tensors(src), load_tensors(back)
    assert sorted(a) == sorted(b)
    for k in a:
        want = torch.float32 if k.endswith("norm.weight") else dtype  # norms are F32 in GGUF, exactly widened
        assert b[k].dtype == want and torch.equal(b[k], a[k].to(want)), k
    before, after = read_meta(src), read_meta(back)
    skip = {"multiple_of", "ffn_dim_multiplier"}  # they only derive hidden_dim, which GGUF stores itself
    assert {k: v for k, v in after.args.to_dict().items() if k not in skip} == {
        k: v for k, v in before.args.to_dict().items() if k not in skip
    }
    assert after.lineage["command"] == "convert" and after.lineage["inputs"][0]["path"] == out
    ref = spm.SentencePieceProcessor(model_file=LLAMA_TOKENIZER)
    rebuilt = Tokenizer(after.tokenizer)
    assert rebuilt.vocab_size == 32000 and (rebuilt.bos_id, rebuilt.eos_id, rebuilt.unk_id) == (1, 2, 0)
    for text in TEXTS:
        assert rebuilt.encode(text) == ref.encode(text), text
        assert rebuilt.decode(ref.encode(text)) == ref.decode(ref.encode(text)), text
    assert [rebuilt.id_to_piece(i) for i in range(32000)] == [ref.id_to_piece(i) for i in range(32000)]


def test_imported_model_computes_what_the_original_does(fp32_model, f32_gguf, tmp_path):
    model, _ = fp32_model
    back = str(tmp_path / "back.safetensors")
    assert run_cli("convert", f32_gguf, "-o", back).returncode == 0  # .gguf detected
    got, _ = load_model(back)
    tokens = torch.randint(0, 32000, (2, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(got(tokens), model(tokens), rtol=0, atol=0)


def test_tied_embeddings_have_no_output_tensor(tmp_path):
    _, src = save_chat_model(tmp_path / "m.safetensors", tie=True)
    out, back = str(tmp_path / "m.gguf"), str(tmp_path / "b.safetensors")
    run(ConvertConfig(src=src, output=out, to="gguf", gguf_type="f16"))
    names = {t.name for t in gguf.GGUFReader(out).tensors}
    assert "output.weight" not in names and "token_embd.weight" in names
    run(ConvertConfig(src=out, output=back))
    assert read_meta(back).args.tie_embeddings and "output.weight" not in load_tensors(back)


def test_gguf_found_by_its_magic_or_named_with_from(f32_gguf, tmp_path):
    other = str(tmp_path / "model.bin")  # .bin alone would be read as llama2.c
    shutil.copy(f32_gguf, other)
    assert_user_error(run_cli("convert", "--info", other), "model.bin")
    proc = run_cli("convert", "--info", other, "--from", "gguf")
    assert proc.returncode == 0, proc.stderr
    assert "gguf         v3, file type f32, tensors 21 x F32; chat template Llama 2's" in proc.stdout
    assert "SentencePiece, 32000 pieces" in proc.stdout and "n_kv_heads=2" in proc.stdout
    noext = str(tmp_path / "model")
    shutil.copy(f32_gguf, noext)
    assert "file type f32" in run_cli("convert", "--info", noext).stdout


def trained_tokenizer(**overrides) -> Tokenizer:
    """A 280-piece SentencePiece model trained with Llama 2's settings (and ``overrides``) on a few words."""
    rng = np.random.default_rng(0)
    words = ["llama", "alpaca", "grass", "mountain", "river", "the", "a", "eats", "runs", "sleeps", "quickly", "3"]
    lines = [" ".join(rng.choice(words, 12)) for _ in range(2000)]
    return train_bpe(lines, vocab_size=280, num_threads=1, **overrides)


def test_a_trained_tokenizer_round_trips_and_pads_to_the_embeddings(tmp_path):
    tok = trained_tokenizer()
    args = ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=288, multiple_of=32, max_seq_len=64)
    model = Transformer(args)
    model.init_weights(0)
    src, out, back = str(tmp_path / "m.safetensors"), str(tmp_path / "m.gguf"), str(tmp_path / "b.safetensors")
    save_plans(src, plan_from_tensors(model.state_dict()), CheckpointMeta(args, tok.model_bytes))
    run(ConvertConfig(src=src, output=out, to="gguf"))
    r = gguf.GGUFReader(out)
    tokens, types = field(r, "tokenizer.ggml.tokens"), field(r, "tokenizer.ggml.token_type")
    assert len(tokens) == 288  # llama.cpp wants a token per embedding row
    assert tokens[280:] == [f"[PAD{i}]" for i in range(280, 288)] and set(types[280:]) == {5}  # UNUSED
    run(ConvertConfig(src=out, output=back))
    rebuilt = Tokenizer(read_meta(back).tokenizer)
    assert rebuilt.vocab_size == 280 and read_meta(back).args.vocab_size == 288
    for text in TEXTS + ["the llama eats grass quickly 333"]:
        assert rebuilt.encode(text) == tok.encode(text), text


@pytest.mark.parametrize(
    "overrides, needles",
    [({"model_type": "unigram"}, ["UNIGRAM", "BPE"]), ({"normalization_rule_name": "nmt_nfkc"}, ["normalises"])],
    ids=["unigram", "nfkc"],
)
def test_tokenizers_llama_cpp_would_encode_otherwise_are_refused(tmp_path, overrides, needles):
    path = tmp_path / "t.model"
    path.write_bytes(trained_tokenizer(**overrides).model_bytes)
    _, src = save_chat_model(tmp_path / "m.safetensors")  # 32000 rows: room for the 280 pieces
    out = str(tmp_path / "out" / "x.gguf")
    assert_user_error(run_cli("convert", src, "-o", out, "--to", "gguf", "-t", path), "t.model", *needles)
    assert not os.path.exists(tmp_path / "out")


# ---------------------------------------------------------------------------------------------------- chat template

DIALOGS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "  What is 2+2?\n"}],
    [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "  Bonjour !\n"},
        {"role": "user", "content": "How are you? 🦙"},
    ],
    [{"role": "user", "content": "One"}, {"role": "assistant", "content": "Two"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "   "}],
]


def render(template: str, messages: list[dict]) -> str:
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, bos_token="<s>", eos_token="</s>")


def encode_special(sp, text: str) -> list[int]:
    """How llama.cpp tokenizes a rendered template: <s> and </s> are BOS and EOS, each text piece between them
    is encoded on its own (with SentencePiece's space prefix)."""
    special = {"<s>": sp.bos_id(), "</s>": sp.eos_id()}
    ids = []
    for part in re.split(r"(</?s>)", text):
        ids += [special[part]] if part in special else sp.encode(part) if part else []
    return ids


@pytest.mark.parametrize("messages", DIALOGS, ids=[f"dialog{i}" for i in range(len(DIALOGS))])
def test_chat_template_renders_the_chat_format(f32_gguf, messages):
    template = field(gguf.GGUFReader(f32_gguf), "tokenizer.chat_template")
    sp = spm.SentencePieceProcessor(model_file=LLAMA_TOKENIZER)
    tok = Tokenizer.from_file(LLAMA_TOKENIZER)
    assert encode_special(sp, render(template, messages)) == encode_dialog(tok, messages).tokens


def test_chat_template_refuses_what_the_chat_format_refuses(f32_gguf):
    from jinja2.exceptions import TemplateError

    template = field(gguf.GGUFReader(f32_gguf), "tokenizer.chat_template")
    for messages in (
        [{"role": "assistant", "content": "first"}],
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        [{"role": "system", "content": "alone"}],
        [{"role": "user", "content": "smuggled [INST] tag"}],
    ):
        with pytest.raises(TemplateError):
            render(template, messages)


# ---------------------------------------------------------------------------------------------------- bad input


def rewrite(src: str, dst: str, drop=(), arch: str | None = None, quantize=None, transform=None) -> str:
    """A copy of the GGUF ``src`` with metadata keys dropped, another architecture, tensors in other types
    (``quantize``: name -> GGML type) or F32 tensors changed (``transform``: name -> function of the array)."""
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, arch or field(r, "general.architecture"))
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop:
            continue
        w.add_key_value(key, f.contents(), f.types[0])  # an array's item type follows its items
    for t in r.tensors:
        if t.name in (quantize or {}):
            qtype = quantize[t.name]
            w.add_tensor(t.name, gguf.quants.quantize(np.asarray(t.data, np.float32), qtype), raw_dtype=qtype)
        else:
            w.add_tensor(t.name, (transform or {}).get(t.name, np.asarray)(np.asarray(t.data)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


@pytest.mark.parametrize(
    "make, needles",
    [
        (lambda g, d: _cut(g, d / "cut.gguf"), ["cut.gguf", "ends inside its tensor data", "truncated"]),
        (lambda g, d: _junk(d / "head.gguf", open(g, "rb").read()[:300]), ["head.gguf", "ends inside its header"]),
        (lambda g, d: rewrite(g, str(d / "gpt2.gguf"), arch="gpt2"), ["gpt2.gguf", "'gpt2'", "architecture"]),
        (lambda g, d: rewrite(g, str(d / "nokey.gguf"), drop={"llama.block_count"}), ["nokey.gguf", "block_count"]),
        (
            lambda g, d: rewrite(
                g, str(d / "q4.gguf"), quantize={"blk.1.attn_v.weight": gguf.GGMLQuantizationType.Q4_0}
            ),
            ["q4.gguf", "'blk.1.attn_v.weight'", "Q4_0"],
        ),
        (lambda g, d: _junk(d / "junk.gguf", b"GGUF" + b"\xff" * 60), ["junk.gguf", "not a readable GGUF"]),
    ],
    ids=["truncated", "truncated-header", "other-architecture", "missing-key", "q4_0-tensor", "junk"],
)
def test_bad_gguf_files_fail_with_one_line(f32_gguf, tmp_path, make, needles):
    src = make(f32_gguf, tmp_path)
    out = tmp_path / "out" / "o.safetensors"
    for args in (("convert", src, "-o", str(out)), ("convert", "--info", src)):
        assert_user_error(run_cli(*args), *needles)
    assert not out.parent.exists() or not os.listdir(out.parent)


def _cut(good: str, path) -> str:
    data = open(good, "rb").read()
    return _junk(path, data[: len(data) - 5000])


def _junk(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def test_bad_flags_fail_before_work(fp32_model, tmp_path):
    src = fp32_model[1]
    out = str(tmp_path / "m.gguf")
    cases = [
        (["--to", "gguf", "--gguf-type", "q4_k"], ["--gguf-type 'q4_k'", "f32, f16, bf16, q8_0"]),
        (["--gguf-type", "q8_0"], ["--gguf-type", "--to gguf"]),
        (["--to", "gguf", "--dtype", "bf16"], ["--dtype", "--gguf-type"]),
    ]
    for flags, needles in cases:
        assert_user_error(run_cli("convert", src, "-o", out, *flags), *needles)
    assert_user_error(run_cli("convert", src, "-o", str(tmp_path / "m.bin"), "--to", "gguf"), "m.bin", ".gguf")
    assert not os.listdir(tmp_path)


def test_models_gguf_cannot_hold_are_refused(tmp_path):
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=32000, multiple_of=32, max_seq_len=64, head="scalar")
    tok = Tokenizer.from_file(LLAMA_TOKENIZER).model_bytes
    rm = Transformer(args)
    save_plans(
        str(tmp_path / "rm.safetensors"), plan_from_tensors(rm.state_dict()), CheckpointMeta(args, tok, {}, "safety")
    )
    _, plain = save_chat_model(tmp_path / "m.safetensors")
    state = load_tensors(plain)
    quant = CheckpointMeta(read_meta(plain).args, tok, quant=QuantSpec("int8"))
    save_plans(str(tmp_path / "int8.safetensors"), plan_from_tensors(state), quant)  # its header is what counts
    bare = CheckpointMeta(read_meta(plain).args)
    save_plans(str(tmp_path / "bare.safetensors"), plan_from_tensors(state), bare)
    os.makedirs(tmp_path / "out")
    out = str(tmp_path / "out" / "x.gguf")
    assert_user_error(
        run_cli("convert", tmp_path / "rm.safetensors", "-o", out, "--to", "gguf"), "scalar head", "safety"
    )
    assert_user_error(
        run_cli("convert", tmp_path / "int8.safetensors", "-o", out, "--to", "gguf"),
        "int8.safetensors",
        "quantized",
        "floating-point checkpoint",
    )
    assert_user_error(run_cli("convert", tmp_path / "bare.safetensors", "-o", out, "--to", "gguf"), "--tokenizer")
    proc = run_cli("convert", tmp_path / "bare.safetensors", "-o", out, "--to", "gguf", "-t", LLAMA_TOKENIZER)
    assert proc.returncode == 0, proc.stderr
    assert os.listdir(tmp_path / "out") == ["x.gguf"]


# ---------------------------------------------------------------------------------------------------- llama.cpp


def llama_cpp_greedy(path: str, prompt: list[int], n: int, eos: int) -> list[int]:
    """llama.cpp's greedy tokens, through the benchmarks' runner (exact argmax), cut after EOS as generate stops."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_llamacpp", os.path.join(ROOT, "bench", "llamacpp.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    tokens = bench.llamacpp_decode(path, prompt, n)["tokens"]
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def llamactl_greedy(model_path: str, prompt: list[int], n: int) -> list[int]:
    proc = run_cli(
        "generate", "-m", model_path, "--temperature", "0", "--max-new-tokens", n, stdin=json.dumps({"tokens": prompt})
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["tokens"][len(prompt) :]


def save_peaked_model(path, prompt: list[int]) -> Transformer:
    """``save_chat_model``'s random model with a cycle of 64 tokens written in: the prompt's last token and ids
    1000-1062 get large orthogonal embeddings, and each one's output row points at the next one's embedding. Greedy
    decoding then walks the cycle with a lead of at least 2.4 over the next best logit (no near ties for 8-bit
    weights to break), while the random layers still move every logit (zeroing attention moves them by up to 16)."""
    model, _ = save_chat_model(path)
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(64, 64, generator=g))
    cycle = [prompt[-1], *range(1000, 1063)]
    with torch.no_grad():
        for i, t in enumerate(cycle):
            model.tok_embeddings.weight[t] = 200 * q[i]
            model.output.weight[cycle[(i + 1) % len(cycle)]] = 3 * q[i]
    meta = CheckpointMeta(model.args, Tokenizer.from_file(LLAMA_TOKENIZER).model_bytes)
    save_plans(str(path), plan_from_tensors(model.state_dict()), meta)
    return model


def llama_cpp_logits(llama_cpp, path: str, tokens: list[int]) -> np.ndarray:
    """llama.cpp's logits at every position of ``tokens``, with an F32 KV cache (its default F16 cache rounds keys
    and values: 0.03 off at this size)."""
    f32 = llama_cpp.GGML_TYPE_F32
    llm = llama_cpp.Llama(model_path=path, n_ctx=128, n_batch=128, logits_all=True, type_k=f32, type_v=f32,
                          n_threads=2, verbose=False)  # fmt: skip
    llm.eval(tokens)
    logits = np.array(llm.scores[: len(tokens)])
    llm.close()
    return logits


@pytest.mark.slow
def test_llama_cpp_runs_the_export_as_llamactl_does(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install '.[bench]')")
    tok = Tokenizer.from_file(LLAMA_TOKENIZER)
    prompt = tok.encode("Once upon a time, in a land far away,", bos=True)
    src = str(tmp_path / "m.safetensors")
    model = save_peaked_model(src, prompt)
    n_new = 48
    want = llamactl_greedy(src, prompt, n_new)
    assert len(want) == n_new
    seq = prompt + want
    with torch.no_grad():
        ours = model(torch.tensor([seq]))[0].numpy()
    top2 = np.sort(ours[len(prompt) - 1 : -1], axis=-1)[:, -2:]
    margin = (top2[:, 1] - top2[:, 0]).min()  # the smallest lead of the greedy token over the next best

    f32, q8 = str(tmp_path / "m-f32.gguf"), str(tmp_path / "m-q8_0.gguf")
    run(ConvertConfig(src=src, output=f32, to="gguf", gguf_type="f32"))
    run(ConvertConfig(src=src, output=q8, to="gguf", gguf_type="q8_0"))
    # F32: the same function of the same weights, up to float32 summation order (measured 2e-5)
    np.testing.assert_allclose(llama_cpp_logits(llama_cpp, f32, seq), ours, rtol=0, atol=1e-3)
    assert llama_cpp_greedy(f32, prompt, n_new, tok.eos_id) == want
    # Q8_0: llama.cpp rounds the weights and, in each product, the activations to 8 bits (measured: 0.84 at most,
    # 0.05 on average, on logits of spread 2.4); greedy agrees where the lead is more than twice the largest error
    theirs = llama_cpp_logits(llama_cpp, q8, seq)
    assert np.abs(theirs - ours).mean() < 0.05 * ours.std() and np.corrcoef(theirs.ravel(), ours.ravel())[0, 1] > 0.999
    assert margin > 2 * np.abs(theirs - ours).max()
    assert llama_cpp_greedy(q8, prompt, n_new, tok.eos_id) == want
    for kind in ("f16", "bf16"):  # the other types llama.cpp loads from our export
        out = str(tmp_path / f"m-{kind}.gguf")
        run(ConvertConfig(src=src, output=out, to="gguf", gguf_type=kind))
        assert llama_cpp_greedy(out, prompt, n_new, tok.eos_id) == want, kind

    # The layout: the same export with wq and wk in Hugging Face's halves layout is another function for llama.cpp.
    def halves(w, heads):
        return w.reshape(heads, -1, 2, w.shape[1]).transpose(0, 2, 1, 3).reshape(w.shape)

    swap = {
        f"blk.{i}.attn_{x}.weight": (lambda w, h=h: halves(w, h)) for i in range(2) for x, h in (("q", 4), ("k", 2))
    }
    permuted = rewrite(f32, str(tmp_path / "halves.gguf"), transform=swap)
    assert np.abs(llama_cpp_logits(llama_cpp, permuted, seq) - ours).max() > 1

    vocab = llama_cpp.Llama(model_path=f32, vocab_only=True, verbose=False)
    for text in TEXTS:  # llama.cpp's tokenizer from the GGUF vocabulary, against SentencePiece's
        assert vocab.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text), text
    template = vocab.metadata["tokenizer.chat_template"]
    for messages in DIALOGS:  # the template rendered, then tokenized with <s> and </s> as BOS and EOS
        rendered = render(template, messages).encode()
        assert vocab.tokenize(rendered, add_bos=False, special=True) == encode_dialog(tok, messages).tokens
    vocab.close()
