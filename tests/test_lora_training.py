"""LoRA and QLoRA through the shared training path: only the adapters (and a scalar head) train, the run ends with
an adapter of its base, it resumes exactly, and a quantized base stays quantized."""

import hashlib
import json
import os

import pytest
import torch
from helpers import assert_user_error, run_cli, save_chatty_model

from llamactl.checkpoint import read_meta
from llamactl.commands.sft import SFTConfig
from llamactl.commands.sft import run as sft
from llamactl.commands.train_rm import TrainRMConfig
from llamactl.commands.train_rm import run as train_rm
from llamactl.loading import load_model
from llamactl.lora import read_adapter

PAIRS = [("What is 2 + 2?", "It is 4."), ("Name a colour.", "Blue."), ("Say hi.", "Hi!"), ("Count to 3.", "1, 2, 3.")]


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = str(root / "base.safetensors")
    save_chatty_model(base, max_seq_len=64)
    data = root / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in PAIRS * 4))
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": p, "chosen": r, "rejected": "No."}) + "\n" for p, r in PAIRS * 4))
    return {"base": base, "data": str(data), "pairs": str(pairs), "root": root}


def _sft(w, out, **kw) -> dict:
    cfg = dict(model=w["base"], data=w["data"], output=str(out), seq_len=64, batch_size=2, global_batch_size=4,
               steps=6, lr=5e-2, dtype="fp32", save_every=2, lora_rank=4, lora_targets="wq,wv,w2")  # fmt: skip
    return sft(SFTConfig(**{**cfg, **kw}))


def _losses(run_dir) -> list[float]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_sft_trains_only_the_adapters_and_writes_an_adapter_of_its_base(w, tmp_path):
    before = _sha256(w["base"])
    _sft(w, tmp_path / "lora")
    _sft(w, tmp_path / "full", lora_rank=0, steps=1)
    lora, full = _losses(tmp_path / "lora"), _losses(tmp_path / "full")
    # B starts at zero: before its first update the adapted model is the base, so step 1's loss is full tuning's
    assert lora[0] == pytest.approx(full[0], rel=1e-6)
    assert lora[-1] < lora[0] - 0.1
    assert _sha256(w["base"]) == before  # the base is read, never written
    meta, tensors = read_adapter(str(tmp_path / "lora" / "adapter.safetensors"))
    assert not os.path.exists(tmp_path / "lora" / "model.safetensors")
    assert meta.base_sha256 == before and meta.spec.rank == 4 and meta.spec.alpha == 8.0  # alpha: twice the rank
    args = read_meta(w["base"]).args
    shapes = {"wq": (args.dim, args.dim), "wv": (args.n_kv_heads * args.head_dim, args.dim),
              "w2": (args.dim, args.hidden_dim)}  # fmt: skip
    want = {}
    for i in range(args.n_layers):
        for name, (out, inp) in shapes.items():
            owner = "attention" if name.startswith("wq") or name == "wv" else "feed_forward"
            want[f"layers.{i}.{owner}.{name}.lora_A"] = (4, inp)
            want[f"layers.{i}.{owner}.{name}.lora_B"] = (out, 4)
    assert {k: tuple(t.shape) for k, t in tensors.items()} == want
    with open(tmp_path / "lora" / "step-0000006" / "trainer.json") as f:
        assert sorted(json.load(f)["trained"]) == sorted(want)  # nothing else has a gradient or optimizer state
    assert any(float(t.abs().max()) > 0 for k, t in tensors.items() if k.endswith("lora_B"))


def test_kill_9_mid_save_then_resume_gives_the_uninterrupted_adapter(w, tmp_path):
    """With dropout on the adapters' input (RNG restored on resume) the resumed run repeats the uninterrupted one."""
    import subprocess
    import sys

    _sft(w, tmp_path / "one", lora_dropout=0.1)
    cfg = dict(model=w["base"], data=w["data"], output=str(tmp_path / "two"), seq_len=64, batch_size=2,
               global_batch_size=4, steps=6, lr=5e-2, dtype="fp32", save_every=2, lora_rank=4,
               lora_targets="wq,wv,w2", lora_dropout=0.1)  # fmt: skip
    code = f"from llamactl.commands.sft import SFTConfig, run; run(SFTConfig(**{cfg!r}))"
    env = {**os.environ, "LLAMACTL_FAULT": "checkpoint-written@4"}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True).returncode != 0
    _sft(w, tmp_path / "two", lora_dropout=0.1, resume=True)
    assert _losses(tmp_path / "two") == _losses(tmp_path / "one")
    a = read_adapter(str(tmp_path / "one" / "adapter.safetensors"))[1]
    b = read_adapter(str(tmp_path / "two" / "adapter.safetensors"))[1]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_qlora_keeps_the_base_quantized_and_its_adapter_merges_into_the_float_source(w, tmp_path):
    quantized = str(tmp_path / "int8.safetensors")
    proc = run_cli("quantize", "-m", w["base"], "-o", quantized, "--scheme", "int8")
    assert proc.returncode == 0, proc.stderr
    _sft(w, tmp_path / "run", model=quantized)
    losses = _losses(tmp_path / "run")
    assert losses[-1] < losses[0] - 0.1
    meta, _ = read_adapter(str(tmp_path / "run" / "adapter.safetensors"))
    assert meta.base_sha256 == _sha256(quantized) and meta.base_source_sha256 == _sha256(w["base"])
    # QLoRA practice: the adapter goes onto the floating-point model the quantized base was made from
    merged = str(tmp_path / "merged.safetensors")
    adapter = str(tmp_path / "run" / "adapter.safetensors")
    proc = run_cli("convert", w["base"], "--merge-adapter", adapter, "-o", merged)
    assert proc.returncode == 0, proc.stderr
    model, _ = load_model(merged)
    base, _ = load_model(w["base"])
    assert not torch.equal(model.layers[0].attention.wq.weight, base.layers[0].attention.wq.weight)
    assert torch.equal(model.layers[0].attention.wk.weight, base.layers[0].attention.wk.weight)  # not a target


def test_reward_model_adapter_trains_its_scalar_head_in_full(w, tmp_path):
    cfg = TrainRMConfig(model=w["base"], data=w["pairs"], output=str(tmp_path / "rm"), seq_len=64, batch_size=2,
                        global_batch_size=4, steps=4, lr=1e-2, dtype="fp32", save_every=0, lora_rank=2,
                        kind="safety")  # fmt: skip
    train_rm(cfg)
    meta, tensors = read_adapter(str(tmp_path / "rm" / "adapter.safetensors"))
    assert meta.extra == ("score.weight",) and meta.role == "safety" and meta.args.head == "scalar"
    assert tensors["score.weight"].shape == (1, read_meta(w["base"]).args.dim)
    assert len([k for k in tensors if k.endswith("lora_A")]) == 7 * read_meta(w["base"]).args.n_layers  # all


def test_continuing_an_adapter_needs_its_rank_and_targets(w, tmp_path):
    _sft(w, tmp_path / "first", steps=2)
    adapter = str(tmp_path / "first" / "adapter.safetensors")
    _sft(w, tmp_path / "second", steps=2, adapter=adapter)  # continues: same rank and targets
    first = read_adapter(adapter)[1]
    second = read_adapter(str(tmp_path / "second" / "adapter.safetensors"))[1]
    assert any(not torch.equal(first[k], second[k]) for k in first)
    common = [
        "-m",
        w["base"],
        "--data",
        w["data"],
        "--seq-len",
        "64",
        "--steps",
        "1",
        "--global-batch-size",
        "4",
        "--batch-size",
        "2",
    ]
    proc = run_cli("sft", *common, "-o", str(tmp_path / "x"), "--adapter", adapter, "--lora-rank", "8")
    assert_user_error(proc, adapter, "rank 4", "--lora-rank 8")
    assert not os.path.exists(tmp_path / "x")
    proc = run_cli("sft", *common, "-o", str(tmp_path / "y"), "--lora-rank", "4", "--lora-targets", "wq,wz")
    assert_user_error(proc, "--lora-targets", "wz")
    proc = run_cli("sft", *common, "-o", str(tmp_path / "z"), "--lora-rank", "-1")
    assert_user_error(proc, "--lora-rank")


@pytest.mark.slow
def test_fsdp_two_processes_train_the_adapters_as_one(w, tmp_path):
    import subprocess
    import sys

    _sft(w, tmp_path / "one", steps=4, lora_dropout=0.0)  # dropout would draw from each rank's own RNG
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "llamactl.cli", "sft",
           "-m", w["base"], "--data", w["data"], "-o", str(tmp_path / "two"), "--seq-len", "64", "--batch-size",
           "1", "--global-batch-size", "4", "--steps", "4", "--lr", "5e-2", "--dtype", "fp32", "--save-every", "2",
           "--lora-rank", "4", "--lora-targets", "wq,wv,w2", "--lora-dropout", "0",
           "--distributed", "fsdp"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-5)


def test_convert_exports_a_training_checkpoint(w, tmp_path):
    """convert reads a run's checkpoint (RUN/step-N, or the run directory: its latest): the model or adapter it
    writes is the one the run wrote at its end, tensor for tensor, streamed out of the shards."""
    from llamactl.checkpoint import load_tensors

    _sft(w, tmp_path / "lora", steps=4)
    _sft(w, tmp_path / "full", steps=4, lora_rank=0)
    proc = run_cli("convert", str(tmp_path / "lora" / "step-0000004"), "-o", str(tmp_path / "a.safetensors"))
    assert proc.returncode == 0, proc.stderr
    got, want = (
        read_adapter(str(tmp_path / "a.safetensors")),
        read_adapter(str(tmp_path / "lora" / "adapter.safetensors")),
    )
    assert got[0].base_sha256 == want[0].base_sha256 and got[1].keys() == want[1].keys()
    assert all(torch.equal(got[1][k], want[1][k]) for k in want[1])
    proc = run_cli("convert", str(tmp_path / "full"), "-o", str(tmp_path / "m.safetensors"))
    assert proc.returncode == 0, proc.stderr
    got, want = (
        load_tensors(str(tmp_path / "m.safetensors")),
        load_tensors(str(tmp_path / "full" / "model.safetensors")),
    )
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert read_meta(str(tmp_path / "m.safetensors")).tokenizer == read_meta(w["base"]).tokenizer
    proc = run_cli("convert", str(tmp_path / "lora" / "step-0000002"), "--to", "hf", "-o", str(tmp_path / "hf"))
    assert_user_error(proc, "step-0000002", "LoRA adapters")
