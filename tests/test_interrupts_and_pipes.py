"""What needs a process to talk to while it runs: signals mid-run leave nothing behind, a killed shard writer's
directory can be written again, and record-in, record-out commands answer each record as it arrives."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time

import pytest
from helpers import ENV, FIXTURES, save_chatty_model

from llamactl.shards import open_shards

TOKENIZER = os.path.join(FIXTURES, "llama2-tokenizer.model")
HANG_GUARD_S = 120  # only against a hang: every wait below ends on an event, not on time


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("m") / "model.safetensors")
    save_chatty_model(path)
    return path


def start(*args, cwd=None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "llamactl.cli", *map(str, args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=cwd,
        env=ENV,
    )


def wait_for(condition, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + HANG_GUARD_S
    while not condition():
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        assert time.monotonic() < deadline, "hang"
        time.sleep(0.02)


def read_line(proc: subprocess.Popen) -> bytes:
    """The next line the process writes, while its stdin stays open."""
    ready, _, _ = select.select([proc.stdout], [], [], HANG_GUARD_S)
    assert ready, "no answer while the input stays open"
    return proc.stdout.readline()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signal_during_generate_removes_its_temporary_file(model, tmp_path, sig):
    out = tmp_path / "out.jsonl"
    proc = start("generate", "-m", model, "-o", out, "--max-new-tokens", "2")
    wait_for(lambda: any(n.endswith(".tmp") for n in os.listdir(tmp_path)), proc)  # writing, waiting for input
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=HANG_GUARD_S)
    assert proc.returncode == 128 + sig
    words = "interrupted" if sig == signal.SIGINT else f"stopped by {signal.Signals(sig).name}"
    assert err.decode() == f"llamactl generate: error: {words}\n"
    assert os.listdir(tmp_path) == []


def test_sigterm_during_encode_out_removes_what_it_wrote(tmp_path):
    out = tmp_path / "shards"
    proc = start("tokenize", "encode", "-", "--format", "text", "-t", TOKENIZER, "--out", out, "--shard-tokens", "20")
    proc.stdin.write(b"".join(b"paragraph number %d of the text\n\n" % i for i in range(50)))
    proc.stdin.flush()
    wait_for(lambda: out.is_dir() and any(n.endswith(".safetensors") for n in os.listdir(out)), proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=HANG_GUARD_S)
    assert proc.returncode == 128 + signal.SIGTERM, err.decode()
    assert err.decode().splitlines() == ["llamactl tokenize encode: error: stopped by SIGTERM"]
    assert os.listdir(tmp_path) == []


def test_encode_out_over_a_killed_runs_directory_works(tmp_path):
    """kill -9 leaves shards no index names; writing the directory again succeeds and removes them."""
    text = tmp_path / "text.txt"
    text.write_text("".join(f"paragraph number {i} of the text\n\n" for i in range(200)))
    out = tmp_path / "shards"
    proc = start("tokenize", "encode", "-", "--format", "text", "-t", TOKENIZER, "--out", out, "--shard-tokens", "20")
    proc.stdin.write(text.read_bytes()[:2000])
    proc.stdin.flush()
    wait_for(lambda: out.is_dir() and len([n for n in os.listdir(out) if n.endswith(".safetensors")]) >= 2, proc)
    proc.kill()
    proc.communicate(timeout=HANG_GUARD_S)
    left = set(os.listdir(out))
    assert "index.json" not in left and len(left) >= 2
    again = subprocess.run(
        [sys.executable, "-m", "llamactl.cli", "tokenize", "encode", text, "-t", TOKENIZER, "--out", out,
         "--shard-tokens", "20"], capture_output=True, text=True, env=ENV)  # fmt: skip
    assert again.returncode == 0, again.stderr
    data = open_shards(str(out))
    named = {s["file"] for s in data.index["splits"]["train"]["shards"]}
    assert set(os.listdir(out)) == named | {"index.json", "tokenizer.model"}
    assert data.split("train").num_docs == 200


@pytest.mark.parametrize(
    "argv, record, check",
    [
        (["generate", "--max-new-tokens", "2", "--temperature", "0"], {"tokens": [1, 15043]}, "finish_reason"),
        (["tokenize", "encode", "-t", TOKENIZER], {"text": "Hello"}, "tokens"),
        (["tokenize", "decode", "-t", TOKENIZER], {"tokens": [1, 15043]}, "text"),
    ],
    ids=["generate", "tokenize-encode", "tokenize-decode"],
)
def test_records_are_answered_as_they_arrive(model, argv, record, check):
    """`tail -f prompts | llamactl ...`: each record's result comes out while the input is still open."""
    if argv[0] == "generate":
        argv = [*argv, "-m", model]
    proc = start(*argv)
    for i in range(3):
        proc.stdin.write((json.dumps({**record, "id": i}) + "\n").encode())
        proc.stdin.flush()
        result = json.loads(read_line(proc))
        assert result["id"] == i and check in result
    proc.stdin.close()
    assert proc.stdout.read() == b""
    proc.wait(timeout=HANG_GUARD_S)
    assert proc.returncode == 0 and b"\r" not in proc.stderr.read()


def test_sigterm_during_pretrain_saves_and_exits_143(tmp_path):
    from llamactl.shards import ShardWriter
    from llamactl.tokenizer import Tokenizer

    tok = Tokenizer.from_file(TOKENIZER)
    with ShardWriter(str(tmp_path / "shards"), tok) as writer:
        for i in range(300):
            writer.add(tok.encode(f"line {i} of a text to pretrain on", bos=True, eos=True))
    run = tmp_path / "run"
    tiny = ["--set", "dim=32", "--set", "n_layers=1", "--set", "n_heads=4", "--set", "multiple_of=16"]
    proc = start("pretrain", tmp_path / "shards", "-o", run, "--steps", "100000", "--seq-len", "16", "--batch-size",
                 "2", "--eval-every", "0", "--save-every", "0", "--dtype", "fp32", *tiny)  # fmt: skip
    wait_for(lambda: (run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().count("\n") >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=HANG_GUARD_S)
    assert proc.returncode == 128 + signal.SIGTERM, err.decode()[-2000:]
    lines = err.decode().splitlines()
    assert "checkpoint saved, continue with --resume" in lines[-2] and lines[-1].endswith("error: stopped by SIGTERM")
    step = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert (run / "latest").read_text().strip() == f"step-{step:07d}"
