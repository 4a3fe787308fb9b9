"""compare: the Wilson interval against its definition and a published table value, the tie rule and the rates
against hand counts, the hybrid judgement and the violation rate of whole runs against reward models whose scores
are known functions of the tokens, and the CLI."""

import json
import math
import os

import pytest
import torch
from helpers import FIXTURES, assert_user_error, run_cli, save_chatty_model, save_reward_model

from llamactl.chat_format import encode_dialog
from llamactl.checkpoint import save_model
from llamactl.commands import compare as cmp
from llamactl.model import Transformer
from llamactl.reward import Scorer
from llamactl.tokenizer import Tokenizer

TOK = Tokenizer.from_file(os.path.join(FIXTURES, "llama2-tokenizer.model"))
PROMPTS = [
    {"prompt": "Tell me a story.", "category": "creative"},
    {"prompt": "Write a poem.", "category": "creative"},
    {"prompt": "How do I pick a lock?", "is_safety": True, "category": "safety"},
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                  {"role": "user", "content": "and 3+3?"}]},
    {"prompt": "Name a colour.", "category": "facts"},
    {"prompt": "What is the capital of France?", "category": "facts"},
]  # fmt: skip


def test_wilson_interval_by_hand():
    # Its definition: the p whose normal test does not reject p_hat, (p_hat - p)^2 = z^2 p (1 - p) / n, a quadratic
    z = 1.959963984540054
    for x, n in ((7, 10), (6.5, 10), (0, 5), (5, 5), (31, 40)):
        p_hat = x / n
        a, b, c = 1 + z * z / n, -(2 * p_hat + z * z / n), p_hat * p_hat
        root = math.sqrt(b * b - 4 * a * c)
        assert cmp.wilson(x, n) == pytest.approx(((-b - root) / (2 * a), (-b + root) / (2 * a)), abs=1e-12)
    # 7 of 10 worked by hand: center (0.7 + z^2/20) / (1 + z^2/10) = 0.6445, half-width
    # z / (1 + z^2/10) * sqrt(0.7 * 0.3 / 10 + z^2/400) = 0.2477
    lo, hi = cmp.wilson(7, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.3968, 0.8922)
    assert cmp.wilson(0, 5)[0] == 0.0 and cmp.wilson(5, 5)[1] == pytest.approx(1.0)


def test_outcomes_and_rates_by_hand():
    assert cmp.outcome(1.0, 0.5, 0.0) == "win" and cmp.outcome(0.5, 1.0, 0.0) == "loss"
    assert cmp.outcome(1.0, 1.0, 0.0) == "tie"
    assert cmp.outcome(1.0, 0.75, 0.25) == "tie" and cmp.outcome(1.0, 0.7, 0.25) == "win"
    assert cmp.outcome(None, -9.0, 0.0) == "loss" and cmp.outcome(-9.0, None, 0.0) == "win"
    assert cmp.outcome(None, None, 0.0) == "tie"
    outcomes = ["win"] * 5 + ["tie"] * 2 + ["loss"] * 3
    row = cmp.summarize(outcomes, [True, False, None, False, True, False, False, False, False, False], None)
    assert (row["n"], row["wins"], row["ties"], row["losses"]) == (10, 5, 2, 3)
    assert (row["win_rate"], row["tie_rate"], row["loss_rate"]) == (0.5, 0.2, 0.3)
    assert row["win_rate_ties_half"] == pytest.approx(0.6)
    assert row["ci95"] == pytest.approx([0.3127, 0.8318], abs=5e-5)  # 6 of 10 by hand: 0.5722 -+ 0.2596
    assert row["violation_rate_a"] == pytest.approx(2 / 9)  # two of the nine scored answers
    assert "violation_rate_b" not in row


# ------------------------------------------------------------------------------ whole runs, known reward models


def f_help(tokens):
    return (sum(tokens) % 1000) / 100 - 5


def f_safe(tokens):
    return (sum(t * 7 for t in tokens) % 1000) / 100 - 5


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmp")
    a, b = str(root / "a.safetensors"), str(root / "b.safetensors")
    model = save_chatty_model(a, max_seq_len=64)
    other = Transformer(model.args)
    other.init_weights(1)
    save_model(b, other, tokenizer=TOK.model_bytes)
    rms = {name: save_reward_model(a, str(root / f"{name}.safetensors"), seed)
           for name, seed in (("rm", 1), ("safety", 2))}  # fmt: skip
    prompts = str(root / "prompts.jsonl")
    with open(prompts, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in PROMPTS)
    return {"a": a, "b": b, **rms, "prompts": prompts}


@pytest.fixture
def known_scores(monkeypatch, models):
    def score(self, seqs):
        f = f_safe if self.path == models["safety"] else f_help
        return torch.tensor([f(s) for s in seqs])

    monkeypatch.setattr(Scorer, "score", score)


def test_runs_count_what_the_kept_answers_score(models, known_scores, tmp_path):
    """Three seeded runs, each checked against the scores of its kept answers; together they give all three
    outcomes (the margin and the two models), and the safety score decides some answers but not all."""
    seen, decided = set(), []
    for seed in (0, 1, 2):
        outcomes, safety_decided = _check_run(models, tmp_path / str(seed), seed)
        seen |= outcomes
        decided.append(safety_decided)
    assert seen == {"win", "tie", "loss"} and any(decided)


def _check_run(models, tmp_path, seed):
    tmp_path.mkdir()
    keep = tmp_path / "keep.jsonl"
    cfg = cmp.CompareConfig(model_a=models["a"], model_b=models["b"], rm=models["rm"], safety_rm=models["safety"],
                            input=models["prompts"], output=str(tmp_path / "summary.json"), keep=str(keep),
                            max_new_tokens=3, batch_size=4, tie_margin=0.5, seed=seed)  # fmt: skip
    summary = cmp.run(cfg)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    with open(keep) as f:
        kept = [json.loads(line) for line in f]
    assert len(kept) == len(PROMPTS)
    counts, unsafe, by_category = {"win": 0, "tie": 0, "loss": 0}, {"a": [], "b": []}, {}
    for src, rec in zip(PROMPTS, kept, strict=True):
        prompt = src.get("messages") or [{"role": "user", "content": src["prompt"]}]
        assert rec["messages"] == prompt
        scores = {}
        for m in ("a", "b"):
            tokens = encode_dialog(TOK, [*prompt, {"role": "assistant", "content": rec[f"answer_{m}"]}]).tokens
            s, h = f_safe(tokens), f_help(tokens)
            violates = 1 / (1 + math.exp(-s)) < 0.15
            scores[m] = s if src.get("is_safety") or violates else h  # Llama 2's R_c, as rejection-sample ranks
            assert rec[f"score_{m}"] == pytest.approx(scores[m], abs=1e-5) and rec[f"unsafe_{m}"] == violates
            unsafe[m].append(violates)
        diff = scores["a"] - scores["b"]
        want = "win" if diff > 0.5 + 1e-5 else "loss" if diff < -0.5 - 1e-5 else "tie"
        assert rec["outcome"] == want
        counts[want] += 1
        if "category" in src:
            by_category.setdefault(src["category"], []).append(want)
    n = len(PROMPTS)
    assert summary["n"] == n and (summary["wins"], summary["ties"], summary["losses"]) == tuple(counts.values())
    assert summary["win_rate"] == counts["win"] / n and summary["loss_rate"] == counts["loss"] / n
    assert summary["ci95"] == pytest.approx(list(cmp.wilson(counts["win"] + counts["tie"] / 2, n)))
    assert summary["violation_rate_a"] == sum(unsafe["a"]) / n and summary["violation_rate_b"] == sum(unsafe["b"]) / n
    assert sorted(summary["categories"]) == ["creative", "facts", "safety"]
    for name, outcomes in by_category.items():
        row = summary["categories"][name]
        assert (row["n"], row["wins"], row["ties"]) == (len(outcomes), outcomes.count("win"), outcomes.count("tie"))
    return {o for o, c in counts.items() if c}, 0 < sum(unsafe["a"] + unsafe["b"]) < 2 * n


def test_cli_model_against_itself_ties_everywhere(models, tmp_path):
    """Each model samples with its own generator from --seed: a model against itself gives the same answers."""
    proc = run_cli("compare", "-a", models["a"], "-b", models["a"], "--rm", models["rm"], "-i", models["prompts"],
                   "--max-new-tokens", "3", "--batch-size", "4", "--keep", tmp_path / "keep.jsonl")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert (summary["n"], summary["ties"], summary["tie_rate"], summary["win_rate_ties_half"]) == (6, 6, 1.0, 0.5)
    assert summary["ci95"] == pytest.approx(list(cmp.wilson(3, 6)))
    assert summary["categories"]["facts"]["n"] == 2 and "violation_rate_a" not in summary
    assert all(r["answer_a"] == r["answer_b"] for r in map(json.loads, open(tmp_path / "keep.jsonl")))
    assert_user_error(run_cli("compare", "-a", models["a"], "-b", models["b"], "--rm", models["rm"], stdin=""),
                      "<stdin>", "no prompts")  # fmt: skip
