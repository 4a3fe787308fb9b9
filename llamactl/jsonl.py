"""JSONL in and out: one JSON object a line, UTF-8, ``-`` for stdin/stdout, errors that name the file and line."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from typing import IO

from llamactl.errors import UserError


def display_name(path: str) -> str:
    return "<stdin>" if path == "-" else path


def read_jsonl(path: str) -> Iterator[tuple[int, dict]]:
    """Yield (line number, record) for each non-blank line; a bad line raises UserError naming file and line."""
    name = display_name(path)
    if path == "-":
        stream: IO[bytes] = sys.stdin.buffer
    else:
        if not os.path.isfile(path):
            raise UserError(f"{name}: no such file")
        stream = open(path, "rb")  # noqa: SIM115 - closed below
    # Bytes decoded line by line: a text stream decodes ahead in blocks and would blame an earlier line.
    with contextlib.closing(stream) if path != "-" else contextlib.nullcontext(stream):
        lineno = 0
        for raw in stream:
            lineno += 1
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{name}:{lineno}: not UTF-8 text ({e.reason})") from None
            if not line.strip():
                continue
            yield lineno, parse_record(line, f"{name}:{lineno}")


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


def dumps(rec: dict) -> str:
    return json.dumps(rec, ensure_ascii=False)


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """A temporary path beside ``path`` that is renamed onto it only if the block succeeds."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the permissions any new file would
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # on disk before the name says it is complete
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def open_output(path: str) -> Iterator[IO[str]]:
    """A text stream for JSONL output: stdout for ``-`` (line-flushed for pipes), else an atomic file."""
    if path == "-":
        yield sys.stdout
        sys.stdout.flush()
        return
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        yield f
