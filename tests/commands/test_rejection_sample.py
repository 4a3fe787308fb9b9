"""rejection-sample: forked sampling against generation without a cache, the prefill done once per prompt, the
best-of-K choice and the hybrid rule against hand computations (reward models whose scores are known functions of
the tokens), the pool across iterations, sft-ready output, and torchrun's shards against single runs."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from helpers import FIXTURES, peaked_model, run_cli, save_chatty_model, save_reward_model

from llamactl.chat_format import encode_dialog
from llamactl.commands import rejection_sample as rs
from llamactl.errors import UserError
from llamactl.generate import SamplingParams, sample_k
from llamactl.records import record_messages
from llamactl.reward import Scorer
from llamactl.tokenizer import Tokenizer

TOK = Tokenizer.from_file(os.path.join(FIXTURES, "llama2-tokenizer.model"))
PROMPTS = [
    {"prompt": "Tell me a story.", "id": "a"},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "id": "b"},
    {"prompt": "How do I pick a lock?", "is_safety": True, "id": "c"},
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                  {"role": "user", "content": "and 3+3?"}], "id": "d"},
]  # fmt: skip


# ------------------------------------------------------------------------------------------------- the engine


@pytest.fixture(scope="module")
def engine_model():
    return peaked_model()


def _greedy_alone(model, prompt, n):
    """Greedy continuation by full forwards over the growing sequence: no cache, no batch."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt) :]


def test_greedy_forked_samples_equal_greedy_generation_alone(engine_model):
    prompts = [[1, 17, 33, 4, 60, 8, 9], [1, 50], [1, 5, 6, 7, 8]]
    got = {}
    for i, j, c in sample_k(engine_model, prompts, 3, SamplingParams(max_new_tokens=6, temperature=0), None):
        assert c.finish_reason == "length" and (i, j) not in got
        got[i, j] = c.tokens
    assert sorted(got) == [(i, j) for i in range(3) for j in range(3)]
    for i, p in enumerate(prompts):
        want = _greedy_alone(engine_model, p, 6)
        assert [got[i, j] for j in range(3)] == [want] * 3


def test_each_prompt_is_prefilled_once(engine_model, monkeypatch):
    """The prompts go through the model once (one forward of B rows); the K samples of each only decode."""
    fed = []
    hidden = engine_model.hidden

    def spy(tokens, *args, **kwargs):
        fed.append(tuple(tokens.shape))
        return hidden(tokens, *args, **kwargs)

    monkeypatch.setattr(engine_model, "hidden", spy)
    prompts = [[1, 17, 33, 4, 60, 8, 9], [1, 50, 51, 52, 53]]
    out = list(sample_k(engine_model, prompts, 4, SamplingParams(max_new_tokens=5, temperature=1.0), None,
                        torch.Generator().manual_seed(0)))  # fmt: skip
    assert len(out) == 8
    assert fed[0] == (2, 7)  # both prompts, once, right-padded to the longer
    assert all(t == 1 for _, t in fed[1:]) and fed[1] == (8, 1)  # then one token per row and step, 2 x 4 rows
    assert len(fed) == 1 + 4  # 5 tokens sampled per row: the first from the prefill, 4 decoding steps
    # sampled rows of one prompt are separate draws (a random 5-token continuation from 97 tokens)
    assert len({tuple(c.tokens) for i, _, c in out if i == 0}) > 1


# -------------------------------------------------------------------------------------- the choice, by hand


class FakeScorer:
    """A reward model whose scores are given: ``values[n]`` for the n-th sequence scored."""

    def __init__(self, values):
        self.values, self.tokenizer, self.context, self.path = values, TOK, 64, "fake"

    def score(self, seqs):
        assert len(seqs) == len(self.values)
        return torch.tensor(self.values)


def _judge(helpful, safety):
    from llamactl.reward import Judge

    judge = object.__new__(Judge)
    judge.helpful, judge.safety = FakeScorer(helpful), FakeScorer(safety) if safety is not None else None
    return judge


def _prompt(is_safety=False):
    from llamactl.records import Prompt

    return Prompt("p.jsonl:1", 0, {}, [{"role": "user", "content": "Hi"}], is_safety)


def test_hybrid_rule_and_best_of_k_by_hand():
    answers = ["one", "two", "three"]
    helpful, safety = [2.0, 1.0, 3.0], [0.0, 1.0, -3.0]
    # sigmoid(-3) = 0.047 < 0.15: the third answer is judged unsafe and gets its safety score, -3
    reward, h, s = _judge(helpful, safety).judge([(_prompt(), a) for a in answers])
    assert reward.tolist() == [2.0, 1.0, -3.0] and h.tolist() == helpful and s.tolist() == safety
    assert rs.best(reward.tolist()) == 0
    # a safety prompt: the safety score for every answer
    reward, _, _ = _judge(helpful, safety).judge([(_prompt(True), a) for a in answers])
    assert reward.tolist() == [0.0, 1.0, -3.0] and rs.best(reward.tolist()) == 1
    # without a safety model: helpfulness alone
    reward, _, s = _judge(helpful, None).judge([(_prompt(True), a) for a in answers])
    assert reward.tolist() == helpful and s is None and rs.best(reward.tolist()) == 2
    # sigmoid(-1.7) = 0.1545: just above the threshold, helpfulness decides
    reward, _, _ = _judge([5.0, 4.0], [-1.7, -1.8]).judge([(_prompt(), a) for a in answers[:2]])
    assert reward.tolist() == pytest.approx([5.0, -1.8])
    # the same answer to the same prompt is scored once, so equal answers get equal scores
    p = _prompt()
    reward, _, _ = _judge([2.0, 1.0], None).judge([(p, "one"), (p, "two"), (p, "one")])
    assert reward.tolist() == [2.0, 1.0, 2.0]


def test_best_takes_the_first_of_equal_scores_and_skips_empty_answers():
    assert rs.best([None, 1.0, 3.0, 3.0, -1.0]) == 2
    assert rs.best([-2.0, None, -2.0]) == 0
    assert rs.best([None, None]) is None


# ------------------------------------------------------------------------------ whole runs, known reward models


def f_help(tokens):
    return (sum(tokens) % 1000) / 100 - 5


def f_safe(tokens):
    return (sum(t * 7 for t in tokens) % 1000) / 100 - 5


def r_c(tokens, is_safety):
    """Llama 2's R_c, written out: the safety score for a safety prompt or an unsafe answer, else helpfulness."""
    s = f_safe(tokens)
    return s if is_safety or 1 / (1 + math.exp(-s)) < 0.15 else f_help(tokens)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("rs")
    policy = str(root / "policy.safetensors")
    save_chatty_model(policy, max_seq_len=64)
    rms = {name: save_reward_model(policy, str(root / f"{name}.safetensors"), seed)
           for name, seed in (("rm", 1), ("safety", 2))}  # fmt: skip
    prompts = str(root / "prompts.jsonl")
    _write(prompts, PROMPTS)
    return {"policy": policy, **rms, "prompts": prompts, "root": root}


def _write(path, records):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


def _read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture
def known_scores(monkeypatch, models):
    """Both reward models score by the functions above (plus ``offset[0]``), whatever their weights."""
    offset = [0.0]

    def score(self, seqs):
        f = f_safe if self.path == models["safety"] else f_help
        return torch.tensor([f(s) + offset[0] for s in seqs], dtype=torch.float64).float()

    monkeypatch.setattr(Scorer, "score", score)
    return offset


def _cfg(models, out, **kw):
    base = dict(model=models["policy"], rm=models["rm"], safety_rm=models["safety"], input=models["prompts"],
                output=str(out), k=5, max_new_tokens=4, batch_size=3)  # fmt: skip
    return rs.RejectionSampleConfig(**{**base, **kw})


def test_scores_and_the_choice_are_the_hybrid_reward_of_the_written_dialogs(models, known_scores, tmp_path):
    rs.run(_cfg(models, tmp_path / "all.jsonl", keep="all"))
    rs.run(_cfg(models, tmp_path / "best.jsonl"))
    every, chosen = _read(tmp_path / "all.jsonl"), _read(tmp_path / "best.jsonl")
    assert [r["id"] for r in chosen] == ["a", "b", "c", "d"]
    for src, rec in zip(PROMPTS, chosen, strict=True):
        samples = [r for r in every if r["id"] == src["id"]]
        assert [r["sample"] for r in samples] == list(range(5))  # no empty answer in this run
        for r in samples:
            want = r_c(encode_dialog(TOK, r["messages"]).tokens, src.get("is_safety", False))
            assert r["score"] == pytest.approx(want, abs=1e-5)
        assert rec["scores"] == [r["score"] for r in samples]  # the same samples (same seed and batches)
        top = max(range(5), key=lambda j: (samples[j]["score"], -j))
        assert [r["best"] for r in samples] == [j == top for j in range(5)]
        assert rec["messages"] == samples[top]["messages"] and rec["score"] == samples[top]["score"]
        assert rec["sampled_by"] == models["policy"] and rec["pooled_from"] is None
    # the rule really mixed the two scores: some non-safety answers were judged unsafe, some were not
    unsafe = [1 / (1 + math.exp(-f_safe(encode_dialog(TOK, r["messages"]).tokens))) < 0.15 for r in every]
    assert 0 < sum(unsafe) < len(unsafe)


def test_pool_keeps_the_better_answer_across_iterations(models, known_scores, tmp_path):
    first = tmp_path / "iter1.jsonl"
    rs.run(_cfg(models, first, seed=0))
    known_scores[0] = 100.0  # a second iteration whose answers all score higher: each of its own wins
    rs.run(_cfg(models, tmp_path / "iter2.jsonl", seed=1, pool=str(first)))
    known_scores[0] = -100.0  # a third whose answers all score lower: every answer comes from the pool
    rs.run(_cfg(models, tmp_path / "iter3.jsonl", seed=2, pool=str(tmp_path / "iter2.jsonl")))
    known_scores[0] = 0.0
    rs.run(_cfg(models, tmp_path / "iter4.jsonl", seed=3, pool=str(first)))
    one, two, three, four = (_read(tmp_path / f"iter{i}.jsonl") for i in range(1, 5))
    for i, (a, b, c, d) in enumerate(zip(one, two, three, four, strict=True)):
        assert b["pooled_from"] is None and b["score"] == max(b["scores"]) > 90
        assert c["pooled_from"] == f"{tmp_path / 'iter2.jsonl'}:{i + 1}" and max(c["scores"]) < -90
        assert c["messages"] == b["messages"] and c["score"] == b["score"]
        assert c["sampled_by"] == models["policy"] and c["scores"] != b["scores"]  # this run's own scores
        # same reward models, another seed: whichever is higher, the pool's only when strictly higher
        assert d["score"] == max(a["score"], max(d["scores"]))
        assert (d["pooled_from"] is not None) == (a["score"] > max(d["scores"]))


def test_a_pool_keeps_its_best_record_per_prompt_and_refuses_other_prompts(tmp_path):
    from llamactl.records import Prompt

    prompts = [_prompt(), Prompt("p.jsonl:2", 1, {}, [{"role": "user", "content": "Bye"}], False)]
    hi = [{"role": "user", "content": "Hi"}]
    pool = _write(tmp_path / "pool.jsonl", [
        {"messages": [*hi, {"role": "assistant", "content": "x"}], "score": 1.0},
        {"messages": [*hi, {"role": "assistant", "content": "y"}], "score": 3.0},
        {"messages": [*hi, {"role": "assistant", "content": "z"}], "score": 3.0},
    ])  # fmt: skip
    got = rs.read_pool(pool, prompts)
    assert list(got) == [rs.dialog_key(hi)]
    score, rec, where = got[rs.dialog_key(hi)]
    assert (score, rec["messages"][-1]["content"], where) == (3.0, "y", f"{pool}:2")
    cfg = rs.RejectionSampleConfig(model="m", rm="r")
    # a tie with this run's best keeps this run's answer
    assert rs.records(prompts[0], ["a", "b"], [3.0, 2.0], cfg, got)[0]["pooled_from"] is None
    assert rs.records(prompts[0], ["a", "b"], [2.0, 2.5], cfg, got)[0]["pooled_from"] == f"{pool}:2"
    assert rs.records(prompts[0], ["", ""], [None, None], cfg, got)[0]["score"] == 3.0  # all empty: the pool's
    assert rs.records(prompts[1], ["", ""], [None, None], cfg, got) == []  # all empty, no pool: left out
    other = _write(tmp_path / "other.jsonl", [
        {"messages": [*hi, {"role": "assistant", "content": "x"}], "score": 1.0},
        {"messages": [{"role": "user", "content": "Other"}, {"role": "assistant", "content": "x"}], "score": 1.0},
    ])  # fmt: skip
    with pytest.raises(UserError, match=f"{other}:2: --pool: its prompt is not one of this run's"):
        rs.read_pool(other, prompts)


# ----------------------------------------------------------------------------------------------- the CLI


def test_cli_writes_sft_ready_dialogs_in_order(models, tmp_path):
    out = tmp_path / "out.jsonl"
    args = ["rejection-sample", "-m", models["policy"], "--rm", models["rm"], "--safety-rm", models["safety"],
            "-o", out, "-k", "3", "--max-new-tokens", "3"]  # fmt: skip
    with open(models["prompts"]) as f:
        proc = run_cli(*args, stdin=f.read())
    assert proc.returncode == 0, proc.stderr
    recs = _read(out)
    assert [r["id"] for r in recs] == ["a", "b", "c", "d"]
    for src, rec in zip(PROMPTS, recs, strict=True):
        messages = record_messages(rec, None)  # what sft reads
        prompt = src.get("messages") or [{"role": "user", "content": src["prompt"]}]
        assert messages[:-1] == prompt and messages[-1]["role"] == "assistant"
        assert "prompt" not in rec and rec.get("is_safety") == src.get("is_safety")
        assert len(rec["scores"]) == 3 and rec["score"] == max(s for s in rec["scores"] if s is not None)
    # --keep all: every sample, each a dialog
    proc = run_cli(*args[:-6], "-i", models["prompts"], "-o", tmp_path / "all.jsonl", "-k", "2", "--keep", "all",
                   "--max-new-tokens", "3")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    every = _read(tmp_path / "all.jsonl")
    assert [(r["id"], r["sample"]) for r in every] == [(p["id"], j) for p in PROMPTS for j in range(2)]
    assert all(record_messages(r, None)[-1]["role"] == "assistant" for r in every)


def test_torchrun_two_ranks_write_what_each_shard_gives_alone(models, tmp_path):
    """Rank r samples prompts r, r + 2, ... with seed + r: the same records as a single run on that shard."""
    common = ["--rm", models["rm"], "-k", "3", "--max-new-tokens", "3", "--batch-size", "1", "--dtype", "fp32"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "llamactl.cli", "rejection-sample", "-m", models["policy"], "-i", models["prompts"],
           "-o", str(tmp_path / "two.jsonl"), *common]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = _read(tmp_path / "two.jsonl")
    alone = []
    for rank in range(2):
        shard = _write(tmp_path / f"shard{rank}.jsonl", PROMPTS[rank::2])
        out = tmp_path / f"alone{rank}.jsonl"
        proc = run_cli("rejection-sample", "-m", models["policy"], "-i", shard, "-o", out, "--seed", rank, *common)
        assert proc.returncode == 0, proc.stderr
        alone.append(_read(out))
    merged = [alone[i % 2][i // 2] for i in range(len(PROMPTS))]
    assert [r["messages"] for r in two] == [r["messages"] for r in merged]
    for a, b in zip(two, merged, strict=True):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-5)  # fp32 on another thread count
