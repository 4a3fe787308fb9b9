"""The --dry-run memory planner (llamactl.memory) against the measured peak memory of real training steps.

    python -P bench/dry_run.py [--quick] [--plans-only] [--default-malloc]

Each case runs real training steps of llamactl's model in fresh processes (one, or two over gloo with DDP or FSDP2)
and takes each rank's peak resident memory above its resident memory just before the model is built (``measure``
says how, and why that measures what the planner plans). Prints a markdown table measured vs planned (each rank),
then the planned tables for Llama 2 7B and 70B on 8 x 80 GB and 7B LoRA and QLoRA on one 24 GB and one 80 GB GPU.
``--default-malloc`` measures with glibc's default thresholds instead (the allocator then keeps freed memory).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass, field

import torch

from llamactl.training.loop import Task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# glibc serves every block of at least this many bytes by mmap and unmaps it on free (see ``measure``)
MMAP_THRESHOLD = 64 * 1024
LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


@dataclass
class Case:
    """One measured configuration: steps of pretraining's loss on random tokens, or with ``lora_rank`` of LoRA
    adapters (rank ``lora_rank``, dropout 0.05) on every block linear of a frozen base."""

    preset: str
    micro_batch: int
    seq_len: int
    bf16: bool = False
    checkpointing: bool = False
    world: int = 1
    strategy: str = "ddp"
    overrides: dict = field(default_factory=dict)
    lora_rank: int = 0
    accumulation: int = 1  # micro-steps per optimizer step
    steps: int | None = None  # None: the steps to reach the steady state (``settled_steps``)

    @property
    def name(self) -> str:
        model = self.preset + "".join(f" {k}={v}" for k, v in self.overrides.items())
        model = {str(TINY): "tiny (dim 128, 4 blocks)", str(TINY_V): "tiny, vocab 512"}.get(str(self.overrides), model)
        how = f"{self.world} x {self.strategy}" if self.world > 1 else "1"
        flags = ("bf16" if self.bf16 else "fp32") + (", ckpt" if self.checkpointing else "")
        flags += f", LoRA r{self.lora_rank}" if self.lora_rank else ""
        accum = f" (x {self.accumulation})" if self.accumulation > 1 else ""
        return f"{model} | {how} | {flags} | {self.micro_batch} x {self.seq_len}{accum}"


# a model of llama2.c's smallest shape, overridden from a preset; with a small vocabulary the activations dominate
TINY = {"dim": 128, "n_layers": 4, "n_heads": 4, "multiple_of": 32, "max_seq_len": 512, "tie_embeddings": False}
TINY_V = {**TINY, "vocab_size": 512}

# The default test run measures these (all at once: a few seconds each).
QUICK = [
    Case("llama2-15m", 4, 128),
    Case("llama2-15m", 32, 256, overrides=TINY_V, bf16=True, checkpointing=True),
    Case("llama2-15m", 16, 256, overrides=TINY_V, world=2, strategy="fsdp", bf16=True),
    Case("llama2-15m", 16, 256, overrides=TINY_V, world=2, strategy="ddp"),
]

# The rest: the slow tests and the benchmark.
SLOW = [
    Case("llama2-15m", 16, 256),
    Case("llama2-15m", 8, 256, bf16=True),
    Case("llama2-15m", 8, 256, checkpointing=True),
    Case("llama2-15m", 16, 256, bf16=True, checkpointing=True),
    Case("llama2-15m", 8, 128, world=2, strategy="fsdp"),
    Case("llama2-15m", 8, 128, world=2, strategy="ddp"),
    Case("llama2-15m", 16, 256, overrides=TINY),
    Case("llama2-15m", 16, 256, overrides=TINY_V),
    Case("llama2-15m", 32, 512, overrides=TINY_V, bf16=True),
    Case("llama2-15m", 32, 512, overrides=TINY_V, checkpointing=True),
    Case("llama2-15m", 16, 256, overrides=TINY_V, world=2, strategy="fsdp"),
    Case("llama2-15m", 16, 256, overrides=TINY_V, world=2, strategy="ddp", bf16=True),
    Case("llama2-15m", 16, 256, overrides=TINY_V, world=2, strategy="fsdp", checkpointing=True),
    Case("llama2-60m", 4, 256),
    Case("llama2-60m", 8, 512, bf16=True),
    Case("llama2-60m", 8, 512, checkpointing=True),
    Case("llama2-60m", 8, 256, world=2, strategy="fsdp"),
    Case("llama2-60m", 8, 256, world=2, strategy="fsdp", bf16=True),
    Case("llama2-60m", 8, 256, world=2, strategy="ddp", bf16=True),
    Case("llama2-110m", 4, 512),
    Case("llama2-110m", 4, 512, bf16=True, checkpointing=True),
    Case("llama2-110m", 4, 256, world=2, strategy="ddp"),
    Case("llama2-110m", 4, 256, world=2, strategy="fsdp"),
    Case("llama2-15m", 16, 256, overrides=TINY_V, lora_rank=8),
    Case("llama2-15m", 8, 256, lora_rank=16, bf16=True),
    Case("llama2-15m", 16, 256, overrides=TINY_V, accumulation=2),
    Case("llama2-15m", 16, 256, overrides=TINY_V, world=2, strategy="fsdp", accumulation=2),
    Case("llama2-15m", 16, 256, overrides=TINY_V, world=2, strategy="fsdp", bf16=True, accumulation=3),
    Case("llama2-15m", 16, 256, overrides=TINY_V, world=2, strategy="ddp", accumulation=2),
    Case("llama2-15m", 4, 128, world=2, strategy="fsdp", accumulation=2),
]


def settled_steps(case: Case) -> int:
    """Steps until one runs in the steady state the planner plans: AdamW's moments exist from the first step's
    update on; DDP rebuilds its gradient buckets at the start of the second step (in the order the first step's
    gradients arrived), fresh pages that the second step's backward writes; the third step holds them all."""
    return case.steps or (3 if case.world > 1 and case.strategy == "ddp" else 2)


def _rss() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in bytes, from /proc/self/status."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0]) * 1024
    return out["VmRSS"], out["VmHWM"]


def flags(case: Case, lora_rank: int | None = None, targets: tuple[str, ...] = LORA_TARGETS):
    """The training flags ``case`` stands for, as a command would hand them to the run lifecycle."""
    from llamactl.flags import TrainFlags

    rank = case.lora_rank if lora_rank is None else lora_rank
    return TrainFlags(distributed=case.strategy, activation_checkpointing=case.checkpointing, lora_rank=rank,
                      lora_targets=",".join(targets), dtype="bf16" if case.bf16 else "fp32", device="cpu",
                      lr=1e-4, grad_clip=1.0, save_every=0, log_every=1 << 30)  # fmt: skip


def trainable(args, case: Case, lora_rank: int | None = None, targets: tuple[str, ...] = LORA_TARGETS):
    """The meta-device model the training commands would train for ``case`` (``lifecycle.trainable``: LoRA adapters
    on a frozen base kept in bf16 under bf16, or every weight)."""
    from llamactl.training import lifecycle

    return lifecycle.trainable(flags(case, lora_rank, targets), args, None, case.preset, None, case.bf16)


class RandomTokens(Task):
    """A pretraining-shaped task on random tokens for the real loop (``llamactl.training.loop.fit``): each
    micro-batch's summed next-token loss; after the last step's optimizer step (before the loop's final save) it
    reads the process's high-water resident set, so the save and the export that follow are not counted."""

    def __init__(self, vocab_size: int, micro_batch: int, seq_len: int, steps: int):
        self.vocab, self.shape, self.steps, self.peak = vocab_size, (micro_batch, seq_len + 1), steps, None

    def batch(self, step: int, micro: int, rank: int, world: int) -> dict:
        gen = torch.Generator().manual_seed(rank)  # the same batch at every micro-step
        t = torch.randint(0, self.vocab, self.shape, generator=gen)
        return {"tokens": t[:, :-1].contiguous(), "targets": t[:, 1:].contiguous()}

    def count(self, batch: dict) -> int:
        return batch["targets"].numel()

    def loss(self, model, batch):
        return model(batch["tokens"], batch["targets"], output="loss_sum")

    def metrics(self, step: int) -> dict:
        if step == self.steps:
            self.peak = _rss()[1]
        return {}


def _train(case: Case, args, micro_batch: int, seq_len: int, d, device, run_dir: str) -> RandomTokens:
    """Steps of ``case`` through the training commands' own path: the model the lifecycle builds
    (``lifecycle.trainable``) run by the run lifecycle (``lifecycle.train``: sharded or wrapped and materialised,
    the loop's micro-steps, accumulation, clipping and AdamW) on random tokens, into ``run_dir``."""
    from llamactl.checkpoint import CheckpointMeta
    from llamactl.lora import AdapterMeta
    from llamactl.training import lifecycle

    cfg = flags(case)
    steps = settled_steps(case)
    model = trainable(args, case)
    header = AdapterMeta(lifecycle.lora_spec(cfg), "0" * 64, args) if case.lora_rank else CheckpointMeta(args)
    task = RandomTokens(args.vocab_size, micro_batch, seq_len, steps)
    spec = lifecycle.RunSpec(
        command="bench", flags=cfg, output=run_dir, args=args,
        parts=[lifecycle.Trained(model, None, lifecycle.output_name(cfg), header)], settings={}, steps=steps,
        loop=dict(accum=case.accumulation, lr=cfg.lr, warmup=0, bf16=case.bf16), task=lambda: task,
    )  # fmt: skip
    lifecycle.train(spec, d, device)
    return task


def worker(case: Case, run_dir: str) -> dict:
    """Run ``case`` as one rank in this process; its peak memory above the baseline, in bytes (see ``measure``)."""
    import gc

    import torch

    from llamactl.model import preset
    from llamactl.training import distributed

    torch.set_num_threads(1)
    d, device = distributed.init_distributed(torch.device("cpu"))
    # the warm-up: the same code on a model too small to matter, so that what a first run loads once (code pages,
    # the math libraries' and the process group's own buffers) is in the baseline
    tiny = preset("llama2-15m", dim=64, n_layers=1, n_heads=2, vocab_size=256)
    _train(case, tiny, 1, 16, d, device, os.path.join(run_dir, "warm-up"))
    gc.collect()
    distributed.barrier(d)
    base, _ = _rss()
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
        f.write("5")
    task = _train(case, preset(case.preset, **case.overrides), case.micro_batch, case.seq_len, d, device,
                  os.path.join(run_dir, "run"))  # fmt: skip
    return {"rank": d.rank, "peak": task.peak - base, "base": base}


# ppo's training step with and without --activation-checkpointing: a policy and a value model of this shape on
# Llama 2's tokenizer, one minibatch of PPO_SAMPLES rollouts of PPO_NEW tokens an iteration
PPO_SHAPE = {"dim": 256, "n_layers": 8, "n_heads": 8, "multiple_of": 32, "vocab_size": 32000}
PPO_SAMPLES, PPO_MICRO, PPO_NEW = 16, 8, 64
PPO_PROMPT = "Tell me a story about a dragon."


def ppo_config(folder: str, checkpointing: bool, **kw):
    """The ppo run ``ppo_worker`` measures (its models made in ``folder`` by ``ppo_models``)."""
    from llamactl.commands.ppo import PPOConfig

    return PPOConfig(model=os.path.join(folder, "policy.safetensors"), rm=os.path.join(folder, "rm.safetensors"),
                     prompts=os.path.join(folder, "prompts.jsonl"), output=os.path.join(folder, "run"), iterations=2,
                     prompts_per_iteration=PPO_SAMPLES, minibatch_size=PPO_SAMPLES, batch_size=PPO_MICRO,
                     gen_batch_size=PPO_SAMPLES, max_new_tokens=PPO_NEW, dtype="fp32", device="cpu",
                     activation_checkpointing=checkpointing, seed=0, **kw)  # fmt: skip


def ppo_models(folder: str) -> None:
    """A random policy with Llama 2's tokenizer whose context just holds the prompt and the answer, the value
    model's reward model made from it, and the prompts."""
    from llamactl.chat_format import encode_prompt
    from llamactl.checkpoint import load_tensors, plan_from_tensors, read_meta, save_model, save_plans
    from llamactl.model import ModelArgs, Transformer
    from llamactl.reward import reward_init
    from llamactl.tokenizer import Tokenizer

    os.makedirs(folder, exist_ok=True)
    tok = Tokenizer.from_file(os.path.join(ROOT, "tests", "fixtures", "llama2-tokenizer.model"))
    prompt_len = len(encode_prompt(tok, [{"role": "user", "content": PPO_PROMPT}]))
    model = Transformer(ModelArgs(**PPO_SHAPE, max_seq_len=prompt_len + PPO_NEW + 1))
    model.init_weights(0)
    policy = os.path.join(folder, "policy.safetensors")
    save_model(policy, model, tokenizer=tok.model_bytes)
    meta, tensors = reward_init(read_meta(policy), load_tensors(policy))
    meta.role = "helpfulness"
    save_plans(os.path.join(folder, "rm.safetensors"), plan_from_tensors(tensors), meta)
    with open(os.path.join(folder, "prompts.jsonl"), "w") as f:
        f.write(json.dumps({"prompt": PPO_PROMPT}) + "\n")


def ppo_worker(folder: str, checkpointing: bool) -> dict:
    """The real ``llamactl ppo`` run in this process: the peak resident memory of its second iteration's training
    step above the resident set that step starts from (the high-water mark is reset when the iteration's rollouts
    are made, and read when its figures are, after the optimizer step): the gradients, activations and the
    optimizer step's transients, which activation checkpointing should cut as the planner plans."""
    import gc

    from llamactl.commands.ppo import run
    from llamactl.training.tasks import PPOTask

    torch.set_num_threads(1)
    seen: dict = {}
    rollout, metrics = PPOTask.rollout, PPOTask.metrics

    def reset_after_rollout(self, iteration):
        rollout(self, iteration)
        gc.collect()
        seen["base"] = _rss()[0]
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def read_peak(self, step):
        seen["peak"] = _rss()[1]
        return metrics(self, step)

    PPOTask.rollout, PPOTask.metrics = reset_after_rollout, read_peak
    run(ppo_config(folder, checkpointing))
    return {"peak": seen["peak"] - seen["base"]}


def measure_ppo(checkpointing: bool, folder: str) -> int:
    """``ppo_worker`` in a fresh process (glibc's mmap threshold fixed, as ``measure`` does): bytes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    out = os.path.join(folder, f"ckpt-{int(checkpointing)}")
    shutil.copytree(folder, out, ignore=shutil.ignore_patterns("ckpt-*", "run"))
    cmd = [sys.executable, "-P", os.path.abspath(__file__), "--ppo-worker", out, str(int(checkpointing))]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"ppo (checkpointing {checkpointing}): the worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak"]


def planned_ppo(folder: str, checkpointing: bool) -> int:
    """What ``llamactl ppo --dry-run`` plans for the run ``ppo_worker`` measures (bytes a rank)."""
    import contextlib
    import io

    from llamactl.commands.ppo import run

    with contextlib.redirect_stdout(io.StringIO()):
        return run(ppo_config(folder, checkpointing, dry_run=True))["bytes_per_rank"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(case: Case, default_malloc: bool = False) -> list[int]:
    """Each rank's peak memory in bytes for ``case``, every rank a fresh process (ranks over gloo on this machine).

    The peak is the process's high-water resident set (VmHWM) at the end minus its resident set just before the
    model is built, the high-water mark reset there (``/proc/self/clear_refs``). Before that baseline the process
    has imported torch and llamactl, joined its process group and run the same training code on a tiny model, so
    that what a first run loads once (code pages, thread pools, the libraries' and gloo's own buffers) is not
    counted: a GPU run has its equivalent in the CUDA context, outside what the allocator reports.

    torch's CPU allocator caches nothing: it takes each tensor from malloc and frees it when the tensor dies.
    glibc's malloc serves a block above its mmap threshold with a mapping of its own, unmapped on free, but by
    default it raises that threshold to the largest block freed (up to 32 MiB), after which large tensors come from
    its heap, which keeps freed memory resident. The workers fix the threshold at 64 KiB (MALLOC_MMAP_THRESHOLD_),
    so the resident set follows the live tensors: what the planner plans. With glibc's defaults the peak comes out
    higher by the heap's retention (``--default-malloc`` shows it), the counterpart of a CUDA caching allocator's
    reserved-but-free memory, which the planner does not model either.
    """
    import tempfile

    port = _free_port()
    procs = []
    run_dir = tempfile.mkdtemp(prefix="llamactl-dry-run-")
    for rank in range(case.world):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if not default_malloc:
            env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
        if case.world > 1:
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(case.world),
                       LOCAL_RANK=str(rank))  # fmt: skip
        cmd = [sys.executable, "-P", os.path.abspath(__file__), "--worker", json.dumps(asdict(case)), run_dir]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    peaks = []
    try:
        for p in procs:
            out, err = p.communicate()
            if p.returncode:
                raise RuntimeError(f"{case.name}: a worker failed:\n{err[-3000:]}")
            peaks.append(json.loads(out.strip().splitlines()[-1])["peak"])
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return peaks


def planned(case: Case):
    """The planner's MemoryPlan for ``case`` (on the CPU's code paths, as measured)."""
    from llamactl.memory import Part, plan
    from llamactl.model import preset

    args = preset(case.preset, **case.overrides)
    part = Part(args, "lora", lora_rank=case.lora_rank, lora_targets=LORA_TARGETS) if case.lora_rank else Part(args)
    return plan([part], micro_batch=case.micro_batch, seq_len=case.seq_len, world=case.world, strategy=case.strategy,
                bf16=case.bf16, activation_checkpointing=case.checkpointing, device="cpu",
                grad_accumulation=case.accumulation)  # fmt: skip


def gpu_plans() -> list[tuple[str, list, int]]:
    """(title, [(column, MemoryPlan)], the device memory planned for) of the README's GPU configurations."""
    from llamactl.memory import Part, plan
    from llamactl.model import preset
    from llamactl.quant import QuantSpec

    out = []
    for name in ("llama2-7b", "llama2-70b"):
        cols = []
        for accum in (1, 128):
            for ckpt in (False, True):
                p = plan([Part(preset(name))], micro_batch=1, seq_len=4096, world=8, strategy="fsdp", bf16=True,
                         activation_checkpointing=ckpt, grad_accumulation=accum)  # fmt: skip
                cols.append((f"ckpt {'on' if ckpt else 'off'}{', accum 128' if accum > 1 else ''}", p))
        out.append((f"{name}: full training, FSDP2 on 8 GPUs, bf16, micro-batch 1 x 4096 tokens", cols, 80))
    cols = []
    for quant, what in ((None, "LoRA"), (QuantSpec("int4", 64), "QLoRA int4 g64")):
        part = Part(preset("llama2-7b"), "lora", quant=quant, lora_rank=16, lora_targets=LORA_TARGETS)
        for ckpt in (False, True):
            p = plan([part], micro_batch=1, seq_len=4096, world=1, strategy="ddp", bf16=True,
                     activation_checkpointing=ckpt)  # fmt: skip
            cols.append((f"{what}, ckpt {'on' if ckpt else 'off'}", p))
    out.append(("llama2-7b: LoRA r=16 on all seven linears (dropout 0.05), one GPU, bf16, 1 x 4096 tokens", cols, 24))
    return out


def markdown(cols: list, gb: tuple[int, ...]) -> str:
    """A markdown table of plans side by side: a row per component, the total, where the peak falls, and whether
    each fits ``gb`` GB devices (10^9 bytes, as --device-memory reads "80GB")."""
    from llamactl.memory import ROWS, format_bytes

    rows = [r for r in ROWS if any(dict(p.rows).get(r) for _, p in cols)]
    lines = ["| GiB per rank | " + " | ".join(c for c, _ in cols) + " |", "|---|" + "---:|" * len(cols)]
    lines += [f"| {r} | " + " | ".join(f"{dict(p.rows).get(r, 0) / 2**30:.2f}" for _, p in cols) + " |" for r in rows]
    lines.append("| **total** | " + " | ".join(f"**{p.total / 2**30:.2f}**" for _, p in cols) + " |")
    lines.append("| peak at | " + " | ".join(p.phase for _, p in cols) + " |")
    for n in gb:
        fit = [("fits" if p.total <= n * 10**9 else "no") + f" ({format_bytes(abs(n * 10**9 - p.total))} "
               + ("spare)" if p.total <= n * 10**9 else "short)") for _, p in cols]  # fmt: skip
        lines.append(f"| {n} GB | " + " | ".join(fit) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the cases the default test run measures")
    parser.add_argument("--plans-only", action="store_true", help="only the planned GPU tables")
    parser.add_argument("--default-malloc", action="store_true", help="glibc's default mmap threshold")
    cli = parser.parse_args()
    if not cli.plans_only:
        print("| model | processes | precision | micro-batch x seq | rank | measured MiB | planned MiB | "
              "planned / measured | planned peak at |")  # fmt: skip
        print("|---|---|---|---|---:|---:|---:|---:|---|")
        worst = 1.0
        for case in QUICK + ([] if cli.quick else SLOW):
            p = planned(case)
            for rank, peak in enumerate(measure(case, cli.default_malloc)):
                ratio = p.total / peak
                worst = max(worst, ratio, 1 / ratio)
                print(f"| {case.name} | {rank} | {peak / 2**20:.1f} | {p.total / 2**20:.1f} | {ratio:.3f} | "
                      f"{p.phase} |", flush=True)  # fmt: skip
        print(f"\nworst ratio: {worst:.3f} (planned / measured or its inverse)\n")
    from llamactl.memory import parse_memory

    for title, cols, gb in gpu_plans():
        print(f"{title}:\n\n{markdown(cols, (24, 80) if gb == 24 else (80,))}\n")
    _, cols, _ = gpu_plans()[0]
    print(f"The 7B plan with checkpointing as `--dry-run --device-memory 80GB` prints it:\n```\n"
          f"{cols[1][1].table(parse_memory('80GB'))}\n```")  # fmt: skip


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    if len(sys.argv) == 4 and sys.argv[1] == "--ppo-worker":
        print(json.dumps(ppo_worker(sys.argv[2], sys.argv[3] == "1")))
    elif len(sys.argv) == 4 and sys.argv[1] == "--worker":
        print(json.dumps(worker(Case(**json.loads(sys.argv[2])), sys.argv[3])))
    else:
        main()
