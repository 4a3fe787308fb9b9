"""train-rm and score: the margin ranking loss on pairs scored in one packed batch equals the loss computed by hand
from transformers' LlamaForSequenceClassification scores; the paper's margins and ratings; a preference is learnt;
the run resumes exactly after kill -9; score gives transformers' scores."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from helpers import FIXTURES, assert_user_error, run_cli, save_chatty_model, save_reward_model

from llamactl.chat_format import DialogError, encode_dialog
from llamactl.checkpoint import load_tensors, read_meta
from llamactl.commands.train_rm import TrainRMConfig, run
from llamactl.data import MARGINS, encode_pairs, pair_margin
from llamactl.records import record_pair
from llamactl.tokenizer import Tokenizer
from llamactl.training.tasks import PairsTask

TOKENIZER = os.path.join(FIXTURES, "llama2-tokenizer.model")
RATED = [
    {"prompt": "What is 2 + 2?", "chosen": "It is 4.", "rejected": "Five.", "rating": "significantly better"},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
     "chosen": "Blue.", "rejected": "I will not.", "rating": "slightly better"},
    {"chosen": "\n\nHuman: Say hi.\n\nAssistant: Hi!", "rejected": "\n\nHuman: Say hi.\n\nAssistant: No.",
     "rating": "Unsure"},
]  # fmt: skip


def _write(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


@pytest.fixture
def rm_path(tmp_path):
    """A reward model with a random scalar head (zeros would score everything 0), from a tiny chat model."""
    base = str(tmp_path / "base.safetensors")
    save_chatty_model(base, max_seq_len=64)
    return save_reward_model(base, str(tmp_path / "rm.safetensors"), 1, "helpfulness")


def _hf_scores(rm_path, tmp_path, sequences):
    from transformers import LlamaForSequenceClassification

    proc = run_cli("convert", rm_path, "--to", "hf", "-o", str(tmp_path / "hf"))
    assert proc.returncode == 0, proc.stderr
    hf = LlamaForSequenceClassification.from_pretrained(str(tmp_path / "hf"), torch_dtype=torch.float32).eval()
    with torch.no_grad():  # one sequence at a time: transformers reads the score at its last token
        return [float(hf(input_ids=torch.tensor([s])).logits[0, 0]) for s in sequences]


@pytest.mark.parametrize("pack", [True, False])
def test_pair_loss_is_the_margin_ranking_loss_of_transformers_scores(rm_path, tmp_path, pack):
    """Chosen and rejected of three pairs in one forward batch (packed or padded): the loss sum equals
    sum(-log sigmoid(r_c - r_r - m)) with r from transformers' sequence classifier and m from the paper's small
    margins (significantly better 1, slightly better 1/3, unsure 0)."""
    tok = Tokenizer.from_file(TOKENIZER)
    pairs = [record_pair(r) for r in RATED]
    ps = encode_pairs(tok, pairs, 64, "small")
    seqs = [encode_dialog(tok, p.chosen).tokens for p in pairs] + [encode_dialog(tok, p.rejected).tokens for p in pairs]
    hf = _hf_scores(rm_path, tmp_path, seqs)
    margins = [1.0, 1 / 3, 0.0]
    want = sum(-math.log(1 / (1 + math.exp(-(hf[i] - hf[3 + i] - margins[i])))) for i in range(3))

    meta = read_meta(rm_path)
    from llamactl.loading import build_model

    model = build_model(meta.args, load_tensors(rm_path), rm_path)
    task = PairsTask(ps, 3, 1, "cpu", 0, pack=pack)
    batch = task._batch(ps, [0, 1, 2])
    assert ("segments" in batch) == pack  # three short pairs share rows when packed
    with torch.no_grad():
        got, count = task.loss(model, batch)
    assert int(count) == 3
    assert float(got) == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_ratings_and_the_papers_margins():
    assert MARGINS["small"] == pytest.approx((1, 2 / 3, 1 / 3, 0)) and MARGINS["large"] == (3, 2, 1, 0)
    small = [pair_margin(record_pair(r).rating, "small") for r in RATED]
    assert small == pytest.approx([1, 1 / 3, 0])
    large = [pair_margin(record_pair(r).rating, "large") for r in RATED]
    assert large == [3, 1, 0]
    assert pair_margin(record_pair({**RATED[0], "rating": "Better"}).rating, "large") == 2
    assert pair_margin(record_pair({**RATED[0], "rating": 0.25}).rating, "small") == 0.25  # a number: the margin
    assert pair_margin(record_pair(RATED[0]).rating, "none") == 0
    for bad, needle in [
        ({**RATED[0], "rating": "much better"}, "rating 'much better'"),
        ({**RATED[0], "rejected": "It is 4."}, "equals"),
        ({"prompt": "x", "chosen": "a"}, "'rejected'"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "chosen": "b",
          "rejected": "c"}, "must end with the user"),
    ]:  # fmt: skip
        with pytest.raises(DialogError, match=needle):
            record_pair(bad)


def _preferences(n):
    """A learnable preference: the chosen answer thanks the user, the rejected one is rude."""
    topics = ["cats", "rain", "tea", "maps", "songs", "boats", "bread", "stars", "clocks", "rivers", "chess", "bees"]
    out = []
    for i in range(n):
        t = topics[i % len(topics)]
        out.append({"prompt": f"Tell me about {t} number {i}.", "chosen": f"Gladly! {t.title()} are lovely, thanks.",
                    "rejected": f"No. {t.title()} bore me, go away."})  # fmt: skip
    return out


def _cfg(base, data, out, **kw):
    return TrainRMConfig(**{**dict(model=base, data=data, output=str(out), seq_len=64, batch_size=4,
                           global_batch_size=8, steps=12, lr=3e-3, val_fraction=0.2, eval_every=6, dtype="fp32",
                           save_every=4, kind="safety", seed=0), **kw})  # fmt: skip


@pytest.fixture
def base(tmp_path):
    path = str(tmp_path / "base.safetensors")
    save_chatty_model(path, max_seq_len=64)
    return path


def test_learns_a_preference_and_writes_a_safety_reward_model(base, tmp_path):
    data = _write(tmp_path / "p.jsonl", _preferences(40))
    summary = run(_cfg(base, data, tmp_path / "run"))
    rows = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, 13)) and "pairs_per_s" in rows[0]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # a zero head scores every answer 0
    assert summary["val_accuracy"] == 1.0 and summary["val_loss"] < 0.5  # 8 held-out pairs, far from chance
    meta = read_meta(str(tmp_path / "run" / "model.safetensors"))
    assert meta.args.head == "scalar" and meta.role == "safety" and meta.lineage["command"] == "train-rm"
    assert [i["path"] for i in meta.lineage["inputs"]] == [base, data]


def test_kill_9_mid_checkpoint_then_resume_gives_the_uninterrupted_curve(base, tmp_path):
    data = _write(tmp_path / "p.jsonl", _preferences(40))
    run(_cfg(base, data, tmp_path / "straight"))
    cfg = _cfg(base, data, tmp_path / "broken")
    code = f"from llamactl.commands.train_rm import TrainRMConfig, run; run(TrainRMConfig(**{cfg.__dict__!r}))"
    env = {**os.environ, "LLAMACTL_FAULT": "checkpoint-written@8"}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True).returncode == -9
    cfg.resume = True
    run(cfg)

    def curve(run_dir):
        return [
            {k: v for k, v in json.loads(x).items() if not k.endswith("_per_s")}
            for x in open(run_dir / "metrics.jsonl")
        ]

    assert curve(tmp_path / "broken") == curve(tmp_path / "straight")


def test_rated_and_unrated_pairs_mixed_need_margin_none(base, tmp_path):
    data = _write(tmp_path / "p.jsonl", [RATED[0], {k: v for k, v in RATED[1].items() if k != "rating"}])
    proc = run_cli("train-rm", "-m", base, "--data", data, "-o", str(tmp_path / "r"), "--steps", "1")
    assert_user_error(proc, f"{data}:2", "'rating'", "--margin none")
    assert not os.path.exists(tmp_path / "r")


def test_score_gives_transformers_scores(rm_path, tmp_path):
    tok = Tokenizer.from_file(TOKENIZER)
    hello = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]
    records = [{"prompt": "What is 2 + 2?", "response": "It is 4.", "id": 1}, {"messages": hello}]
    from llamactl.records import record_messages

    hf = _hf_scores(rm_path, tmp_path, [encode_dialog(tok, record_messages(r, None)).tokens for r in records])
    proc = run_cli("score", "-m", rm_path, "--batch-size", "2", stdin="".join(json.dumps(r) + "\n" for r in records))
    assert proc.returncode == 0, proc.stderr
    out = [json.loads(x) for x in proc.stdout.splitlines()]
    assert [o.get("id") for o in out] == [1, None]
    assert [o["score"] for o in out] == pytest.approx(hf, rel=1e-4, abs=1e-5)
    assert [o["score_prob"] for o in out] == pytest.approx([1 / (1 + math.exp(-h)) for h in hf], rel=1e-4)


def test_score_refuses_a_language_model(base):
    proc = run_cli("score", "-m", base, stdin=json.dumps({"prompt": "a", "response": "b"}) + "\n")
    assert_user_error(proc, base, "language-model head", "reward model")


def test_a_long_pair_loses_the_same_exchanges_on_both_sides():
    """Only the rejected dialog outgrows the limit: both sides drop the oldest exchange, so the two answers are
    judged after the same context (the chat format's encoding of the last exchange alone)."""
    tok = Tokenizer.from_file(TOKENIZER)
    long = "word " * 30
    first = "\n\nHuman: " + long + "\n\nAssistant: ok"
    rec = {"chosen": first + "\n\nHuman: q2\n\nAssistant: short",
           "rejected": first + "\n\nHuman: q2\n\nAssistant: " + long * 2}  # fmt: skip
    ps = encode_pairs(tok, [record_pair(rec)], 90, "none")
    last = [{"role": "user", "content": "q2"}]
    assert (
        ps.cut == 1
        and ps.chosen[0].tolist() == encode_dialog(tok, [*last, {"role": "assistant", "content": "short"}]).tokens
    )
    assert ps.rejected[0].tolist() == encode_dialog(tok, [*last, {"role": "assistant", "content": long * 2}]).tokens
