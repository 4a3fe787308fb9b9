"""``llamactl train-rm``: a helpfulness or safety reward model from human preference pairs, as Llama 2 trains them.

The next-token head of a chat or base checkpoint is replaced by a scalar head read at the last token of prompt +
answer; each pair's chosen and rejected dialogs go through one forward batch (packed with the micro-batch's other
sequences); the loss is the margin ranking loss -log(sigmoid(r_c - r_r - m(rating))) of the paper's eq. 2, trained
by the one training loop (``llamactl.training.loop``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from llamactl.errors import UserError
from llamactl.flags import FinetuneFlags

# Llama 2, section 3.2.2: one epoch; maximum learning rate 5e-6 for the 70B model, 1e-5 for the rest; cosine down to
# 10% of it; warm-up of 3% of the steps (at least 5); 512 pairs (1024 rows) a step.
DEFAULT_LR, DEFAULT_LR_70B = 1e-5, 5e-6
DEFAULT_GLOBAL_BATCH = 512


@dataclass(kw_only=True)
class TrainRMConfig(FinetuneFlags):
    kind: str = "helpfulness"  # which reward model this is: helpfulness or safety (written in its header)
    margin: str = "small"  # the rating margin of the loss: small, large (Llama 2, Table 27) or none
    batch_size: int = 4  # pairs per micro-batch per process (two sequences each)
    global_batch_size: int = DEFAULT_GLOBAL_BATCH  # pairs per optimizer step, reached by accumulation
    epochs: int = 1

    def own_problems(self) -> list[str]:
        from llamactl.checkpoint import ROLES

        problems = []
        if self.kind not in ROLES[:2]:
            problems.append(f"--kind {self.kind!r} is not one of helpfulness, safety")
        if self.margin not in ("small", "large", "none"):
            problems.append(f"--margin {self.margin!r} is not one of small, large, none")
        return problems


def run_settings(cfg: TrainRMConfig, global_batch: int, steps: int) -> dict:
    """What fixes a run's loss curve besides the model and data: a resumed run must be started with the same."""
    keys = ("kind", "margin", "seq_len", "lr", "min_lr_ratio", "warmup", "weight_decay", "grad_clip", "val_fraction",
            "pack")  # fmt: skip
    return {**{k: getattr(cfg, k) for k in keys}, "seed": cfg.seed, "global_batch": global_batch, "steps": steps}


def read_pairs(path: str, margin: str) -> list:
    """Every preference pair of ``path``; a bad record is one UserError naming file, line and field, and so is a
    file that rates some pairs but not others while a margin is asked for (the unrated ones would silently get
    none)."""
    from llamactl.chat_format import DialogError
    from llamactl.files import display_name
    from llamactl.jsonl import read_jsonl
    from llamactl.records import record_pair

    name = display_name(path)
    pairs, rated, unrated = [], None, None
    for lineno, rec in read_jsonl(path):
        where = f"{name}:{lineno}"
        try:
            pair = record_pair(rec)
        except DialogError as e:
            raise UserError(f"{where}: {e}") from None
        if pair.rating is None:
            unrated = unrated or where
        else:
            rated = rated or where
        if margin != "none" and rated and unrated:
            raise UserError(
                f"{where}: {rated} has a 'rating' and {unrated} has none; with --margin {margin} every pair needs one "
                "(or pass --margin none)"
            )
        pairs.append(pair)
    if not pairs:
        raise UserError(f"{name}: no preference pairs")
    return pairs


def run(cfg: TrainRMConfig) -> dict:
    """Train; returns a summary (final step, last train loss, held-out loss and accuracy, checkpoint path)."""
    from dataclasses import replace

    from llamactl.checkpoint import make_lineage
    from llamactl.data import encode_pairs, split_val
    from llamactl.loading import read_checked_meta
    from llamactl.model import PRESETS
    from llamactl.reward import reward_init
    from llamactl.tokenizer import Tokenizer
    from llamactl.training import lifecycle
    from llamactl.training.tasks import PairsTask

    cfg.validate()
    base = read_checked_meta(cfg.model, None, "to train a reward model from", train=not cfg.lora_rank)
    if cfg.dry_run:  # both answers of a pair in one forward
        args = replace(base.args, head="scalar", tie_embeddings=False) if base.args.head == "lm" else base.args
        seq = min(cfg.seq_len, base.args.max_seq_len)
        part = lifecycle.memory_part(cfg, args, base.quant)
        return lifecycle.dry_run(cfg, [part], micro_batch=cfg.batch_size, seq_len=seq, sequences_per_item=2,
                                 packed=cfg.pack, items_per_step=cfg.global_batch_size)  # fmt: skip
    tensors, adapted, continued = lifecycle.base_weights(cfg, cfg.model, base, None, "to train a reward model from")
    if adapted.args.head == "scalar" and adapted.role not in (None, cfg.kind):
        raise UserError(f"{cfg.model}: is a {base.role} model; --kind {cfg.kind} would train it into another kind")
    tok = Tokenizer(base.tokenizer, cfg.model)
    seq_len = min(cfg.seq_len, base.args.max_seq_len)
    d, device, say, use_bf16 = lifecycle.start(cfg, "train-rm")
    lifecycle.check_global_batch(cfg, d)

    train_pairs, val_pairs = split_val(read_pairs(cfg.data, cfg.margin), cfg.val_fraction, cfg.seed)
    train_set = encode_pairs(tok, train_pairs, seq_len, cfg.margin)
    val_set = encode_pairs(tok, val_pairs, seq_len, cfg.margin)
    if train_set.cut + val_set.cut:
        say(f"{train_set.cut + val_set.cut} pairs longer than {seq_len} tokens lost their oldest exchanges to fit")
    if train_set.dropped + val_set.dropped:
        dropped = train_set.dropped + val_set.dropped
        say(f"{dropped} pairs whose last exchange alone exceeds {seq_len} tokens were left out")
    if not len(train_set):
        raise UserError(f"{cfg.data}: no pair fits --seq-len {seq_len}")
    say(f"{len(train_set)} pairs" + (f", {len(val_set)} held out" if len(val_set) else ""))

    global_batch, accum, steps, warmup = lifecycle.plan_schedule(cfg, len(train_set), d, "pairs", say, 5)
    shape_70b = {k: PRESETS["llama2-70b"][k] for k in ("dim", "n_layers")}
    is_70b = {k: getattr(base.args, k) for k in shape_70b} == shape_70b
    lr = cfg.lr if cfg.lr is not None else DEFAULT_LR_70B if is_70b else DEFAULT_LR
    meta, tensors = reward_init(adapted, tensors)
    meta.role = cfg.kind
    inputs = [cfg.model, cfg.data] + ([cfg.adapter] if cfg.adapter else [])
    meta.lineage = make_lineage("train-rm", cfg.argv or sys.argv[1:], inputs, parent=adapted.lineage)
    result = lifecycle.finetune(
        cfg, name="train-rm", meta=meta, base=base, tensors=tensors, continued=continued,
        settings=run_settings(cfg, global_batch, steps), steps=steps, d=d, device=device,
        make_task=lambda: PairsTask(train_set, cfg.batch_size, accum, device, cfg.seed, cfg.pack, val_set),
        accum=accum, lr=lr, warmup=warmup, bf16=use_bf16, unit="pairs", units_per_step=global_batch,
    )  # fmt: skip
    if "stopped" not in result:  # --resume of a finished run
        return result
    val = result.get("val_accuracy")
    held = f", held-out accuracy {val:.1%} (loss {result['val_loss']:.4f})" if val is not None else ""
    say(f"step {result['step']}, train loss {result['loss']:.4f}{held}; {lifecycle.output_name(cfg)} in {cfg.output}")
    return {k: v for k, v in result.items() if k != "stopped"} | {"pairs": len(train_set)}
