"""tokenize train / encode / decode: against sentencepiece, the same whatever the workers, and bad input."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from helpers import assert_user_error, run_cli

from llamactl.chat_format import encode_dialog
from llamactl.commands import tokenize as tk
from llamactl.commands.tokenize import (
    DecodeConfig,
    EncodeConfig,
    TrainConfig,
    run_decode,
    run_encode,
    run_train,
    split_documents,
)
from llamactl.errors import UserError
from llamactl.shards import open_shards
from llamactl.tokenizer import Tokenizer

ROOT = Path(__file__).parents[2]
LLAMA2 = str(ROOT / "tests" / "fixtures" / "llama2-tokenizer.model")
SHAKESPEARE = ROOT / "examples" / "tinyshakespeare.txt"


@pytest.fixture(scope="module")
def sp() -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=LLAMA2)


@pytest.fixture(scope="module")
def play(tmp_path_factory) -> Path:
    """The first 4000 lines of tiny Shakespeare (about 1000 paragraphs)."""
    path = tmp_path_factory.mktemp("text") / "play.txt"
    path.write_text("\n".join(SHAKESPEARE.read_text(encoding="utf-8").split("\n")[:4000]) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def small_blocks(monkeypatch):
    """Cut inputs into many blocks, so that two workers really share the work."""
    monkeypatch.setattr(tk, "BLOCK_BYTES", 2048)


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------------------------------------------------- train


def test_train_on_text_and_jsonl(tmp_path, play):
    records = write_jsonl(tmp_path / "extra.jsonl", [{"body": "Numbers 0123456789 here.\nÇa va?", "id": 1}])
    report = run_train(
        TrainConfig(inputs=[str(play), str(records)], output=str(tmp_path / "t.model"), vocab_size=700, field="body")
    )
    tok = Tokenizer.from_file(str(tmp_path / "t.model"))
    assert report["vocab_size"] == tok.vocab_size == 700
    assert report["lines"] == sum(1 for line in play.read_text().split("\n") if line) + 2
    assert tok.encode("0123456789") == tok.sp.encode("0123456789")
    assert tok.sp.encode("42", out_type=str) == ["▁", "4", "2"]  # digits split, learnt from the JSONL field


def test_train_errors(tmp_path, play):
    with pytest.raises(UserError, match="at most"):
        run_train(TrainConfig(inputs=[str(play)], output=str(tmp_path / "t.model"), vocab_size=100_000))
    assert not (tmp_path / "t.model").exists()
    records = write_jsonl(tmp_path / "r.jsonl", [{"text": "a"}, {"txt": "b"}])
    with pytest.raises(UserError, match=r"r\.jsonl:2: missing field 'text'"):
        run_train(TrainConfig(inputs=[str(records)], output=str(tmp_path / "t.model"), vocab_size=300))
    with pytest.raises(UserError, match="--field names the text field of JSONL input, and no input is JSONL"):
        run_train(TrainConfig(inputs=[str(play)], field="text"))
    (tmp_path / "blank.txt").write_text("\n\n")
    with pytest.raises(UserError, match="no text to train on"):
        run_train(TrainConfig(inputs=[str(tmp_path / "blank.txt")], output=str(tmp_path / "t.model")))


# --------------------------------------------------------------------------------------------------------- encode


def test_split_documents():
    text = "  \nA b\n c\n\n\n  \t\nD\r\n\r\nE\n   "
    assert split_documents(text, "paragraph") == ["A b\n c", "D\r", "E"]
    assert split_documents(text, "line") == ["A b", " c", "D\r", "E"]
    assert split_documents(text, "file") == [text]
    assert split_documents(" \n\t", "file") == split_documents(" \n\t", "paragraph") == []


def test_encode_jsonl_agrees_with_sentencepiece(tmp_path, sp):
    texts = ["Hello world", "  odd  whitespace\t\n", "日本語 🦙", ""]
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "text": t, "meta": {"k": [1]}} for i, t in enumerate(texts)])
    run_encode(EncodeConfig(tokenizer=LLAMA2, inputs=[str(inp)], output=str(tmp_path / "out.jsonl")))
    expected = [{"id": i, "meta": {"k": [1]}, "tokens": [1, *sp.encode(t)]} for i, t in enumerate(texts)]
    lines = (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()
    assert lines == [json.dumps(r, ensure_ascii=False) for r in expected]  # byte for byte what json.dumps writes
    run_encode(EncodeConfig(LLAMA2, [str(inp)], str(tmp_path / "o2.jsonl"), bos=False, eos=True, field="text"))
    assert [r["tokens"] for r in read_jsonl(tmp_path / "o2.jsonl")] == [[*sp.encode(t), 2] for t in texts]
    # decode is the reverse: the original records come back.
    run_decode(DecodeConfig(tokenizer=LLAMA2, inputs=[str(tmp_path / "out.jsonl")], output=str(tmp_path / "d.jsonl")))
    assert read_jsonl(tmp_path / "d.jsonl") == read_jsonl(inp)


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_encode_text_documents(tmp_path, sp, play, newline):
    # Read in small blocks, cut where documents end: the documents are those of the whole text.
    long_paragraph = "\n".join(["a paragraph longer than a block"] * 300)
    text = (play.read_text() + "\n\n" + long_paragraph + "\n").replace("\n", newline)
    (tmp_path / "play.txt").write_bytes(text.encode())
    for doc_split in ("paragraph", "line", "file"):
        out = tmp_path / f"{doc_split}.jsonl"
        run_encode(EncodeConfig(LLAMA2, [str(tmp_path / "play.txt")], str(out), doc_split=doc_split))
        docs = split_documents(text, doc_split)
        assert len(docs) > 500 or doc_split == "file"
        expected = [json.dumps({"tokens": [1, *ids]}) for ids in sp.encode(docs)]
        assert out.read_text().splitlines() == expected


def test_encode_shards(tmp_path, sp, play):
    report = run_encode(EncodeConfig(LLAMA2, [str(play)], out=str(tmp_path / "s"), shard_tokens=5000))
    docs = split_documents(play.read_text(), "paragraph")
    ds = open_shards(str(tmp_path / "s"))
    train = ds.split("train")
    assert set(ds.splits) == {"train"} and len(train.shards) > 3
    assert ds.tokenizer_sha256 == Tokenizer.from_file(LLAMA2).sha256 and ds.dtype == np.uint16
    expected = [[1, *ids, 2] for ids in sp.encode(docs)]
    assert report["documents"] == train.num_docs == len(docs)
    assert report["tokens"] == len(train) == sum(map(len, expected))
    assert [train.document(i).tolist() for i in range(len(docs))] == expected


def test_val_fraction(tmp_path, play):
    run_encode(EncodeConfig(LLAMA2, [str(play)], out=str(tmp_path / "all")))
    run_encode(EncodeConfig(LLAMA2, [str(play)], out=str(tmp_path / "s"), val_fraction=0.1))
    every = open_shards(str(tmp_path / "all")).split("train")
    ds = open_shards(str(tmp_path / "s"))
    n = every.num_docs
    val_ids = [i for i in range(n) if i % 10 == 0]  # every 10th document, from the first: ceil(n / 10) of them
    assert ds.split("val").num_docs == len(val_ids) == -(-n // 10)
    assert ds.split("train").num_docs == n - len(val_ids)
    train_ids = [i for i in range(n) if i % 10]
    for name, ids in (("val", val_ids), ("train", train_ids)):
        split = ds.split(name)
        assert [split.document(k).tolist() for k in range(len(ids))] == [every.document(i).tolist() for i in ids]


def test_chat(tmp_path):
    tok = Tokenizer.from_file(LLAMA2)
    dialogs = [
        [{"role": "user", "content": "Hi"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
        ],
    ]
    inp = write_jsonl(tmp_path / "d.jsonl", [{"messages": d, "id": i} for i, d in enumerate(dialogs)])
    run_encode(EncodeConfig(LLAMA2, [str(inp)], str(tmp_path / "out.jsonl"), chat=True))
    expected = [
        {"id": i, "tokens": encode_dialog(tok, d).tokens, "mask": encode_dialog(tok, d).mask}
        for i, d in enumerate(dialogs)
    ]
    lines = (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()
    assert lines == [json.dumps(r, ensure_ascii=False) for r in expected]


@pytest.mark.usefixtures("small_blocks")
def test_output_is_the_same_whatever_the_workers(tmp_path, play):
    records = [{"text": p, "n": i} for i, p in enumerate(split_documents(play.read_text(), "paragraph"))]
    jsonl = write_jsonl(tmp_path / "in.jsonl", records)
    dialogs = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {"messages": [{"role": "user", "content": r["text"]}, {"role": "assistant", "content": "Aye."}]}
            for r in records
        ],
    )
    for workers in (1, 2):
        run_encode(
            EncodeConfig(
                LLAMA2,
                [str(play), str(jsonl)],
                out=str(tmp_path / f"s{workers}"),
                workers=workers,
                val_fraction=0.25,
                shard_tokens=20_000,
            )
        )
        run_encode(EncodeConfig(LLAMA2, [str(jsonl)], str(tmp_path / f"j{workers}.jsonl"), workers=workers))
        run_encode(
            EncodeConfig(LLAMA2, [str(dialogs)], str(tmp_path / f"c{workers}.jsonl"), workers=workers, chat=True)
        )
    for name in ("j{}.jsonl", "c{}.jsonl"):
        assert (tmp_path / name.format(1)).read_bytes() == (tmp_path / name.format(2)).read_bytes()
    one, two = sorted(os.listdir(tmp_path / "s1")), sorted(os.listdir(tmp_path / "s2"))
    assert one == two and len(one) > 4
    assert all((tmp_path / "s1" / f).read_bytes() == (tmp_path / "s2" / f).read_bytes() for f in one)


# ------------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("records", "config", "message"),
    [
        (['{"text": "ok"}', '{"text": "ok"'], {}, r"in\.jsonl:2: invalid JSON"),
        (['{"text": "ok"}', "", "[1, 2]"], {}, r"in\.jsonl:3: expected a JSON object, got list"),
        (['{"text": "ok"}', '{"body": "x"}'], {}, r"in\.jsonl:2: missing field 'text'"),
        (['{"text": 3}'], {}, r"in\.jsonl:1: field 'text' must be str, got int"),
        (['{"text": "a", "tokens": [1]}'], {}, r"in\.jsonl:1: already has a 'tokens' field"),
        (['{"messages": "hi"}'], {"chat": True}, r"in\.jsonl:1: field 'messages' must be list"),
        (
            ['{"messages": [{"role": "user", "content": "a [INST] b"}]}'],
            {"chat": True},
            r"in\.jsonl:1: field 'messages': messages\[0\] \(user\) contains the special tag '\[INST\]'",
        ),
        (
            ['{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}'],
            {"chat": True},
            r"in\.jsonl:1: field 'messages': messages\[1\] is from 'user' where 'assistant' was expected",
        ),
    ],
)
def test_bad_records(tmp_path, records, config, message):
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(records) + "\n")
    with pytest.raises(UserError, match=message):
        run_encode(EncodeConfig(LLAMA2, [str(inp)], str(tmp_path / "out.jsonl"), **config))
    assert os.listdir(tmp_path) == ["in.jsonl"]  # no output, no temporary left behind


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"out": "d", "output": "o.jsonl"}, "give -o/--output (JSONL) or --out (token shards), not both"),
        ({"chat": True, "out": "d"}, "--chat writes JSONL tokens with a loss mask"),
        ({"chat": True, "bos": False}, "--chat places BOS and EOS"),
        ({"val_fraction": 0.1}, "--val-fraction splits --out shards; there is no --out"),
        ({"shard_tokens": 10}, "--shard-tokens sizes --out shards; there is no --out"),
        ({"out": "d", "val_fraction": 1.0}, "--val-fraction must be in (0, 1)"),
        ({"inputs": ["a.txt"], "field": "body"}, "no input is JSONL"),
        ({"doc_split": "line"}, "no input is text"),
        ({"doc_split": "sentence", "inputs": ["a.txt"]}, "--doc-split must be one of paragraph, line, file"),
        ({"workers": 0}, "--workers must be at least 1"),
        ({"inputs": ["missing.jsonl"]}, "missing.jsonl: no such file"),
        ({"inputs": ["a.txt"], "chat": True}, "--chat reads JSONL dialogs, and a.txt is read as text"),
    ],
)
def test_impossible_flags(tmp_path, monkeypatch, config, message):
    monkeypatch.chdir(tmp_path)
    Path("a.txt").write_text("text")
    Path("in.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(UserError, match=re.escape(message)):
        run_encode(EncodeConfig(**{"tokenizer": LLAMA2, "inputs": ["in.jsonl"], **config}))
    assert sorted(os.listdir()) == ["a.txt", "in.jsonl"]


def test_bad_text_and_tokenizer(tmp_path):
    (tmp_path / "bin.txt").write_bytes(b"fine\nfine\n\xff\xfe bad\n")
    with pytest.raises(UserError, match=r"bin\.txt:3: not UTF-8 text"):
        run_encode(EncodeConfig(LLAMA2, [str(tmp_path / "bin.txt")], str(tmp_path / "o.jsonl")))
    (tmp_path / "nul.txt").write_bytes(b"fine\n\nab\x00cd\n")
    with pytest.raises(UserError, match=r"nul\.txt:3: binary data"):
        run_encode(EncodeConfig(LLAMA2, [str(tmp_path / "nul.txt")], out=str(tmp_path / "shards")))
    assert not (tmp_path / "shards").exists() and not (tmp_path / "o.jsonl").exists()
    with pytest.raises(UserError, match=r"nul\.txt: not a SentencePiece model"):
        run_encode(EncodeConfig(str(tmp_path / "nul.txt"), [str(tmp_path / "bin.txt")]))


@pytest.mark.usefixtures("small_blocks")
def test_failure_keeps_old_shards_and_reports_the_first_error(tmp_path, play):
    run_encode(EncodeConfig(LLAMA2, [str(play)], out=str(tmp_path / "s"), shard_tokens=2000))
    before = {f: (tmp_path / "s" / f).read_bytes() for f in os.listdir(tmp_path / "s")}
    lines = [json.dumps({"text": p}) for p in split_documents(play.read_text(), "paragraph")]
    lines[500] = lines[700] = "{broken"
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    for workers in (1, 2):
        with pytest.raises(UserError, match=r"in\.jsonl:501: invalid JSON"):
            run_encode(EncodeConfig(LLAMA2, [str(tmp_path / "in.jsonl")], out=str(tmp_path / "s"), workers=workers))
        assert {f: (tmp_path / "s" / f).read_bytes() for f in os.listdir(tmp_path / "s")} == before


def test_decode_errors(tmp_path):
    inp = write_jsonl(tmp_path / "t.jsonl", [{"tokens": [1, 15043]}, {"tokens": [1, 32000]}])
    with pytest.raises(UserError, match=r"t\.jsonl:2: field 'tokens'\[1\] is 32000, not a token id in \[0, 32000\)"):
        run_decode(DecodeConfig(LLAMA2, [str(inp)], str(tmp_path / "o.jsonl")))
    inp = write_jsonl(tmp_path / "t.jsonl", [{"tokens": [1, 15043], "text": "kept"}])
    with pytest.raises(UserError, match=r"t\.jsonl:1: already has a 'text' field"):
        run_decode(DecodeConfig(LLAMA2, [str(inp)], str(tmp_path / "o.jsonl")))
    assert not (tmp_path / "o.jsonl").exists()


# ------------------------------------------------------------------------------------------------------------ CLI


def test_cli_pipeline(tmp_path, sp):
    enc = run_cli("tokenize", "encode", "-t", LLAMA2, stdin='{"text": "Hello world", "id": 7}\n')
    assert enc.returncode == 0, enc.stderr
    assert json.loads(enc.stdout) == {"id": 7, "tokens": [1, *sp.encode("Hello world")]}
    dec = run_cli("tokenize", "decode", "-t", LLAMA2, stdin=enc.stdout)
    assert dec.returncode == 0, dec.stderr
    assert json.loads(dec.stdout) == {"id": 7, "text": "Hello world"}
    text = run_cli("tokenize", "encode", "-t", LLAMA2, "--format", "text", stdin="One\nline\n\n\nTwo\n")
    assert text.returncode == 0, text.stderr
    assert [json.loads(line) for line in text.stdout.splitlines()] == [
        {"tokens": [1, *sp.encode("One\nline")]},
        {"tokens": [1, *sp.encode("Two")]},
    ]


def test_cli_errors(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"text": "fine"}\n{"text": "fine"}\n{"txt": "oops"}\n')
    proc = run_cli("tokenize", "encode", "-t", LLAMA2, "in.jsonl", "-o", "out.jsonl", cwd=tmp_path)
    assert_user_error(proc, "in.jsonl:3: missing field 'text'")
    proc = run_cli("tokenize", "encode", "-t", LLAMA2, "in.jsonl", "--out", "shards", "--workers", "2", cwd=tmp_path)
    assert_user_error(proc, "in.jsonl:3: missing field 'text'")
    proc = run_cli("tokenize", "encode", "-t", "in.jsonl", "in.jsonl", cwd=tmp_path)
    assert_user_error(proc, "in.jsonl: not a SentencePiece model")
    proc = run_cli("tokenize", "encode", "-t", LLAMA2, "in.jsonl", "--chat", "--out", "shards", cwd=tmp_path)
    assert_user_error(proc, "--chat writes JSONL tokens with a loss mask")
    assert os.listdir(tmp_path) == ["in.jsonl"]
