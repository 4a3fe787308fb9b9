"""The flow end to end, as a user chains it in a shell: tokenize -> pretrain -> sft -> chat, on a tiny model."""

import json
import os

from helpers import run_cli

from llamactl.checkpoint import read_meta

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--set", "dim=32", "--set", "n_layers=1", "--set", "n_heads=4", "--set", "multiple_of=16"]


def _ok(*argv, stdin=None):
    proc = run_cli(*argv, stdin=stdin)
    assert proc.returncode == 0, (argv, proc.stderr[-2000:])
    return proc


def test_tokenize_pretrain_sft_chat(tmp_path):
    text = tmp_path / "play.txt"
    with open(os.path.join(ROOT, "examples", "tinyshakespeare.txt")) as f:
        text.write_text(f.read(60_000))
    tok, shards, base, sft = tmp_path / "tok.model", tmp_path / "shards", tmp_path / "base", tmp_path / "sft"
    _ok("tokenize", "train", text, "-o", tok, "--vocab-size", "400")
    _ok("tokenize", "encode", text, "-t", tok, "--out", shards, "--val-fraction", "0.1")
    _ok("pretrain", shards, "-o", base, *TINY, "--steps", "3", "--seq-len", "64", "--batch-size", "4",
        "--eval-every", "3", "--dtype", "fp32")  # fmt: skip
    dialogs = tmp_path / "dialogs.jsonl"
    pairs = [("Who art thou?", "A player."), ("Where goest thou?", "To Verona."), ("What news?", "None, my lord.")]
    dialogs.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs * 4))
    _ok("sft", "-m", base / "model.safetensors", "--data", dialogs, "-o", sft, "--seq-len", "64", "--steps", "2",
        "--batch-size", "2", "--global-batch-size", "4", "--lr", "1e-3", "--dtype", "fp32")  # fmt: skip
    questions = "".join(json.dumps({"messages": [{"role": "user", "content": p}]}) + "\n" for p, _ in pairs)
    out = _ok("chat", "-m", sft / "model.safetensors", "--max-new-tokens", "8", "--temperature", "0", stdin=questions)
    answered = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["messages"][0]["content"] for r in answered] == [p for p, _ in pairs]
    assert all(r["messages"][-1]["role"] == "assistant" for r in answered)
    # every stage says where it came from: sft's model names the pretrained model as its parent
    meta = read_meta(str(sft / "model.safetensors"))
    assert meta.lineage["command"] == "sft" and meta.lineage["parent"]["command"] == "pretrain"
    assert meta.tokenizer == read_meta(str(base / "model.safetensors")).tokenizer == tok.read_bytes()
