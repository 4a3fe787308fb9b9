"""The training loop, one for every stage: a stage brings a ``Task`` (its step-pure batches and its loss); ``fit`` owns
micro-steps and accumulation, the normalisation, clipping, the schedule, evaluation, metrics, signals and
checkpoints. The optimizer, the schedule and the MFU figures are here too."""

from __future__ import annotations

import abc
import math
import os
import signal
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from llamactl.errors import UserError
from llamactl.files import atomic_path
from llamactl.jsonl import dumps, parse_record
from llamactl.model import ModelArgs, Transformer
from llamactl.training.checkpoints import fault_point, save_checkpoint
from llamactl.training.distributed import Dist, all_reduce_mean, grad_sync


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


class MetricsLog:
    """metrics.jsonl of a run; on resume, rows past the checkpoint's step are dropped so the curve stays single.
    With ``tensorboard`` (a log directory) every row's numbers also go to TensorBoard as scalars at the row's step,
    through the writer torch ships (``torch.utils.tensorboard``); a resume purges its events past the step too."""

    def __init__(self, path: str, resume_step: int | None, enabled: bool, tensorboard: str | None = None):
        self.path, self.enabled, self.tb = path, enabled, None
        if not enabled:
            return
        if tensorboard is not None:
            from torch.utils.tensorboard import SummaryWriter

            purge = resume_step + 1 if resume_step is not None else None
            self.tb = SummaryWriter(tensorboard, purge_step=purge)
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
            if self.tb is not None:
                for key, value in row.items():
                    if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                        self.tb.add_scalar(key, value, row["step"])
                self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.f.close()
            if self.tb is not None:
                self.tb.close()


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
    tensorboard: str | None = None  # a TensorBoard log directory that gets the metrics rows too

    @classmethod
    def from_flags(cls, flags, **resolved) -> LoopConfig:
        """The loop's settings from a command's ``TrainFlags`` (``llamactl.flags``), with the values the command
        resolved itself (steps, accumulation, learning rate, warmup ...) given by name."""
        shared = ("min_lr_ratio", "grad_clip", "eval_every", "save_every", "keep", "log_every", "tensorboard")
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
    metrics = MetricsLog(
        os.path.join(run_dir, "metrics.jsonl"), start_step if metrics_resume else None, d.main, cfg.tensorboard
    )
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
