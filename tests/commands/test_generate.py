"""generate: JSONL in and out through the real CLI, batching, sampling controls, and bad input."""

import json
import os

import pytest
import torch
from helpers import FIXTURES, assert_user_error, run_cli, save_chatty_model

from llamactl.checkpoint import load_model, save_model
from llamactl.commands.convert import ConvertConfig, run
from llamactl.generate import SamplingParams, generate, pack_for_cpu_decode, sample
from llamactl.model import ModelArgs, Transformer
from llamactl.tokenizer import Tokenizer

STORIES = os.path.join(FIXTURES, "stories260K.bin")
LLAMA_TOKENIZER = os.path.join(FIXTURES, "llama2-tokenizer.model")


@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("m") / "stories.safetensors")
    run(ConvertConfig(src=STORIES, output=out))
    return out


@pytest.fixture(scope="module")
def chatty(tmp_path_factory):
    """A random model with Llama 2's tokenizer embedded, so prompts can be text."""
    out = str(tmp_path_factory.mktemp("m") / "chatty.safetensors")
    save_chatty_model(out)
    return out


def _lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_jsonl_in_out_keeps_order_and_fields(stories):
    prompts = [{"tokens": [1, 400, 300], "id": "a"}, {"tokens": [1], "id": "b"}, {"tokens": [1, 5, 6, 7, 8], "id": 3}]
    stdin = "".join(json.dumps(p) + "\n" for p in prompts)
    one = run_cli(
        "generate",
        "-m",
        stories,
        "--temperature",
        "0",
        "--max-new-tokens",
        "9",
        "--batch-size",
        "1",
        "--dtype",
        "fp32",
        stdin=stdin,
    )
    many = run_cli(
        "generate",
        "-m",
        stories,
        "--temperature",
        "0",
        "--max-new-tokens",
        "9",
        "--batch-size",
        "3",
        "--dtype",
        "fp32",
        stdin=stdin,
    )
    assert one.returncode == 0 and many.returncode == 0, one.stderr + many.stderr
    a, b = _lines(one.stdout), _lines(many.stdout)
    assert a == b  # batching (right-padded prompts of different lengths) changes nothing
    assert [r["id"] for r in a] == ["a", "b", 3]
    for p, r in zip(prompts, a, strict=True):
        assert r["tokens"][: len(p["tokens"])] == p["tokens"]
        assert len(r["tokens"]) == len(p["tokens"]) + 9 and r["finish_reason"] == "length"
        assert "completion" not in r  # no tokenizer in this checkpoint


def test_text_prompts_with_embedded_tokenizer(chatty, tmp_path):
    out = tmp_path / "out.jsonl"
    proc = run_cli(
        "generate",
        "-m",
        chatty,
        "-o",
        str(out),
        "--max-new-tokens",
        "6",
        "--logprobs",
        "--seed",
        "3",
        stdin='{"prompt": "Once upon a time"}\n',
    )
    assert proc.returncode == 0, proc.stderr
    (rec,) = _lines(out.read_text())
    tok = Tokenizer.from_file(LLAMA_TOKENIZER)
    prompt_ids = tok.encode("Once upon a time", bos=True)
    assert rec["tokens"][: len(prompt_ids)] == prompt_ids
    new = rec["tokens"][len(prompt_ids) :]
    new_text = new[:-1] if rec["finish_reason"] == "eos" else new
    assert rec["completion"] == tok.decode(prompt_ids + new_text)[len(tok.decode(prompt_ids)) :]
    assert "Once upon a time" + rec["completion"] == tok.decode(prompt_ids + new_text)
    assert len(rec["logprobs"]) == len(new) and all(lp <= 0 for lp in rec["logprobs"])
    again = run_cli(
        "generate",
        "-m",
        chatty,
        "--max-new-tokens",
        "6",
        "--logprobs",
        "--seed",
        "3",
        stdin='{"prompt": "Once upon a time"}\n',
    )
    assert _lines(again.stdout) == [rec]  # same seed, same sample


def test_stops_at_eos_per_sequence(stories):
    model, _ = load_model(stories)
    prompts = [[1], [1, 300, 301]]
    free = generate(model, prompts, SamplingParams(max_new_tokens=10, temperature=0), eos_id=None)
    eos = free[0].tokens[3]
    got = generate(model, prompts, SamplingParams(max_new_tokens=10, temperature=0), eos_id=eos)
    for f, g in zip(free, got, strict=True):
        if eos in f.tokens:
            assert g.tokens == f.tokens[: f.tokens.index(eos) + 1] and g.finish_reason == "eos"
        else:
            assert g.tokens == f.tokens and g.finish_reason == "length"
    assert got[0].finish_reason == "eos"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_cpu_decode_matches_plain_model(stories, dtype):
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this CPU has no native bf16, so weights are not packed in bf16")
    plain, _ = load_model(stories, dtype=dtype)
    packed, _ = load_model(stories, dtype=dtype)
    assert pack_for_cpu_decode(packed)
    tokens = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # fp32: only the summation order differs; bf16: the same products, rounded to bf16 at the same places
        tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=0.02, atol=0.05)
        torch.testing.assert_close(packed.logits(packed.hidden(tokens)), plain(tokens), **tol)
    params = SamplingParams(max_new_tokens=40, temperature=0)
    if dtype == torch.float32:
        assert generate(packed, [[1], [1, 300]], params, None) == generate(plain, [[1], [1, 300]], params, None)


def test_sampling_controls():
    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0]])
    gen = torch.Generator().manual_seed(0)
    assert sample(logits, 0).item() == 2
    assert {sample(logits, 1.0, top_k=1, generator=gen).item() for _ in range(20)} == {2}
    assert {sample(logits, 1.0, top_p=0.5, generator=gen).item() for _ in range(20)} == {2}
    seen = {sample(logits, 5.0, top_k=2, generator=gen).item() for _ in range(200)}
    assert seen == {2, 3}


@pytest.mark.parametrize(
    "stdin, needles",
    [
        ('{"tokens": [1, 2]}\n{"tokens": [1, 2\n', ["<stdin>:2", "invalid JSON"]),
        ('{"tokens": [1, 9999]}\n', ["<stdin>:1", "9999", "[0, 512)"]),
        ('{"text": "hi"}\n', ["<stdin>:1", "'prompt'", "'tokens'"]),
        ('{"prompt": "hi"}\n', ["<stdin>:1", "needs a tokenizer"]),
        ('{"tokens": "1 2"}\n', ["<stdin>:1", "'tokens' must be list"]),
        ('{"tokens": [1, null]}\n', ["<stdin>:1", "None", "not a token id"]),
        ('{"tokens": [1]}\n{"tokens": [1]}\n{"tokens": [1, "\xff\xfe"]}\n', ["<stdin>:3"]),
        ("[1, 2]\n", ["<stdin>:1", "expected a JSON object"]),
    ],
    ids=[
        "malformed",
        "out-of-vocab",
        "missing-field",
        "no-tokenizer",
        "wrong-type",
        "null-id",
        "bad-id-line-3",
        "not-object",
    ],
)
def test_bad_input_fails_with_one_line_and_writes_nothing(stories, tmp_path, stdin, needles):
    out = tmp_path / "out.jsonl"
    proc = run_cli("generate", "-m", stories, "-o", str(out), "--max-new-tokens", "2", stdin=stdin)
    assert_user_error(proc, *needles)
    assert not os.listdir(tmp_path)


def test_invalid_utf8_is_reported_on_its_own_line(stories, tmp_path):
    bad = tmp_path / "in.jsonl"
    bad.write_bytes(b'{"tokens": [1]}\n' * 700 + b'{"tokens": [1], "x": "\xff"}\n')
    assert_user_error(run_cli("generate", "-m", stories, "-i", str(bad)), "in.jsonl:701", "not UTF-8")


def test_scalar_head_cannot_generate(tmp_path):
    args = ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=64, multiple_of=16, max_seq_len=32, head="scalar")
    save_model(str(tmp_path / "rm.safetensors"), Transformer(args))
    proc = run_cli("generate", "-m", str(tmp_path / "rm.safetensors"), stdin='{"tokens": [1]}\n')
    assert_user_error(proc, "rm.safetensors", "scalar")


def test_bad_flags_and_model(stories, tmp_path):
    assert_user_error(run_cli("generate", "-m", stories, "--top-p", "0", stdin=""), "--top-p")
    assert_user_error(run_cli("generate", "-m", str(tmp_path / "nope.safetensors"), stdin=""), "nope.safetensors")
    assert_user_error(run_cli("generate", "-m", STORIES, stdin=""), "stories260K.bin")
