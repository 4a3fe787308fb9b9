"""pretrain: loss goes down, resume after kill -9 reproduces the uninterrupted curve, torchrun with 2 processes."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import FIXTURES, assert_user_error, run_cli

from llamactl.commands.pretrain import PretrainConfig, run
from llamactl.loading import load_model
from llamactl.shards import ShardWriter
from llamactl.tokenizer import Tokenizer

TINY = ["dim=32", "n_layers=2", "n_heads=4", "n_kv_heads=2", "multiple_of=16"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Shakespeare-like text in Llama 2's tokenizer, with a held-out split (tests/fixtures has no Shakespeare)."""
    tok = Tokenizer.from_file(os.path.join(FIXTURES, "llama2-tokenizer.model"))
    path = str(tmp_path_factory.mktemp("data") / "shards")
    lines = [f"To be or not to be, line {i}: that is the question {i % 7}." for i in range(600)]
    with ShardWriter(path, tok, shard_tokens=3000, splits=("train", "val")) as w:
        for i, line in enumerate(lines):
            w.add(tok.encode(line, bos=True, eos=True), "val" if i % 10 == 0 else "train")
    return path


def _cfg(shards, out, **kw):
    base = dict(
        data=shards,
        output=str(out),
        overrides=TINY,
        seq_len=32,
        batch_size=4,
        steps=8,
        eval_every=4,
        eval_batches=2,
        save_every=2,
        dtype="fp32",
        lr=3e-3,
    )
    base.update(kw)
    return PretrainConfig(**base)


def _curve(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [
        {k: r[k] for k in ("step", "loss", "lr", "grad_norm") + (("val_loss",) if "val_loss" in r else ())}
        for r in rows
    ]


def _run_subprocess(cfg: PretrainConfig, fault: str | None = None) -> int:
    code = f"from llamactl.commands.pretrain import PretrainConfig, run; run(PretrainConfig(**{cfg.__dict__!r}))"
    env = {**os.environ, **({"LLAMACTL_FAULT": fault} if fault else {})}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True).returncode


def test_trains_and_writes_a_self_describing_model(shards, tmp_path):
    # 20 steps: after 12 the loss had fallen by 1.01 and 0.98 nats under two initialisations, too near the bound
    summary = run(_cfg(shards, tmp_path / "run", steps=20))
    curve = _curve(tmp_path / "run")
    assert [r["step"] for r in curve] == list(range(1, 21))
    assert curve[-1]["loss"] < curve[0]["loss"] - 1.0  # a real signal, far above noise on this repetitive text
    assert "val_loss" in curve[3] and summary["val_loss"] == pytest.approx(curve[-1]["val_loss"], abs=1e-6)
    assert 0 < summary["unigram_val_loss"] < 10.4  # below uniform over 32000 (ln 32000 = 10.37)
    model, meta = load_model(str(tmp_path / "run" / "model.safetensors"))
    assert meta.lineage["command"] == "pretrain" and meta.lineage["step"] == 20
    assert meta.tokenizer is not None and model.args.vocab_size == 32000 and model.args.dim == 32


# the kill between checkpoints (about 25 s) runs in `make test-all`; the kill mid-checkpoint-write runs always
@pytest.mark.parametrize("fault", ["checkpoint-written@6", pytest.param("step-done@5", marks=pytest.mark.slow)])
def test_kill_9_then_resume_gives_the_uninterrupted_curve(shards, tmp_path, fault):
    run(_cfg(shards, tmp_path / "straight"))
    cfg = _cfg(shards, tmp_path / "broken")
    assert _run_subprocess(cfg, fault) == -9  # killed: mid-checkpoint write, or between checkpoints
    assert _curve(tmp_path / "broken")[-1]["step"] < 8
    cfg.resume = True
    run(cfg)
    assert _curve(tmp_path / "broken") == _curve(tmp_path / "straight")
    assert not [n for n in os.listdir(tmp_path / "broken") if n.endswith(".tmp")]


def test_activation_checkpointing_gives_the_same_curve(shards, tmp_path):
    run(_cfg(shards, tmp_path / "plain", steps=3, eval_every=0))
    run(_cfg(shards, tmp_path / "ckpt", steps=3, eval_every=0, activation_checkpointing=True))
    for a, b in zip(_curve(tmp_path / "plain"), _curve(tmp_path / "ckpt"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6) and a["grad_norm"] == pytest.approx(
            b["grad_norm"], rel=1e-5
        )


def test_ctrl_c_saves_and_resume_finishes_the_same_curve(shards, tmp_path):
    run(_cfg(shards, tmp_path / "straight", steps=30, save_every=0, eval_every=10))
    out = tmp_path / "interrupted"
    args = [
        "pretrain",
        shards,
        "-o",
        str(out),
        "--steps",
        "30",
        "--seq-len",
        "32",
        "--batch-size",
        "4",
        "--save-every",
        "0",
        "--eval-every",
        "10",
        "--eval-batches",
        "2",
        "--dtype",
        "fp32",
        "--lr",
        "3e-3",
    ]
    args += [a for o in TINY for a in ("--set", o)]
    proc = subprocess.Popen([sys.executable, "-m", "llamactl.cli", *args], stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    while proc.poll() is None and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "checkpoint saved, continue with --resume" in err and "Traceback" not in err
    stopped = _curve(out)[-1]["step"]
    assert 3 <= stopped < 30 and os.path.isdir(out / f"step-{stopped:07d}")
    proc = run_cli(*args, "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _curve(out) == _curve(tmp_path / "straight")


def test_existing_run_needs_resume(shards, tmp_path):
    run(_cfg(shards, tmp_path / "run", steps=2))
    sets = [a for o in TINY for a in ("--set", o)] + ["--seq-len", "32", "--batch-size", "4"]
    proc = run_cli("pretrain", shards, "-o", str(tmp_path / "run"), *sets, "--steps", "2", "--lr", "3e-3")
    assert_user_error(proc, "pass --resume")
    # a resumed run must keep the flags that shape its curve (here the schedule's length)
    proc = run_cli("pretrain", shards, "-o", str(tmp_path / "run"), *sets, "--steps", "4", "--resume")
    assert_user_error(proc, "resume with the flags the run started with", "--steps 2")
    assert_user_error(run_cli("pretrain", shards, "-o", str(tmp_path / "x"), "--set", "dim=28"), "dim 28", "n_heads 6")
    assert_user_error(run_cli("pretrain", shards, "-o", str(tmp_path / "x"), "--dtype", "fp16"), "--dtype 'fp16'")
    assert_user_error(run_cli("pretrain", str(tmp_path / "none"), "-o", str(tmp_path / "x")), "none", "no such")


# FSDP2 (about 20 s) runs in `make test-all`; DDP, the default strategy, always
@pytest.mark.parametrize("strategy", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_torchrun_two_processes_match_one(shards, tmp_path, strategy):
    # Same global batch: 1 process accumulating 2 micro-batches == 2 processes with 1 each (gloo on CPU).
    run(_cfg(shards, tmp_path / "one", steps=4, global_batch_tokens=2 * 4 * 32))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "-m",
        "llamactl.cli",
        "pretrain",
        shards,
        "-o",
        str(tmp_path / "two"),
        "--steps",
        "4",
        "--seq-len",
        "32",
        "--batch-size",
        "4",
        "--eval-every",
        "4",
        "--eval-batches",
        "2",
        "--save-every",
        "2",
        "--dtype",
        "fp32",
        "--lr",
        "3e-3",
        "--distributed",
        strategy,
    ] + [a for o in TINY for a in ("--set", o)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = _curve(tmp_path / "one"), _curve(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two, strict=True):
        # fp32 sums of the same gradients in another order (all-reduce vs accumulation): differences ~1e-7
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-5), (a, b)
        if strategy == "ddp":
            # FSDP2's reported norm drifts up to 1e-4 relative by step 4 (per-parameter gradients at step 1 agree to
            # 7 digits; see the pretrain issue's closing note), so only DDP's norm is held to this.
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5, abs=1e-6), (a, b)
    m1, _ = load_model(str(tmp_path / "one" / "model.safetensors"))
    m2, _ = load_model(str(tmp_path / "two" / "model.safetensors"))
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values(), strict=True):
        assert (a - b).abs().max() < 1e-4, k


def _tensorboard_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a TensorBoard log directory as TensorBoard's own reader loads it: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_gets_the_metrics_rows_and_a_resume_keeps_one_curve(shards, tmp_path):
    """--tensorboard DIR: every number of every metrics.jsonl row, at its step, read back by TensorBoard's reader;
    a run resumed from step 4 after writing steps 5-8 leaves one value per step (the resumed run's), as
    metrics.jsonl does."""
    import shutil

    tb, out = tmp_path / "tb", tmp_path / "a"
    run(_cfg(shards, out, keep=0, tensorboard=str(tb)))
    for step in (6, 8):  # back to the checkpoint of step 4, as if the run had died after step 5
        shutil.rmtree(out / f"step-{step:07d}")
    (out / "latest").write_text("step-0000004\n")
    run(_cfg(shards, out, keep=0, tensorboard=str(tb), resume=True))
    assert (out / "step-0000006").is_dir()  # steps 5 to 8 ran again
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, 9))
    want: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        for k, v in r.items():
            if k != "step" and isinstance(v, (int, float)):
                want.setdefault(k, []).append((r["step"], v))
    got = _tensorboard_scalars(tb)
    assert set(got) == set(want) and {"loss", "lr", "grad_norm", "val_loss"} <= set(got)
    for tag, points in want.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in points], tag
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag  # stored as fp32


def test_tensorboard_flag_is_checked_before_work(shards, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_user_error(run_cli("pretrain", shards, "-o", tmp_path / "run", "--tensorboard", blocker / "tb"),
                      "--tensorboard")  # fmt: skip
    assert not (tmp_path / "run").exists()
