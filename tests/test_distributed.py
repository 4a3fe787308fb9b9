"""Sharded training on this CPU with gloo: models materialised shard by shard, trainer checkpoints written by every
rank through torch.distributed.checkpoint and read back on another number of ranks, the final model streamed out of
the shards, and the memory a save and an export take."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from helpers import FIXTURES

from llamactl.checkpoint import CheckpointMeta, load_tensors, read_safetensors, save_model
from llamactl.model import ModelArgs, Transformer
from llamactl.shards import ShardWriter
from llamactl.tokenizer import Tokenizer
from llamactl.training import checkpoints, distributed, lifecycle, loop

SMALL = ModelArgs(dim=48, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=301, multiple_of=16, max_seq_len=32)
# ~17.6M parameters (70 MB in fp32): a whole-model gather on rank 0 would stand far above one rank's shard
BIG = ModelArgs(dim=512, n_layers=4, n_heads=8, vocab_size=8192, multiple_of=256, max_seq_len=64)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, world: int, port: int) -> distributed.Dist:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ["LOCAL_RANK"] = str(rank)
    return distributed.init_distributed(torch.device("cpu"))[0]


def _full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _peak_kib() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1))


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak resident set size to the current one
        f.write("5")


# ------------------------------------------------------------------------------------------------ materialising


def _materialise_worker(rank: int, world: int, port: int, ckpt: str, out: str) -> None:
    d = _join(rank, world, port)
    try:
        for name, sources in (("init", {"": None}), ("ckpt", {"": load_tensors(ckpt)})):
            model = lifecycle.meta_model(SMALL, sources[""], "test")
            distributed.build_wrapped(model, sources, 7, d, torch.device("cpu"), "fsdp", bf16=True)
            for p in model.parameters():  # each rank holds its rows only
                assert p.to_local().numel() <= -(-p.shape[0] // world) * p[0].numel()
            full = _full_state(model)
            if d.main:
                save_model(os.path.join(out, f"{name}-{world}.safetensors"), _as_model(full, SMALL))
    finally:
        torch.distributed.destroy_process_group()


def _as_model(state: dict[str, torch.Tensor], args: ModelArgs) -> Transformer:
    with torch.device("meta"):
        model = Transformer(args)
    model.load_state_dict(state, assign=True)
    return model


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_sharded_materialisation_gives_the_single_process_model(tmp_path, world):
    """Each rank fills only its rows (from the seeded initialisation, or read from the memory-mapped checkpoint);
    gathered, the model is the checkpoint's tensors exactly, and the one a single process initialises."""
    torch.manual_seed(1)
    source = Transformer(SMALL)  # random weights, not the seeded initialisation
    ckpt = str(tmp_path / "source.safetensors")
    save_model(ckpt, source)
    mp.spawn(_materialise_worker, args=(world, _free_port(), ckpt, str(tmp_path)), nprocs=world, join=True)
    from_ckpt = read_safetensors(str(tmp_path / f"ckpt-{world}.safetensors"))
    for k, v in source.state_dict().items():
        assert torch.equal(from_ckpt[k], v), k
    single = Transformer(SMALL)
    single.init_weights(7)
    from_init = read_safetensors(str(tmp_path / f"init-{world}.safetensors"))
    for k, v in single.state_dict().items():
        assert torch.equal(from_init[k], v), k


# ------------------------------------------------------------------------------------------------ saving


def _save_worker(rank: int, world: int, port: int, run_dir: str, out: str) -> None:
    """One AdamW step of BIG under FSDP2, then a checkpoint; rank 0 records how far its resident memory rose above
    where it stood before the save."""
    d = _join(rank, world, port)
    try:
        model = lifecycle.meta_model(BIG, None, "test")
        distributed.build_wrapped(model, {"": None}, 0, d, torch.device("cpu"), "fsdp", bf16=False)
        optim = loop.make_optimizer(model, 1e-3, 0.1, fused=False)
        tokens = torch.randint(0, BIG.vocab_size, (2, 17), generator=torch.Generator().manual_seed(rank))
        model(tokens[:, :-1], tokens[:, 1:]).backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        local = sum(p.to_local().numel() * 4 for p in model.parameters())  # fp32 shard; AdamW holds two more
        state = {"model_args": BIG.to_dict(), "settings": {}, "parts": checkpoints.part_headers(CheckpointMeta(BIG))}
        distributed.barrier(d)
        _reset_peak()
        before = _peak_kib()
        checkpoints.save_checkpoint(run_dir, 1, model, optim, state, d, keep=2)
        rose = (_peak_kib() - before) * 1024
        full = _full_state(model)
        if d.main:
            save_model(os.path.join(out, "gathered.safetensors"), _as_model(full, BIG))
            with open(os.path.join(out, "save.json"), "w") as f:
                json.dump({"rose": rose, "local": local}, f)
    finally:
        torch.distributed.destroy_process_group()


def test_a_save_holds_one_shard_and_the_export_streams_one_tensor(tmp_path):
    """4 ranks save a 17.6M-parameter model and its AdamW state (211 MB in all) in parallel: rank 0's resident
    memory rises by less than its own shard of them (53 MB), where gathering the whole state on it would take 211 MB.
    Then one process streams model.safetensors out of the 4 ranks' shards: the gathered model exactly, with memory
    rising by less than two of its largest tensors (a whole-model load would take 70 MB)."""
    run_dir, out = str(tmp_path / "run"), str(tmp_path)
    os.makedirs(run_dir)
    mp.spawn(_save_worker, args=(4, _free_port(), run_dir, out), nprocs=4, join=True)
    with open(tmp_path / "save.json") as f:
        save = json.load(f)
    whole = 3 * BIG.num_params() * 4  # parameters and AdamW's two moments, fp32
    shard = 3 * save["local"]
    assert shard < whole / 3.5
    assert save["rose"] < shard, (save, shard, whole)
    assert sorted(os.listdir(os.path.join(run_dir, "step-0000001"))) == [
        "dcp", "rng-0.json", "rng-1.json", "rng-2.json", "rng-3.json", "trainer.json"
    ]  # fmt: skip

    ckpt = checkpoints.latest_checkpoint(run_dir)
    largest = BIG.vocab_size * BIG.dim * 4  # the embedding, fp32
    os.makedirs(tmp_path / "warm")
    checkpoints.export_parts(ckpt, str(tmp_path / "warm"))  # once first: imports, the allocator's pools
    _reset_peak()
    before = _peak_kib()
    checkpoints.export_parts(ckpt, run_dir)
    rose = (_peak_kib() - before) * 1024
    assert rose < 2 * largest + 8 * 2**20, (rose, largest)
    exported = read_safetensors(os.path.join(run_dir, "model.safetensors"))
    gathered = read_safetensors(str(tmp_path / "gathered.safetensors"))
    assert exported.keys() == gathered.keys()
    for k, v in gathered.items():
        assert torch.equal(exported[k], v), k


# ------------------------------------------------------------------------------------------------ resuming


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    tok = Tokenizer.from_file(os.path.join(FIXTURES, "llama2-tokenizer.model"))
    path = str(tmp_path_factory.mktemp("data") / "shards")
    lines = [f"Now is the winter of our discontent, line {i}, made glorious summer {i % 5}." for i in range(500)]
    with ShardWriter(path, tok, shard_tokens=4000) as writer:
        for line in lines:
            writer.add(tok.encode(line, bos=True, eos=True), "train")
    return path


PRETRAIN = ["--set", "dim=32", "--set", "n_layers=2", "--set", "n_heads=4", "--set", "n_kv_heads=2", "--set",
            "multiple_of=16", "--seq-len", "16", "--batch-size", "1", "--global-batch-tokens", str(12 * 16),
            "--steps", "6", "--save-every", "2", "--eval-every", "0", "--dtype", "fp32", "--lr", "3e-3"]  # fmt: skip


def _pretrain(shards: str, run_dir, nproc: int, strategy: str, *extra: str, fault: str | None = None):
    launcher = [sys.executable, "-m", "llamactl.cli"]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "-m", "llamactl.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({"LLAMACTL_FAULT": fault} if fault else {})}
    cmd = [*launcher, "pretrain", shards, "-o", str(run_dir), *PRETRAIN, "--distributed", strategy, *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _losses(run_dir) -> list[float]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def _resume_on(shards, killed, run_dir, nproc, strategy):
    shutil.copytree(killed, run_dir)
    proc = _pretrain(shards, run_dir, nproc, strategy, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _losses(run_dir)


@pytest.mark.parametrize(
    ("before", "after"),
    [(("fsdp", 2), ("fsdp", 3)), pytest.param(("ddp", 2), ("fsdp", 4), marks=pytest.mark.slow),
     pytest.param(("fsdp", 4), ("ddp", 1), marks=pytest.mark.slow)],
)  # fmt: skip
def test_kill_9_mid_save_then_resume_on_another_world_size(shards, tmp_path, before, after):
    """A run killed (SIGKILL, every rank) while writing its step-4 checkpoint resumes from step 2 on another number
    of processes and another strategy, with the same global batch (12 sequences: accumulation 12 / world), and gives
    the loss curve of an uninterrupted single-process run: fp32 sums in another order, 1e-5 apart."""
    reference = tmp_path / "one"
    proc = _pretrain(shards, reference, 1, "ddp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    killed = tmp_path / "killed"
    proc = _pretrain(shards, killed, before[1], before[0], fault="checkpoint-written@4")
    assert proc.returncode != 0
    with open(killed / "latest") as f:
        assert f.read().strip() == "step-0000002"  # the half-written step 4 is not the latest
    assert any(n.startswith(".step-0000004") for n in os.listdir(killed))
    resumed = _resume_on(shards, killed, tmp_path / "resumed", after[1], after[0])
    assert resumed == pytest.approx(_losses(reference), rel=1e-5)
    assert not any(n.startswith(".step-") for n in os.listdir(tmp_path / "resumed"))
    a = read_safetensors(str(reference / "model.safetensors"))
    b = read_safetensors(str(tmp_path / "resumed" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_fsdp_bf16_mixed_precision_trains(shards, tmp_path):
    """FSDP2 with bf16 parameters for compute and fp32 reduction and master weights: the curve falls and the saved
    master weights are fp32."""
    proc = _pretrain(shards, tmp_path / "run", 2, "fsdp", "--dtype", "bf16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = _losses(tmp_path / "run")
    assert losses[-1] < losses[0] - 0.3
    assert {t.dtype for t in read_safetensors(str(tmp_path / "run" / "model.safetensors")).values()} == {torch.float32}


# ------------------------------------------------------------------------------------------------ dry run


def test_dry_run_prints_the_plan_and_writes_nothing(shards, tmp_path):
    from helpers import assert_user_error, run_cli

    out = tmp_path / "run"
    flags = ["--preset", "llama2-7b", "--seq-len", "4096", "--batch-size", "1", "--distributed", "fsdp",
             "--eval-every", "0", "--device", "cuda", "--dry-run"]  # fmt: skip
    proc = run_cli("pretrain", shards, "-o", out, *flags, "--world-size", "8", "--device-memory", "80GB")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("memory per rank: 8 ranks, fsdp, bf16") and "fits in" in lines[-1]
    total = next(line for line in lines if line.strip().startswith("total"))
    # at least the 16 bytes per parameter of fp32 weights, gradients and AdamW's moments, over 8 ranks
    assert float(total.split()[1]) * 2**30 >= 16 * 6.738e9 / 8
    assert not out.exists()
    proc = run_cli("pretrain", shards, "-o", out, *flags, "--world-size", "1", "--device-memory", "80GB")
    assert proc.returncode == 0 and "does not fit in" in proc.stdout.splitlines()[-1]
    assert_user_error(run_cli("pretrain", shards, "-o", out, *flags, "--device-memory", "lots"), "--device-memory")
    assert_user_error(run_cli("pretrain", shards, "-o", out, "--device-memory", "80GB"), "--dry-run")
