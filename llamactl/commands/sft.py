"""``llamactl sft``: supervised fine-tuning of a base model on dialogs, the first stage of Llama 2-Chat.

Dialogs (``{"messages": [...]}``, ``{"prompt", "response"}`` pairs, or Anthropic HH text in ``--field``) are encoded
with Llama 2's chat format, the loss taken on the assistants' answers and their EOS only, packed into rows of
``--seq-len`` with attention kept inside each dialog, and trained by the one training loop (``llamactl.train``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from llamactl.errors import UserError
from llamactl.flags import TrainFlags

# Llama 2, section 3.1: cosine schedule, initial learning rate 2e-5, weight decay 0.1, batch size 64, sequence
# length 4096, 2 epochs. The paper states no warm-up for SFT; the default here is 3% of the steps (as for the
# reward models, section 3.2.2), and --warmup 0 gives the paper's.
DEFAULT_LR = 2e-5
DEFAULT_GLOBAL_BATCH = 64


@dataclass(kw_only=True)
class SFTConfig(TrainFlags):
    model: str
    data: str
    output: str
    field: str | None = None  # a record field holding HH text (or a message list)
    seq_len: int = 4096  # capped by the model's context
    batch_size: int = 8  # sequences per micro-batch per process
    global_batch_size: int = DEFAULT_GLOBAL_BATCH  # sequences per optimizer step, reached by accumulation
    epochs: int = 2
    steps: int | None = None  # wins over --epochs
    warmup: int | None = None  # None: 3% of the steps
    val_fraction: float = 0.0
    eval_every: int = 0  # 0: only at the end (when there is a validation split)
    pack: bool = True

    def validate(self) -> None:
        from llamactl.files import check_output, input_problem, overlaps
        from llamactl.flags import flag_problems

        problems = flag_problems(self)
        for name in ("seq_len", "global_batch_size", "epochs"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            problems.append(f"--steps must be at least 1, got {self.steps}")
        if self.warmup is not None and self.warmup < 0:
            problems.append(f"--warmup must be >= 0, got {self.warmup}")
        if not 0 <= self.val_fraction < 1:
            problems.append(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        for path, what in ((self.model, "checkpoint"), (self.data, "dialogs JSONL file")):
            if problem := input_problem(path, what):
                problems.append(problem)
        if problem := check_output(self.output, "-o/--output", directory=True):
            problems.append(problem)
        problems += overlaps([("-o/--output", self.output)], [("-m/--model", self.model), ("--data", self.data)])
        if problems:
            raise UserError("; ".join(problems))


def run_settings(cfg: SFTConfig, global_batch: int, steps: int) -> dict:
    """What fixes a run's loss curve besides the model and data: a resumed run must be started with the same."""
    keys = ("field", "seq_len", "lr", "min_lr_ratio", "warmup", "weight_decay", "grad_clip", "val_fraction", "pack")
    return {**{k: getattr(cfg, k) for k in keys}, "seed": cfg.seed, "global_batch": global_batch, "steps": steps}


def read_dialogs(path: str, field_name: str | None):
    """(where, messages) for each record of ``path``; a bad record is a UserError naming file, line and field."""
    from llamactl.chat_format import DialogError
    from llamactl.data import record_messages
    from llamactl.files import display_name
    from llamactl.jsonl import read_jsonl

    name = display_name(path)
    for item in read_jsonl(path):
        lineno, rec = item
        where = f"{name}:{lineno}"
        try:
            yield where, record_messages(rec, field_name)
        except DialogError as e:
            raise UserError(f"{where}: {e}") from None


def split_val(dialogs: list, fraction: float, seed: int) -> tuple[list, list]:
    """A seeded held-out share of the dialogs (at least one when asked for), and the rest."""
    import numpy as np

    if fraction <= 0 or len(dialogs) < 2:
        return dialogs, []
    order = np.random.default_rng(seed).permutation(len(dialogs))
    n_val = max(1, round(fraction * len(dialogs)))
    val = set(order[:n_val].tolist())
    return [x for i, x in enumerate(dialogs) if i not in val], [x for i, x in enumerate(dialogs) if i in val]


def say(d, message: str) -> None:
    if d.main:
        print(f"llamactl sft: {message}", file=sys.stderr)


def run(cfg: SFTConfig) -> dict:
    """Fine-tune; returns a summary (final step, last train and validation loss, checkpoint path)."""
    import math

    import torch

    from llamactl import train as T
    from llamactl.checkpoint import CheckpointMeta, build_model, load_tensors, make_lineage, read_meta
    from llamactl.data import RowsTask, encode_for_sft, pack_rows
    from llamactl.device import resolve_device, seed_everything
    from llamactl.tokenizer import Tokenizer

    cfg.validate()
    base = read_meta(cfg.model)
    if base.args.head != "lm":
        raise UserError(f"{cfg.model}: is a reward model (scalar head); sft fine-tunes a language model")
    if base.tokenizer is None:
        raise UserError(f"{cfg.model}: has no tokenizer; sft encodes dialogs (convert it with --tokenizer)")
    tok = Tokenizer(base.tokenizer, cfg.model)
    if tok.vocab_size > base.args.vocab_size:
        raise UserError(f"{cfg.model}: its tokenizer has {tok.vocab_size} pieces for {base.args.vocab_size} embeddings")
    seq_len = min(cfg.seq_len, base.args.max_seq_len)
    device = resolve_device(cfg.device)
    d, device = T.init_distributed(device)
    use_bf16 = T.autocast_bf16(cfg.dtype, device)
    per_micro = cfg.batch_size * d.world
    if cfg.global_batch_size % per_micro:
        raise UserError(
            f"--global-batch-size {cfg.global_batch_size} is not a multiple of --batch-size x processes = {per_micro}"
        )

    train_dialogs, val_dialogs = split_val(list(read_dialogs(cfg.data, cfg.field)), cfg.val_fraction, cfg.seed)
    if not train_dialogs:
        raise UserError(f"{cfg.data}: no dialogs")
    train_set = encode_for_sft(tok, train_dialogs, seq_len + 1)
    val_set = encode_for_sft(tok, val_dialogs, seq_len + 1)
    cut, dropped = train_set.cut_dialogs + val_set.cut_dialogs, train_set.dropped + val_set.dropped
    if cut:
        turns = train_set.cut_turns + val_set.cut_turns
        say(d, f"{cut} dialogs longer than {seq_len + 1} tokens lost their {turns} oldest exchanges to fit")
    if dropped:
        say(d, f"{dropped} dialogs whose last exchange alone exceeds {seq_len + 1} tokens were left out")
    if not train_set.examples:
        raise UserError(f"{cfg.data}: no dialog fits --seq-len {seq_len}")
    rows = pack_rows(train_set.examples, seq_len, cfg.pack, cfg.seed)
    val_rows = pack_rows(val_set.examples, seq_len, cfg.pack, cfg.seed) if val_set.examples else None
    say(
        d,
        f"{len(train_set.examples)} dialogs in {len(rows)} rows of {seq_len} "
        f"({'packed' if cfg.pack else 'one a row'}; padding {rows.padding_fraction:.1%})"
        + (f", {len(val_set.examples)} held out" if val_rows is not None else ""),
    )

    global_batch = cfg.global_batch_size
    if len(rows) < global_batch:
        global_batch = math.ceil(len(rows) / per_micro) * per_micro
        say(d, f"{len(rows)} rows are fewer than --global-batch-size {cfg.global_batch_size}: {global_batch} a step")
    accum = global_batch // per_micro
    steps = cfg.steps or cfg.epochs * math.ceil(len(rows) / global_batch)
    warmup = cfg.warmup if cfg.warmup is not None else round(0.03 * steps)
    if warmup >= steps:
        raise UserError(f"--warmup {warmup} must be below the run's {steps} steps")
    lr = cfg.lr if cfg.lr is not None else DEFAULT_LR

    settings = run_settings(cfg, global_batch, steps)
    ckpt, state = T.open_run(cfg.output, cfg.resume, base.args, settings)
    start_step = state["step"] if state else 0
    if ckpt and start_step >= steps:
        return T.finished_run(cfg.output, ckpt, start_step, steps, d.main, "sft")

    from llamactl.config import check_memory, rope_bytes

    need = 16 * base.args.num_params() // d.world + rope_bytes(base.args)
    check_memory(need, f"fine-tuning {base.args.num_params():,} parameters", cfg.model, device)
    seed_everything(cfg.seed)
    # fp32 master weights, whatever the checkpoint stores (bf16 autocast does the compute where it pays)
    model = build_model(base.args, load_tensors(cfg.model), cfg.model, "cpu", torch.float32)
    model.grad_checkpointing = cfg.activation_checkpointing
    wrapped, optim, forward = T.prepare(
        model, ckpt, state, d, device, cfg.distributed, lr, cfg.weight_decay, cfg.compile
    )
    T.start_run_dir(cfg.output, d)

    lineage = make_lineage("sft", cfg.argv or sys.argv[1:], [cfg.model, cfg.data], parent=base.lineage)
    meta = CheckpointMeta(base.args, base.tokenizer, lineage)
    trainer_state = {"model_args": base.args.to_dict(), "settings": settings}
    task = RowsTask(rows, cfg.batch_size, accum, device, cfg.seed, val_rows)
    eval_every = cfg.eval_every or (steps if val_rows is not None else 0)
    loop = T.LoopConfig.from_flags(
        cfg, steps=steps, accum=accum, lr=lr, warmup=warmup, eval_every=eval_every, bf16=use_bf16,
        tokens_per_step=global_batch * seq_len, flops_per_token=T.flops_per_token(base.args, seq_len), name="sft",
    )  # fmt: skip
    result = T.fit(
        task, model, wrapped, optim, loop, cfg.output, meta, trainer_state, d, device, start_step, forward,
        metrics_resume=ckpt is not None,
    )  # fmt: skip
    final = T.conclude(cfg.output, result, d, "sft")
    last = {"loss": result["loss"], "val_loss": result.get("val_loss")}
    val = f", val loss {last['val_loss']:.4f}" if last["val_loss"] is not None else ""
    say(d, f"step {result['step']}, train loss {last['loss']:.4f}{val}; model in {cfg.output}/model.safetensors")
    return {"step": result["step"], "checkpoint": final, "rows": len(rows), "padding": rows.padding_fraction, **last}
