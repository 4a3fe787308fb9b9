"""Token shards: written by ShardWriter, read back through open_shards, rewritten and failed safely."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from llamactl.errors import UserError
from llamactl.shards import INDEX_NAME, ShardWriter, open_shards, token_dtype
from llamactl.tokenizer import Tokenizer

LLAMA2 = Path(__file__).parent / "fixtures" / "llama2-tokenizer.model"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_file(str(LLAMA2))


def documents(n: int, seed: int = 0, high: int = 32000) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.concatenate([[1], rng.integers(3, high, rng.integers(0, 40)), [2]]) for _ in range(n)]


def write(directory, tok, docs, shard_tokens=100, val=()):
    with ShardWriter(str(directory), tok, shard_tokens, ("train", "val") if val else ("train",)) as w:
        for i, d in enumerate(docs):
            w.add(d, "val" if i in val else "train")
    return w.index


def test_round_trip_across_shards(tmp_path, tok):
    docs = documents(60)
    index = write(tmp_path / "s", tok, docs)
    ds = open_shards(str(tmp_path / "s"))
    train = ds.split("train")
    flat = np.concatenate(docs)
    assert len(train.shards) > 3 and index["splits"]["train"]["num_tokens"] == len(train) == flat.size
    assert (ds.vocab_size, ds.bos_id, ds.eos_id, ds.dtype, ds.tokenizer_sha256) == (
        32000,
        1,
        2,
        np.uint16,
        tok.sha256,
    )
    assert ds.load_tokenizer().sha256 == tok.sha256
    for start, stop in [(0, flat.size), (0, 0), (5, 6), (95, 230), (flat.size - 3, flat.size)]:
        got = train.tokens(start, stop)
        assert got.dtype == np.int64 and np.array_equal(got, flat[start:stop])
    offsets = train.doc_offsets()
    assert offsets.tolist() == np.concatenate([[0], np.cumsum([d.size for d in docs])]).tolist()
    assert all(np.array_equal(train.document(i), d) for i, d in enumerate(docs))
    with pytest.raises(IndexError):
        train.tokens(0, flat.size + 1)
    clone = pickle.loads(pickle.dumps(train))  # DataLoader workers get a copy that reopens the files
    assert np.array_equal(clone.tokens(90, 250), flat[90:250])


def test_splits_and_empty_documents(tmp_path, tok):
    docs = documents(20) + [np.array([], dtype=np.int64)]
    write(tmp_path / "s", tok, docs, shard_tokens=10_000, val={0, 7, 20})
    ds = open_shards(str(tmp_path / "s"))
    assert set(ds.splits) == {"train", "val"}
    assert [ds.split("val").document(i).tolist() for i in range(3)] == [docs[0].tolist(), docs[7].tolist(), []]
    assert ds.split("train").num_docs == 18
    with pytest.raises(UserError, match="no 'test' split"):
        ds.split("test")


def test_dtype_follows_vocabulary(tmp_path):
    assert token_dtype(32000) == np.uint16 and token_dtype(65536) == np.uint16 and token_dtype(65537) == np.int32
    big = SimpleNamespace(vocab_size=128256, bos_id=1, eos_id=2, model_bytes=b"model", sha256="0" * 64)
    docs = documents(5, high=128256)
    write(tmp_path / "s", big, docs)
    index = json.loads((tmp_path / "s" / INDEX_NAME).read_text())
    assert index["dtype"] == "int32"
    # The index checks the tokenizer file against its sha256: this stand-in has none that matches.
    with pytest.raises(UserError, match="not the tokenizer"):
        open_shards(str(tmp_path / "s"))


def test_same_documents_same_files(tmp_path, tok):
    docs = documents(30)
    write(tmp_path / "a", tok, docs)
    write(tmp_path / "b", tok, docs)
    names = sorted(os.listdir(tmp_path / "a"))
    assert names == sorted(os.listdir(tmp_path / "b"))
    assert all((tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes() for n in names)


def test_rewrite_replaces_old_shards(tmp_path, tok):
    write(tmp_path / "s", tok, documents(30, seed=1))
    write(tmp_path / "s", tok, documents(10, seed=2))
    ds = open_shards(str(tmp_path / "s"))
    files = {s["file"] for s in ds.split("train").shards}
    assert set(os.listdir(tmp_path / "s")) == files | {"index.json", "tokenizer.model"}
    assert np.array_equal(ds.split("train").tokens(0, len(ds.split("train"))), np.concatenate(documents(10, seed=2)))


def test_failure_leaves_the_old_directory_as_it_was(tmp_path, tok):
    write(tmp_path / "s", tok, documents(30, seed=1))
    before = {n: (tmp_path / "s" / n).read_bytes() for n in os.listdir(tmp_path / "s")}
    with pytest.raises(RuntimeError, match="crash"), ShardWriter(str(tmp_path / "s"), tok, 50) as w:
        for d in documents(40, seed=3):  # enough for several new shards to be written
            w.add(d)
        raise RuntimeError("crash")
    assert {n: (tmp_path / "s" / n).read_bytes() for n in os.listdir(tmp_path / "s")} == before
    with pytest.raises(RuntimeError), ShardWriter(str(tmp_path / "new"), tok, 50) as w:
        w.add(documents(1)[0])
        raise RuntimeError
    assert not (tmp_path / "new").exists()


def test_refuses_directories_that_are_not_shards(tmp_path, tok):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty and not a token shards directory"):
        ShardWriter(str(tmp_path / "notes"), tok)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        ShardWriter(str(tmp_path / "file"), tok)
    with pytest.raises(UserError, match="no index.json"):
        open_shards(str(tmp_path / "notes"))


def test_open_checks_every_file(tmp_path, tok):
    write(tmp_path / "s", tok, documents(30))
    index = json.loads((tmp_path / "s" / INDEX_NAME).read_text())
    first = tmp_path / "s" / index["splits"]["train"]["shards"][0]["file"]
    first.rename(tmp_path / "moved")
    with pytest.raises(UserError, match="shard listed in index.json is missing"):
        open_shards(str(tmp_path / "s"))
    (tmp_path / "moved").rename(first)
    index["splits"]["train"]["shards"][0]["num_tokens"] += 1
    index["splits"]["train"]["num_tokens"] += 1
    (tmp_path / "s" / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(UserError, match="index says otherwise"):
        open_shards(str(tmp_path / "s"))
    (tmp_path / "s" / INDEX_NAME).write_text("{not json")
    with pytest.raises(UserError, match="cannot read token shards index"):
        open_shards(str(tmp_path / "s"))


def test_shards_close_at_the_first_document_past_the_size(tmp_path, tok):
    docs = documents(80, seed=4)
    write(tmp_path / "one", tok, docs, shard_tokens=150)
    with ShardWriter(str(tmp_path / "batch"), tok, 150) as w:
        for k in range(0, 80, 25):
            w.add_batch(np.concatenate(docs[k : k + 25]), [d.size for d in docs[k : k + 25]])
    names = sorted(os.listdir(tmp_path / "one"))
    assert names == sorted(os.listdir(tmp_path / "batch"))  # same documents, same shards, however they came
    train = open_shards(str(tmp_path / "one")).split("train")
    offsets = train.doc_offsets()
    bounds = np.cumsum([0] + [s["num_tokens"] for s in train.shards])
    assert len(bounds) > 4
    for shard_start, shard_end in zip(bounds[:-2], bounds[1:-1], strict=True):  # all but the last shard
        last_doc_start = offsets[np.searchsorted(offsets, shard_end) - 1]
        assert shard_end - shard_start >= 150 > last_doc_start - shard_start
