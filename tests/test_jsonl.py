"""JSONL reading: line numbers and records whatever the read size, and batches that close when the input waits."""

import json

import pytest

from llamactl import jsonl
from llamactl.errors import UserError


@pytest.mark.parametrize("read_bytes", [1, 7, 64, 1 << 16])
def test_records_and_line_numbers_do_not_depend_on_read_size(tmp_path, monkeypatch, read_bytes):
    monkeypatch.setattr(jsonl, "READ_BYTES", read_bytes)
    lines = [json.dumps({"i": 0, "long": "x" * 300}), "", "  ", json.dumps({"i": 1, "s": "é" * 50}), json.dumps({})]
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")  # no newline after the last record
    want = [(n, json.loads(line)) for n, line in enumerate(lines, 1) if line.strip()]
    assert list(jsonl.read_jsonl(str(path))) == want
    path.write_bytes(path.read_bytes() + b"\n[1]\n")
    with pytest.raises(UserError, match=r"r\.jsonl:6: expected a JSON object"):
        list(jsonl.read_jsonl(str(path)))


def test_batches_close_early_when_the_input_waits():
    items = [1, 2, 3, None, 4, None, None, 5, 6, 7, 8]
    assert list(jsonl.batches(iter(items), 3)) == [[1, 2, 3], [4], [5, 6, 7], [8]]
