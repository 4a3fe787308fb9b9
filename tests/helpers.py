"""Helpers shared by the tests (imported as `helpers`; pytest puts tests/ on sys.path)."""

import os
import subprocess
import sys

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def tiny_hf_config(**overrides):
    from transformers import LlamaConfig

    cfg = dict(
        hidden_size=64,
        intermediate_size=176,
        num_attention_heads=8,
        num_key_value_heads=2,
        num_hidden_layers=2,
        vocab_size=128,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
    )
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def run_cli(*args, stdin: str | None = None, cwd=None) -> subprocess.CompletedProcess:
    """Run the real ``llamactl`` entry point in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "llamactl.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit code 2, exactly one line on stderr naming what is wrong, no traceback, nothing on stdout."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert proc.stdout == ""
