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
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from llamactl.checkpoint import CheckpointMeta, plan_from_tensors, read_safetensors, save_plans, write_safetensors
from llamactl.errors import Interrupted, UserError
from llamactl.files import atomic_path, fsync_dir
from llamactl.jsonl import dumps, parse_record
from llamactl.model import ModelArgs, Transformer

LATEST = "latest"
TRAINER_JSON = "trainer.json"
TRAINER_TENSORS = "trainer.safetensors"
TRAINER_FORMAT = "llamactl-trainer/1"


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


def wrap_model(model: Transformer, strategy: str, d: Dist, device: torch.device) -> torch.nn.Module:
    """DDP or FSDP2 (``fully_shard`` per block, then the root) across the process group; as is for one process."""
    if d.world == 1:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[d.local_rank] if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (d.world,))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


@contextlib.contextmanager
def grad_sync(wrapped: torch.nn.Module, sync: bool):
    """Skip the gradient all-reduce on accumulation micro-steps that are not the last."""
    if sync:
        yield
    elif hasattr(wrapped, "no_sync"):  # DDP
        with wrapped.no_sync():
            yield
    elif hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        wrapped.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)
    else:
        yield


def full_model_state(model: torch.nn.Module, d: Dist) -> dict[str, torch.Tensor]:
    """The whole (unsharded) model state on CPU, on every rank's call; only rank 0 gets the tensors."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if d.world == 1:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts)


def full_optim_state(model: torch.nn.Module, optim: torch.optim.Optimizer, d: Dist) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, optim, options=opts)


def load_full_state(model: torch.nn.Module, optim: torch.optim.Optimizer, model_sd: dict, optim_sd: dict, d: Dist):
    """Load whole-model states (as saved by any number of ranks) into a model sharded or replicated over ``d``."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=d.world > 1)
    set_model_state_dict(model, model_sd, options=opts)
    set_optimizer_state_dict(model, optim, optim_sd, options=opts)


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
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)

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


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """Every RNG's state: the JSON-able ones (Python, NumPy) and the tensors (torch, CUDA)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    plain = {"python": [version, list(internal), gauss], "numpy": [name, keys.tolist(), pos, has_gauss, cached]}
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"rng/cuda/{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return plain, tensors


def set_rng_state(plain: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["rng/torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng/cuda/")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


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


def save_trainer_state(folder: str, state: dict, optim_sd: dict) -> None:
    """``trainer.json`` and ``trainer.safetensors`` in ``folder``: ``state`` (step, settings ...), the optimizer's
    state dict (per-parameter tensors by parameter name, hyperparameters as JSON) and every RNG."""
    rng, tensors = rng_state()
    for fqn, per_param in optim_sd["state"].items():
        for key, value in per_param.items():
            assert isinstance(value, torch.Tensor), f"optimizer state {fqn}.{key} is {type(value).__name__}"
            tensors[f"optimizer/{fqn}/{key}"] = value
    write_safetensors(os.path.join(folder, TRAINER_TENSORS), plan_from_tensors(tensors), {"format": TRAINER_FORMAT})
    doc = {"format": TRAINER_FORMAT, **state, "param_groups": optim_sd["param_groups"], "rng": rng}
    with atomic_path(os.path.join(folder, TRAINER_JSON)) as tmp, open(tmp, "w") as f:
        json.dump(doc, f)


def load_trainer_state(folder: str) -> dict:
    """What ``save_trainer_state`` wrote: the state with ``optimizer`` (a state dict) and ``rng_tensors`` added.
    Damage (a truncated or altered file) is one UserError naming the file."""
    path = os.path.join(folder, TRAINER_JSON)
    with open(path, "rb") as f:
        raw = f.read()
    try:
        state = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise UserError(f"{path}: damaged trainer state (not JSON: {str(e)[:120]})") from None
    problem = _trainer_state_problem(state)
    if problem:
        raise UserError(f"{path}: damaged trainer state ({problem})")
    per_param: dict[str, dict[str, torch.Tensor]] = {}
    rng_tensors = {}
    for key, t in read_safetensors(os.path.join(folder, TRAINER_TENSORS)).items():
        if key.startswith("optimizer/"):
            fqn, _, name = key.removeprefix("optimizer/").rpartition("/")
            per_param.setdefault(fqn, {})[name] = t
        elif key.startswith("rng/"):
            rng_tensors[key] = t
    if "rng/torch" not in rng_tensors:
        raise UserError(f"{os.path.join(folder, TRAINER_TENSORS)}: damaged trainer state (no torch RNG state)")
    # JSON has no tuples; torch's optimizers keep hyperparameters such as betas as tuples
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()} for g in
              state.pop("param_groups")]  # fmt: skip
    return {**state, "optimizer": {"state": per_param, "param_groups": groups}, "rng_tensors": rng_tensors}


def optimizer_state_problem(model: torch.nn.Module, optim: torch.optim.Optimizer, optim_sd: dict) -> str | None:
    """Whether a loaded optimizer state dict is this optimizer's (same parameter groups, moments of the parameters'
    shapes): loading another one would not fail, it would silently restart the moments."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    want = [sorted(name_of[id(p)] for p in g["params"]) for g in optim.param_groups]
    got = [sorted(map(str, g["params"])) for g in optim_sd["param_groups"]]
    if want != got:
        return "its optimizer's parameter groups are not this model's"
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    for fqn, per_param in optim_sd["state"].items():
        if fqn not in shapes:
            return f"optimizer state for {fqn!r}, which this model does not have"
        for key, t in per_param.items():
            if t.dim() and tuple(t.shape) != shapes[fqn]:
                return f"optimizer state {fqn}/{key} has shape {tuple(t.shape)}, the parameter {shapes[fqn]}"
    return None


def _trainer_state_problem(state: object) -> str | None:
    if not isinstance(state, dict) or state.get("format") != TRAINER_FORMAT:
        return f"no format tag {TRAINER_FORMAT!r}"
    kinds = {"step": int, "model_args": dict, "settings": dict, "param_groups": list, "rng": dict}
    for key, kind in kinds.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            return f"{key!r} is missing or not {kind.__name__}"
    if state["step"] < 0:
        return f"step {state['step']}"
    if not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in state["param_groups"]):
        return "'param_groups' are not objects with 'params'"
    py, nump = state["rng"].get("python"), state["rng"].get("numpy")
    if not (isinstance(py, list) and len(py) == 3 and isinstance(py[1], list)):
        return "the Python RNG state is malformed"
    if not (isinstance(nump, list) and len(nump) == 5 and isinstance(nump[1], list)):
        return "the NumPy RNG state is malformed"
    return None


Parts = dict[str, tuple[str, CheckpointMeta]]  # file name -> (state-dict prefix, what the file says of itself)


def checkpoint_parts(meta: CheckpointMeta | Parts | None) -> Parts:
    """The model files of a checkpoint: ``model.safetensors`` for one model, or one file per part of a model made of
    several (ppo: the policy in ``model.safetensors``, its value model in ``value.safetensors``)."""
    return meta if isinstance(meta, dict) else {"model.safetensors": ("", meta)}


def save_checkpoint(
    run_dir: str,
    step: int,
    model: torch.nn.Module,
    optim: torch.optim.Optimizer,
    meta: CheckpointMeta | Parts,
    trainer_state: dict,
    d: Dist,
    keep: int,
) -> str | None:
    """Write ``step-NNNNNNN/`` atomically and point ``latest`` at it; all ranks call, rank 0 writes."""
    model_sd = full_model_state(model, d)
    optim_sd = full_optim_state(model, optim, d)
    if not d.main:
        return None
    name = f"step-{step:07d}"
    final = os.path.join(run_dir, name)
    tmp = os.path.join(run_dir, f".{name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for file, (prefix, part_meta) in checkpoint_parts(meta).items():
        part_meta.lineage = {**part_meta.lineage, "step": step}
        part = {k[len(prefix) :]: v for k, v in model_sd.items() if k.startswith(prefix)}
        save_plans(os.path.join(tmp, file), plan_from_tensors(part), part_meta)
    save_trainer_state(tmp, {**trainer_state, "step": step}, optim_sd)
    fault_point("checkpoint-written", step)
    fsync_dir(tmp)  # each file is on disk already (atomic_path); now the folder's entries
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    fsync_dir(run_dir)
    with atomic_path(os.path.join(run_dir, LATEST)) as t, open(t, "w") as f:
        f.write(name + "\n")
    steps = sorted(n for n in os.listdir(run_dir) if n.startswith("step-") and n != name)
    for old in steps[: max(0, len(steps) - (keep - 1))] if keep > 0 else []:
        shutil.rmtree(os.path.join(run_dir, old), ignore_errors=True)
    return final


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
    meta: CheckpointMeta | Parts,
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
        save_checkpoint(run_dir, step, wrapped, optim, meta, trainer_state, d, cfg.keep)

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


def prepare(
    model: Transformer,
    ckpt: str | None,
    state: dict | None,
    d: Dist,
    device: torch.device,
    distributed: str,
    lr: float,
    weight_decay: float,
    compile: bool = False,
    meta: CheckpointMeta | Parts | None = None,
) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.nn.Module]:
    """Move the model to its device, wrap it (DDP/FSDP2), make the optimizer and, resuming, load the checkpoint's
    model and optimizer state and RNGs. Returns (wrapped, optimizer, forward: the wrapped model, compiled if asked)."""
    from llamactl.checkpoint import load_tensors

    parts = checkpoint_parts(meta)  # None: one model in model.safetensors
    model.to(device)
    wrapped = wrap_model(model, distributed, d, device)
    optim = make_optimizer(model, lr, weight_decay, fused=not (d.world > 1 and distributed == "fsdp"))
    if state is not None:
        model_sd = {
            prefix + k: v
            for file, (prefix, _) in parts.items()
            for k, v in load_tensors(os.path.join(ckpt, file)).items()
        }
        problem = optimizer_state_problem(model, optim, state["optimizer"])
        if problem:
            raise UserError(f"{ckpt}: the trainer state does not fit this run ({problem})")
        try:
            load_full_state(wrapped, optim, model_sd, state["optimizer"], d)
            set_rng_state(state["rng"], state["rng_tensors"])
        except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as e:
            reason = (str(e).splitlines() or [type(e).__name__])[0][:160]
            raise UserError(f"{ckpt}: the trainer state does not fit this run ({reason})") from None
    return wrapped, optim, torch.compile(wrapped) if compile else wrapped


def start_run_dir(run_dir: str, d: Dist) -> None:
    """Create the run directory (only once every check has passed: a refused command leaves nothing behind) and
    remove what an interrupted save left."""
    os.makedirs(run_dir, exist_ok=True)
    if d.main:
        clean_partial(run_dir)


def conclude(run_dir: str, result: dict, d: Dist, name: str, files: Iterable[str] = ("model.safetensors",)) -> str:
    """After ``fit``: a stopped run says how to continue and raises Interrupted (exit 128 + the signal, as any command
    stopped by one); a finished one gets its final model as ``RUN/model.safetensors`` (a hard link to the last
    checkpoint's, no second copy). Returns that checkpoint."""
    from llamactl.files import link_or_copy

    if result["stopped"]:
        if d.main:
            print(
                f"llamactl {name}: stopped at step {result['step']}; checkpoint saved, continue with --resume",
                file=sys.stderr,
            )
        raise Interrupted(result["stopped"])
    final = latest_checkpoint(run_dir)
    if d.main:
        for file in files:
            link_or_copy(os.path.join(final, file), os.path.join(run_dir, file))
    return final


def finished_run(
    run_dir: str, ckpt: str, step: int, steps: int, main: bool, name: str, files: Iterable[str] = ("model.safetensors",)
) -> dict:
    """--resume of a run that has done its --steps: say so with its last losses, and make sure its model is out."""
    from llamactl.files import link_or_copy

    last: dict = {"loss": None, "val_loss": None}
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if os.path.isfile(metrics):
        with open(metrics, encoding="utf-8", errors="replace") as f:
            for line in f:
                with contextlib.suppress(ValueError, AttributeError):
                    row = json.loads(line)
                    last.update({k: row[k] for k in ("loss", "val_loss") if isinstance(row.get(k), (int, float))})
    if main:
        for file in files:
            link_or_copy(os.path.join(ckpt, file), os.path.join(run_dir, file))
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
    import functools

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
    tensors: dict[str, torch.Tensor],
    source: str,
    settings: dict,
    steps: int,
    make_task,
    d: Dist,
    device: torch.device,
    **loop,
) -> dict:
    """A fine-tuning run from a checkpoint's ``tensors`` to ``cfg.output``, after the command has read its data: the
    resume checks, the memory check, fp32 master weights, the wrapped model and optimizer, ``fit`` over
    ``make_task()``'s batches, and the final model. ``meta`` is what the checkpoints say of themselves (config,
    tokenizer, lineage, role); ``loop`` the LoopConfig values the command resolved (accum, lr, warmup, ...).
    Returns ``fit``'s result with the final checkpoint, or the finished run's summary on a --resume past its end."""
    from llamactl.checkpoint import build_model
    from llamactl.config import check_memory, rope_bytes
    from llamactl.device import seed_everything

    args = meta.args
    ckpt, state = open_run(cfg.output, cfg.resume, args, settings)
    start_step = state["step"] if state else 0
    if ckpt and start_step >= steps:
        return finished_run(cfg.output, ckpt, start_step, steps, d.main, name)
    # parameters, gradients and AdamW's two moments in fp32, and the rotary tables, before any is allocated
    need = 16 * args.num_params() // d.world + rope_bytes(args)
    check_memory(need, f"fine-tuning {args.num_params():,} parameters", source, device)
    seed_everything(cfg.seed)
    # fp32 master weights, whatever the checkpoint stores (bf16 autocast does the compute where it pays)
    model = build_model(args, tensors, source, "cpu", torch.float32)
    model.grad_checkpointing = cfg.activation_checkpointing
    wrapped, optim, forward = prepare(
        model, ckpt, state, d, device, cfg.distributed, loop["lr"], cfg.weight_decay, cfg.compile
    )
    start_run_dir(cfg.output, d)
    trainer_state = {"model_args": args.to_dict(), "settings": settings}
    eval_every = cfg.eval_every or (steps if cfg.val_fraction > 0 else 0)
    loop_cfg = LoopConfig.from_flags(cfg, steps=steps, eval_every=eval_every, name=name, **loop)
    result = fit(
        make_task(), model, wrapped, optim, loop_cfg, cfg.output, meta, trainer_state, d, device, start_step,
        forward, metrics_resume=ckpt is not None,
    )  # fmt: skip
    return {**result, "checkpoint": conclude(cfg.output, result, d, name)}
