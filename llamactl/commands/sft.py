"""``llamactl sft``: supervised fine-tuning of a base model on dialogs, the first stage of Llama 2-Chat.

Dialogs (``{"messages": [...]}``, ``{"prompt", "response"}`` pairs, or Anthropic HH text in ``--field``) are encoded
with Llama 2's chat format, the loss taken on the assistants' answers and their EOS only, packed into rows of
``--seq-len`` with attention kept inside each dialog, and trained by the one training loop (``llamactl.training.loop``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from llamactl.errors import UserError
from llamactl.flags import FinetuneFlags

# Llama 2, section 3.1: cosine schedule, initial learning rate 2e-5, weight decay 0.1, batch size 64, sequence
# length 4096, 2 epochs. The paper states no warm-up for SFT; the default here is 3% of the steps (as for the
# reward models, section 3.2.2), and --warmup 0 gives the paper's.
DEFAULT_LR = 2e-5
DEFAULT_GLOBAL_BATCH = 64


@dataclass(kw_only=True)
class SFTConfig(FinetuneFlags):
    field: str | None = None  # a record field holding HH text (or a message list)
    batch_size: int = 8  # sequences per micro-batch per process
    global_batch_size: int = DEFAULT_GLOBAL_BATCH  # sequences per optimizer step, reached by accumulation
    epochs: int = 2


def run_settings(cfg: SFTConfig, global_batch: int, steps: int) -> dict:
    """What fixes a run's loss curve besides the model and data: a resumed run must be started with the same."""
    keys = ("field", "seq_len", "lr", "min_lr_ratio", "warmup", "weight_decay", "grad_clip", "val_fraction", "pack")
    return {**{k: getattr(cfg, k) for k in keys}, "seed": cfg.seed, "global_batch": global_batch, "steps": steps}


def read_dialogs(path: str, field_name: str | None):
    """(where, messages) for each record of ``path``; a bad record is a UserError naming file, line and field."""
    from llamactl.chat_format import DialogError
    from llamactl.files import display_name
    from llamactl.jsonl import read_jsonl
    from llamactl.records import record_messages

    name = display_name(path)
    for item in read_jsonl(path):
        lineno, rec = item
        where = f"{name}:{lineno}"
        try:
            yield where, record_messages(rec, field_name)
        except DialogError as e:
            raise UserError(f"{where}: {e}") from None


def run(cfg: SFTConfig) -> dict:
    """Fine-tune; returns a summary (final step, last train and validation loss, checkpoint path)."""

    from llamactl.checkpoint import CheckpointMeta, make_lineage
    from llamactl.data import encode_for_sft, pack_rows, split_val
    from llamactl.loading import read_checked_meta
    from llamactl.tokenizer import Tokenizer
    from llamactl.training import lifecycle, loop
    from llamactl.training.tasks import RowsTask

    cfg.validate()
    base = read_checked_meta(cfg.model, "lm", "to fine-tune with sft", train=not cfg.lora_rank)
    if cfg.dry_run:
        seq = min(cfg.seq_len, base.args.max_seq_len)
        part = lifecycle.memory_part(cfg, base.args, base.quant)
        return lifecycle.dry_run(cfg, [part], micro_batch=cfg.batch_size, seq_len=seq, packed=cfg.pack,
                         items_per_step=cfg.global_batch_size)  # fmt: skip
    tensors, adapted, continued = lifecycle.base_weights(cfg, cfg.model, base, "lm", "to fine-tune with sft")
    tok = Tokenizer(base.tokenizer, cfg.model)
    seq_len = min(cfg.seq_len, base.args.max_seq_len)
    d, device, say, use_bf16 = lifecycle.start(cfg, "sft")
    lifecycle.check_global_batch(cfg, d)

    train_dialogs, val_dialogs = split_val(list(read_dialogs(cfg.data, cfg.field)), cfg.val_fraction, cfg.seed)
    if not train_dialogs:
        raise UserError(f"{cfg.data}: no dialogs")
    train_set = encode_for_sft(tok, train_dialogs, seq_len + 1)
    val_set = encode_for_sft(tok, val_dialogs, seq_len + 1)
    cut, dropped = train_set.cut_dialogs + val_set.cut_dialogs, train_set.dropped + val_set.dropped
    if cut:
        turns = train_set.cut_turns + val_set.cut_turns
        say(f"{cut} dialogs longer than {seq_len + 1} tokens lost their {turns} oldest exchanges to fit")
    if dropped:
        say(f"{dropped} dialogs whose last exchange alone exceeds {seq_len + 1} tokens were left out")
    if not train_set.examples:
        raise UserError(f"{cfg.data}: no dialog fits --seq-len {seq_len}")
    rows = pack_rows(train_set.examples, seq_len, cfg.pack, cfg.seed)
    val_rows = pack_rows(val_set.examples, seq_len, cfg.pack, cfg.seed) if val_set.examples else None
    say(
        f"{len(train_set.examples)} dialogs in {len(rows)} rows of {seq_len} "
        f"({'packed' if cfg.pack else 'one a row'}; padding {rows.padding_fraction:.1%})"
        + (f", {len(val_set.examples)} held out" if val_rows is not None else ""),
    )

    global_batch, accum, steps, warmup = lifecycle.plan_schedule(cfg, len(rows), d, "rows", say)
    lr = cfg.lr if cfg.lr is not None else DEFAULT_LR
    inputs = [cfg.model, cfg.data] + ([cfg.adapter] if cfg.adapter else [])
    lineage = make_lineage("sft", cfg.argv or sys.argv[1:], inputs, parent=adapted.lineage)
    result = lifecycle.finetune(
        cfg, name="sft", meta=CheckpointMeta(adapted.args, base.tokenizer, lineage), base=base, tensors=tensors,
        continued=continued, settings=run_settings(cfg, global_batch, steps), steps=steps, d=d, device=device,
        make_task=lambda: RowsTask(rows, cfg.batch_size, accum, device, cfg.seed, val_rows),
        accum=accum, lr=lr, warmup=warmup, bf16=use_bf16, tokens_per_step=global_batch * seq_len,
        flops_per_token=loop.flops_per_token(base.args, seq_len),
    )  # fmt: skip
    if "stopped" not in result:  # --resume of a finished run
        return result
    last = {"loss": result["loss"], "val_loss": result.get("val_loss")}
    val = f", val loss {last['val_loss']:.4f}" if last["val_loss"] is not None else ""
    say(f"step {result['step']}, train loss {last['loss']:.4f}{val}; {lifecycle.output_name(cfg)} in {cfg.output}")
    return {
        "step": result["step"],
        "checkpoint": result["checkpoint"],
        "rows": len(rows),
        "padding": rows.padding_fraction,
        **last,
    }
