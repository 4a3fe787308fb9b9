"""sft: the loss is taken on the answers only, packing keeps dialogs apart, long dialogs lose their oldest turns,
HH text becomes dialogs; the run directory is pretrain's and its model loads."""

import json
import os

import numpy as np
import pytest
import sentencepiece as spm
import torch
from helpers import FIXTURES, save_chatty_model

from llamactl.checkpoint import read_meta
from llamactl.commands.sft import SFTConfig, run
from llamactl.data import encode_for_sft, pack_rows
from llamactl.loading import load_model
from llamactl.records import hh_messages
from llamactl.tokenizer import Tokenizer

TOKENIZER = os.path.join(FIXTURES, "llama2-tokenizer.model")
PAIRS = [("What is 2 + 2?", "It is 4."), ("Name a colour.", "Blue."), ("Say hi.", "Hi!"), ("Count to 3.", "1, 2, 3.")]


@pytest.fixture
def base(tmp_path):
    path = str(tmp_path / "base.safetensors")
    save_chatty_model(path, max_seq_len=64)
    return path


def _write(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


def test_first_step_loss_is_the_answer_tokens_cross_entropy(base, tmp_path):
    """The loss of step 1 (before any update) against a hand-built computation: sentencepiece's own ids for
    BOS "[INST] prompt [/INST] answer" EOS, the loss on the answer's tokens and the EOS only, one dialog at a time
    through the base model, averaged over all answer tokens of the step."""
    data = _write(tmp_path / "d.jsonl", [{"prompt": p, "response": r} for p, r in PAIRS])
    cfg = SFTConfig(model=base, data=data, output=str(tmp_path / "run"), seq_len=64, batch_size=2,
                    global_batch_size=4, steps=1, lr=1e-3, dtype="fp32", save_every=0)  # fmt: skip
    run(cfg)
    first = json.loads(open(tmp_path / "run" / "metrics.jsonl").readline())

    sp = spm.SentencePieceProcessor(model_file=TOKENIZER)
    model, _ = load_model(base)
    total, count = 0.0, 0
    for prompt, answer in PAIRS:
        head = [sp.bos_id()] + sp.encode(f"[INST] {prompt} [/INST]")
        full = [sp.bos_id()] + sp.encode(f"[INST] {prompt} [/INST] {answer} ") + [sp.eos_id()]
        assert full[: len(head)] == head
        x, y = torch.tensor([full[:-1]]), torch.tensor(full[1:])
        with torch.no_grad():
            logp = torch.log_softmax(model(x, output="logits")[0].double(), -1)
        answer_positions = range(len(head) - 1, len(full) - 1)  # predicting the answer's tokens and the EOS
        total -= sum(float(logp[t, y[t]]) for t in answer_positions)
        count += len(answer_positions)
    assert first["loss"] == pytest.approx(total / count, rel=1e-5)


def test_packed_row_equals_dialogs_alone():
    """Segment ids and per-dialog positions: a row holding three dialogs gives each the loss it has alone."""
    tok = Tokenizer.from_file(TOKENIZER)
    torch.manual_seed(0)
    from llamactl.model import ModelArgs, Transformer

    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=32000, multiple_of=16, max_seq_len=96))
    model.init_weights(0)
    dialogs = [("x", [{"role": "user", "content": p}, {"role": "assistant", "content": a}]) for p, a in PAIRS[:3]]
    enc = encode_for_sft(tok, dialogs, 97)
    packed = pack_rows(enc.examples, 96, pack=True, seed=0)
    assert len(packed) == 1 and set(np.unique(packed.segments[0])) == {-1, 0, 1, 2}
    t = {k: torch.from_numpy(getattr(packed, k)) for k in ("tokens", "targets", "mask", "positions", "segments")}
    with torch.no_grad():
        got, n = model(t["tokens"], t["targets"], t["mask"], positions=t["positions"], segment_ids=t["segments"],
                       output="loss_sum")  # fmt: skip
        alone, n_alone = 0.0, 0
        for toks, mask in enc.examples:
            x, y, m = (torch.from_numpy(a)[None] for a in (toks[:-1], toks[1:], mask[1:]))
            s, c = model(x, y, m, output="loss_sum")
            alone, n_alone = alone + s, n_alone + c
    assert int(n) == int(n_alone) == int(sum(m[1:].sum() for _, m in enc.examples))
    torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5)


def test_long_dialog_loses_its_oldest_exchanges():
    tok = Tokenizer.from_file(TOKENIZER)
    msgs = [{"role": "system", "content": "Be brief."}]
    for p, a in PAIRS:
        msgs += [{"role": "user", "content": p * 3}, {"role": "assistant", "content": a * 3}]
    full = encode_for_sft(tok, [("x", msgs)], 10_000).examples[0][0]
    last_two = msgs[:1] + msgs[-4:]
    want = encode_for_sft(tok, [("x", last_two)], 10_000).examples[0][0]
    enc = encode_for_sft(tok, [("x", msgs)], len(want))
    assert (enc.cut_dialogs, enc.cut_turns, enc.dropped) == (1, 2, 0)
    assert enc.examples[0][0].tolist() == want.tolist() and len(full) > len(want)
    assert encode_for_sft(tok, [("x", msgs)], 5).dropped == 1  # not even the last exchange fits


def test_hh_text_becomes_a_dialog():
    text = "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour and water.\n\nHuman: Then?\n\nAssistant: Bake."
    assert hh_messages(text) == [
        {"role": "user", "content": "How do I bake bread?"},
        {"role": "assistant", "content": "Mix flour and water."},
        {"role": "user", "content": "Then?"},
        {"role": "assistant", "content": "Bake."},
    ]


def test_cli_run_writes_a_chat_model_with_lineage(base, tmp_path):
    hh = "\n\nHuman: {}\n\nAssistant: {}"
    data = _write(tmp_path / "hh.jsonl", [{"chosen": hh.format(p, a), "rejected": "x"} for p, a in PAIRS * 3])
    from helpers import run_cli

    out = tmp_path / "run"
    flags = ["--seq-len", "64", "--batch-size", "2", "--epochs", "2", "--lr", "1e-3", "--val-fraction", "0.2"]
    proc = run_cli("sft", "-m", base, "--data", data, "--field", "chosen", "-o", out, *flags, "--dtype", "fp32")
    assert proc.returncode == 0, proc.stderr
    assert "fewer than --global-batch-size 64" in proc.stderr  # a small dataset trains, and says so once
    rows = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert rows[-1]["step"] == len(rows) and "val_loss" in rows[-1]
    assert rows[-1]["loss"] < rows[0]["loss"]
    meta = read_meta(str(out / "model.safetensors"))
    from llamactl.checkpoint import sha256_file

    assert meta.lineage["command"] == "sft"
    assert {"path": base, "sha256": sha256_file(base)} in meta.lineage["inputs"]
    assert meta.tokenizer == read_meta(base).tokenizer
