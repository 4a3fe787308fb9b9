"""generate: JSONL in and out through the real CLI, batching, sampling controls, and bad input."""

import json
import math
import os

import pytest
import torch
from helpers import FIXTURES, assert_user_error, run_cli, save_chatty_model
from llama2c_ref import Llama2cRef

from llamactl.checkpoint import save_model
from llamactl.generate import SamplingParams, generate, sample
from llamactl.loading import build_model, load_model
from llamactl.model import ModelArgs, Transformer
from llamactl.swap import PackedLinear, cpu_packing
from llamactl.tokenizer import Tokenizer

STORIES = os.path.join(FIXTURES, "stories260K.bin")
LLAMA_TOKENIZER = os.path.join(FIXTURES, "llama2-tokenizer.model")


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
    # each log-probability is log_softmax of one full forward over the whole sequence, at the sampled token
    model, _ = load_model(chatty)
    with torch.no_grad():
        full = torch.log_softmax(model(torch.tensor([rec["tokens"][:-1]]))[0, len(prompt_ids) - 1 :], -1)
    want = full.gather(1, torch.tensor(new)[:, None])[:, 0]
    assert len(rec["logprobs"]) == len(new)
    torch.testing.assert_close(torch.tensor(rec["logprobs"]), want, rtol=1e-4, atol=1e-4)
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
def test_cpu_decode_form_matches_plain_model(stories, dtype):
    """The CPU decode form (fused projections; packed ones where ``cpu_packing`` says this CPU gains) computes the
    plain model's logits and, in fp32, its greedy tokens."""
    plain, _ = load_model(stories, dtype=dtype)
    packed = build_model(plain.args, plain.state_dict(), stories, "cpu", dtype, decode=True).eval()
    kind = PackedLinear if cpu_packing(dtype) else torch.nn.Linear
    assert isinstance(packed.layers[0].attention.wqkv, kind)
    assert isinstance(packed.packed_head, PackedLinear) if cpu_packing(dtype) else packed.packed_head is None
    tokens = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # fp32: only the summation order differs; bf16: the same products, rounded to bf16 at the same places
        tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=0.02, atol=0.05)
        torch.testing.assert_close(packed.logits(packed.hidden(tokens)), plain(tokens), **tol)
    params = SamplingParams(max_new_tokens=40, temperature=0)
    if dtype == torch.float32:
        assert generate(packed, [[1], [1, 300]], params, None) == generate(plain, [[1], [1, 300]], params, None)


def _frequencies(logits: list[float], n: int = 20000, **kw) -> torch.Tensor:
    """How often each token is drawn in n samples (n rows of the same logits, one draw each)."""
    got = sample(torch.tensor([logits]).expand(n, -1), generator=torch.Generator().manual_seed(0), **kw)
    return torch.bincount(got, minlength=len(logits)).float() / n


# 4 standard deviations of a frequency estimated from 20000 draws (p = 0.5: 0.0035 each): a wrong rule fails by far more
FREQ_TOL = 0.015


@pytest.mark.parametrize(
    "top_p, want",
    [
        # a flat distribution (0.3, 0.3, 0.25, 0.15): the nucleus is the smallest set of most likely tokens whose
        # mass reaches top_p, renormalised; argmax alone would give (1, 0, 0, 0) or (0, 1, 0, 0)
        (0.5, [0.5, 0.5, 0.0, 0.0]),  # 0.3 < 0.5 <= 0.6: two tokens
        (0.7, [0.3 / 0.85, 0.3 / 0.85, 0.25 / 0.85, 0.0]),  # 0.6 < 0.7 <= 0.85: three tokens
        (1.0, [0.3, 0.3, 0.25, 0.15]),
    ],
)
def test_top_p_samples_the_nucleus_in_proportion(top_p, want):
    got = _frequencies([math.log(p) for p in (0.3, 0.3, 0.25, 0.15)], temperature=1.0, top_p=top_p)
    torch.testing.assert_close(got, torch.tensor(want), rtol=0, atol=FREQ_TOL)


def test_temperature_and_top_k_sample_in_proportion():
    logits = [0.0, 1.0, 2.0, 0.5]
    assert sample(torch.tensor([logits]), 0).item() == 2  # temperature 0: greedy
    # temperature 2: softmax(logits / 2); top-k 2 then keeps tokens 2 and 1 in their ratio e^(1/2)
    want = torch.softmax(torch.tensor(logits) / 2, -1)
    torch.testing.assert_close(_frequencies(logits, temperature=2.0), want, rtol=0, atol=FREQ_TOL)
    top2 = torch.tensor([0.0, 1.0, math.exp(0.5), 0.0]) / (1 + math.exp(0.5))
    torch.testing.assert_close(_frequencies(logits, temperature=2.0, top_k=2), top2, rtol=0, atol=FREQ_TOL)


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


def test_default_dtype_decodes_an_fp32_checkpoint_as_llama2c_does(stories):
    """--dtype auto keeps the checkpoint's fp32: the greedy text is run.c's (in bf16 it parts after ~10 tokens)."""
    proc = run_cli("generate", "-m", stories, "--temperature", "0", "--max-new-tokens", "63", stdin='{"tokens": [1]}\n')
    assert proc.returncode == 0, proc.stderr
    (rec,) = _lines(proc.stdout)
    ref = Llama2cRef(STORIES).greedy([1], 63)
    if 2 in ref[1:]:  # Llama's EOS id: the command stops there when the checkpoint has no tokenizer
        ref = ref[: ref.index(2, 1) + 1]
    assert rec["tokens"] == ref


def test_continuous_batching_and_timings(stories):
    """Seven prompts through two rows (continuous batching: a finished row takes the next record) give, in input
    order, the records each prompt gives alone; ``--timings`` prints one line on stderr whose counts are the
    prompts' tokens and the new tokens written."""
    import re

    prompts = [{"tokens": [1] + list(range(300, 300 + n)), "id": n} for n in (2, 9, 0, 5, 14, 1, 3)]
    stdin = "".join(json.dumps(p) + "\n" for p in prompts)
    flags = ["--temperature", "0", "--max-new-tokens", "500", "--dtype", "fp32"]  # rows end at the context
    alone = run_cli("generate", "-m", stories, *flags, "--batch-size", "1", stdin=stdin)
    two = run_cli("generate", "-m", stories, *flags, "--batch-size", "2", "--timings", stdin=stdin)
    assert alone.returncode == 0 and two.returncode == 0, alone.stderr + two.stderr
    a, b = _lines(alone.stdout), _lines(two.stdout)
    assert a == b and [r["id"] for r in b] == [p["id"] for p in prompts]
    assert len({len(r["tokens"]) - len(p["tokens"]) for r, p in zip(b, prompts, strict=True)}) > 1  # at each length
    lines = [line for line in two.stderr.splitlines() if line.startswith("timings")]
    assert len(lines) == 1, two.stderr
    m = re.fullmatch(r"timings: load [\d.]+ s \| prompt (\d+) tokens in [\d.]+ s \([\d.]+ tok/s\) \| decode (\d+) "
                     r"tokens in [\d.]+ s \([\d.]+ tok/s\) \| (\d+) sequences", lines[0])  # fmt: skip
    assert m, lines[0]
    new = sum(len(r["tokens"]) - len(p["tokens"]) for r, p in zip(b, prompts, strict=True))
    assert [int(g) for g in m.groups()] == [sum(len(p["tokens"]) for p in prompts), new, len(prompts)]
    assert "timings" not in alone.stderr  # off unless asked
