"""Helpers shared by the tests (imported as `helpers`; pytest puts tests/ on sys.path)."""

import atexit
import json
import os
import subprocess
import sys

TESTS = os.path.dirname(__file__)
FIXTURES = os.path.join(TESTS, "fixtures")
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


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


def save_chatty_model(path: str, max_seq_len: int = 128):
    """A random one-layer model with Llama 2's tokenizer embedded (prompts can be text); returns the model."""
    from llamactl.checkpoint import save_model
    from llamactl.model import ModelArgs, Transformer
    from llamactl.tokenizer import Tokenizer

    args = ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=32000, multiple_of=16, max_seq_len=max_seq_len)
    model = Transformer(args)
    model.init_weights(0)
    save_model(path, model, tokenizer=Tokenizer.from_file(os.path.join(FIXTURES, "llama2-tokenizer.model")).model_bytes)
    return model


class CliServer:
    """Runs ``llamactl ARGS`` as forked children of one process that has imported torch (tests/cli_server.py):
    each run is a process of its own with real descriptors, exit code and signals, ~2 s faster to start."""

    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(TESTS, "cli_server.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=ENV,
        )

    def run(self, argv: list[str], stdin: str | None, cwd: str | None, timeout: float) -> subprocess.CompletedProcess:
        request = {"argv": [str(a) for a in argv], "stdin": stdin, "cwd": str(cwd) if cwd else None}
        self.proc.stdin.write(json.dumps({**request, "timeout": timeout}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"tests/cli_server.py ended (exit {self.proc.wait()}); its traceback is on stderr above"
        answer = json.loads(line)
        return subprocess.CompletedProcess(
            ["llamactl", *argv], answer["returncode"], answer["stdout"], answer["stderr"]
        )

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


_server: list[CliServer] = []


def run_cli(*args, stdin: str | None = None, cwd=None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real ``llamactl`` entry point in a process of its own (forked from a warm server; a fresh interpreter
    on a CUDA machine, where a child forked after the server's imports initialised CUDA cannot use it)."""
    import torch

    if torch.cuda.is_available():
        proc = run_cli_fresh(*args, stdin=stdin, cwd=cwd)
        proc.args = ["llamactl", *map(str, args)]
        return proc
    if not _server or _server[0].proc.poll() is not None:
        _server[:] = [CliServer()]
        atexit.register(_server[0].close)
    return _server[0].run(list(args), stdin, cwd, timeout)


def run_cli_fresh(*args, stdin: str | None = None, cwd=None) -> subprocess.CompletedProcess:
    """Run ``python -m llamactl.cli ARGS`` in a new interpreter (for what a fork of the server cannot show)."""
    return subprocess.run(
        [sys.executable, "-m", "llamactl.cli", *map(str, args)],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=cwd,
        env=ENV,
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


def peaked_model(**shape):
    """A tiny GQA model with weights large enough that its logits have clear maxima (no near-ties for argmax to
    break differently between batch shapes); ``shape`` overrides its config."""
    import torch

    from llamactl.model import ModelArgs, Transformer

    config = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16, max_seq_len=48)
    m = Transformer(ModelArgs(**{**config, **shape})).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.ones_like(p) if name.endswith("norm.weight") else torch.randn(p.shape, generator=g) * 0.3)
    return m


def save_reward_model(base: str, path: str, seed: int, role: str | None = None) -> str:
    """A reward model from the chat model at ``base`` (``reward.reward_init``) with a random scalar head (a zero head
    would score everything 0), saved at ``path``."""
    import torch

    from llamactl.checkpoint import load_tensors, plan_from_tensors, read_meta, save_plans
    from llamactl.reward import reward_init

    meta, tensors = reward_init(read_meta(base), load_tensors(base))
    g = torch.Generator().manual_seed(seed)
    tensors["score.weight"] = torch.randn(tensors["score.weight"].shape, generator=g)
    meta.role = role
    save_plans(path, plan_from_tensors(tensors), meta)
    return path
