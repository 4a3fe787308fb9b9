"""Token shards: what ``llamactl tokenize encode --out DIR`` writes and pretrain reads.

A shards directory holds::

    index.json                      the entry point, written last and atomically
    tokenizer.model                 the tokenizer the ids come from (its sha256 is in the index)
    {split}-{k:05d}-{hash}.safetensors
        tokens   1-D uint16 (a vocabulary of at most 65536) or int32: the documents back to back
        offsets  1-D int64, num_docs + 1 entries: where each document starts in ``tokens``, then its length

A shard holds whole documents, each as the encoder wrote it (``tokenize encode`` puts BOS in front and EOS
behind). Splits (``train``, optionally ``val``) are separate lists of shards in the one index.

Shard names carry a hash of their tokens, so rewriting a directory never touches a file the old index points at:
a crash leaves either the old index with its shards or the new index with its shards, never a mix. What a killed
writer leaves behind (shards no index names, temporary files) is recognised by name: writing the directory again
works and removes it.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import os
import re
from collections.abc import Sequence

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from llamactl.errors import UserError
from llamactl.files import atomic_path, kind_of, new_temp, publish, signals_held
from llamactl.tokenizer import Tokenizer

INDEX_NAME = "index.json"
TOKENIZER_NAME = "tokenizer.model"
FORMAT = "llamactl-token-shards"
VERSION = 1
DEFAULT_SHARD_TOKENS = 100_000_000  # 200 MB a shard in uint16
_DTYPES = {"uint16": (np.uint16, "U16"), "int32": (np.int32, "I32")}
# Every name a ShardWriter creates: shards, the tokenizer, and the temporary files of shards, tokenizer and index.
_OWN_FILE = re.compile(
    r"\w+-\d{5}-[0-9a-f]{16}\.safetensors|tokenizer\.model|\.(?:\w+|tokenizer\.model|index\.json)\.\w+\.tmp"
)


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else int32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.int32)


def _read_index(directory: str) -> dict:
    path = os.path.join(directory, INDEX_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read token shards index ({e})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise UserError(f'{path}: not a token shards index (no "format": "{FORMAT}")')
    if index.get("version") != VERSION:
        raise UserError(f"{path}: token shards version {index.get('version')!r}; this llamactl reads {VERSION}")
    return index


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _write_atomic(path: str, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


class ShardWriter:
    """Writes documents of token ids into shards of about ``shard_tokens`` tokens each, per split.

    Use as a context manager: leaving the block normally commits (last shards, tokenizer, index); an exception
    removes every file this writer created and leaves the directory as it was.
    """

    def __init__(
        self,
        directory: str,
        tokenizer: Tokenizer,
        shard_tokens: int = DEFAULT_SHARD_TOKENS,
        splits: Sequence[str] = ("train",),
    ):
        assert shard_tokens > 0, "shard_tokens must be positive"
        assert splits and all(s.isidentifier() for s in splits), f"bad split names {splits!r}"
        self.directory = directory
        self.tokenizer = tokenizer
        self.shard_tokens = shard_tokens
        self.dtype = token_dtype(tokenizer.vocab_size)
        self.index: dict | None = None
        self._old_files: set[str] = set()
        self._created_dir = False
        if os.path.exists(directory):
            if not os.path.isdir(directory):
                raise UserError(f"{directory}: exists and is not a directory")
            if os.path.exists(os.path.join(directory, INDEX_NAME)):
                old = _read_index(directory)
                try:
                    self._old_files = {s["file"] for split in old["splits"].values() for s in split["shards"]}
                except (KeyError, TypeError, AttributeError):
                    raise UserError(f"{os.path.join(directory, INDEX_NAME)}: malformed token shards index") from None
            elif not all(_OWN_FILE.fullmatch(name) for name in os.listdir(directory)):
                raise UserError(f"{directory}: not empty and not a token shards directory; give a new or empty one")
        else:
            os.makedirs(directory)
            self._created_dir = True
        self._written: list[str] = []
        self._temp: str | None = None
        self._replaced_tokenizer: bytes | None = None  # the old tokenizer.model, put back if the commit fails
        self._new_tokenizer = False  # the commit wrote a tokenizer.model where there was none: removed if it fails
        self._splits = {name: {"shards": [], "num_tokens": 0, "num_docs": 0} for name in splits}
        self._parts: dict[str, list[np.ndarray]] = {name: [] for name in splits}
        self._lengths: dict[str, list[np.ndarray]] = {name: [] for name in splits}
        self._buffered = dict.fromkeys(splits, 0)

    def add(self, tokens: np.ndarray | Sequence[int], split: str = "train") -> None:
        """Append one document; ids must come from this writer's tokenizer."""
        arr = np.asarray(tokens)
        self.add_batch(arr, [arr.size], split)

    def add_batch(self, tokens: np.ndarray, lengths: np.ndarray | Sequence[int], split: str = "train") -> None:
        """Append documents given back to back in ``tokens``, ``lengths[i]`` tokens each."""
        assert split in self._parts, f"split {split!r} was not declared ({', '.join(self._parts)})"
        lengths = np.asarray(lengths, dtype=np.int64)
        assert tokens.ndim == 1 and int(lengths.sum()) == tokens.size, "lengths do not add up to the tokens"
        if not lengths.size:
            return
        if tokens.dtype != self.dtype:
            ok = tokens.size == 0 or (tokens.min() >= 0 and tokens.max() < self.tokenizer.vocab_size)
            assert ok, "token id out of the tokenizer's range"
            tokens = tokens.astype(self.dtype)
        ends = np.cumsum(lengths)
        done = 0  # documents of this batch already placed
        while done < lengths.size:
            # Close the shard at the first document that brings it to shard_tokens.
            room = self.shard_tokens - self._buffered[split] + (int(ends[done - 1]) if done else 0)
            stop = min(int(np.searchsorted(ends, room)) + 1, lengths.size)
            start_tok, stop_tok = int(ends[done - 1]) if done else 0, int(ends[stop - 1])
            self._parts[split].append(tokens[start_tok:stop_tok])
            self._lengths[split].append(lengths[done:stop])
            self._buffered[split] += stop_tok - start_tok
            if self._buffered[split] >= self.shard_tokens:
                self._flush(split)
            done = stop

    def _flush(self, split: str) -> None:
        if not self._lengths[split]:
            return
        tokens = np.concatenate(self._parts[split])
        lengths = np.concatenate(self._lengths[split])
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        entry = self._splits[split]
        with signals_held():
            self._temp = new_temp(self.directory, split)
        # One metadata entry: safetensors writes metadata in hash-map order, and the file should be the same bytes
        # for the same documents.
        save_file({"tokens": tokens, "offsets": offsets}, self._temp, metadata={"format": FORMAT})
        digest = hashlib.sha256(tokens.data)
        digest.update(offsets.data)
        name = f"{split}-{len(entry['shards']):05d}-{digest.hexdigest()[:16]}.safetensors"
        self._written.append(name)  # before the rename: an interruption just after it must still remove the shard
        publish(self._temp, os.path.join(self.directory, name))
        self._temp = None
        entry["shards"].append({"file": name, "num_tokens": int(tokens.size), "num_docs": len(lengths)})
        entry["num_tokens"] += int(tokens.size)
        entry["num_docs"] += len(lengths)
        self._parts[split], self._lengths[split], self._buffered[split] = [], [], 0

    def num_docs(self, split: str = "train") -> int:
        return self._splits[split]["num_docs"] + sum(map(len, self._lengths[split]))

    def num_tokens(self, split: str = "train") -> int:
        return self._splits[split]["num_tokens"] + self._buffered[split]

    def commit(self) -> dict:
        """Write the last shards, the tokenizer and then the index; drop the files only the old index used."""
        assert self.index is None, "already committed"
        for split in self._parts:
            self._flush(split)
        tok_path = os.path.join(self.directory, TOKENIZER_NAME)
        if os.path.isfile(tok_path):
            with open(tok_path, "rb") as f:
                old = f.read()
            self._replaced_tokenizer = old if old != self.tokenizer.model_bytes else None
        else:
            self._new_tokenizer = True  # set first: an interruption inside the write must still remove it
        _write_atomic(tok_path, self.tokenizer.model_bytes)
        index = {
            "format": FORMAT,
            "version": VERSION,
            "dtype": self.dtype.name,
            "tokenizer": {
                "file": TOKENIZER_NAME,
                "sha256": self.tokenizer.sha256,
                "vocab_size": self.tokenizer.vocab_size,
                "bos_id": self.tokenizer.bos_id,
                "eos_id": self.tokenizer.eos_id,
            },
            "splits": self._splits,
        }
        _write_atomic(os.path.join(self.directory, INDEX_NAME), (json.dumps(index, indent=2) + "\n").encode())
        self.index = index
        keep = {*self._written, TOKENIZER_NAME, INDEX_NAME}
        leftovers = {n for n in os.listdir(self.directory) if _OWN_FILE.fullmatch(n)}  # of a killed earlier writer
        for name in (self._old_files | leftovers) - keep:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.directory, name))
        return index

    def abort(self) -> None:
        """Remove what this writer created; the old index and its shards stay as they were."""
        assert self.index is None, "already committed"
        if self._replaced_tokenizer is not None:
            _write_atomic(os.path.join(self.directory, TOKENIZER_NAME), self._replaced_tokenizer)
        elif self._new_tokenizer:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.directory, TOKENIZER_NAME))
        if self._temp is not None and os.path.exists(self._temp):
            os.unlink(self._temp)
        for name in self._written:
            if name not in self._old_files:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.directory, name))
        if self._created_dir and not os.listdir(self.directory):
            os.rmdir(self.directory)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
            return
        try:
            self.commit()
        except BaseException:
            if self.index is None:
                self.abort()
            raise


class TokenSplit:
    """One split of a shards directory as one long token array, read from the memory-mapped shards on demand."""

    def __init__(self, directory: str, name: str, entry: dict, dtype: np.dtype):
        self.directory = directory
        self.name = name
        self.dtype = dtype
        self.shards: list[dict] = entry["shards"]
        self.num_tokens: int = entry["num_tokens"]
        self.num_docs: int = entry["num_docs"]
        self._starts = [0]  # global index of each shard's first token, then the total
        for s in self.shards:
            self._starts.append(self._starts[-1] + s["num_tokens"])
        assert self._starts[-1] == self.num_tokens, f"{name}: shard sizes do not add up to num_tokens"
        self._handles: dict[int, object] = {}
        self._offsets: np.ndarray | None = None

    def __len__(self) -> int:
        return self.num_tokens

    def __getstate__(self) -> dict:
        # The open safetensors handles do not pickle (DataLoader workers); each process reopens its own.
        return {**self.__dict__, "_handles": {}}

    def _handle(self, i: int):
        if i not in self._handles:
            self._handles[i] = safe_open(os.path.join(self.directory, self.shards[i]["file"]), framework="numpy")
        return self._handles[i]

    def tokens(self, start: int, stop: int, dtype: np.dtype | type = np.int64) -> np.ndarray:
        """Tokens [start, stop) of the split, across shard boundaries."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"tokens [{start}, {stop}) out of range for {self.name} ({self.num_tokens} tokens)")
        parts = []
        i = bisect.bisect_right(self._starts, start) - 1
        while start < stop:
            base = self._starts[i]
            end = min(stop, self._starts[i + 1])
            parts.append(self._handle(i).get_slice("tokens")[start - base : end - base])
            start, i = end, i + 1
        if not parts:
            return np.zeros(0, dtype=dtype)
        return np.concatenate(parts).astype(dtype, copy=False) if len(parts) > 1 else parts[0].astype(dtype)

    def doc_offsets(self) -> np.ndarray:
        """int64 array of num_docs + 1 entries: where each document starts in the split, then the total."""
        if self._offsets is None:
            parts = [self._handle(i).get_tensor("offsets")[:-1] + self._starts[i] for i in range(len(self.shards))]
            parts.append(np.array([self.num_tokens], dtype=np.int64))
            self._offsets = np.concatenate(parts)
        return self._offsets

    def document(self, i: int, dtype: np.dtype | type = np.int64) -> np.ndarray:
        """Tokens of document ``i`` (BOS and EOS included where the encoder put them)."""
        if not 0 <= i < self.num_docs:
            raise IndexError(f"document {i} out of range for {self.name} ({self.num_docs} documents)")
        offsets = self.doc_offsets()
        return self.tokens(int(offsets[i]), int(offsets[i + 1]), dtype)

    def check(self) -> None:
        """Every shard is there, with the sizes and dtype the index says."""
        want = _DTYPES[self.dtype.name][1]
        for i, s in enumerate(self.shards):
            path = os.path.join(self.directory, s["file"])
            if not os.path.isfile(path):
                raise UserError(f"{path}: shard listed in {INDEX_NAME} is missing")
            try:
                tokens, offsets = self._handle(i).get_slice("tokens"), self._handle(i).get_slice("offsets")
            except SafetensorError as e:
                raise UserError(f"{path}: not a token shard ({e})") from None
            if tokens.get_dtype() != want or tokens.get_shape() != [s["num_tokens"]]:
                raise UserError(f"{path}: holds {tokens.get_shape()} {tokens.get_dtype()} tokens, index says otherwise")
            if offsets.get_shape() != [s["num_docs"] + 1]:
                raise UserError(f"{path}: holds {offsets.get_shape()[0] - 1} documents, index says {s['num_docs']}")


class TokenDataset:
    """A shards directory: its index, tokenizer facts and splits."""

    def __init__(self, directory: str, index: dict):
        self.directory = directory
        self.index = index
        tok = index["tokenizer"]
        self.vocab_size: int = tok["vocab_size"]
        self.tokenizer_sha256: str = tok["sha256"]
        self.bos_id: int = tok["bos_id"]
        self.eos_id: int = tok["eos_id"]
        self.dtype = np.dtype(_DTYPES[index["dtype"]][0])
        self.splits = {name: TokenSplit(directory, name, e, self.dtype) for name, e in index["splits"].items()}

    def split(self, name: str = "train") -> TokenSplit:
        if name not in self.splits:
            raise UserError(f"{self.directory}: no {name!r} split (it has {', '.join(self.splits) or 'none'})")
        return self.splits[name]

    @property
    def tokenizer_path(self) -> str:
        return os.path.join(self.directory, self.index["tokenizer"]["file"])

    def load_tokenizer(self) -> Tokenizer:
        return Tokenizer.from_file(self.tokenizer_path)


def open_shards(directory: str) -> TokenDataset:
    """Open a shards directory written by ``ShardWriter``, checking that every file the index names is whole."""
    kind = kind_of(directory)
    if kind != "a directory":
        raise UserError(f"{directory}: " + (f"is {kind}, not a" if kind else "no such") + " token shards directory")
    if not os.path.isfile(os.path.join(directory, INDEX_NAME)):
        raise UserError(f"{directory}: not a token shards directory (no {INDEX_NAME})")
    index = _read_index(directory)
    path = os.path.join(directory, INDEX_NAME)
    try:
        dataset = TokenDataset(directory, index)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: malformed token shards index ({type(e).__name__}: {e})") from None
    tok_path = dataset.tokenizer_path
    if not os.path.isfile(tok_path) or _file_sha256(tok_path) != dataset.tokenizer_sha256:
        raise UserError(f"{tok_path}: missing or not the tokenizer {INDEX_NAME} was written with")
    for split in dataset.splits.values():
        split.check()
    return dataset
