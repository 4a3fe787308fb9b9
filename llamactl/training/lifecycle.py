"""The run lifecycle every training command goes through: open or resume the run, check memory, seed, build and
prepare the trained models, start the run directory, ``fit``, conclude (the final files); ``--dry-run`` plans it."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from llamactl.checkpoint import CheckpointMeta
from llamactl.errors import Interrupted, UserError
from llamactl.flags import FinetuneFlags, TrainFlags
from llamactl.model import ModelArgs, Transformer
from llamactl.training.checkpoints import (
    clean_partial,
    export_parts,
    latest_checkpoint,
    load_checkpoint,
    load_trainer_state,
    part_headers,
    saved_parts,
)
from llamactl.training.distributed import Dist, build_wrapped, init_distributed
from llamactl.training.loop import LoopConfig, Task, fit, make_optimizer


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


def start(cfg: TrainFlags, command: str):
    """What every training command does first: its device (under torchrun, this rank's), the process group, its
    stderr notes (rank 0 only) and whether it autocasts to bf16. Returns (dist, device, say, bf16)."""
    from llamactl.device import resolve_device

    d, device = init_distributed(resolve_device(cfg.device))
    return d, device, functools.partial(say, d, command), autocast_bf16(cfg.dtype, device)


def say(d: Dist, command: str, message: str) -> None:
    """A training command's note on stderr, from rank 0 only."""
    if d.main:
        print(f"llamactl {command}: {message}", file=sys.stderr)


def check_global_batch(cfg: FinetuneFlags, d: Dist) -> None:
    """Refuse, before any data is read, a --global-batch-size that accumulation cannot reach exactly."""
    per_micro = cfg.batch_size * d.world
    if cfg.global_batch_size % per_micro:
        raise UserError(
            f"--global-batch-size {cfg.global_batch_size} is not a multiple of --batch-size x processes = {per_micro}"
        )


def plan_schedule(
    cfg: FinetuneFlags, n_items: int, d: Dist, unit: str, say, min_warmup: int = 0
) -> tuple[int, int, int, int]:
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


@dataclass
class Trained:
    """One model a run trains: its meta-device model (built by ``trainee`` or ``meta_model``), the tensors it starts
    from (None: a seeded initialisation), its state-dict prefix in what the loop trains ("" alone; ppo's
    ``policy.``/``value.``), and the final file it ends as with that file's header."""

    model: Transformer
    sources: dict[str, torch.Tensor] | None
    file: str
    meta: object  # CheckpointMeta, or lora.AdapterMeta for an adapter
    prefix: str = ""


@dataclass(kw_only=True)
class RunSpec:
    """What a training command hands the run lifecycle (``train``): its flags, the models it trains, its loop
    settings and how to make its task once the models exist."""

    command: str  # "pretrain", "sft" ... (messages, the progress bar)
    flags: TrainFlags
    output: str  # the run directory
    args: ModelArgs  # the model config a resumed run must have been trained with
    parts: list[Trained]
    settings: dict  # what fixes the loss curve besides the model: a resume must be started with the same
    steps: int
    loop: dict  # LoopConfig values the command resolved (accum, lr, warmup, bf16, tokens_per_step ...)
    task: Callable[[], Task]  # made once the models are materialised (ppo builds its reference policy there)
    module: torch.nn.Module | None = None  # what the loop trains when there are several parts (ppo's pair)
    memory_what: str = "training"  # the memory check's words: what is being trained, from what
    memory_source: str = ""
    extra_bytes: int = 0  # held besides the trained models (rotary tables ...)


def train(spec: RunSpec, d: Dist, device: torch.device) -> dict:
    """The run lifecycle, the same for every training command once it has read its data and planned its schedule:
    open or resume the run (refusing a run directory that holds another run, or a resume with other settings),
    check memory, seed, apply the flags every trained model takes (activation checkpointing), shard or wrap and
    materialise the models with their optimizer (or restore them from the checkpoint), start the run directory,
    ``fit`` the task, and conclude: the final files streamed out of the last checkpoint. Returns ``fit``'s result
    with that checkpoint, or the finished run's summary on a --resume past its end (no "stopped" key then)."""
    from llamactl.config import check_memory
    from llamactl.device import seed_everything

    flags, name = spec.flags, spec.command
    settings = {**spec.settings, "lora": lora_spec(flags).to_json() if flags.lora_rank else None}
    ckpt, state = open_run(spec.output, flags.resume, spec.args, settings)
    start_step = state["step"] if state else 0
    if ckpt and start_step >= spec.steps:
        return finished_run(spec.output, ckpt, start_step, spec.steps, d, name)
    assert spec.module is not None or len(spec.parts) == 1, "several trained parts need the module holding them"
    module = spec.module if spec.module is not None else spec.parts[0].model
    sharded = d.world > 1 and flags.distributed == "fsdp"
    need = training_bytes(module, d, sharded) + spec.extra_bytes
    check_memory(need, spec.memory_what, spec.memory_source, device)
    seed_everything(flags.seed)
    for part in spec.parts:
        part.model.grad_checkpointing = flags.activation_checkpointing
    bf16 = spec.loop["bf16"]
    wrapped, optim, forward = prepare(
        module, {p.prefix: p.sources for p in spec.parts}, flags.seed, ckpt, state, d, device, flags.distributed,
        bf16, spec.loop["lr"], flags.weight_decay, flags.compile, functools.partial(say, d, name),
    )  # fmt: skip
    ready_quantized(module, bf16)
    start_run_dir(spec.output, d)
    task = spec.task()
    finals = {p.file: (p.prefix, p.meta) for p in spec.parts}
    trainer_state = {"model_args": spec.args.to_dict(), "settings": settings, "parts": part_headers(finals)}
    loop_cfg = LoopConfig.from_flags(flags, steps=spec.steps, name=name, **spec.loop)
    result = fit(
        task, module, wrapped, optim, loop_cfg, spec.output, trainer_state, d, device, start_step, forward,
        metrics_resume=ckpt is not None,
    )  # fmt: skip
    return {**result, "checkpoint": conclude(spec.output, result, d, name)}


def finetune(
    cfg: FinetuneFlags,
    *,
    name: str,
    meta: CheckpointMeta,
    base: CheckpointMeta,
    tensors: dict[str, torch.Tensor],
    continued: dict[str, torch.Tensor] | None,
    settings: dict,
    steps: int,
    make_task: Callable[[], Task],
    d: Dist,
    device: torch.device,
    **loop,
) -> dict:
    """The run of a stage that fine-tunes ``cfg.model`` on JSONL records (sft, train-rm), through ``train``: the
    model (every weight trained in fp32 master copies, or with ``--lora-rank`` LoRA adapters on the frozen base, a
    scalar head trained in full; see ``trainee``) from ``tensors`` as the command prepared them (``base_weights``),
    evaluated at the end when there is a validation split. ``meta`` is what the trained model says of itself
    (config, tokenizer, lineage, role); ``continued`` an adapter's tensors that LoRA training continues; ``loop``
    the LoopConfig values the command resolved (accum, lr, warmup, ...)."""
    part = trainee(cfg, cfg.model, meta, base, tensors, loop["bf16"], continued=continued)
    eval_every = cfg.eval_every or (steps if cfg.val_fraction > 0 else 0)
    spec = RunSpec(
        command=name, flags=cfg, output=cfg.output, args=meta.args, parts=[part], settings=settings, steps=steps,
        loop={**loop, "eval_every": eval_every}, task=make_task,
        memory_what=f"fine-tuning {meta.args.num_params():,} parameters", memory_source=cfg.model,
    )  # fmt: skip
    return train(spec, d, device)


def dry_run(cfg: TrainFlags, parts: list, *, micro_batch: int, seq_len: int, sequences_per_item: int = 1,
            packed: bool = False, items_per_step: int | None = None):  # fmt: skip
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


def planned_device(cfg: TrainFlags) -> tuple[str, bool]:
    """(cuda or cpu, bf16) a dry run plans for: ``--device`` (auto: this machine's) and ``--dtype`` (auto: bf16 on
    CUDA, and on a CPU that runs it natively)."""
    from llamactl.device import bf16_supported

    kind = "cpu" if cfg.device == "cpu" else "cuda" if cfg.device.startswith("cuda") else None
    kind = kind or ("cuda" if torch.cuda.is_available() else "cpu")
    auto = kind == "cuda" or bf16_supported(torch.device("cpu"))
    return kind, cfg.dtype == "bf16" or (cfg.dtype == "auto" and auto)


def memory_part(cfg: TrainFlags, args: ModelArgs, quant=None, output: str | None = None, frozen: bool = False):
    """The ``llamactl.memory.Part`` of a model this run trains (fully, or through LoRA adapters) or only runs."""
    from llamactl import memory

    bf16 = planned_device(cfg)[1]
    if frozen:
        return memory.Part(args, "frozen", quant, output=output, weight_bytes=4)
    if not cfg.lora_rank:
        return memory.Part(args, "full", output=output)
    spec = lora_spec(cfg)
    return memory.Part(args, "lora", quant, spec.rank, spec.targets, spec.dropout, output, 2 if bf16 else 4)


def output_name(cfg: TrainFlags) -> str:
    """The file a training command's run ends with."""
    return "adapter.safetensors" if cfg.lora_rank else "model.safetensors"


def lora_spec(cfg: TrainFlags):
    """The LoRA adapters ``--lora-rank/--lora-alpha/--lora-dropout/--lora-targets`` ask for."""
    from llamactl.lora import LoraSpec, parse_targets

    alpha = cfg.lora_alpha if cfg.lora_alpha is not None else 2.0 * cfg.lora_rank
    return LoraSpec(cfg.lora_rank, float(alpha), cfg.lora_dropout, parse_targets(cfg.lora_targets))


def trainable(
    cfg: TrainFlags, args: ModelArgs, tensors: dict[str, torch.Tensor] | None, source: str, quant, bf16: bool
) -> Transformer:
    """The meta-device model a run trains (``meta_model``; ``tensors`` None: a seeded start). Full training trains
    every weight. With ``--lora-rank`` the block linears of the target kinds get adapters and the rest is frozen
    (kept quantized as ``quant`` says: QLoRA; kept in bf16 when training in bf16, as no master copy of it is
    needed), a scalar head trained in full."""
    if not cfg.lora_rank:
        return meta_model(args, tensors, source)
    model = meta_model(args, tensors, source, quant, lora_spec(cfg))
    for module_name, m in model.named_modules():
        for key, p in list(m.named_parameters(recurse=False)):
            if f"{module_name}.{key}".lstrip(".") in trained_extras(args):
                p.requires_grad_(True)
            elif bf16 and not key.startswith("lora_") and p.is_floating_point():
                setattr(m, key, torch.nn.Parameter(p.to(torch.bfloat16), requires_grad=False))
    return model


def trained_extras(args: ModelArgs) -> tuple[str, ...]:
    """What a LoRA run trains in full besides the adapters: a reward or value model's scalar head."""
    return ("score.weight",) if args.head == "scalar" else ()


def trainee(
    cfg: TrainFlags,
    path: str,
    meta: CheckpointMeta,
    base: CheckpointMeta,
    tensors: dict[str, torch.Tensor],
    bf16: bool,
    prefix: str = "",
    file: str | None = None,
    continued: dict[str, torch.Tensor] | None = None,
) -> Trained:
    """The model to train from checkpoint ``path`` (``trainable``; ``continued``: an adapter's tensors that LoRA
    training continues) with its final file: a model checkpoint of ``meta`` for full fine-tuning, with
    ``--lora-rank`` an adapter of ``path``. ``file`` names the final file (default: ``output_name``)."""
    from llamactl import lora

    model = trainable(cfg, meta.args, tensors, path, base.quant, bf16)
    file = file or output_name(cfg)
    if not cfg.lora_rank:
        return Trained(model, tensors, file, meta, prefix)
    extra = trained_extras(meta.args)
    adapter = lora.AdapterMeta.of_base(lora_spec(cfg), path, base, extra, meta.lineage, meta.role)
    return Trained(model, {**tensors, **(continued or {})}, file, adapter, prefix)


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


def base_weights(cfg: TrainFlags, path: str, base: CheckpointMeta, head: str | None, purpose: str):
    """The tensors of checkpoint ``path`` (``-m/--model``) for a training command (memory-mapped), with
    ``--adapter``: merged into them for full fine-tuning (the merged model in memory), or, with ``--lora-rank``,
    kept apart to continue training (same rank and targets). Returns (tensors, header of the model they make, the
    continued adapter's tensors or None)."""
    from llamactl import loading, lora
    from llamactl.checkpoint import load_tensors

    tensors = load_tensors(path)
    if cfg.adapter is None:
        return tensors, base, None
    adapter, adapter_tensors = lora.read_adapter(cfg.adapter)
    lora.check_base(adapter, path, base)
    if head is not None:
        lora.check_adapted_head(adapter, path, head, purpose)
    if not cfg.lora_rank:
        merged = loading.merged_tensors(tensors, base, adapter, adapter_tensors, path)
        return merged, adapter.adapted(base, merged=True), None
    spec = lora_spec(cfg)
    if (adapter.spec.rank, adapter.spec.targets) != (spec.rank, spec.targets):
        have, want = ",".join(adapter.spec.targets), ",".join(spec.targets)
        raise UserError(f"{cfg.adapter}: has rank {adapter.spec.rank} on {have}; --lora-rank {spec.rank} "
                        f"--lora-targets {want} cannot continue it")  # fmt: skip
    return tensors, base, adapter_tensors


def meta_model(
    args: ModelArgs, tensors: dict[str, torch.Tensor] | None, source: str, quant=None, lora=None
) -> Transformer:
    """A model of ``args`` on the meta device for ``prepare``, made by the one builder (``llamactl.swap.build``: its
    linears quantized as ``quant`` says, a QLoRA base; LoRA adapters as ``lora`` says); ``tensors`` (a checkpoint's)
    are checked to be its state (names, shapes; the adapters aside) before anything is allocated."""
    from llamactl.checkpoint import check_state
    from llamactl.swap import build

    model = build(args, quant, lora)
    if tensors is not None:
        expected = {k: t for k, t in model.state_dict().items() if not k.endswith((".lora_A", ".lora_B"))}
        check_state(source, expected, tensors)
    return model
