"""eval: perplexity against transformers' LlamaForCausalLM run through the Hugging Face perplexity guide's loop
(labels -100 over each window's context part), KL divergence and same-top against an explicit sum over the
transformers logits of two different models, token JSONL against the text it encodes, and bad input."""

import json
import math
import os

import pytest
import torch
from helpers import FIXTURES, save_chatty_model, save_reward_model, tiny_hf_config

from llamactl.checkpoint import save_model
from llamactl.commands import eval as eval_command
from llamactl.commands.convert import ConvertConfig
from llamactl.commands.convert import run as convert
from llamactl.commands.eval import EvalConfig, run, windows
from llamactl.errors import UserError
from llamactl.model import ModelArgs, Transformer
from llamactl.tokenizer import Tokenizer

TOK = Tokenizer.from_file(os.path.join(FIXTURES, "llama2-tokenizer.model"))
LENGTHS = (1, 2, 17, 40, 64, 65, 150)  # one too short to score, one of a single target, some past the context
G = torch.Generator().manual_seed(3)
DOCS = [torch.randint(0, 128, (n,), generator=G).tolist() for n in LENGTHS]


def _write(path, records) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """Two transformers Llamas (the tiny GQA config, 64 positions), the second a perturbed copy of the first: their
    distributions are close and most of their top tokens agree. Weights ~N(0, 0.3) make the logits peaked enough that
    no top token is a near-tie for fp32 rounding to break. Each converted to a llamactl checkpoint."""
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    a = LlamaForCausalLM(tiny_hf_config()).eval()
    b = LlamaForCausalLM(tiny_hf_config()).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
            if name.endswith("norm.weight"):
                continue
            pa.copy_(torch.randn(pa.shape, generator=g) * 0.3)
            pb.copy_(pa + torch.randn(pa.shape, generator=g) * 0.01)
    out = {"data": _write(root / "docs.jsonl", [{"tokens": ids} for ids in DOCS])}
    for name, model in (("a", a), ("b", b)):
        model.save_pretrained(root / name)
        out[name] = str(root / f"{name}.safetensors")
        convert(ConvertConfig(src=str(root / name), output=out[name]))
        out[f"hf_{name}"] = model
    return out


def hf_windows(hf, ids: list[int], context: int, stride: int):
    """The Hugging Face guide's loop over one document: for each window that scores anything, (its mean loss times
    its count, the count, the logits at the positions whose next token is scored)."""
    seq = torch.tensor([ids])
    n, prev_end = len(ids), 0
    for begin in range(0, n, stride):
        end = min(begin + context, n)
        trg_len = end - prev_end
        input_ids = seq[:, begin:end]
        labels = input_ids.clone()
        labels[:, :-trg_len] = -100
        counted = labels[0, 1:] != -100  # the model shifts labels: logits at j predict token j + 1
        k = int(counted.sum())
        if k:
            with torch.no_grad():
                out = hf(input_ids, labels=labels)
            yield out.loss.item() * k, k, out.logits[0, :-1][counted]
        prev_end = end
        if end == n:
            break


def test_windows_by_hand():
    assert windows(10, 4, 4) == [(0, 4, 1), (4, 8, 5), (8, 10, 9)]  # disjoint: each window's first is context only
    assert windows(9, 4, 4) == [(0, 4, 1), (4, 8, 5)]  # [8, 9) would score nothing
    assert windows(10, 4, 2) == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]  # >= context - stride of history
    assert windows(3, 8, 8) == [(0, 3, 1)] and windows(1, 8, 8) == []


@pytest.mark.parametrize("context,stride", [(None, None), (64, 13), (16, 16), (16, 5)])
def test_perplexity_equals_transformers_guide_loop(hf_pair, context, stride, tmp_path):
    out = tmp_path / "summary.json"
    summary = run(EvalConfig(model=hf_pair["a"], data=hf_pair["data"], output=str(out), context=context,
                             stride=stride, batch_size=3, dtype="fp32"))  # fmt: skip
    assert json.loads(out.read_text()) == summary
    c = context or 64
    s = stride or c
    total = count = n_windows = 0
    for ids in DOCS:
        for loss_sum, k, _ in hf_windows(hf_pair["hf_a"], ids, c, s):
            total, count, n_windows = total + loss_sum, count + k, n_windows + 1
    scored = [n - math.ceil(n / c) if s == c else n - 1 for n in LENGTHS if n >= 2]  # the docstring's counts
    assert summary["tokens_scored"] == count == sum(scored) and summary["windows"] == n_windows
    assert (summary["documents"], summary["documents_skipped"], summary["context"], summary["stride"]) == (6, 1, c, s)
    assert summary["nll_mean"] == pytest.approx(total / count, rel=1e-5)
    assert summary["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert "kl_mean" not in summary and summary["dtype"] == "fp32"


def test_kl_and_same_top_equal_an_explicit_sum_over_transformers_logits(hf_pair, tmp_path, monkeypatch):
    monkeypatch.setattr(eval_command, "LOGIT_ELEMENTS", 128 * 7)  # 7 positions at a time: chunks across windows
    summary = run(EvalConfig(model=hf_pair["a"], reference=hf_pair["b"], data=hf_pair["data"],
                             output=str(tmp_path / "s.json"), context=16, stride=5, batch_size=4))  # fmt: skip
    kl, same, ref_total, gaps = [], 0, 0.0, []
    for ids in DOCS:
        ours, theirs = hf_windows(hf_pair["hf_a"], ids, 16, 5), hf_windows(hf_pair["hf_b"], ids, 16, 5)
        for (_, _, la), (ref_sum, _, lb) in zip(ours, theirs, strict=True):
            log_q, log_p = la.double().log_softmax(-1), lb.double().log_softmax(-1)  # q: the model, p: the reference
            kl += (log_p.exp() * (log_p - log_q)).sum(-1).tolist()
            same += int((la.argmax(-1) == lb.argmax(-1)).sum())
            ref_total += ref_sum
            for logits in (la, lb):
                top2 = logits.topk(2).values
                gaps += (top2[:, 0] - top2[:, 1]).tolist()
    assert min(gaps) > 1e-4  # no near-tie: both sides must pick the same top tokens
    n = len(kl)
    kl.sort()

    def pct(q):  # llama.cpp's percentile: linear between the neighbours of q * (n - 1)
        p = q * (n - 1)
        i = int(p)
        return kl[i] + (p - i) * (kl[min(i + 1, n - 1)] - kl[i])

    assert summary["tokens_scored"] == n == sum(n - 1 for n in LENGTHS)
    want = {"kl_mean": sum(kl) / n, "kl_median": pct(0.5), "kl_p99": pct(0.99), "kl_p999": pct(0.999),
            "kl_max": kl[-1], "same_top": same / n, "reference_nll_mean": ref_total / n}  # fmt: skip
    for key, value in want.items():
        assert summary[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert summary["reference_perplexity"] == pytest.approx(math.exp(ref_total / n), rel=1e-5)
    assert 0.2 < summary["same_top"] < 0.95 and 0 < summary["kl_median"] < summary["kl_p99"] < summary["kl_max"]


@pytest.fixture(scope="module")
def chatty(tmp_path_factory):
    """Two random models with Llama 2's tokenizer and the same weights, contexts 64 and 32."""
    root = tmp_path_factory.mktemp("chatty")
    paths = {"m": str(root / "m.safetensors"), "short": str(root / "short.safetensors")}
    save_chatty_model(paths["m"], max_seq_len=64)
    save_chatty_model(paths["short"], max_seq_len=32)
    return paths


STORY = ("Once upon a time, in a quiet village by the sea, there lived a girl who collected shells. "
         "Every morning she walked the shore, and every evening she sorted what she had found by colour.")  # fmt: skip
TEXTS = [STORY, "", "The cat sat on the mat.", "x", "Ünïcödé and emoji 🙂 also count."]


def test_token_jsonl_equals_the_text_it_encodes(chatty, tmp_path):
    def summary(name, records=None, text=None, **kw):
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        else:
            _write(path, records)
        got = run(EvalConfig(model=chatty["m"], data=str(path), output=str(tmp_path / "o.json"), context=24,
                             stride=10, **kw))  # fmt: skip
        return {k: v for k, v in got.items() if k != "data"}

    one = summary("story.txt", text=STORY)
    assert one == summary("story.jsonl", [{"text": STORY}])
    assert one == summary("story-ids.jsonl", [{"tokens": TOK.encode(STORY, bos=True)}])
    assert one["tokens_scored"] == len(TOK.encode(STORY)) and one["documents"] == 1  # all but the BOS
    many = summary("many.jsonl", [{"body": t} for t in TEXTS], field="body")
    ids = [{"tokens": TOK.encode(t, bos=True), "id": i} for i, t in enumerate(TEXTS)]
    assert many == summary("many-ids.jsonl", ids)
    assert (many["documents"], many["documents_skipped"]) == (4, 1)  # "" is the BOS alone
    assert many["tokens_scored"] == sum(len(TOK.encode(t)) for t in TEXTS)


def test_context_defaults_to_the_shorter_model_and_a_model_against_itself_differs_nowhere(chatty, tmp_path):
    got = run(EvalConfig(model=chatty["m"], reference=chatty["short"], data=str(_write(tmp_path / "d.jsonl", [
        {"text": STORY * 2}])), output=str(tmp_path / "o.json"), batch_size=2))  # fmt: skip
    assert (got["context"], got["stride"]) == (32, 32)
    assert got["kl_max"] == pytest.approx(0, abs=1e-6) and got["same_top"] == 1.0
    assert got["reference_nll_mean"] == pytest.approx(got["nll_mean"], rel=1e-6)


@pytest.fixture(scope="module")
def bad_world(chatty, tmp_path_factory):
    """Models a reference must not be (a reward model, another tokenizer, none, another vocabulary size) and data
    that must be refused."""
    from sentencepiece import sentencepiece_model_pb2

    root = tmp_path_factory.mktemp("bad")
    w = dict(chatty)
    w["rm"] = save_reward_model(chatty["m"], str(root / "rm.safetensors"), 1)
    proto = sentencepiece_model_pb2.ModelProto.FromString(TOK.model_bytes)
    proto.pieces[1000].score -= 1.0
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=32000, multiple_of=16, max_seq_len=64))
    w["othertok"] = str(root / "othertok.safetensors")
    save_model(w["othertok"], model, tokenizer=proto.SerializeToString())
    w["notok"] = str(root / "notok.safetensors")
    save_model(w["notok"], model)
    w["notok100"] = str(root / "notok100.safetensors")
    save_model(w["notok100"], Transformer(ModelArgs(**{**model.args.to_dict(), "vocab_size": 100})))
    w["ids"] = _write(root / "ids.jsonl", [{"tokens": [1, 15043, 3186]}])
    w["text"] = str(root / "story.txt")
    with open(w["text"], "w") as f:
        f.write(STORY)
    for name, content in {
        "broken": '{"tokens": [1, 2]}\n{"tokens": [1\n',
        "no_field": '{"tokens": [1, 2]}\n{"body": "x"}\n',
        "text_record": '{"text": "a"}\n',
        "oov": '{"tokens": [1, 32000]}\n',
        "not_int": '{"tokens": [1, "a"]}\n',
        "both": '{"tokens": [1, 2], "text": "a"}\n',
        "too_short": '{"tokens": [1]}\n{"text": ""}\n',
        "empty": "",
    }.items():
        w[name] = str(root / f"{name}.jsonl")
        with open(w[name], "w") as f:
            f.write(content)
    return w


BAD = [
    # (id, config fields with {placeholders}, what the one line names)
    ("malformed-jsonl", dict(data="{broken}"), ["{broken}:2", "invalid JSON"]),
    ("field-missing", dict(data="{no_field}"), ["{no_field}:2", "'text'"]),
    ("named-field-missing", dict(data="{text_record}", field="body"), ["{text_record}:1", "'body'"]),
    ("out-of-vocab", dict(data="{oov}"), ["{oov}:1", "32000", "[0, 32000)"]),
    ("id-not-int", dict(data="{not_int}"), ["{not_int}:1", "'a'"]),
    ("tokens-and-text", dict(data="{both}"), ["{both}:1", "'tokens'", "'text'"]),
    ("nothing-to-score", dict(data="{too_short}"), ["{too_short}", "no token to score", "2 documents"]),
    ("no-documents", dict(data="{empty}"), ["{empty}", "no token to score", "0 documents"]),
    ("stride-over-context", dict(context=16, stride=17), ["--stride 17", "--context 16"]),
    ("stride-over-default-context", dict(stride=65), ["--stride 65", "64"]),
    ("stride-0", dict(stride=0), ["--stride must be at least 1"]),
    ("context-over-model", dict(context=65), ["--context 65", "{m}", "64"]),
    ("context-over-reference", dict(reference="{short}", context=48), ["--context 48", "--reference {short}", "32"]),
    ("context-1", dict(context=1), ["--context must be at least 2"]),
    ("batch-size-0", dict(batch_size=0), ["--batch-size"]),
    ("format", dict(format="csv"), ["--format", "'csv'"]),
    ("field-of-text", dict(data="{text}", field="body"), ["--field", "{text}", "text"]),
    ("reward-model", dict(model="{rm}"), ["{rm}", "scalar", "a language model is needed to evaluate"]),
    ("reward-model-reference", dict(reference="{rm}"), ["{rm}", "scalar", "needed as the --reference"]),
    ("reference-other-tokenizer", dict(reference="{othertok}"), ["--reference {othertok}", "tokenizer differs"]),
    ("reference-no-tokenizer", dict(reference="{notok}"), ["--reference {notok}", "no tokenizer"]),
    ("reference-other-vocab", dict(model="{notok}", reference="{notok100}"), ["{notok100}", "100", "32000"]),
    ("text-without-tokenizer", dict(model="{notok}", data="{text}"), ["{notok}", "no tokenizer"]),
    ("output-is-model", dict(output="{m}"), ["{m}", "is also an input"]),
]


@pytest.mark.parametrize("fields,needles", [row[1:] for row in BAD], ids=[row[0] for row in BAD])
def test_bad_input_is_one_line_naming_it(bad_world, fields, needles, tmp_path):
    cfg = {"model": "{m}", "data": "{ids}", "output": str(tmp_path / "o.json"), **fields}
    cfg = {k: v.format(**bad_world) if isinstance(v, str) else v for k, v in cfg.items()}
    with pytest.raises(UserError) as e:
        run(EvalConfig(**cfg))
    message = str(e.value)
    assert "\n" not in message
    for needle in needles:
        assert needle.format(**bad_world) in message, (needle, message)
    assert not os.path.exists(tmp_path / "o.json")
