"""JSONL in and out: one JSON object a line, UTF-8, ``-`` for stdin/stdout, errors that name the file and line.

Input is read as it arrives: a reader asked to (``wait``) marks each moment the input has nothing new (a pipe whose
writer is quiet), so that a command can finish and flush what it has instead of holding results back.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import stat
import sys
from collections.abc import Iterator
from typing import IO, TypeVar

from llamactl.errors import UserError
from llamactl.files import atomic_path, display_name, named_errors, require_input

__all__ = [
    "atomic_path",
    "batches",
    "check_free",
    "display_name",
    "dumps",
    "field",
    "open_output",
    "parse_record",
    "read_chunks",
    "read_jsonl",
    "streams",
]

READ_BYTES = 1 << 16
BATCH_WAIT_S = 0.05  # how long a batch waits for more records from input that arrives over time (a pipe)
FORMATS = ("auto", "text", "jsonl")  # --format of an input read as text or JSONL (input_kind)
T = TypeVar("T")


def _ready(fd: int, wait: float) -> bool:
    try:
        return bool(select.select([fd], [], [], wait)[0])
    except (OSError, ValueError):  # an fd select cannot watch: read it as a file
        return True


def read_chunks(path: str, size: int | None = None, wait: float | None = None) -> Iterator[bytes | None]:
    """The bytes of a file (``-``: stdin) as they arrive, in reads of at most ``size`` bytes (READ_BYTES).

    With ``wait`` set, None is yielded whenever the input has had nothing new for ``wait`` seconds, before the read
    that blocks; a regular file never waits, so its reads (and what callers make of them) do not depend on timing.
    """
    if path == "-":
        fd, own = sys.stdin.fileno(), False
    else:
        require_input(path, "file", stream_ok=True)
        fd, own = os.open(path, os.O_RDONLY), True
    try:
        waits = wait is not None and not stat.S_ISREG(os.fstat(fd).st_mode)
        while True:
            if waits and not _ready(fd, wait):
                yield None
            data = os.read(fd, size or READ_BYTES)
            if not data:
                return
            yield data
    finally:
        if own:
            os.close(fd)


def streams(path: str) -> bool:
    """Whether an input arrives over time (a pipe, a terminal) rather than lying whole in a regular file."""
    try:
        mode = os.fstat(sys.stdin.fileno()).st_mode if path == "-" else os.stat(path).st_mode
    except (OSError, ValueError):
        return True
    return not stat.S_ISREG(mode)


def batches(items: Iterator[T | None], size: int) -> Iterator[list[T]]:
    """Lists of up to ``size`` items; a None (the input is waiting, see ``read_jsonl``) closes a batch early, so
    that no record waits for input that has not come."""
    batch: list[T] = []
    for item in items:
        if item is not None:
            batch.append(item)
        if batch and (item is None or len(batch) == size):
            yield batch
            batch = []
    if batch:
        yield batch


def read_jsonl(path: str, wait: float | None = None) -> Iterator[tuple[int, dict] | None]:
    """Yield (line number, record) for each non-blank line; a bad line raises UserError naming file and line.

    With ``wait`` set, None marks each moment the input has had nothing new for ``wait`` seconds (``read_chunks``).
    """
    name = display_name(path)
    lineno = 0
    pending: list[bytes] = []  # the pieces of a line not yet ended (a long line spans many reads)
    for data in read_chunks(path, wait=wait):
        if data is None:
            yield None
            continue
        if b"\n" not in data:
            pending.append(data)
            continue
        lines = data.split(b"\n")
        lines[0] = b"".join([*pending, lines[0]])
        pending = [lines.pop()]
        for raw in lines:
            lineno += 1
            rec = _parse_line(raw, name, lineno)
            if rec is not None:
                yield lineno, rec
    last = b"".join(pending)
    if last:
        rec = _parse_line(last, name, lineno + 1)
        if rec is not None:
            yield lineno + 1, rec


def parsed_records(path: str, parse, wait: float | None = None) -> tuple[Iterator, int | None]:
    """``parse(where, record)`` of every record of ``path`` ("file:line" names it), and how many there are: a regular
    file is read and parsed whole first (a bad record in it writes nothing, and the count feeds a progress bar); a
    stream is parsed as it arrives (count None), with ``read_jsonl``'s None passed through where it waits."""
    name = display_name(path)
    items = (None if item is None else parse(f"{name}:{item[0]}", item[1]) for item in read_jsonl(path, wait=wait))
    if streams(path):
        return items, None
    listed = list(items)
    return iter(listed), len(listed)


def _parse_line(raw: bytes, name: str, lineno: int) -> dict | None:
    # Bytes decoded line by line: a text stream decodes ahead in blocks and would blame an earlier line.
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{name}:{lineno}: not UTF-8 text ({e.reason})") from None
    return parse_record(line, f"{name}:{lineno}") if line.strip() else None


def parse_record(line: str, where: str) -> dict:
    """One JSONL line as a JSON object; ``where`` ("file:line") names it in the error."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: invalid JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(rec, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    return rec


def field(rec: dict, key: str, kind: type | tuple[type, ...], where: str, required: bool = True):
    """rec[key] checked against ``kind``; ``where`` is "file:line" for the message."""
    if key not in rec:
        if required:
            raise UserError(f"{where}: missing field {key!r}")
        return None
    value = rec[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise UserError(f"{where}: field {key!r} must be {names}, got {type(value).__name__}")
    return value


def check_free(rec: dict, keys, where: str, source: str | None = None) -> None:
    """Refuse a record that already has a field the command would write (other than its ``source`` field)."""
    for key in keys:
        if key != source and key in rec:
            raise UserError(f"{where}: already has a {key!r} field; it would be overwritten")


def dumps(rec: dict) -> str:
    return json.dumps(rec, ensure_ascii=False)


@contextlib.contextmanager
def open_output(path: str) -> Iterator[IO[str]]:
    """A text stream for JSONL output: stdout for ``-``, else a file written through ``atomic_path``.

    A write that fails (a full disk, ``> /dev/full``) is a UserError naming the output.
    """
    if path == "-":
        with named_errors("-"):
            yield sys.stdout
            sys.stdout.flush()
        return
    with atomic_path(path) as tmp, named_errors(path, tmp), open(tmp, "w", encoding="utf-8") as f:
        yield f


def input_kind(path: str, fmt: str) -> str:
    """ "text" or "jsonl" for an input under ``--format fmt``: auto makes .jsonl files and stdin JSONL."""
    if fmt != "auto":
        return fmt
    return "jsonl" if path == "-" or path.endswith(".jsonl") else "text"


def decode_text(data: bytes, name: str, lineno: int) -> str:
    """UTF-8 text of a block that starts at line ``lineno``; binary data names the line it was found on."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = lineno + data.count(b"\n", 0, e.start)
        raise UserError(f"{name}:{line}: not UTF-8 text ({e.reason}); is this the right file?") from None
    nul = text.find("\0")
    if nul >= 0:
        line = lineno + text.count("\n", 0, nul)
        raise UserError(f"{name}:{line}: binary data (a NUL byte), not text; is this the right file?")
    return text


def check_token_ids(ids: list, vocab: int, where: str) -> list[int]:
    """``ids`` (a record's field 'tokens'), refused with the first entry that is no token id of a ``vocab``-token
    model."""
    for j, t in enumerate(ids):
        if type(t) is not int or not 0 <= t < vocab:
            raise UserError(f"{where}: field 'tokens'[{j}] is {t!r}, not a token id in [0, {vocab})")
    return ids
