"""Pieces every training command shares: distributed set-up, optimizer and schedule, checkpoints that resume exactly.

A run directory holds ``metrics.jsonl``, one ``step-NNNNNNN/`` folder per checkpoint (``model.safetensors``, a
self-describing llamactl checkpoint; ``trainer.safetensors``, the optimizer's and RNGs' tensors; ``trainer.json``,
step, settings, optimizer hyperparameters and the Python and NumPy RNG states) and ``latest``, a one-line file
naming the newest complete checkpoint. Nothing is pickled: resuming a run directory from someone else executes no
code of theirs. A checkpoint folder is written under a temporary name, fsynced and renamed when whole, and
``latest`` is replaced atomically after it, so a crash at any moment (kill -9 or power loss) leaves the previous
checkpoint as the one ``--resume`` picks up.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from llamactl.checkpoint import CheckpointMeta
from llamactl.errors import Interrupted, UserError
from llamactl.files import atomic_path, fsync_dir
from llamactl.jsonl import dumps, parse_record
from llamactl.model import ModelArgs, Transformer

LATEST = "latest"
TRAINER_JSON = "trainer.json"
DCP_DIR = "dcp"
TRAINER_FORMAT = "llamactl-trainer/2"


# ------------------------------------------------------------------------------------------------ distributed


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group torchrun describes in the environment; a plain run is rank 0 of 1.

    Returns the group and this rank's device: under torchrun a CUDA rank always runs on ``cuda:LOCAL_RANK``, whatever
    index ``--device`` named (``--device cuda:0`` would otherwise put every rank of a node on its first GPU).
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Dist(), device
    d = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)  # before the group: NCCL binds each rank to the current device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), d.local_rank), device


def all_reduce_mean(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= d.world
    return x


def shard(model: torch.nn.Module, d: Dist, device: torch.device, bf16: bool) -> None:
    """FSDP2 on a model still on the meta device: ``fully_shard`` on every transformer block, then on each
    transformer (the root, or each model of a container such as ppo's policy and value), so each rank will allocate
    only its shard of each parameter (``materialize``). With ``bf16``, FSDP2's mixed precision: parameters
    all-gathered and computed in bf16, gradients reduced in fp32, fp32 master weights in the shards."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from llamactl.model import TransformerBlock

    mesh = init_device_mesh(device.type, (d.world,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kwargs = {"mesh": mesh, **({"mp_policy": policy} if policy else {})}
    models = [m for m in model.modules() if isinstance(m, Transformer)]
    for m in model.modules():
        if isinstance(m, TransformerBlock):
            fully_shard(m, **kwargs)
    for m in models:
        fully_shard(m, **kwargs)


def local_rows(t: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(this rank's local tensor, first row, end row) of a parameter: an FSDP2 shard holds rows [start, stop) of
    dim 0 (``torch.chunk``'s split: ceil(n / world) rows a rank, the last ones short or empty); a plain tensor all."""
    if not hasattr(t, "to_local"):
        return t, 0, t.shape[0] if t.dim() else 0
    local = t.to_local()
    n, world = t.shape[0], t.device_mesh.size()
    start = min(n, t.device_mesh.get_local_rank() * -(-n // world))
    assert local.shape[0] == min(-(-n // world), n - start), f"unexpected shard of {tuple(t.shape)}"
    return local, start, start + local.shape[0]


def materialize(
    model: torch.nn.Module, sources: dict[str, dict[str, torch.Tensor] | None], seed: int, device, skip=frozenset()
) -> None:
    """Allocate a meta-device (possibly sharded) model on ``device`` and fill what each rank holds: a parameter or
    buffer under prefix P gets its rows from ``sources[P]`` (a checkpoint's memory-mapped tensors: only these rows
    are read) or, where the source is None or lacks it (LoRA's adapters), from the seeded ``init_rows``. Names in
    ``skip`` are left for a checkpoint to fill. No rank ever holds a whole parameter it does not own."""
    from llamactl.model import Transformer, init_rows

    model.to_empty(device=device)
    roots = {n + "." if n else "": m for n, m in model.named_modules() if isinstance(m, Transformer)}
    with torch.no_grad():
        # by state-dict name (a LoRA wrapper's base weight is ``wq.weight`` there, as in the checkpoint)
        for name, t in model.state_dict(keep_vars=True).items():
            if name in skip:
                continue
            prefix = max((p for p in sources if name.startswith(p)), key=len)
            key, src = name[len(prefix) :], sources[prefix]
            local, start, stop = local_rows(t)
            if src is not None and key in src:
                local.copy_(src[key][start:stop] if t.dim() else src[key])
            else:
                owner = max((p for p in roots if name.startswith(p)), key=len)
                n_layers = roots[owner].args.n_layers
                local.copy_(init_rows(name[len(owner) :], tuple(t.shape), seed, n_layers, start, stop))
    for m in roots.values():
        m.reset_rope(device)


@contextlib.contextmanager
def grad_sync(wrapped: torch.nn.Module, sync: bool):
    """Skip DDP's gradient all-reduce on accumulation micro-steps that are not the last. FSDP2 reduce-scatters on
    every micro-step instead, into the sharded gradients: holding its gradients unsharded until the last micro-step
    would keep a whole fp32 copy of them on every rank (+25 GiB a rank at 7B on 8 GPUs, +257 GiB at 70B), the
    memory FSDP is there to save."""
    if sync or not hasattr(wrapped, "no_sync"):
        yield
    else:
        with wrapped.no_sync():
            yield


# ------------------------------------------------------------------------------------------------ optimisation


def make_optimizer(
    model: torch.nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95), eps=1e-5, fused: bool = True
):
    """AdamW as Llama 2: decay on matrices only (not on norms' gains), beta2 0.95, eps 1e-5.

    NOTE: the fused implementation steps the 60M preset in 34 ms on this CPU against 207 ms for the default
    multi-tensor one (3.5% of a training step); FSDP2's sharded parameters take the multi-tensor one (fused=False).
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)


def cosine_lr(step: int, peak: float, warmup: int, total: int, final_ratio: float = 0.1) -> float:
    """Linear warmup to ``peak``, then cosine decay to ``final_ratio * peak`` at ``total`` steps (Llama 2)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def matmul_peak_flops(dtype: torch.dtype, device: torch.device, min_seconds: float = 0.3) -> float:
    """FLOP/s of a large square matmul in ``dtype``, measured now: the denominator of MFU.

    The best of repeated timings after a warm-up, for at least ``min_seconds``: a single timing taken while the
    machine was still busy (start-up, another process) understated the peak and put MFU above 100%.
    """
    n = 2048 if device.type == "cpu" else 8192
    gen = torch.Generator(device=device).manual_seed(0)  # not the global RNG: a resumed run restored that one
    a = torch.randn(n, n, device=device, generator=gen).to(dtype)
    b = torch.randn(n, n, device=device, generator=gen).to(dtype)

    def timed() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    timed()  # warm-up: thread pools, kernels, clocks
    best, start, tries = float("inf"), time.perf_counter(), 0
    while tries < 3 or time.perf_counter() - start < min_seconds:
        best = min(best, timed())
        tries += 1
    return 2 * n**3 / best


def flops_per_token(a: ModelArgs, seq_len: int) -> float:
    """Training FLOPs per token: 6 x the matrix parameters (forward 2, backward 4 per weight) + 12 x layers x dim x
    seq (the attention scores and their use, forward and backward, counted without the causal half, as PaLM's
    appendix B does). The embedding lookup and the norms' gains do no matrix products."""
    n = a.num_params() - (0 if a.tie_embeddings else a.vocab_size * a.dim) - (2 * a.n_layers + 1) * a.dim
    return 6 * n + 12 * a.n_layers * a.dim * seq_len


# ------------------------------------------------------------------------------------------------ checkpoints


def rng_state() -> dict:
    """Every RNG of this process (Python, NumPy, torch, CUDA) as JSON."""
    import base64

    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    b64 = lambda t: base64.b64encode(t.numpy().tobytes()).decode()  # noqa: E731
    return {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), pos, has_gauss, cached],
        "torch": b64(torch.get_rng_state()),
        "cuda": [b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    import base64

    def tensor(text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(text, validate=True)), dtype=torch.uint8)

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensor(state["torch"]))
    # the devices this process sees now (a resume may see fewer than the saving one did)
    for i, saved in enumerate(state["cuda"][: torch.cuda.device_count()]):
        torch.cuda.set_rng_state(tensor(saved), i)


def latest_checkpoint(run_dir: str) -> str | None:
    """The newest complete checkpoint folder of a run, or None."""
    path = os.path.join(run_dir, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        name = f.read(64).decode("utf-8", "replace").strip()
    folder = os.path.join(run_dir, name)
    if not re.fullmatch(r"step-\d{7}", name) or not os.path.isdir(folder):
        raise UserError(f"{path}: names {name!r}, which is not a checkpoint folder of this run")
    if not os.path.isfile(os.path.join(folder, TRAINER_JSON)):
        if os.path.isfile(os.path.join(folder, "trainer.pt")):
            raise UserError(
                f"{folder}: written by an older llamactl (trainer.pt, a pickle, which is not loaded: it could run "
                "code); start a new run"
            )
        raise UserError(f"{path}: names {name}, which is not a whole checkpoint (no {TRAINER_JSON})")
    return folder


def load_trainer_state(folder: str) -> dict:
    """``trainer.json`` of a checkpoint (step, config, settings, the optimizer's hyperparameters, the names of the
    trained tensors, the world that saved it); damage is one UserError naming the file."""
    path = os.path.join(folder, TRAINER_JSON)
    with open(path, "rb") as f:
        raw = f.read()
    try:
        state = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise UserError(f"{path}: damaged trainer state (not JSON: {str(e)[:120]})") from None
    if isinstance(state, dict) and state.get("format") == "llamactl-trainer/1":
        raise UserError(f"{folder}: written by an older llamactl (whole-model trainer state); start a new run")
    problem = _trainer_state_problem(state)
    if problem:
        raise UserError(f"{path}: damaged trainer state ({problem})")
    # JSON has no tuples; torch's optimizers keep hyperparameters such as betas as tuples
    state["param_groups"] = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
                             for g in state["param_groups"]]  # fmt: skip
    return state


def optimizer_state_problem(model: torch.nn.Module, optim: torch.optim.Optimizer, groups: list[dict]) -> str | None:
    """Whether a checkpoint's optimizer parameter groups are this optimizer's: loading other ones would not fail,
    it would silently restart the moments of the parameters it does not name."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    want = [sorted(name_of[id(p)] for p in g["params"]) for g in optim.param_groups]
    got = [sorted(map(str, g["params"])) for g in groups]
    if want != got:
        return "its optimizer's parameter groups are not this model's"
    return None


def _trainer_state_problem(state: object) -> str | None:
    if not isinstance(state, dict) or state.get("format") != TRAINER_FORMAT:
        return f"no format tag {TRAINER_FORMAT!r}"
    kinds = {"step": int, "model_args": dict, "settings": dict, "param_groups": list, "trained": list, "world": int}
    for key, kind in kinds.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            return f"{key!r} is missing or not {kind.__name__}"
    if state["step"] < 0 or state["world"] < 1:
        return f"step {state['step']}, world {state['world']}"
    if not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in state["param_groups"]):
        return "'param_groups' are not objects with 'params'"
    if not all(isinstance(n, str) for n in state["trained"]):
        return "'trained' is not a list of tensor names"
    parts = state.get("parts", {})
    if not isinstance(parts, dict) or not all(
        isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and isinstance(v[1], dict) for v in parts.values()
    ):
        return "'parts' is not an object of [prefix, header] by file name"
    return None


Parts = dict[str, tuple[str, object]]  # file name -> (state-dict prefix, what the file says of itself)


def checkpoint_parts(meta) -> Parts:
    """The files a run writes at its end: ``model.safetensors`` for one model (a ``CheckpointMeta``), an adapter
    (a ``lora.AdapterMeta``: ``adapter.safetensors``), or one file per part of a model made of several (ppo: the
    policy, its value model)."""
    if isinstance(meta, dict):
        return meta
    return {"model.safetensors" if isinstance(meta, CheckpointMeta) else "adapter.safetensors": ("", meta)}


def trained_state(model: torch.nn.Module, optim: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model state, optimizer state) of what training changes, sharded as the model is: the trainable parameters
    (a LoRA run's adapters and head, not its frozen base) and their AdamW moments. Every rank calls it."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optim)
    trained = {n for n, p in _unwrapped(model).named_parameters() if p.requires_grad}
    return {k: v for k, v in msd.items() if k in trained}, osd


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "no_sync") else model  # DDP keeps the model in .module


def save_checkpoint(
    run_dir: str,
    step: int,
    model: torch.nn.Module,
    optim: torch.optim.Optimizer,
    trainer_state: dict,
    d: Dist,
    keep: int,
) -> str:
    """Write ``step-NNNNNNN/`` and point ``latest`` at it: every rank writes its own shards in parallel through
    ``torch.distributed.checkpoint`` (safetensors files, ``dcp/``) and its RNGs (``rng-R.json``); rank 0 then
    writes ``trainer.json``, renames the folder into place and replaces ``latest``. A kill at any point leaves the
    previous checkpoint as ``latest``."""
    import torch.distributed.checkpoint as dcp

    name = f"step-{step:07d}"
    final = os.path.join(run_dir, name)
    tmp = os.path.join(run_dir, f".{name}.tmp")
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier(d)
    msd, osd = trained_state(model, optim)
    # one file per block on each rank: DCP's safetensors writer builds each file in memory before writing it, so a
    # save holds one block's shard at a time, not the rank's whole shard (70B on 8 ranks: 105 GB)
    keys = [f"model.{k}" for k in msd] + [f"optim.{p}.{k}" for p, per in osd["state"].items() for k in per]
    files = {k: int(m.group(1)) + 2 if (m := re.search(r"\.layers\.(\d+)\.", k)) else 1 for k in keys}
    writer = dcp.HuggingFaceStorageWriter(os.path.join(tmp, DCP_DIR), fqn_to_index_mapping=files,
                                          save_distributed=True)  # fmt: skip
    with single_process_dcp(d):
        dcp.save({"model": msd, "optim": osd["state"]}, storage_writer=writer, no_dist=d.world == 1)
    with atomic_path(os.path.join(tmp, f"rng-{d.rank}.json")) as t, open(t, "w") as f:
        json.dump(rng_state(), f)
    fault_point("checkpoint-written", step)
    barrier(d)
    if d.main:
        doc = {"format": TRAINER_FORMAT, **trainer_state, "step": step, "world": d.world,
               "param_groups": osd["param_groups"], "trained": sorted(msd)}  # fmt: skip
        with atomic_path(os.path.join(tmp, TRAINER_JSON)) as t, open(t, "w") as f:
            json.dump(doc, f)
        fsync_dir(os.path.join(tmp, DCP_DIR))
        fsync_dir(tmp)  # each file is on disk already (DCP and atomic_path fsync); now the folder's entries
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(run_dir)
        with atomic_path(os.path.join(run_dir, LATEST)) as t, open(t, "w") as f:
            f.write(name + "\n")
        steps = sorted(n for n in os.listdir(run_dir) if n.startswith("step-") and n != name)
        for old in steps[: max(0, len(steps) - (keep - 1))] if keep > 0 else []:
            shutil.rmtree(os.path.join(run_dir, old), ignore_errors=True)
    barrier(d)
    return final


@contextlib.contextmanager
def single_process_dcp(d: Dist):
    """DCP without its notes on stderr: its warning, in one process, that no process group exists (that is the
    intent), and its logged tracebacks for a damaged checkpoint (the caller says what is wrong in one line)."""
    import logging
    import warnings

    log = logging.getLogger()  # DCP's modules log to the root logger
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            if d.world == 1:
                warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
            yield
    finally:
        log.setLevel(level)


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def load_checkpoint(folder: str, state: dict, model: torch.nn.Module, optim: torch.optim.Optimizer, d: Dist,
                    say) -> None:  # fmt: skip
    """Load a checkpoint saved by any number of ranks into this run's (sharded or replicated) model and optimizer:
    DCP reads, on each rank, only the parts of the saved shards that overlap its own. Each rank takes the RNGs of
    the rank of its number if the saving run had one."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    problem = optimizer_state_problem(_unwrapped(model), optim, state["param_groups"])
    msd, osd = trained_state(model, optim)  # initialises the optimizer's moments, which the load overwrites
    if not problem and sorted(msd) != sorted(state["trained"]):
        problem = "it trained other tensors than this run trains"
    if problem:
        raise UserError(f"{folder}: the trainer state does not fit this run ({problem})")
    try:
        loaded = {"model": msd, "optim": osd["state"]}
        reader = dcp.HuggingFaceStorageReader(os.path.join(folder, DCP_DIR))
        with single_process_dcp(d):
            dcp.load(loaded, storage_reader=reader, no_dist=d.world == 1)
        # not strict: a LoRA run's frozen base is not in its checkpoints (the names were matched above)
        set_state_dict(model, optim, model_state_dict=loaded["model"], options=StateDictOptions(strict=False),
                       optim_state_dict={"state": loaded["optim"], "param_groups": state["param_groups"]})  # fmt: skip
    except (Exception, CheckpointException) as e:  # DCP's own exception for a damaged shard is a BaseException
        reason = (str(e).strip().splitlines() or [type(e).__name__])[-1].rpartition("read failed: ")[2][:160]
        raise UserError(f"{folder}: the trainer state cannot be loaded ({reason})") from None
    rng = os.path.join(folder, f"rng-{d.rank}.json")
    problem = None
    if os.path.isfile(rng):
        try:
            with open(rng) as f:
                set_rng_state(json.load(f))
        except (ValueError, KeyError, TypeError, RuntimeError, OSError) as e:
            problem = f"{rng}: damaged RNG state ({str(e)[:120]})"
    # every rank learns whether one failed: a rank raising alone would leave the others waiting in a collective
    device = next(iter(model.parameters())).device
    failed = all_reduce_mean(torch.tensor(float(problem is not None), device=device), d)
    if float(failed) > 0:
        raise UserError(problem or f"{folder}: another rank's RNG state is damaged (rng-R.json)")
    if d.world > state["world"]:
        say(f"{folder} was saved by {state['world']} processes: ranks {state['world']} to {d.world - 1} start from "
            "seeded RNGs")  # fmt: skip


def part_headers(meta) -> dict:
    """What a run's trainer state keeps of its final files (``checkpoint_parts``): file -> [state-dict prefix, the
    file's header], so any checkpoint folder can be exported on its own (``export_parts``, ``convert``)."""
    return {file: [prefix, m.to_header()] for file, (prefix, m) in checkpoint_parts(meta).items()}


def saved_parts(folder: str) -> Parts:
    """The parts a checkpoint folder's ``trainer.json`` names, with what each file says of itself."""
    from llamactl.checkpoint import ADAPTER_FORMAT
    from llamactl.lora import AdapterMeta

    state = load_trainer_state(folder)
    parts = {}
    for file, (prefix, header) in state.get("parts", {}).items():
        source = os.path.join(folder, TRAINER_JSON)
        is_adapter = header.get("format") == ADAPTER_FORMAT
        meta = AdapterMeta.from_header(header, source) if is_adapter else CheckpointMeta.from_header(header, source)
        meta.lineage = {**meta.lineage, "step": state["step"]}
        parts[file] = (prefix, meta)
    return parts


def part_plans(folder: str, prefix: str) -> list:
    """Plans (``checkpoint.TensorPlan``) for the tensors a checkpoint folder saved under ``prefix``, each produced
    by reading that one tensor out of every rank's shards: a whole model never sits in memory."""
    import torch.distributed.checkpoint as dcp

    from llamactl.checkpoint import TensorPlan

    class Reader(dcp.HuggingFaceStorageReader):
        """Reads every shard file's header once, not once per tensor (7B on 8 ranks: 272 files)."""

        def read_metadata(self):
            if not hasattr(self, "metadata"):
                self.metadata = super().read_metadata()
            return self.metadata

    root = os.path.join(folder, DCP_DIR)
    reader = Reader(root)
    try:
        saved = reader.read_metadata().state_dict_metadata
    except Exception as e:  # a damaged shard file (safetensors' own error)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[-1][:120]
        raise UserError(f"{root}: not a readable checkpoint ({reason})") from None

    def one(key: str) -> torch.Tensor:
        out = {key: torch.empty(saved[key].size, dtype=saved[key].properties.dtype)}
        with single_process_dcp(Dist()):
            dcp.load(out, storage_reader=reader, no_dist=True)
        return out[key]

    head = "model." + prefix
    return [TensorPlan(k[len(head) :], tuple(saved[k].size), saved[k].properties.dtype, lambda k=k: one(k))
            for k in saved if k.startswith(head)]  # fmt: skip


def export_parts(folder: str, out_dir: str) -> list[str]:
    """A checkpoint folder's files (model.safetensors, or adapters) written to ``out_dir``; returns the paths."""
    written = []
    for file, (prefix, meta) in saved_parts(folder).items():
        written.append(os.path.join(out_dir, file))
        write_part(folder, prefix, meta, written[-1])
    return written


def write_part(folder: str, prefix: str, meta, path: str) -> None:
    """One part of a checkpoint folder at ``path``: a model streamed one tensor at a time out of the saved shards
    (never a whole-model gather), or an adapter (a few MB, read whole)."""
    from llamactl.checkpoint import save_plans

    if isinstance(meta, CheckpointMeta):
        save_plans(path, part_plans(folder, prefix), meta)
    else:
        from llamactl import lora

        lora.save_adapter(path, {p.name: p.produce() for p in part_plans(folder, prefix)}, meta)


def clean_partial(run_dir: str) -> None:
    """Remove checkpoint folders a crash left half-written."""
    for n in os.listdir(run_dir):
        if n.startswith(".step-") and n.endswith(".tmp"):
            shutil.rmtree(os.path.join(run_dir, n), ignore_errors=True)


def fault_point(name: str, step: int) -> None:
    """Die by SIGKILL here when LLAMACTL_FAULT is ``name@step``: how tests kill a run at an exact point."""
    if os.environ.get("LLAMACTL_FAULT") == f"{name}@{step}":
        os.kill(os.getpid(), signal.SIGKILL)


class MetricsLog:
    """metrics.jsonl of a run; on resume, rows past the checkpoint's step are dropped so the curve stays single."""

    def __init__(self, path: str, resume_step: int | None, enabled: bool):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        rows = []
        if resume_step is not None and os.path.isfile(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                lines = f.read().split("\n")
            for i, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    step = parse_record(line, f"{path}:{i}").get("step")
                except UserError:
                    if i == len(lines):  # the last row, cut short by the crash being resumed from
                        continue
                    raise
                if not isinstance(step, int):
                    raise UserError(f"{path}:{i}: a metrics row without an integer 'step'")
                if step <= resume_step:
                    rows.append(line + "\n")
        with atomic_path(path) as tmp, open(tmp, "w") as f:
            f.writelines(rows)
        self.f = open(path, "a")  # noqa: SIM115 - open for the run's lifetime

    def write(self, row: dict) -> None:
        if self.enabled:
            self.f.write(dumps(row) + "\n")
            self.f.flush()

    def close(self) -> None:
        if self.enabled:
            self.f.close()


# ---------------------------------------------------------------------------------------------------------------------
# The training loop: one for every stage. A stage brings a Task (its step-pure batches and its loss); the loop owns
# micro-steps and accumulation, the normalisation, clipping, the schedule, evaluation, metrics, signals and
# checkpoints.
# ---------------------------------------------------------------------------------------------------------------------


class Task(abc.ABC):
    """What a training stage gives the loop. ``batch`` must be a pure function of (step, micro, rank): the data
    position is then the step number alone, which is what makes a resumed run repeat the uninterrupted one."""

    @abc.abstractmethod
    def batch(self, step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        """This rank's micro-batch ``micro`` of optimizer step ``step`` (tensors on the CPU)."""

    @abc.abstractmethod
    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """How many units (tokens, pairs) of ``batch`` the loss sums over."""

    @abc.abstractmethod
    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of the per-unit losses, number of units) of ``batch`` on the model's device, through ``model``'s
        forward (so DDP and FSDP hooks run)."""

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Held-out metrics (every rank calls it; reduce across ranks inside). Empty when the task has none."""
        return {}

    def metrics(self, step: int) -> dict[str, float]:
        """The task's own figures for the metrics row of ``step`` (after its optimizer step); empty by default."""
        return {}

    def checkpoint_ok(self, step: int) -> bool:
        """Whether a checkpoint after ``step`` resumes exactly (a signal's save waits for the next step where it
        does: ppo saves between iterations only)."""
        return True


@dataclass
class LoopConfig:
    steps: int
    accum: int  # micro-steps per optimizer step on each rank
    lr: float
    warmup: int
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 0
    save_every: int = 0
    keep: int = 2
    log_every: int = 1
    bf16: bool = False  # autocast to bf16 over fp32 master weights
    tokens_per_step: int | None = None  # for tokens/s; with flops_per_token also MFU
    flops_per_token: float | None = None
    unit: str | None = None  # a task's own unit for throughput ("pairs": pairs/s in the metrics and the bar)
    units_per_step: int = 0
    name: str = "train"  # the command, for the progress bar and messages

    @classmethod
    def from_flags(cls, flags, **resolved) -> LoopConfig:
        """The loop's settings from a command's ``TrainFlags`` (``llamactl.flags``), with the values the command
        resolved itself (steps, accumulation, learning rate, warmup ...) given by name."""
        shared = ("min_lr_ratio", "grad_clip", "eval_every", "save_every", "keep", "log_every")
        return cls(**{**{k: getattr(flags, k) for k in shared}, **resolved})


def fit(
    task: Task,
    model: Transformer,
    wrapped: torch.nn.Module,
    optim: torch.optim.Optimizer,
    cfg: LoopConfig,
    run_dir: str,
    trainer_state: dict,
    d: Dist,
    device: torch.device,
    start_step: int = 0,
    forward: torch.nn.Module | None = None,
    metrics_resume: bool = False,
) -> dict:
    """Train from ``start_step`` to ``cfg.steps``; returns {"step", "loss", "val_*"..., "stopped" (a signal or None)}.

    The loss of a step is the sum of every counted unit's loss over all micro-steps and ranks divided once by their
    total count (known before the first backward from ``task.count``): a mean of per-micro-batch means would weight
    a micro-batch of 3 answer tokens like one of 300. DDP and FSDP average gradients over ranks, hence the factor
    ``world`` in each micro-step's scale. SIGINT, SIGTERM and SIGHUP save a checkpoint at the end of the current
    step on every rank and raise KeyboardInterrupt; a finite loss is checked every step.
    """
    from llamactl.progress import progress

    forward = forward if forward is not None else wrapped
    metrics = MetricsLog(os.path.join(run_dir, "metrics.jsonl"), start_step if metrics_resume else None, d.main)
    peak_dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    peak_flops = matmul_peak_flops(peak_dtype, device) * d.world if cfg.flops_per_token else None
    remeasured = False
    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signum

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16)

    def save(step: int) -> None:
        save_checkpoint(run_dir, step, wrapped, optim, trainer_state, d, cfg.keep)

    def evaluate() -> dict[str, float]:
        model.eval()
        with torch.no_grad(), autocast():
            out = task.evaluate(forward)
        model.train()
        return out

    last: dict = {"loss": float("nan")}
    bar = progress(cfg.name, "step", total=cfg.steps, initial=start_step, disable=not d.main)
    step = start_step
    try:
        model.train()
        t_last = time.perf_counter()
        while step < cfg.steps:
            cur_lr = cosine_lr(step, cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr_ratio)
            for group in optim.param_groups:
                group["lr"] = cur_lr
            batches = [task.batch(step, m, d.rank, d.world) for m in range(cfg.accum)]
            total = torch.tensor(float(sum(task.count(b) for b in batches)), device=device)
            if d.world > 1:
                dist.all_reduce(total)
            if float(total) <= 0:
                raise UserError(f"step {step + 1}: no unit of this step's batches counts toward the loss")
            scale = d.world / total
            loss_sum = torch.zeros((), device=device)
            for m, b in enumerate(batches):
                with grad_sync(wrapped, m == cfg.accum - 1), autocast():
                    part, _ = task.loss(forward, b)
                    (part * scale).backward()
                loss_sum += part.detach().float()
            # a model made of parts (ppo's policy and value model) has each part's gradient clipped on its own: the
            # value loss's large early gradients must not shrink the policy's step; the first part's norm is logged
            parts = getattr(model, "parts", {"": model})
            norms = [
                torch.nn.utils.clip_grad_norm_(m.parameters(), cfg.grad_clip or float("inf")) for m in parts.values()
            ]
            grad_norm = norms[0].full_tensor() if hasattr(norms[0], "full_tensor") else norms[0]
            optim.step()
            optim.zero_grad(set_to_none=True)
            step += 1
            if d.world > 1:
                dist.all_reduce(loss_sum)
            train_loss = float(loss_sum / total)
            if not math.isfinite(train_loss):
                raise UserError(f"step {step}: loss is {train_loss}; lower --lr (now {cfg.lr}) or check the data")
            now = time.perf_counter()
            last["loss"] = train_loss
            row = {"step": step, "loss": round(train_loss, 6), "lr": cur_lr, "grad_norm": round(float(grad_norm), 6)}
            if cfg.tokens_per_step:
                tok_s = cfg.tokens_per_step / (now - t_last)
                row["tokens_per_s"] = round(tok_s, 1)
                if peak_flops:
                    row["mfu"] = round(tok_s * cfg.flops_per_token / peak_flops, 4)
                    if row["mfu"] > 1 and not remeasured:  # the start-up measurement was taken on a busy machine
                        peak_flops = max(peak_flops, matmul_peak_flops(peak_dtype, device) * d.world)
                        row["mfu"], remeasured = round(tok_s * cfg.flops_per_token / peak_flops, 4), True
            if cfg.unit:
                row[f"{cfg.unit}_per_s"] = round(cfg.units_per_step / (now - t_last), 2)
            row.update(task.metrics(step))
            if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
                val = evaluate()
                last.update(val)
                row.update({k: round(v, 6) for k, v in val.items()})
            if step % cfg.log_every == 0 or any(k.startswith("val_") for k in row):
                metrics.write(row)
            fault_point("step-done", step)
            bar.update(1)
            postfix = {"loss": f"{train_loss:.3f}"}
            if "tokens_per_s" in row:
                postfix["tok_s"] = f"{row['tokens_per_s']:.0f}"
            if cfg.unit:
                postfix[f"{cfg.unit}_s"] = f"{row[f'{cfg.unit}_per_s']:.1f}"
            bar.set_postfix(**postfix)
            wants_stop = torch.tensor(float(stop["signal"] is not None), device=device)  # NCCL reduces CUDA only
            stopping = float(all_reduce_mean(wants_stop, d)) > 0
            if stopping and not task.checkpoint_ok(step):
                if d.main and not stop.get("told"):
                    print(f"llamactl {cfg.name}: finishing the steps up to the next checkpoint that resumes exactly",
                          file=sys.stderr)  # fmt: skip
                    stop["told"] = True
                stopping = False
            if stopping or (cfg.save_every and step % cfg.save_every == 0):
                save(step)
            if stopping:
                break
            t_last = time.perf_counter()  # exclude evaluation and checkpoint time from the next throughput
        saved = cfg.save_every and step % cfg.save_every == 0
        if step == cfg.steps and step > start_step and not saved and stop["signal"] is None:
            save(step)
    finally:
        bar.close()
        metrics.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
    return {"step": step, "stopped": stop["signal"], **last}  # stopped: the signal that stopped it, or None


# ---------------------------------------------------------------------------------------------------------------------
# Around the loop: what every training command does before and after ``fit``, once.
# ---------------------------------------------------------------------------------------------------------------------


def open_run(run_dir: str, resume: bool, args: ModelArgs, settings: dict) -> tuple[str | None, dict | None]:
    """The run's latest checkpoint and its trainer state (None, None for a new run), refusing a run directory that
    holds a run without ``--resume``, and a resume whose model config or loss-curve settings differ."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt and not resume:
        raise UserError(f"{run_dir}: holds a run (latest {os.path.basename(ckpt)}); pass --resume or another -o")
    if not ckpt:
        return None, None
    state = load_trainer_state(ckpt)
    if state["model_args"] != args.to_dict():
        raise UserError(f"{ckpt}: was trained with another model config than this command asks for")
    changed = [k for k, v in settings.items() if state["settings"].get(k) != v]
    if changed:
        was = ", ".join(f"--{k.replace('_', '-')} {state['settings'].get(k)}" for k in changed)
        raise UserError(f"{ckpt}: resume with the flags the run started with ({was})")
    return ckpt, state


def build_wrapped(
    model: torch.nn.Module,
    sources: dict[str, dict[str, torch.Tensor] | None],
    seed: int,
    d: Dist,
    device: torch.device,
    distributed: str,
    bf16: bool,
    skip=frozenset(),
) -> torch.nn.Module:
    """A meta-device model sharded (FSDP2 under torchrun with ``fsdp``) before any weight exists, then materialised
    (``materialize``), then wrapped in DDP under torchrun with ``ddp``; returns the wrapped model (the model itself
    for FSDP2 and one process)."""
    fsdp = d.world > 1 and distributed == "fsdp"
    if fsdp:
        shard(model, d, device, bf16)
    materialize(model, sources, seed, device, skip)
    if d.world > 1 and not fsdp:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[d.local_rank] if device.type == "cuda" else None)
    return model


def prepare(
    model: torch.nn.Module,
    sources: dict[str, dict[str, torch.Tensor] | None],
    seed: int,
    ckpt: str | None,
    state: dict | None,
    d: Dist,
    device: torch.device,
    distributed: str,
    bf16: bool,
    lr: float,
    weight_decay: float,
    compile: bool = False,
    say=lambda message: None,
) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.nn.Module]:
    """A model built on the meta device made trainable: sharded (FSDP2 under torchrun with ``fsdp``) before any
    weight exists, materialised shard by shard (``materialize``: ``sources`` per state-dict prefix, None for a seeded
    fresh start), wrapped in DDP under torchrun with ``ddp``, with its optimizer; resuming, the checkpoint's trained
    tensors, optimizer state and RNGs are loaded, whatever number of ranks saved them. Returns (wrapped, optimizer,
    forward: the wrapped model, compiled if asked)."""
    restored = frozenset(state["trained"]) if state is not None else frozenset()
    wrapped = build_wrapped(model, sources, seed, d, device, distributed, bf16, restored)
    optim = make_optimizer(model, lr, weight_decay, fused=not (d.world > 1 and distributed == "fsdp"))
    if state is not None:
        load_checkpoint(ckpt, state, wrapped, optim, d, say)
    return wrapped, optim, torch.compile(wrapped) if compile else wrapped


def start_run_dir(run_dir: str, d: Dist) -> None:
    """Create the run directory (only once every check has passed: a refused command leaves nothing behind) and
    remove what an interrupted save left."""
    os.makedirs(run_dir, exist_ok=True)
    if d.main:
        clean_partial(run_dir)


def conclude(run_dir: str, result: dict, d: Dist, name: str) -> str:
    """After ``fit``: a stopped run says how to continue and raises Interrupted (exit 128 + the signal, as any command
    stopped by one); a finished one gets its final files (``RUN/model.safetensors``, or its adapters) streamed out
    of its last checkpoint by rank 0. Returns that checkpoint."""
    if result["stopped"]:
        if d.main:
            print(
                f"llamactl {name}: stopped at step {result['step']}; checkpoint saved, continue with --resume",
                file=sys.stderr,
            )
        raise Interrupted(result["stopped"])
    final = latest_checkpoint(run_dir)
    if d.main:  # the others go: no collective follows, so none of them waits (and times out) while rank 0 writes
        export_parts(final, run_dir)
    return final


def finished_run(run_dir: str, ckpt: str, step: int, steps: int, d: Dist, name: str) -> dict:
    """--resume of a run that has done its --steps: say so with its last losses, and make sure its files are out."""
    last: dict = {"loss": None, "val_loss": None}
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if os.path.isfile(metrics):
        with open(metrics, encoding="utf-8", errors="replace") as f:
            for line in f:
                with contextlib.suppress(ValueError, AttributeError):
                    row = json.loads(line)
                    last.update({k: row[k] for k in ("loss", "val_loss") if isinstance(row.get(k), (int, float))})
    if d.main:
        if not all(os.path.isfile(os.path.join(run_dir, f)) for f in saved_parts(ckpt)):
            export_parts(ckpt, run_dir)  # the run was stopped after its last save, before writing them
        losses = ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in last.items() if v is not None)
        print(
            f"llamactl {name}: {run_dir} is complete at step {step} of {steps}"
            + (f" (last {losses})" if losses else "")
            + "; nothing to do (a longer run needs a new -o)",
            file=sys.stderr,
        )
    return {"step": step, "checkpoint": ckpt, **last}


def autocast_bf16(dtype: str, device: torch.device) -> bool:
    """Whether a training run autocasts to bf16: ``auto`` where the device runs bf16 natively."""
    from llamactl.device import bf16_supported

    if dtype == "bf16" and not bf16_supported(device):
        raise UserError(f"--dtype bf16: {device.type} has no native bf16 here; use fp32")
    return dtype == "bf16" or (dtype == "auto" and bf16_supported(device))


def start(cfg, command: str):
    """What every training command does first: its device (under torchrun, this rank's), the process group, its
    stderr notes (rank 0 only) and whether it autocasts to bf16. Returns (dist, device, say, bf16)."""
    from llamactl.device import resolve_device

    d, device = init_distributed(resolve_device(cfg.device))
    return d, device, functools.partial(say, d, command), autocast_bf16(cfg.dtype, device)


def say(d: Dist, command: str, message: str) -> None:
    """A training command's note on stderr, from rank 0 only."""
    if d.main:
        print(f"llamactl {command}: {message}", file=sys.stderr)


def check_global_batch(cfg, d: Dist) -> None:
    """Refuse, before any data is read, a --global-batch-size that accumulation cannot reach exactly."""
    per_micro = cfg.batch_size * d.world
    if cfg.global_batch_size % per_micro:
        raise UserError(
            f"--global-batch-size {cfg.global_batch_size} is not a multiple of --batch-size x processes = {per_micro}"
        )


def plan_schedule(cfg, n_items: int, d: Dist, unit: str, say, min_warmup: int = 0) -> tuple[int, int, int, int]:
    """(global batch, accumulation, steps, warmup) of a fine-tuning run over ``n_items`` records, from the flags of
    ``llamactl.flags.FinetuneFlags``: a dataset smaller than one global batch trains on what it has (said once);
    ``--steps`` wins over ``--epochs``; warmup defaults to 3% of the steps, at least ``min_warmup`` (below the
    steps)."""
    per_micro = cfg.batch_size * d.world
    global_batch = cfg.global_batch_size
    if n_items < global_batch:
        global_batch = math.ceil(n_items / per_micro) * per_micro
        say(f"{n_items} {unit} are fewer than --global-batch-size {cfg.global_batch_size}: {global_batch} a step")
    steps = cfg.steps or cfg.epochs * math.ceil(n_items / global_batch)
    warmup = cfg.warmup if cfg.warmup is not None else min(max(min_warmup, round(0.03 * steps)), steps - 1)
    if warmup >= steps:
        raise UserError(f"--warmup {warmup} must be below the run's {steps} steps")
    return global_batch, global_batch // per_micro, steps, warmup


def finetune(
    cfg,
    *,
    name: str,
    meta: CheckpointMeta,
    base: CheckpointMeta,
    tensors: dict[str, torch.Tensor],
    continued: dict[str, torch.Tensor] | None,
    settings: dict,
    steps: int,
    make_task,
    d: Dist,
    device: torch.device,
    **loop,
) -> dict:
    """A fine-tuning run of ``cfg.model`` (header ``base``; ``tensors`` as the command prepared them, see
    ``base_weights``) to ``cfg.output``, after the command has read its data: the resume checks, the memory check,
    the model (every weight trained in fp32 master copies, or with ``--lora-rank`` LoRA adapters on the frozen base,
    a scalar head trained in full), the wrapped model and optimizer, ``fit`` over ``make_task()``'s batches, and
    the final files (``model.safetensors``, or ``adapter.safetensors``). ``meta`` is what the trained model says of
    itself (config, tokenizer, lineage, role); ``continued`` an adapter's tensors that LoRA training continues;
    ``loop`` the LoopConfig values the command resolved (accum, lr, warmup, ...). Returns ``fit``'s result with the
    final checkpoint, or the finished run's summary on a --resume past its end."""
    from llamactl.config import check_memory
    from llamactl.device import seed_everything

    args = meta.args
    model, out_meta = trainee(cfg, cfg.model, meta, base, tensors, loop["bf16"])
    settings = {**settings, "lora": out_meta.spec.to_json() if cfg.lora_rank else None}
    ckpt, state = open_run(cfg.output, cfg.resume, args, settings)
    start_step = state["step"] if state else 0
    if ckpt and start_step >= steps:
        return finished_run(cfg.output, ckpt, start_step, steps, d, name)
    sharded = d.world > 1 and cfg.distributed == "fsdp"
    check_memory(training_bytes(model, d, sharded), f"fine-tuning {args.num_params():,} parameters", cfg.model, device)
    seed_everything(cfg.seed)
    model.grad_checkpointing = cfg.activation_checkpointing
    wrapped, optim, forward = prepare(
        model, {"": {**tensors, **(continued or {})}}, cfg.seed, ckpt, state, d, device, cfg.distributed,
        loop["bf16"], loop["lr"], cfg.weight_decay, cfg.compile, functools.partial(say, d, name),
    )  # fmt: skip
    ready_quantized(model, loop["bf16"])
    start_run_dir(cfg.output, d)
    trainer_state = {"model_args": args.to_dict(), "settings": settings, "parts": part_headers(out_meta)}
    eval_every = cfg.eval_every or (steps if cfg.val_fraction > 0 else 0)
    loop_cfg = LoopConfig.from_flags(cfg, steps=steps, eval_every=eval_every, name=name, **loop)
    result = fit(
        make_task(), model, wrapped, optim, loop_cfg, cfg.output, trainer_state, d, device, start_step, forward,
        metrics_resume=ckpt is not None,
    )  # fmt: skip
    return {**result, "checkpoint": conclude(cfg.output, result, d, name)}


def dry_run(cfg, parts: list, *, micro_batch: int, seq_len: int, sequences_per_item: int = 1, packed: bool = False,
            items_per_step: int | None = None):  # fmt: skip
    """``--dry-run``: the memory plan of one rank (``llamactl.memory``) for these flags on stdout, from rank 0 only,
    before any process group, device or weight exists; with ``--device-memory``, whether it fits. Plans for the
    world ``--world-size`` says (else torchrun's, else one process) and the device ``--device`` names (auto: this
    machine's)."""
    from llamactl import memory

    limit = memory.parse_memory(cfg.device_memory) if cfg.device_memory else None
    world = cfg.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    kind, bf16 = planned_device(cfg)
    # micro-steps per optimizer step: the global batch (``items_per_step``, None: one micro-batch a rank) over them
    accum = max(1, (items_per_step or 0) // (micro_batch * world))
    result = memory.plan(
        parts, micro_batch=micro_batch, seq_len=seq_len, sequences_per_item=sequences_per_item, world=world,
        strategy=cfg.distributed, bf16=bf16, activation_checkpointing=cfg.activation_checkpointing, device=kind,
        packed=packed, grad_accumulation=accum,
    )  # fmt: skip
    if int(os.environ.get("RANK", "0")) == 0:
        print(result.table(limit), flush=True)
    return {"dry_run": True, "bytes_per_rank": result.total, "fits": None if limit is None else result.total <= limit}


def planned_device(cfg) -> tuple[str, bool]:
    """(cuda or cpu, bf16) a dry run plans for: ``--device`` (auto: this machine's) and ``--dtype`` (auto: bf16 on
    CUDA, and on a CPU that runs it natively)."""
    from llamactl.device import bf16_supported

    kind = "cpu" if cfg.device == "cpu" else "cuda" if cfg.device.startswith("cuda") else None
    kind = kind or ("cuda" if torch.cuda.is_available() else "cpu")
    auto = kind == "cuda" or bf16_supported(torch.device("cpu"))
    return kind, cfg.dtype == "bf16" or (cfg.dtype == "auto" and auto)


def memory_part(cfg, args: ModelArgs, quant=None, output: str | None = None, frozen: bool = False):
    """The ``llamactl.memory.Part`` of a model this run trains (fully, or through LoRA adapters) or only runs."""
    from llamactl import memory

    bf16 = planned_device(cfg)[1]
    if frozen:
        return memory.Part(args, "frozen", quant, output=output, weight_bytes=4)
    if not cfg.lora_rank:
        return memory.Part(args, "full", output=output)
    spec = lora_spec(cfg)
    return memory.Part(args, "lora", quant, spec.rank, spec.targets, spec.dropout, output, 2 if bf16 else 4)


def output_name(cfg) -> str:
    """The file a training command's run ends with."""
    return "adapter.safetensors" if cfg.lora_rank else "model.safetensors"


def lora_spec(cfg):
    """The LoRA adapters ``--lora-rank/--lora-alpha/--lora-dropout/--lora-targets`` ask for."""
    from llamactl.lora import LoraSpec, parse_targets

    alpha = cfg.lora_alpha if cfg.lora_alpha is not None else 2.0 * cfg.lora_rank
    return LoraSpec(cfg.lora_rank, float(alpha), cfg.lora_dropout, parse_targets(cfg.lora_targets))


def trainee(cfg, path: str, meta: CheckpointMeta, base: CheckpointMeta, tensors: dict[str, torch.Tensor], bf16: bool):
    """(the meta-device model to train from checkpoint ``path``, what its final file says of itself). Full
    fine-tuning trains every weight (``meta``: a model checkpoint). With ``--lora-rank`` the block linears of the
    target kinds get adapters and the rest is frozen (kept quantized when ``base`` is: QLoRA; kept in bf16 when
    training in bf16, as no master copy of it is needed), a scalar head trained in full; the result is an adapter
    of ``path``."""
    from llamactl import lora

    if not cfg.lora_rank:
        return meta_model(meta.args, tensors, path), meta
    spec = lora_spec(cfg)
    model = meta_model(meta.args, tensors, path, base.quant)
    lora.add_lora(model, spec)
    extra = ("score.weight",) if meta.args.head == "scalar" else ()
    for prefix, m in model.named_modules():
        for key, p in list(m.named_parameters(recurse=False)):
            if f"{prefix}.{key}".lstrip(".") in extra:
                p.requires_grad_(True)
            elif bf16 and not key.startswith("lora_") and p.is_floating_point():
                setattr(m, key, torch.nn.Parameter(p.to(torch.bfloat16), requires_grad=False))
    return model, lora.AdapterMeta.of_base(spec, path, base, extra, meta.lineage, meta.role)


def training_bytes(model: torch.nn.Module, d: Dist, sharded: bool) -> int:
    """What a rank holds of a model it trains, before any is allocated: the weights as stored (frozen ones
    included), and for each trained one an fp32 gradient and AdamW's two fp32 moments; the parameters' share split
    over the ranks when ``sharded`` (FSDP2; its buffers, such as a QLoRA base's quantized weights, are not). The
    activations come on top: ``--dry-run`` plans them."""
    params = sum(p.numel() * p.element_size() + (12 * p.numel() if p.requires_grad else 0) for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return params // (d.world if sharded else 1) + buffers


def ready_quantized(model: torch.nn.Module, bf16: bool) -> None:
    """A QLoRA base's quantized layers pick their kernels once their tensors are in place."""
    from llamactl.quant import QuantLinear

    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.prepare(torch.bfloat16 if bf16 else torch.float32)


def base_weights(cfg, base: CheckpointMeta, head: str | None, purpose: str):
    """``cfg.model``'s tensors for a training command (memory-mapped), with ``--adapter``: merged into them for full
    fine-tuning (the merged model in memory), or, with ``--lora-rank``, kept apart to continue training (same rank
    and targets). Returns (tensors, header of the model they make, the continued adapter's tensors or None)."""
    from llamactl import lora
    from llamactl.checkpoint import load_tensors

    tensors = load_tensors(cfg.model)
    if cfg.adapter is None:
        return tensors, base, None
    adapter, adapter_tensors = lora.read_adapter(cfg.adapter)
    lora.check_base(adapter, cfg.model, base)
    if head is not None:
        lora.check_adapted_head(adapter, cfg.model, head, purpose)
    if not cfg.lora_rank:
        merged = lora.merged_tensors(tensors, base, adapter, adapter_tensors, cfg.model)
        return merged, adapter.adapted(base, merged=True), None
    spec = lora_spec(cfg)
    if (adapter.spec.rank, adapter.spec.targets) != (spec.rank, spec.targets):
        have, want = ",".join(adapter.spec.targets), ",".join(spec.targets)
        raise UserError(f"{cfg.adapter}: has rank {adapter.spec.rank} on {have}; --lora-rank {spec.rank} "
                        f"--lora-targets {want} cannot continue it")  # fmt: skip
    return tensors, base, adapter_tensors


def meta_model(args: ModelArgs, tensors: dict[str, torch.Tensor] | None, source: str, quant=None) -> Transformer:
    """A model of ``args`` on the meta device, for ``prepare``, its linears quantized as ``quant`` says (a QLoRA
    base); ``tensors`` (a checkpoint's) are checked to be its state (names, shapes) before anything is allocated."""
    from llamactl.checkpoint import check_state

    with torch.device("meta"):
        model = Transformer(args)
    if quant is not None:
        from llamactl.swap import quantize_linears

        quantize_linears(model, quant)
    if tensors is not None:
        check_state(source, model.state_dict(), tensors)
    return model
