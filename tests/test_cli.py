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


WHAT_HELP_IMPORTS = """
import sys
from llamactl.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
heavy = sorted(m for m in sys.modules if m == "torch" or m.startswith("llamactl.commands."))
print(" ".join(heavy), file=sys.stderr)
"""


def _imported_for(*argv) -> tuple[set[str], str]:
    proc = subprocess.run([sys.executable, "-c", WHAT_HELP_IMPORTS, *argv], capture_output=True, text=True, env=ENV)
    return set(proc.stderr.split("\n")[-2].split()), proc.stdout


def test_help_and_usage_errors_import_no_command_module_and_no_torch():
    """Commands are registered by name and help text; `llamactl --help` builds none of them, a command's own --help
    imports only that command's module, and no command module imports torch to define its flags."""
    imported, out = _imported_for("--help")
    assert imported == set() and "rejection-sample" in out and "tokenize" in out
    assert _imported_for("no-such-command")[0] == set()
    assert _imported_for("tokenize", "--help")[0] == set()
    from llamactl.cli import app

    groups = [
        ("", app.info.cls.specs),
        ("tokenize ", next(g for g in app.registered_groups).typer_instance.info.cls.specs),
    ]
    for prefix, specs in groups:
        for name, spec in specs.items():
            imported, out = _imported_for(*f"{prefix}{name} --help".split())
            assert imported == {f"llamactl.commands.{spec['module']}"}, (name, imported)
            assert "--help" in out
