"""The generation engine (llamactl.generate) against independent computations: full forwards without a cache,
separate runs of each prompt alone, and the llama2.c reference on a real checkpoint."""

import os

import pytest
import torch
from helpers import FIXTURES, peaked_model
from llama2c_ref import Llama2cRef

from llamactl.commands.convert import ConvertConfig, run
from llamactl.device import resolve_dtype
from llamactl.generate import SamplingParams, finished_rows, generate, prefill, stream
from llamactl.loading import load_model
from llamactl.model import KVCache

GREEDY = SamplingParams(max_new_tokens=8, temperature=0)


@pytest.fixture(scope="module")
def model():
    return peaked_model()


def _cache(model, batch, max_len=40):
    return KVCache(model.args, batch, max_len, "cpu", torch.float32)


def _last_logits(model, seq):
    """The next-token logits of a whole sequence by one forward pass without a cache."""
    with torch.no_grad():
        return model(torch.tensor([seq]))[0, -1]


def _greedy_alone(model, prompt, n):
    """Greedy continuation by full forwards over the growing sequence: no cache, no batch."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(_last_logits(model, seq).argmax()))
    return seq[len(prompt) :]


def _collect(steps):
    """Per row (numbered as the batch started), the live tokens of a stream, read step by step."""
    out = {}
    for s in steps:
        for row, tok, live in zip(s.rows, s.tokens.tolist(), s.live.tolist(), strict=True):
            if live:
                out.setdefault(row, []).append(tok)
    return [out[r] for r in sorted(out)]


def test_forked_rows_equal_separate_prefills(model):
    prompt, conts = [1, 17, 33, 4, 60, 8, 9], [[5, 6], [7], [8, 9, 10, 11]]
    cache = _cache(model, 1)
    prefill(model, cache, [prompt])
    forked = cache.fork([0, 0, 0])
    assert cache.lengths == [7] and forked.lengths == [7, 7, 7]
    got = prefill(model, forked, conts)  # rows of different lengths from a shared prefix: right-padded
    assert forked.lengths == [9, 8, 11] and cache.lengths == [7]  # the parent is untouched
    for i, c in enumerate(conts):
        alone = _cache(model, 1)
        torch.testing.assert_close(got[i], prefill(model, alone, [prompt + c])[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[i], _last_logits(model, prompt + c), rtol=1e-5, atol=1e-5)
    tokens = _collect(stream(model, forked, got, GREEDY, None))
    assert tokens == [_greedy_alone(model, prompt + c, 8) for c in conts]


def test_fork_for_n_samples_from_one_prefill(model):
    """One prompt prefilled once, forked to 4 rows: each row's greedy answer is the prompt's own."""
    prompt = [1, 50, 51, 52]
    cache = _cache(model, 1)
    logits = prefill(model, cache, [prompt])
    many = cache.fork([0] * 4)
    tokens = _collect(stream(model, many, logits.expand(4, -1), GREEDY, None))
    assert tokens == [_greedy_alone(model, prompt, 8)] * 4


def test_truncate_then_extend_equals_a_fresh_run(model):
    prompt, first, second = [1, 20, 21, 22, 23], [30, 31, 32, 33, 34], [40, 41]
    cache = _cache(model, 1)
    logits = prefill(model, cache, [prompt + first])
    _collect(stream(model, cache, logits, GREEDY, None))  # an answer, then undone
    assert cache.lengths == [len(prompt + first) + 7]
    cache.truncate(len(prompt))
    logits = prefill(model, cache, [second])
    torch.testing.assert_close(logits[0], _last_logits(model, prompt + second), rtol=1e-5, atol=1e-5)
    assert _collect(stream(model, cache, logits, GREEDY, None)) == [_greedy_alone(model, prompt + second, 8)]


def test_retry_refeeds_the_last_prompt_token(model):
    """Retry: truncate to just before the prompt's last token and feed it again; the logits are the prompt's."""
    prompt = [1, 2, 3, 4, 5, 6]
    cache = _cache(model, 1)
    first = prefill(model, cache, [prompt])
    _collect(stream(model, cache, first, GREEDY, None))
    cache.truncate(len(prompt) - 1)
    again = prefill(model, cache, [prompt[-1:]])
    torch.testing.assert_close(again, first, rtol=1e-5, atol=1e-5)


def _greedy_full(model, prompt, n, eos):
    """Greedy continuation by full fp32 forwards over the whole sequence, up to ``n`` tokens or ``eos`` included."""
    out = []
    while len(out) < n and (not out or out[-1] != eos):
        out.append(int(_last_logits(model, prompt + out).argmax()))
    return out


def test_streamed_tokens_equal_full_forwards(model):
    """Greedy, three prompts of different lengths in one batch and each alone: the stream's tokens are those of a
    loop of full forwards (no cache, no engine), each row ending at its EOS or its length limit, reported once."""
    prompts = [[1, 2, 3], [1, 9, 8, 7, 6, 5, 4], [1]]
    eos = _greedy_full(model, prompts[0], 4, None)[3]  # the first row ends at its 4th token
    want = [_greedy_full(model, p, 10, eos) for p in prompts]
    assert len(want[0]) == 4 and any(len(w) == 10 and eos not in w for w in want)  # both endings occur
    greedy = SamplingParams(max_new_tokens=10, temperature=0)
    cache = _cache(model, 3, 20)
    steps = list(stream(model, cache, prefill(model, cache, prompts), greedy, eos))
    assert _collect(steps) == want
    assert sorted(r for s in steps for r in s.finished) == [0, 1, 2]  # each row reported once
    for p, w in zip(prompts, want, strict=True):
        alone = _cache(model, 1, 20)
        assert _collect(stream(model, alone, prefill(model, alone, [p]), greedy, eos)) == [w]
    # generate over the same engine: the rows back in prompt order, each with how it ended
    got = generate(model, prompts, greedy, eos)
    assert [c.tokens for c in got] == want
    assert [c.finish_reason for c in got] == ["eos" if w[-1] == eos else "length" for w in want]


def test_sampled_tokens_against_full_forwards(model):
    """Sampling (temperature 0.9, top-k 20), the batch and each prompt alone: every token is one of the 20 most
    likely under a full forward over the row's sequence so far, its log-probability is that forward's, a row
    ends at EOS or after max_new_tokens; and the first token's frequencies over 4,000 seeded draws are the tempered
    top-k softmax of the full forward's logits, computed here."""
    prompts = [[1, 2, 3], [1, 9, 8, 7, 6, 5, 4], [1]]
    params = SamplingParams(max_new_tokens=10, temperature=0.9, top_k=20, logprobs=True)
    eos = 5
    runs = []
    cache = _cache(model, 3, 20)
    steps = list(stream(model, cache, prefill(model, cache, prompts), params, eos, torch.Generator().manual_seed(7)))
    assert sorted(r for s in steps for r in s.finished) == [0, 1, 2]
    runs.append(dict(finished_rows(iter(steps), eos)))
    for i, p in enumerate(prompts):
        alone = _cache(model, 1, 20)
        s = stream(model, alone, prefill(model, alone, [p]), params, eos, torch.Generator().manual_seed(i))
        ((_, c),) = finished_rows(s, eos)
        runs.append({i: c})
    greedy = {i: _greedy_full(model, p, 10, eos) for i, p in enumerate(prompts)}
    differs = False
    for run_ in runs:
        for i, c in run_.items():
            p = prompts[i]
            assert c.finish_reason == ("eos" if c.tokens[-1] == eos else "length")
            assert (c.tokens[-1] == eos and eos not in c.tokens[:-1]) or (len(c.tokens) == 10 and eos not in c.tokens)
            with torch.no_grad():
                full = model(torch.tensor([p + c.tokens[:-1]]), output="logits")[0, len(p) - 1 :]
            top = full.topk(20, -1).indices
            assert all(t in top[k].tolist() for k, t in enumerate(c.tokens))
            want = torch.log_softmax(full, -1).gather(1, torch.tensor(c.tokens)[:, None])[:, 0]
            torch.testing.assert_close(torch.tensor(c.logprobs), want, rtol=1e-5, atol=1e-5)
            differs |= c.tokens != greedy[i][: len(c.tokens)]
    assert differs  # it sampled: not every answer is the greedy one

    n, prompt = 4000, [1, 2, 3]
    cache = _cache(model, 1, 8)
    logits = prefill(model, cache, [prompt])
    many = cache.fork([0] * n)
    first = torch.cat([s.tokens for s in stream(model, many, logits.expand(n, -1), SamplingParams(1, 0.9, top_k=20),
                                                None, torch.Generator().manual_seed(3))])  # fmt: skip
    scaled = _last_logits(model, prompt) / 0.9
    kth = scaled.topk(20).values[-1]
    p = torch.softmax(scaled.masked_fill(scaled < kth, float("-inf")), -1).double()
    freq = torch.bincount(first, minlength=len(p)).double() / n
    assert freq[p == 0].sum() == 0
    # each frequency within 4.5 standard errors of its probability (a seeded draw: the same every run)
    assert ((freq - p).abs() <= 4.5 * (p * (1 - p) / n).sqrt() + 1e-12).all(), (freq - p).abs().max()


def test_batch_shrinks_without_changing_any_row(model):
    """Rows fill a small cache at different steps, and some stop at EOS: the batch shrinks as they finish, and
    every row's greedy output is what the prompt gives alone."""
    prompts = [[1, 2, 3], [1, 5, 6, 7, 8, 9, 10, 11], [1, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22], [1, 40]]
    free = [_greedy_alone(model, p, 20 - len(p)) for p in prompts]  # what each row gives until it fills 20 slots
    eos = free[3][4]
    want = [f[: f.index(eos) + 1] if eos in f else f for f in free]
    cache = _cache(model, 4, 20)
    steps = list(stream(model, cache, prefill(model, cache, prompts), SamplingParams(30, temperature=0), eos))
    assert _collect(steps) == want
    sizes = [len(s.rows) for s in steps]
    assert sizes[0] == 4 and sizes[-1] < 4 and sizes == sorted(sizes, reverse=True)  # it did shrink
    assert {r for r, c in finished_rows(iter(steps), eos)} == {0, 1, 2, 3}
    kept = steps[-1].rows
    assert cache.batch == len(kept) and cache.lengths == [len(prompts[r]) + len(want[r]) - 1 for r in kept]


def test_reading_the_done_mask_less_often_changes_nothing(model):
    """Between reads of the done mask, finished rows keep decoding in place: their output and the cache's lengths
    must not show it. Rows 0 and 1 share a prompt's continuation, so both stop at its third token and the batch
    of four can shrink."""
    head = [1, 2, 3]
    free0 = _greedy_alone(model, head, 12)
    prompts = [head, head + free0[:2], [1, 60, 61], [1, 7, 7, 7, 7]]
    free = [_greedy_alone(model, p, 12) for p in prompts]
    eos = free0[2]
    want = [f[: f.index(eos) + 1] if eos in f else f for f in free]
    assert len(want[0]) == 3 and len(want[1]) == 1 and len(want[2]) == len(want[3]) == 12
    for sync_every, shrink in ((1, True), (5, False), (5, True), (100, False)):
        cache = _cache(model, 4, 30)
        logits = prefill(model, cache, prompts)
        steps = list(stream(model, cache, logits, SamplingParams(12, 0), eos, shrink=shrink, sync_every=sync_every))
        got = dict(finished_rows(iter(steps), eos))
        assert [got[r].tokens for r in range(4)] == want, sync_every
        assert len(steps[-1].rows) == (2 if shrink else 4)
        kept = steps[-1].rows
        assert cache.lengths == [len(prompts[r]) + len(want[r]) - 1 for r in kept]


def test_continuing_from_the_cache_equals_one_longer_run(model):
    """What chat does between turns: the stream leaves each row's last token unfed; feeding it continues."""
    prompts = [[1, 2, 3, 4], [1, 30]]
    cache = _cache(model, 2)
    first = _collect(stream(model, cache, prefill(model, cache, prompts), SamplingParams(5, 0), None, shrink=False))
    assert cache.lengths == [4 + 4, 2 + 4]
    more = _collect(stream(model, cache, prefill(model, cache, [[t[-1]] for t in first]), SamplingParams(6, 0), None))
    assert [a + b for a, b in zip(first, more, strict=True)] == [_greedy_alone(model, p, 11) for p in prompts]


def test_stopping_the_stream_early_leaves_exact_lengths(model):
    cache = _cache(model, 2)
    steps = stream(model, cache, prefill(model, cache, [[1, 2], [1, 2, 3, 4, 5]]), GREEDY, None)
    for i, _ in enumerate(steps):
        if i == 2:
            break
    steps.close()  # what leaving a for loop does once the generator is dropped (Ctrl-C in chat)
    assert cache.lengths == [2 + 2, 5 + 2]


def test_rows_fed_one_at_a_time_when_padding_would_pass_the_cache_end(model):
    cache = _cache(model, 2, 12)
    prefill(model, cache, [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [1, 2]])
    got = prefill(model, cache, [[11], [3, 4, 5, 6, 7]])  # row 0 padded to 5 tokens would reach position 15
    assert cache.lengths == [11, 7]
    torch.testing.assert_close(got[0], _last_logits(model, list(range(1, 12))), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], _last_logits(model, [1, 2, 3, 4, 5, 6, 7]), rtol=1e-5, atol=1e-5)


def test_stories260k_batched_greedy_equals_llama2c_reference(tmp_path):
    """A real checkpoint, three prompts in one batch over a cache they fill at different steps (so the batch
    shrinks twice), against llama2.c's run.c transcribed in numpy, one prompt at a time."""
    stories = os.path.join(FIXTURES, "stories260K.bin")
    out = str(tmp_path / "s.safetensors")
    run(ConvertConfig(src=stories, output=out))
    model, _ = load_model(out)
    prompts, length = [[1], [1, 400, 300], [1, 5, 6, 7, 8]], 30
    cache = KVCache(model.args, 3, length, "cpu", torch.float32)
    steps = list(stream(model, cache, prefill(model, cache, prompts), SamplingParams(length, temperature=0), None))
    assert [len(s.rows) for s in steps][-1] == 1
    ref = Llama2cRef(stories)
    assert [p + t for p, t in zip(prompts, _collect(steps), strict=True)] == [
        ref.greedy(p, length - len(p)) for p in prompts
    ]


@pytest.mark.parametrize(
    "stored, native_bf16, want",
    [
        (torch.float32, True, torch.float32),  # an fp32 checkpoint decodes in fp32, as transformers and run.c do
        (torch.bfloat16, True, torch.bfloat16),
        (torch.bfloat16, False, torch.float32),
        (torch.float16, True, torch.bfloat16),  # a CPU has no fast fp16: bf16 keeps its range where it is native
        (torch.float16, False, torch.float32),
    ],
)
def test_dtype_auto_keeps_the_checkpoints_dtype_on_a_cpu(monkeypatch, stored, native_bf16, want):
    monkeypatch.setattr("llamactl.device.bf16_supported", lambda device: native_bf16)
    assert resolve_dtype("auto", torch.device("cpu"), stored) == want
    assert resolve_dtype("bf16", torch.device("cpu"), stored) == torch.bfloat16  # one flag away


def test_min_new_tokens_keeps_eos_out_of_the_first_steps(model):
    """Greedy with EOS set to the token the model picks first: it ends at once, unless min_new_tokens forbids EOS
    for that many steps, after which it is the second-best token of the unconstrained logits that comes first."""
    prompt = [3, 14, 15]
    logits = _last_logits(model, prompt)
    eos = int(logits.argmax())
    plain = generate(model, [prompt], GREEDY, eos_id=eos)[0]
    assert plain.tokens == [eos] and plain.finish_reason == "eos"
    params = SamplingParams(max_new_tokens=4, temperature=0, min_new_tokens=2)
    held = generate(model, [prompt], params, eos_id=eos)[0]
    assert held.tokens[0] == int(logits.topk(2).indices[1])
    assert eos not in held.tokens[:2]


def _requests(prompts, k=1, gaps=()):
    """The prompts as engine requests, with a None (nothing has come yet, as from a pipe) before each index in
    ``gaps``."""
    for i, p in enumerate(prompts):
        if i in gaps:
            yield None
        yield p, k


@pytest.mark.parametrize("sync_every", [1, 3])
def test_continuous_batching_gives_each_prompt_its_own_completion(model, sync_every):
    """Nine prompts of different lengths through three rows: rows that finish (EOS, or their token limit) are
    refilled with the next prompt while the others decode; each prompt's greedy completion is what full forwards
    give it alone, and prompts come out in the order they finish, each exactly once. A later prompt longer than the
    first ones makes the cache grow; Nones in the requests (input not come yet) change nothing."""
    from llamactl.generate import Timings, run_requests

    prompts = [[1, 2, 3], [1, 9, 8, 7, 6, 5, 4], [1], [1, 40, 41], [1, 5, 5], [1, 22, 23, 24, 25],
               [1, 3] + list(range(50, 80)), [1, 7], [1, 60, 61, 62]]  # fmt: skip
    eos = _greedy_full(model, prompts[0], 4, None)[3]
    want = [_greedy_full(model, p, 9, eos) for p in prompts]
    lengths = {len(w) for w in want}
    assert len(lengths) > 2 and any(w[-1] == eos for w in want) and 9 in lengths  # EOS and the limit both occur
    timings, order = Timings(), []
    got = {}
    for i, j, c in run_requests(model, _requests(prompts, gaps={4, 5}), SamplingParams(9, temperature=0), eos,
                                rows=3, timings=timings, sync_every=sync_every):  # fmt: skip
        assert j == 0 and i not in got
        got[i] = c
        order.append(i)
    assert [got[i].tokens for i in range(len(prompts))] == want
    assert [got[i].finish_reason for i in range(len(prompts))] == ["eos" if w[-1] == eos else "length" for w in want]
    assert order != sorted(order)  # some later prompt finished first: rows were refilled, not drained in turn
    assert timings.prompt_tokens == sum(map(len, prompts)) and timings.sequences == len(prompts)
    assert timings.new_tokens == sum(map(len, want))


def test_continuous_samples_of_a_prompt_share_its_prefill(model):
    """k = 3 samples of each of four prompts through four rows (fewer than 4 x 3): a prompt's samples admitted
    together are copies of one prefill; greedy, every sample is the prompt's greedy completion, and each prompt is
    prefilled only as many times as its samples were admitted in separate groups (here at most twice)."""
    from llamactl.generate import Timings, sample_k

    prompts = [[1, 2, 3], [1, 30, 31, 32, 33], [1, 7], [1, 12, 13]]
    want = [_greedy_full(model, p, 6, None) for p in prompts]
    timings = Timings()
    got = {}
    for i, j, c in sample_k(model, prompts, 3, SamplingParams(6, temperature=0), None, rows=4, timings=timings):
        got[i, j] = c.tokens
    assert got == {(i, j): want[i] for i in range(4) for j in range(3)}
    assert sum(map(len, prompts)) <= timings.prompt_tokens <= 2 * sum(map(len, prompts))
    assert timings.sequences == 12 and timings.new_tokens == 12 * 6


def test_sampled_completions_do_not_depend_on_the_batch(model):
    """Sampling, each request's draws are its own (counter-based, keyed by request and step): the same seed gives each
    prompt the same sampled completion through 1, 3 or 8 rows, whichever row it is given and whenever it is admitted.
    And the draws are uniform: 20,000 of them fill ten equal bins within 4.5 standard errors."""
    from llamactl.generate import run_requests, uniforms

    prompts = [[1, 2, 3], [1, 9, 8, 7, 6, 5, 4], [1], [1, 40, 41], [1, 5, 5], [1, 22, 23, 24, 25]]
    params = SamplingParams(max_new_tokens=9, temperature=1.0)
    runs = []
    for rows in (1, 3, 8):
        got = run_requests(model, ((p, 1) for p in prompts), params, None, torch.Generator().manual_seed(11), rows=rows)
        runs.append({i: c.tokens for i, _, c in got})
    assert runs[0] == runs[1] == runs[2]
    greedy = [_greedy_full(model, p, 9, None) for p in prompts]
    assert any(runs[0][i] != g for i, g in enumerate(greedy))  # it sampled
    n = 20000
    u = uniforms(12345, torch.arange(n), torch.full((n,), 3))[:, 0].double()
    assert 0 < u.min() and u.max() <= 1
    freq = torch.bincount((u * 10).long().clamp(max=9), minlength=10).double() / n
    assert ((freq - 0.1).abs() <= 4.5 * (0.1 * 0.9 / n) ** 0.5).all(), freq


def test_each_request_has_its_own_token_limit(model):
    """Requests carrying their own most new tokens (what a server's max_tokens is) through two rows: each stops at its
    own limit with its greedy completion's first tokens; one without keeps the default."""
    from llamactl.generate import run_requests

    prompts, most = [[1, 2, 3], [1, 9, 8], [1], [1, 40, 41, 42], [1, 5]], [3, 11, 1, 7, None]
    reqs = [(p, 1, m) if m is not None else (p, 1) for p, m in zip(prompts, most, strict=True)]
    got = {i: c for i, _, c in run_requests(model, iter(reqs), SamplingParams(5, temperature=0), None, rows=2)}
    for i, p in enumerate(prompts):
        n = most[i] or 5
        assert got[i].tokens == _greedy_full(model, p, 11, None)[:n] and got[i].finish_reason == "length"
