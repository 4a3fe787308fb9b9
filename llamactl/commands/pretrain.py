"""``llamactl pretrain``: token shards to a base model, resumable, on one process or under torchrun (DDP or FSDP2)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from llamactl.errors import UserError
from llamactl.flags import TrainFlags

DEFAULT_LR = {"llama2-70b": 1.5e-4}  # Llama 2 paper, Table 1: 3e-4 for 7B and 13B, 1.5e-4 for 70B


@dataclass(kw_only=True)
class PretrainConfig(TrainFlags):
    data: str
    output: str
    preset: str = "llama2-15m"
    overrides: list[str] = field(default_factory=list)  # "key=value" for ModelArgs fields
    seq_len: int = 256
    batch_size: int = 8  # sequences per micro-batch per process
    global_batch_tokens: int | None = None  # None: one micro-batch per process and step
    steps: int = 1000
    eval_batches: int = 8
    warmup: int | None = None  # None: 2000 as in the paper, at most a tenth of the steps

    def validate(self) -> None:
        from llamactl.flags import flag_problems

        problems = flag_problems(self)
        for name in ("seq_len", "steps"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.warmup is not None and not 0 <= self.warmup < self.steps:
            problems.append(f"--warmup {self.warmup} must be in [0, --steps {self.steps})")
        from llamactl.config import parse_override
        from llamactl.files import check_output, overlaps
        from llamactl.model import PRESETS

        for o in self.overrides:
            try:
                parse_override(o)
            except UserError as e:
                problems.append(str(e))
        if self.preset not in PRESETS:
            problems.append(f"--preset {self.preset!r} is not one of {', '.join(PRESETS)}")
        if problem := check_output(self.output, "-o/--output", directory=True):
            problems.append(problem)
        problems += overlaps([("-o/--output", self.output)], [("", self.data)])
        if problems:
            raise UserError("; ".join(problems))


def model_args(cfg: PretrainConfig, vocab_size: int):
    """The preset with the --set fields (typed and checked), the shards' vocabulary, and room for --seq-len."""
    from llamactl.config import model_args as checked_args
    from llamactl.config import parse_override
    from llamactl.model import PRESETS

    values = dict(parse_override(o) for o in cfg.overrides)
    if values.get("vocab_size", vocab_size) < vocab_size:
        raise UserError(f"--set vocab_size={values['vocab_size']} is smaller than the tokenizer's {vocab_size}")
    values.setdefault("vocab_size", vocab_size)
    values = {**PRESETS[cfg.preset], **values}
    values["max_seq_len"] = max(values.get("max_seq_len", 4096), cfg.seq_len)
    args = checked_args(values, f"--preset {cfg.preset}" + (" with --set" if cfg.overrides else ""))
    if args.head != "lm":
        raise UserError(f"--set head={args.head}: pretrain trains a language model (head lm)")
    return args


def run_settings(cfg: PretrainConfig, global_tokens: int) -> dict:
    """What fixes a run's loss curve besides the model: a resumed run must be started with the same."""
    keys = ("seq_len", "steps", "lr", "min_lr_ratio", "warmup", "weight_decay", "grad_clip", "seed")
    return {**{k: getattr(cfg, k) for k in keys}, "global_batch_tokens": global_tokens}


def unigram_loss(train_split, val_split, vocab_size: int, max_tokens: int = 50_000_000) -> float:
    """Cross-entropy (nats/token) of the val split under the train split's add-one smoothed unigram frequencies:
    the loss of a model that ignores context, which a trained model must beat."""
    import numpy as np

    counts = np.ones(vocab_size, dtype=np.float64)
    for s in range(0, min(len(train_split), max_tokens), 1 << 22):
        counts += np.bincount(train_split.tokens(s, min(s + (1 << 22), len(train_split))), minlength=vocab_size)
    logp = np.log(counts / counts.sum())
    val = val_split.tokens(0, min(len(val_split), max_tokens))
    return float(-logp[val].mean())


def run(cfg: PretrainConfig) -> dict:
    """Train; returns a summary (final step, last train and validation loss, checkpoint path)."""

    from llamactl.checkpoint import CheckpointMeta, make_lineage
    from llamactl.config import rope_bytes
    from llamactl.data import Windows
    from llamactl.shards import INDEX_NAME, open_shards
    from llamactl.training import lifecycle, loop
    from llamactl.training.tasks import WindowsTask

    cfg.validate()
    data = open_shards(cfg.data)
    train_split = data.split("train")
    val_split = data.splits.get("val")
    if cfg.eval_every and val_split is None:
        raise UserError(f"{cfg.data}: no 'val' split to evaluate on; encode with --val-fraction, or --eval-every 0")
    args = model_args(cfg, data.vocab_size)
    if cfg.dry_run:
        sequences = (cfg.global_batch_tokens or 0) // cfg.seq_len or None
        part = lifecycle.memory_part(cfg, args)
        return lifecycle.dry_run(cfg, [part], micro_batch=cfg.batch_size, seq_len=cfg.seq_len,
                                 items_per_step=sequences)  # fmt: skip
    d, device, say, use_bf16 = lifecycle.start(cfg, "pretrain")
    micro_tokens = cfg.batch_size * cfg.seq_len * d.world
    global_tokens = cfg.global_batch_tokens or micro_tokens
    if global_tokens % micro_tokens:
        raise UserError(
            f"--global-batch-tokens {global_tokens} is not a multiple of batch-size x seq-len x processes "
            f"= {micro_tokens}"
        )
    accum = global_tokens // micro_tokens
    windows = Windows(train_split, cfg.seq_len, cfg.seed)
    val_windows = Windows(val_split, cfg.seq_len, cfg.seed, shuffle=False) if val_split is not None else None
    if cfg.eval_every and val_windows.n < cfg.batch_size * d.world:
        raise UserError(f"{cfg.data}: the 'val' split is shorter than one batch of {cfg.batch_size} x {cfg.seq_len}")
    if windows.n < cfg.batch_size * accum * d.world:
        raise UserError(f"{cfg.data}: {len(train_split)} training tokens do not fill one global batch")
    lr = cfg.lr if cfg.lr is not None else DEFAULT_LR.get(cfg.preset, 3e-4)
    warmup = cfg.warmup if cfg.warmup is not None else min(2000, cfg.steps // 10)

    tok = data.load_tokenizer()
    lineage = make_lineage("pretrain", cfg.argv or sys.argv[1:], [os.path.join(cfg.data, INDEX_NAME)])
    model = lifecycle.meta_model(args, None, f"--preset {cfg.preset}")
    spec = lifecycle.RunSpec(
        command="pretrain", flags=cfg, output=cfg.output, args=args,
        parts=[lifecycle.Trained(model, None, "model.safetensors", CheckpointMeta(args, tok.model_bytes, lineage))],
        settings=run_settings(cfg, global_tokens), steps=cfg.steps,
        loop=dict(accum=accum, lr=lr, warmup=warmup, bf16=use_bf16, tokens_per_step=global_tokens,
                  flops_per_token=loop.flops_per_token(args, cfg.seq_len)),
        task=lambda: WindowsTask(windows, cfg.batch_size, accum, device, val_windows,
                                 cfg.eval_batches if cfg.eval_every else 0),
        memory_what=f"training {args.num_params():,} parameters", memory_source=f"--preset {cfg.preset}",
        extra_bytes=rope_bytes(args),
    )  # fmt: skip
    result = lifecycle.train(spec, d, device)
    if "stopped" not in result:  # --resume of a finished run
        return result
    step = result["step"]
    last = {"loss": result["loss"], "val_loss": result.get("val_loss")}
    final = result["checkpoint"]
    if d.main:
        baseline = unigram_loss(train_split, val_split, args.vocab_size) if val_split is not None else None
        last["unigram_val_loss"] = baseline
        val = f", val loss {last['val_loss']:.4f}" if last["val_loss"] is not None else ""
        base = f" (unigram baseline {baseline:.4f})" if baseline is not None else ""
        print(f"llamactl pretrain: step {step}, train loss {last['loss']:.4f}{val}{base}", file=sys.stderr)
    return {"step": step, "checkpoint": final, **last}
