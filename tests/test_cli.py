"""The CLI frame around every command: --debug shows what the one-line errors hide, a reader that leaves early
(`| head`) is no error, and no arguments at all is a request for help."""

import json
import os
import subprocess
import sys

from helpers import ENV, FIXTURES, run_cli

TOKENIZER = os.path.join(FIXTURES, "llama2-tokenizer.model")


def test_debug_shows_the_traceback(tmp_path):
    plain = run_cli("generate", "-m", tmp_path / "missing.safetensors")
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    debug = run_cli("--debug", "generate", "-m", tmp_path / "missing.safetensors")
    assert debug.returncode != 0 and "Traceback" in debug.stderr
    assert "UserError: " + plain.stderr.split(": error: ", 1)[1].strip() in debug.stderr


def test_a_reader_that_leaves_early_is_not_an_error(tmp_path):
    """`llamactl tokenize decode big.jsonl | head -c 100`: exit 0, nothing on stderr."""
    big = tmp_path / "big.jsonl"
    big.write_text("".join(json.dumps({"tokens": [1, 15043, 3186] * 20, "i": i}) + "\n" for i in range(20000)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "llamactl.cli", "tokenize", "decode", big, "-t", TOKENIZER],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
    )
    assert len(proc.stdout.read(100)) == 100
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and err == ""


def test_no_arguments_is_the_help():
    proc = run_cli()
    assert "Usage: llamactl" in proc.stderr + proc.stdout and "pretrain" in proc.stderr + proc.stdout
    assert ": error:" not in proc.stderr
