"""``llamactl tokenize train | encode | decode``: SentencePiece BPE with Llama 2's settings, text to ids and back.

Inputs are text or JSONL files (``-`` is stdin). JSONL is read by its extension ``.jsonl`` (and on stdin), text
otherwise, unless ``--format`` says. A text input splits into documents by ``--doc-split``: blank-line-separated
paragraphs (the default), non-blank lines, or the whole file; blank documents are skipped.

``encode`` runs over ``--workers`` processes: the main process cuts the input into blocks at document boundaries
and writes results in input order; each worker decodes, parses, encodes and serialises one block at a time, so the
output is the same whatever the number of workers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llamactl.errors import UserError
from llamactl.files import check_output, input_problem, overlaps
from llamactl.files import display_name as _display
from llamactl.jsonl import FORMATS, check_free, decode_text, input_kind, parse_record, read_chunks

if TYPE_CHECKING:
    from concurrent.futures import ProcessPoolExecutor

    import numpy as np

    from llamactl.shards import ShardWriter
    from llamactl.tokenizer import Tokenizer

DOC_SPLITS = ("paragraph", "line", "file")
# NOTE: 64 KiB blocks are ~12 ms of encoding for one worker with Llama 2's tokenizer: the hand-off to a worker
# costs well under 1% of that, and a 1 MB input still spreads over 16 blocks.
BLOCK_BYTES = 1 << 16


def _check_paths(inputs: list[str], tokenizer: str | None, output: str | None, problems: list[str]) -> None:
    """The inputs exist and are files, the output can be written and is none of the inputs."""
    if not inputs:
        problems.append("no input given")
    if inputs.count("-") > 1:
        problems.append("stdin (-) can be read only once")
    problems += [p for path in inputs if path != "-" and (p := input_problem(path, "file", stream_ok=True))]
    if output is not None:
        problems += [p for p in [check_output(output, "-o/--output")] if p]
        named = [("", p) for p in inputs] + ([("-t/--tokenizer", tokenizer)] if tokenizer else [])
        problems += overlaps([("-o/--output", output)], named)


def _blocks(path: str, cut: Callable[[bytearray], int]) -> Iterator[tuple[int, bytes] | None]:
    """(first line number, bytes) blocks of about BLOCK_BYTES, each cut where ``cut`` says (-1: read on).

    Input that arrives slowly (a pipe) is cut at the last place it can be whenever nothing more is there to read,
    and None then marks that the next read waits: results so far can go out first.
    """
    buf = bytearray()
    lineno = 1
    for data in read_chunks(path, BLOCK_BYTES, wait=0.0):
        if data is not None:
            buf += data
            if len(buf) < BLOCK_BYTES:
                continue
        k = cut(buf)
        if k > 0:
            block = bytes(buf[:k])
            del buf[:k]
            yield lineno, block
            lineno += block.count(b"\n")
        if data is None:
            yield None
    if buf:
        yield lineno, bytes(buf)


def _cut_after_line(buf: bytearray) -> int:
    return buf.rfind(b"\n") + 1


def _cut_after_blank_line(buf: bytearray) -> int:
    # Right after an empty line (LF or CRLF ends), the paragraphs on either side of the cut are whole.
    lf, crlf = buf.rfind(b"\n\n"), buf.rfind(b"\n\r\n")
    return max(lf + 2 if lf >= 0 else -1, crlf + 3 if crlf >= 0 else -1)


def _cut_never(buf: bytearray) -> int:
    return -1


def split_documents(text: str, doc_split: str) -> list[str]:
    """Documents of a text: paragraphs (maximal runs of non-blank lines), non-blank lines, or the whole text."""
    if doc_split == "file":
        return [text] if text.strip() else []
    lines = text.split("\n")
    if doc_split == "line":
        return [line for line in lines if line.strip()]
    docs: list[str] = []
    start = None
    for i, line in enumerate(lines):
        if line.strip():
            if start is None:
                start = i
        elif start is not None:
            docs.append("\n".join(lines[start:i]))
            start = None
    if start is not None:
        docs.append("\n".join(lines[start:]))
    return docs


# ---------------------------------------------------------------------------------------------------------- train


@dataclass
class TrainConfig:
    inputs: list[str] = dataclasses.field(default_factory=lambda: ["-"])
    output: str = "tokenizer.model"
    vocab_size: int = 32000
    format: str = "auto"
    field: str | None = None
    character_coverage: float = 0.99995
    max_sentence_length: int = 4192
    threads: int = 0

    def validate(self) -> None:
        problems: list[str] = []
        _check_paths(self.inputs, None, self.output, problems)
        if self.format not in FORMATS:
            problems.append(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        elif self.field is not None and all(input_kind(p, self.format) != "jsonl" for p in self.inputs):
            problems.append("--field names the text field of JSONL input, and no input is JSONL")
        if self.vocab_size < 260:
            problems.append(f"--vocab-size must be at least 260 (3 special + 256 byte pieces), got {self.vocab_size}")
        # SentencePiece's own bounds, said in our flags' names before it starts
        if not 0.98 <= self.character_coverage <= 1:
            problems.append(f"--character-coverage must be in [0.98, 1], got {self.character_coverage}")
        if not 10 <= self.max_sentence_length <= 1 << 30:
            problems.append(f"--max-sentence-length must be in [10, 2^30], got {self.max_sentence_length}")
        if not 0 <= self.threads <= 1024:
            problems.append(f"--threads must be in [0, 1024] (0: all cores), got {self.threads}")
        if problems:
            raise UserError("; ".join(problems))


def _training_lines(cfg: TrainConfig) -> Iterator[str]:
    """Every non-empty line of the text inputs and of the JSONL field values, newlines removed."""
    from llamactl.jsonl import field as get_field
    from llamactl.jsonl import read_jsonl

    key = cfg.field or "text"
    for path in cfg.inputs:
        name = _display(path)
        if input_kind(path, cfg.format) == "jsonl":
            for lineno, rec in read_jsonl(path):
                yield from filter(None, get_field(rec, key, str, f"{name}:{lineno}").split("\n"))
        else:
            for lineno, block in filter(None, _blocks(path, _cut_after_line)):
                yield from filter(None, decode_text(block, name, lineno).split("\n"))


def run_train(cfg: TrainConfig) -> dict:
    """Train a BPE tokenizer with Llama 2's settings and write it to ``cfg.output``; returns what it reports."""
    from llamactl.jsonl import atomic_path
    from llamactl.tokenizer import train_bpe

    cfg.validate()
    start = time.perf_counter()
    lines: list[str] = []
    n_bytes = n_long = 0
    for line in _training_lines(cfg):
        size = len(line.encode("utf-8"))
        if size > cfg.max_sentence_length:
            n_long += 1  # sentencepiece would drop it anyway; counted so that the report can say so
            continue
        lines.append(line)
        n_bytes += size
    if not lines:
        raise UserError(f"no text to train on in {', '.join(map(_display, cfg.inputs))}")
    tokenizer = train_bpe(
        lines,
        cfg.vocab_size,
        character_coverage=cfg.character_coverage,
        max_sentence_length=cfg.max_sentence_length,
        num_threads=cfg.threads or min(os.cpu_count() or 1, 1024),
    )
    with atomic_path(cfg.output) as tmp, open(tmp, "wb") as f:
        f.write(tokenizer.model_bytes)
    seconds = time.perf_counter() - start
    report = {
        "output": cfg.output,
        "vocab_size": tokenizer.vocab_size,
        "lines": len(lines),
        "bytes": n_bytes,
        "skipped_long_lines": n_long,
        "seconds": seconds,
    }
    skipped = f"; {n_long:,} lines over --max-sentence-length {cfg.max_sentence_length} left out" if n_long else ""
    print(
        f"trained a {tokenizer.vocab_size:,}-piece BPE tokenizer on {len(lines):,} lines ({n_bytes / 1e6:.2f} MB) in "
        f"{seconds:.1f}s ({n_bytes / 1e6 / seconds:.2f} MB/s){skipped} -> {cfg.output}",
        file=sys.stderr,
    )
    return report


# --------------------------------------------------------------------------------------------------------- encode


@dataclass
class EncodeConfig:
    tokenizer: str
    inputs: list[str] = dataclasses.field(default_factory=lambda: ["-"])
    output: str = "-"
    out: str | None = None
    format: str = "auto"
    field: str | None = None
    doc_split: str | None = None
    chat: bool = False
    bos: bool | None = None
    eos: bool | None = None
    workers: int = 1
    shard_tokens: int | None = None
    val_fraction: float | None = None

    def validate(self) -> None:
        problems: list[str] = []
        _check_paths(self.inputs, self.tokenizer, self.output if self.out is None else None, problems)
        if self.out is not None:
            problems += [p for p in [check_output(self.out, "--out", directory=True)] if p]
        kinds = {input_kind(p, self.format) for p in self.inputs} if self.format in FORMATS else set()
        if self.format not in FORMATS:
            problems.append(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.field is not None and kinds and "jsonl" not in kinds:
            problems.append("--field names the field of JSONL input, and no input is JSONL")
        if self.doc_split is not None:
            if self.doc_split not in DOC_SPLITS:
                problems.append(f"--doc-split must be one of {', '.join(DOC_SPLITS)}, got {self.doc_split!r}")
            elif kinds and "text" not in kinds:
                problems.append("--doc-split splits text input into documents, and no input is text")
        if self.out is not None and self.output != "-":
            problems.append("give -o/--output (JSONL) or --out (token shards), not both")
        if self.chat:
            if self.out is not None:
                problems.append("--chat writes JSONL tokens with a loss mask; --out shards are for pretraining text")
            if "text" in kinds:
                text_inputs = [p for p in self.inputs if input_kind(p, self.format) == "text"]
                problems.append(f"--chat reads JSONL dialogs, and {', '.join(text_inputs)} is read as text")
            if self.bos is not None or self.eos is not None:
                problems.append("--chat places BOS and EOS by Llama 2's chat format; drop --bos/--eos")
        if self.out is None:
            if self.shard_tokens is not None:
                problems.append("--shard-tokens sizes --out shards; there is no --out")
            if self.val_fraction is not None:
                problems.append("--val-fraction splits --out shards; there is no --out")
        if self.shard_tokens is not None and self.shard_tokens < 1:
            problems.append(f"--shard-tokens must be at least 1, got {self.shard_tokens}")
        if self.val_fraction is not None and not 0 < self.val_fraction < 1:
            problems.append(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if self.workers < 1:
            problems.append(f"--workers must be at least 1, got {self.workers}")
        if problems:
            raise UserError("; ".join(problems))


@dataclass(frozen=True)
class _Job:
    """What a worker needs to encode blocks: sent once to each process."""

    tokenizer: Tokenizer  # pickles as its model bytes
    shards: bool
    chat: bool
    field: str
    doc_split: str
    bos: bool
    eos: bool


@dataclass
class _Result:
    num_docs: int
    num_tokens: int
    text: str = ""  # JSONL lines, for JSONL output
    tokens: np.ndarray | None = None  # the documents back to back, for shards
    lengths: np.ndarray | None = None  # int64, tokens per document


class _Encoder:
    """Turns one block of input into output; the same code runs in the main process and in the workers."""

    def __init__(self, job: _Job):
        self.job = job
        self.tok = job.tokenizer

    def __call__(self, chunk: tuple[str, str, int, bytes]) -> _Result:
        name, kind, lineno, data = chunk
        text = decode_text(data, name, lineno)
        if kind == "text":
            docs = split_documents(text, self.job.doc_split)
            return self._finish(self.tok.encode_batch(docs, self.job.bos, self.job.eos), [{} for _ in docs])
        records, where = [], []
        for i, line in enumerate(text.split("\n")):
            if line.strip():
                where.append(f"{name}:{lineno + i}")
                records.append(parse_record(line, where[-1]))
        if self.job.chat:
            return self._chat(records, where)
        from llamactl.jsonl import field as get_field

        key = self.job.field
        docs = [get_field(rec, key, str, w) for rec, w in zip(records, where, strict=True)]
        if not self.job.shards:
            for rec, w in zip(records, where, strict=True):
                check_free(rec, ("tokens",), w, key)
                del rec[key]
        return self._finish(self.tok.encode_batch(docs, self.job.bos, self.job.eos), records)

    def _finish(self, ids: list[list[int]], records: list[dict]) -> _Result:
        num_tokens = sum(map(len, ids))
        if self.job.shards:
            import itertools

            import numpy as np

            from llamactl.shards import token_dtype

            flat = np.fromiter(itertools.chain.from_iterable(ids), token_dtype(self.tok.vocab_size), num_tokens)
            return _Result(len(ids), num_tokens, tokens=flat, lengths=np.array(list(map(len, ids)), dtype=np.int64))
        from llamactl.jsonl import dumps

        lines = [dumps({**rec, "tokens": doc}) + "\n" for rec, doc in zip(records, ids, strict=True)]
        return _Result(len(ids), num_tokens, text="".join(lines))

    def _chat(self, records: list[dict], where: list[str]) -> _Result:
        from llamactl.chat_format import DialogError, encode_dialog
        from llamactl.jsonl import dumps
        from llamactl.jsonl import field as get_field

        key = self.job.field
        lines, num_tokens = [], 0
        for rec, w in zip(records, where, strict=True):
            messages = get_field(rec, key, list, w)
            check_free(rec, ("tokens", "mask"), w, key)
            try:
                dialog = encode_dialog(self.tok, messages)
            except DialogError as e:
                raise UserError(f"{w}: field {key!r}: {e}") from None
            del rec[key]
            lines.append(dumps({**rec, "tokens": dialog.tokens, "mask": dialog.mask}) + "\n")
            num_tokens += len(dialog.tokens)
        return _Result(len(records), num_tokens, text="".join(lines))


_WORKER: _Encoder | None = None


def _init_worker(job: _Job) -> None:
    global _WORKER
    from llamactl.files import default_signals

    default_signals()
    _WORKER = _Encoder(job)


def _encode_in_worker(chunk: tuple[str, str, int, bytes]) -> _Result:
    assert _WORKER is not None, "worker not initialised"
    return _WORKER(chunk)


def _process_pool(job: _Job, workers: int) -> ProcessPoolExecutor:
    """``workers`` encoder processes; a worker that dies (killed, out of memory) fails the run instead of hanging it.

    Forked where that is safe: on Linux, with no thread in this process but the main one and tqdm's monitor (it
    sleeps on an event and holds no lock a worker takes), and without torch, whose thread pools a forked child
    would inherit in whatever state they were. Otherwise the workers come from a fork server that has imported
    this module once per process. NOTE: two forked workers are up in ~0.03 s; from the fork server, ~0.3 s the
    first time (starting it and importing numpy and sentencepiece) and ~0.07 s after; spawn took ~0.5 s every time.
    """
    import multiprocessing
    import threading
    from concurrent.futures import ProcessPoolExecutor

    others = [t for t in threading.enumerate() if t is not threading.main_thread() and type(t).__name__ != "TMonitor"]
    if sys.platform.startswith("linux") and not others and "torch" not in sys.modules:
        context = multiprocessing.get_context("fork")
    elif "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__, "llamactl.tokenizer", "numpy"])
    else:
        context = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(job,))


def _ordered_results(
    job: _Job, chunks: Iterator[tuple[str, str, int, bytes] | None], pool: ProcessPoolExecutor | None, workers: int
) -> Iterator[_Result]:
    """Results of ``chunks`` in input order, over the ``workers`` processes of ``pool`` (None: in this process),
    with at most two blocks a worker in flight; a None chunk (the input is waiting) lets every result out first.

    An input error found while reading ahead is raised only after the blocks before it are out, so the output and
    the error are the same whatever the number of workers.
    """
    if pool is None:
        encoder = _Encoder(job)
        for chunk in filter(None, chunks):
            yield encoder(chunk)
        return
    pending: deque = deque()
    try:
        while True:
            try:
                chunk = next(chunks)
            except StopIteration:
                break
            except UserError:
                while pending:
                    yield pending.popleft().result()
                raise
            if chunk is None:
                while pending:
                    yield pending.popleft().result()
                continue
            pending.append(pool.submit(_encode_in_worker, chunk))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()


def _chunks(cfg: EncodeConfig) -> Iterator[tuple[str, str, int, bytes] | None]:
    for path in cfg.inputs:
        kind = input_kind(path, cfg.format)
        if kind == "jsonl":
            cut = _cut_after_line
        else:
            cut = {"paragraph": _cut_after_blank_line, "line": _cut_after_line, "file": _cut_never}[
                cfg.doc_split or "paragraph"
            ]
        for item in _blocks(path, cut):
            yield None if item is None else (_display(path), kind, *item)


def _val_selector(fraction: float) -> Callable[[np.ndarray], np.ndarray]:
    """Which global document indices go to val: every (1/fraction)-th document, starting with the first.

    Document i is in val when ceil((i + 1) f) > ceil(i f), computed exactly on the decimal given (to a
    denominator of at most 10^6), so n documents put ceil(n f) in val, spread evenly through the input.
    """
    from fractions import Fraction

    f = Fraction(repr(fraction)).limit_denominator(1_000_000)
    p, q = f.numerator, f.denominator

    def select(i: np.ndarray) -> np.ndarray:
        return -((-(i + 1) * p) // q) > -((-i * p) // q)

    return select


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def run_encode(cfg: EncodeConfig) -> dict:
    """Encode the inputs to JSONL or to token shards; returns the counts it reports."""
    from llamactl.jsonl import open_output
    from llamactl.progress import progress
    from llamactl.shards import DEFAULT_SHARD_TOKENS, ShardWriter
    from llamactl.tokenizer import Tokenizer

    cfg.validate()
    tokenizer = Tokenizer.from_file(cfg.tokenizer)
    shards = cfg.out is not None
    job = _Job(
        tokenizer=tokenizer,
        shards=shards,
        chat=cfg.chat,
        field=cfg.field or ("messages" if cfg.chat else "text"),
        doc_split=cfg.doc_split or "paragraph",
        bos=True if cfg.bos is None else cfg.bos,
        eos=(shards if cfg.eos is None else cfg.eos) and not cfg.chat,
    )
    start = time.perf_counter()
    counts = {"documents": 0, "tokens": 0}
    with contextlib.ExitStack() as stack:
        if cfg.out is not None:
            splits = ("train", "val") if cfg.val_fraction else ("train",)
            shard_tokens = cfg.shard_tokens or DEFAULT_SHARD_TOKENS
            writer = stack.enter_context(ShardWriter(cfg.out, tokenizer, shard_tokens, splits))
        else:
            stream = stack.enter_context(open_output(cfg.output))
        # The pool starts before the bar does, while this process runs no other thread (see _process_pool).
        pool = stack.enter_context(_process_pool(job, cfg.workers)) if cfg.workers > 1 else None
        bar = stack.enter_context(progress("encode", "tok", unit_scale=True))
        results = stack.enter_context(contextlib.closing(_ordered_results(job, _chunks(cfg), pool, cfg.workers)))
        for r in results:
            counts["documents"] += r.num_docs
            counts["tokens"] += r.num_tokens
            bar.update(r.num_tokens)
            if shards:
                _add_to_shards(writer, r, counts["documents"] - r.num_docs, cfg.val_fraction)
            else:
                stream.write(r.text)
                stream.flush()  # a block of 64 KiB of input at most: results go out as the input comes in
        if shards and writer.num_docs("train") == 0:
            n = counts["documents"]
            raise UserError(f"{'no documents' if not n else f'all {n} documents went to val'}: nothing to write")
    seconds = time.perf_counter() - start
    report: dict = {**counts, "seconds": seconds}
    summary = (
        f"encoded {_plural(counts['documents'], 'dialog' if cfg.chat else 'document')}, "
        f"{_plural(counts['tokens'], 'token')} in {seconds:.1f}s ({counts['tokens'] / seconds:,.0f} tokens/s, "
        f"{_plural(cfg.workers, 'worker')}) -> "
    )
    if shards:
        report.update(out=cfg.out, splits=writer.index["splits"])
        summary += cfg.out + "".join(
            f"; {name}: {_plural(s['num_docs'], 'document')}, {_plural(s['num_tokens'], 'token')} in "
            f"{_plural(len(s['shards']), 'shard')}"
            for name, s in writer.index["splits"].items()
        )
    else:
        report.update(output=cfg.output)
        summary += "<stdout>" if cfg.output == "-" else cfg.output
    print(summary, file=sys.stderr)
    return report


def _add_to_shards(writer: ShardWriter, r: _Result, first_doc: int, val_fraction: float | None) -> None:
    """The documents of one block into the train split, or spread over train and val."""
    if not val_fraction:
        writer.add_batch(r.tokens, r.lengths, "train")
        return
    import numpy as np

    is_val = _val_selector(val_fraction)(np.arange(first_doc, first_doc + r.num_docs))
    per_token = np.repeat(is_val, r.lengths)
    writer.add_batch(r.tokens[~per_token], r.lengths[~is_val], "train")
    writer.add_batch(r.tokens[per_token], r.lengths[is_val], "val")


# --------------------------------------------------------------------------------------------------------- decode


@dataclass
class DecodeConfig:
    tokenizer: str
    inputs: list[str] = dataclasses.field(default_factory=lambda: ["-"])
    output: str = "-"
    field: str = "text"

    def validate(self) -> None:
        problems: list[str] = []
        _check_paths(self.inputs, self.tokenizer, self.output, problems)
        if not self.field:
            problems.append("--field must name the output field")
        if self.field == "tokens":
            problems.append("--field tokens would overwrite the ids being decoded; name another field")
        if problems:
            raise UserError("; ".join(problems))


def run_decode(cfg: DecodeConfig) -> dict:
    """``{"tokens": [...]}`` records back to text in ``cfg.field``, other fields passed through."""
    from llamactl.jsonl import check_token_ids, dumps, open_output, read_jsonl
    from llamactl.jsonl import field as get_field
    from llamactl.progress import progress
    from llamactl.tokenizer import Tokenizer

    cfg.validate()
    tokenizer = Tokenizer.from_file(cfg.tokenizer)
    vocab = tokenizer.vocab_size
    start = time.perf_counter()
    n_records = n_tokens = 0
    with open_output(cfg.output) as f, progress("decode", "tok", unit_scale=True) as bar:
        for path in cfg.inputs:
            for item in read_jsonl(path, wait=0.0):
                if item is None:  # the input is waiting: what is decoded so far goes out
                    f.flush()
                    continue
                lineno, rec = item
                where = f"{_display(path)}:{lineno}"
                ids = check_token_ids(get_field(rec, "tokens", list, where), vocab, where)
                check_free(rec, (cfg.field,), where, "tokens")
                del rec["tokens"]
                rec[cfg.field] = tokenizer.decode(ids)
                f.write(dumps(rec) + "\n")
                n_records += 1
                n_tokens += len(ids)
                bar.update(len(ids))
    seconds = time.perf_counter() - start
    dest = "<stdout>" if cfg.output == "-" else cfg.output
    print(
        f"decoded {_plural(n_records, 'record')}, {_plural(n_tokens, 'token')} in {seconds:.1f}s -> {dest}",
        file=sys.stderr,
    )
    return {"records": n_records, "tokens": n_tokens, "seconds": seconds, "output": cfg.output}
