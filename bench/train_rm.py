"""Reward-model training speed, peak memory and held-out accuracy of `llamactl train-rm` against TRL's RewardTrainer,
same run.

    python -P bench/train_rm.py [--preset llama2-60m] [--seq-len 512] [--pairs 16] [--steps 8] [--dtype bf16]
                                [--val-pairs 200] [--out DIR]

Same random model (saved once, exported to Hugging Face for TRL), made a reward model on both sides the same way:
the next-token head replaced by a zero scalar head read at each dialog's last token (the answer's EOS). Same pairs:
Anthropic HH harmless pairs (examples/hh-harmless-pairs.jsonl) in Llama 2's chat format, encoded once by llamactl's
own rules (dialogs over --seq-len lose their oldest exchanges; a pair whose last exchange alone does not fit is left
out before the split) and given to TRL as those token ids; TRL also gets them in llamactl's order, so both optimizer
steps k see the same pairs. Same pairs a step (no accumulation), AdamW (beta2 0.95, eps 1e-5, weight decay 0.1 on
matrices, gradient clip 1.0), learning rate schedule (linear warmup, cosine to 10%), dtype, steps and seed; no
margin (the pairs are unrated). Each side trains in its own process, so its peak memory (ru_maxrss) is its own.
Throughput is pairs/s per optimizer step, median over the steps after the first two. Held-out accuracy (chosen
scored above rejected) is measured here for both trained models on the same held-out pairs, in fp32. TRL needs the
bench extras (trl, datasets, protobuf).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shlex
import statistics
import sys
import tempfile
from importlib import metadata

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import measure  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "tests", "fixtures", "llama2-tokenizer.model")
PAIRS = os.path.join(ROOT, "examples", "hh-harmless-pairs.jsonl")

TRL_SCRIPT = r"""
import json, math, sys, time, torch
from datasets import Dataset
from torch.optim.lr_scheduler import LambdaLR
from transformers import AutoTokenizer, LlamaForSequenceClassification, TrainerCallback
from trl import RewardConfig, RewardTrainer

cfg = json.loads(sys.argv[1])
torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained(cfg["hf"])
# pad with <unk>: the tokenizer never emits it (byte fallback), so the last non-pad token is the answer's EOS
tok.pad_token = tok.unk_token
model = LlamaForSequenceClassification.from_pretrained(cfg["hf"], num_labels=1, dtype=torch.float32)
torch.nn.init.zeros_(model.score.weight)  # the new head starts at zero, as llamactl's does
model.config.pad_token_id = tok.pad_token_id
data = Dataset.from_list([json.loads(x) for x in open(cfg["data"])])
warmup, steps = cfg["warmup"], cfg["steps"]
def lr_factor(step):  # llamactl's schedule: warmup from lr/warmup at step 0, cosine down to 10% at the last step
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
class Trainer(RewardTrainer):
    def create_scheduler(self, num_training_steps, optimizer=None):
        if self.lr_scheduler is None:
            self.lr_scheduler = LambdaLR(optimizer or self.optimizer, lr_factor)
        return self.lr_scheduler
class Clock(TrainerCallback):
    t = None
    def on_step_begin(self, *a, **k):
        self.t = self.t or time.perf_counter()
    def on_step_end(self, args, state, control, **k):
        now = time.perf_counter()
        print(json.dumps({"step": state.global_step, "seconds": now - self.t}), flush=True)
        self.t = now
    def on_log(self, args, state, control, logs=None, **k):
        if logs and "loss" in logs:
            print(json.dumps({"log": state.global_step, "loss": logs["loss"]}), flush=True)
args = RewardConfig(
    output_dir=cfg["out"], max_length=cfg["seq_len"], per_device_train_batch_size=cfg["pairs"],
    gradient_accumulation_steps=1, max_steps=steps, learning_rate=cfg["lr"], warmup_steps=warmup,
    weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-5, max_grad_norm=1.0,
    optim="adamw_torch_fused", bf16=cfg["dtype"] == "bf16", use_cpu=True, gradient_checkpointing=False,
    train_sampling_strategy="sequential", logging_steps=1, report_to=[], save_strategy="no",
    dataloader_num_workers=0, seed=0, disable_tqdm=True,
)
trainer = Trainer(model=model, args=args, train_dataset=data, processing_class=tok, callbacks=[Clock()])
assert len(trainer.train_dataset) == len(data), "TRL left out pairs that llamactl trains on"
trainer.train()
trainer.save_model(cfg["out"] + "/model")
"""


def encoded_records(tok, seq_len: int) -> list[tuple[dict, list[int], list[int]]]:
    """Each record of the pairs file that fits ``seq_len`` by train-rm's rules, with its chosen and rejected ids."""
    from llamactl.data import encode_pairs
    from llamactl.records import record_pair

    out = []
    for line in open(PAIRS):
        rec = json.loads(line)
        enc = encode_pairs(tok, [record_pair(rec)], seq_len, "none")
        if len(enc):
            out.append((rec, enc.chosen[0].tolist(), enc.rejected[0].tolist()))
    return out


def padding(groups: list[list[list[int]]], pack: bool) -> float:
    """Share of pad slots in the forward batches: packed into rows as wide as the longest sequence (llamactl), or
    one sequence a row padded to the longest (TRL's collator)."""
    from llamactl.data import pack_sequences

    real = slots = 0
    for seqs in groups:
        real += sum(len(s) for s in seqs)
        slots += pack_sequences(seqs, True)["tokens"].numel() if pack else len(seqs) * max(len(s) for s in seqs)
    return 1 - real / slots


def trl_scores(path: str, seqs: list[list[int]], batch_size: int = 16):
    """The TRL-trained model's score of each sequence (fp32; right-padded batches, the score read by the model at
    the last non-pad token)."""
    import torch
    from transformers import LlamaForSequenceClassification
    from transformers.utils import logging

    logging.disable_progress_bar()
    model = LlamaForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    pad = model.config.pad_token_id
    out = torch.empty(len(seqs))
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            ids = torch.full((len(idx), len(seqs[idx[0]])), pad)
            mask = torch.zeros_like(ids)
            for row, i in enumerate(idx):
                ids[row, : len(seqs[i])] = torch.tensor(seqs[i])
                mask[row, : len(seqs[i])] = 1
            out[idx] = model(input_ids=ids, attention_mask=mask).logits[:, 0].float()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama2-60m")
    ap.add_argument("--seq-len", type=int, default=512, help="most tokens of a dialog")
    ap.add_argument("--pairs", type=int, default=16, help="pairs per optimizer step (one micro-batch)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-5, help="peak learning rate (train-rm's default, Llama 2's)")
    ap.add_argument("--warmup", type=int, default=None, help="warmup steps (default: train-rm's)")
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--val-pairs", type=int, default=200, help="held-out pairs scored for accuracy")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads of each side (default: torch's own)")
    ap.add_argument("--out", default=None, help="directory for the runs (default: a temporary one, removed)")
    ap.add_argument("--csv", default=os.path.join(ROOT, "bench", "results", "train_rm.csv"))
    args = ap.parse_args()
    # train-rm's default: 3% of the steps, at least 5, below the steps
    warmup = args.warmup if args.warmup is not None else min(max(5, round(0.03 * args.steps)), args.steps - 1)
    if args.steps < 3 or not 0 <= warmup < args.steps:
        ap.error("--steps must be at least 3 (the first two are not timed) and --warmup below it")
    if args.out and os.path.isdir(args.out) and os.listdir(args.out):
        ap.error(f"--out {args.out}: not empty")

    if args.out:
        os.makedirs(args.out, exist_ok=True)
        run_bench(args, warmup, args.out)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            run_bench(args, warmup, tmp)


def run_bench(args, warmup: int, tmp: str) -> None:
    import numpy as np
    import torch

    from llamactl.checkpoint import save_model
    from llamactl.convert import read_source, write_hf
    from llamactl.data import EpochOrder
    from llamactl.model import Transformer, preset
    from llamactl.reward import Scorer
    from llamactl.tokenizer import Tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    tok = Tokenizer.from_file(TOKENIZER)
    model = Transformer(preset(args.preset, vocab_size=32000, max_seq_len=args.seq_len))
    model.init_weights(0)
    ckpt = os.path.join(tmp, "base.safetensors")
    save_model(ckpt, model, tokenizer=tok.model_bytes)
    write_hf(os.path.join(tmp, "hf"), read_source(ckpt), None)
    del model

    # one split for both: a seeded held-out set, the rest trains (llamactl reads it with --val-fraction 0)
    records = encoded_records(tok, args.seq_len)
    held = set(np.random.default_rng(0).permutation(len(records))[: args.val_pairs].tolist())
    train = [r for i, r in enumerate(records) if i not in held]
    val = [r for i, r in enumerate(records) if i in held]
    if len(train) < args.pairs:
        raise SystemExit(f"only {len(train)} training pairs fit --seq-len {args.seq_len}")
    train_file = os.path.join(tmp, "train.jsonl")
    with open(train_file, "w") as f:
        for rec, _, _ in train:
            f.write(json.dumps(rec) + "\n")

    # TRL reads the pairs in sequence, in the order train-rm's sampler (seeded, one micro-batch a step) takes them
    order = EpochOrder(len(train), args.pairs, 1, 0)
    steps_pairs = [[train[i] for i in order.items(step, 0, 0, 1)] for step in range(args.steps)]
    trl_file = os.path.join(tmp, "trl-pairs.jsonl")
    with open(trl_file, "w") as f:
        for group in steps_pairs:
            for _, c, r in group:
                f.write(json.dumps({"chosen_ids": c, "rejected_ids": r}) + "\n")
    groups = [[c for _, c, _ in g] + [r for _, _, r in g] for g in steps_pairs]

    run = os.path.join(tmp, "llamactl")
    flags = ["--seq-len", str(args.seq_len), "--batch-size", str(args.pairs), "--global-batch-size", str(args.pairs)]
    flags += ["--steps", str(args.steps), "--lr", str(args.lr), "--warmup", str(warmup), "--margin", "none"]
    flags += ["--dtype", args.dtype, "--val-fraction", "0", "--save-every", "0", "--seed", "0", "--device", "cpu"]
    ours_cmd = [sys.executable, "-m", "llamactl.cli", "train-rm", "-m", ckpt, "--data", train_file, "-o", run, *flags]
    _, err, ours_rss = measure(ours_cmd, args.threads)
    n_read = int(re.search(r"train-rm: (\d+) pairs$", err, re.M).group(1))
    assert n_read == len(train), f"train-rm kept {n_read} of the {len(train)} pairs the bench encoded"
    rows = [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl"))]
    ours_pairs_s = statistics.median(r["pairs_per_s"] for r in rows[2:])
    ours_losses = [r["loss"] for r in rows]

    trl_dir = os.path.join(tmp, "trl")
    cfg = dict(hf=os.path.join(tmp, "hf"), data=trl_file, out=trl_dir, seq_len=args.seq_len, pairs=args.pairs,
               steps=args.steps, lr=args.lr, warmup=warmup, dtype=args.dtype)  # fmt: skip
    out, _, trl_rss = measure([sys.executable, "-c", TRL_SCRIPT, json.dumps(cfg)], args.threads)
    lines = [json.loads(x) for x in out.splitlines() if x.startswith(('{"step"', '{"log"'))]
    seconds = [x["seconds"] for x in lines if "step" in x]
    trl_losses = [x["loss"] for x in lines if "log" in x]
    assert len(seconds) == args.steps, f"TRL ran {len(seconds)} steps, not {args.steps}"
    trl_pairs_s = statistics.median(args.pairs / s for s in seconds[2:])

    # held-out accuracy of both, scored here the same way (fp32, chosen strictly above rejected)
    seqs = [c for _, c, _ in val] + [r for _, _, r in val]
    ours = Scorer(os.path.join(run, "model.safetensors"), torch.device("cpu"), "fp32", batch_size=16).score(seqs)
    theirs = trl_scores(os.path.join(trl_dir, "model"), seqs)
    n = len(val)
    ours_acc = float((ours[:n] > ours[n:]).float().mean())
    trl_acc = float((theirs[:n] > theirs[n:]).float().mean())

    table = [
        ("llamactl train-rm (packed)", ours_pairs_s, ours_rss, padding(groups, True), ours_losses[-1], ours_acc),
        ("TRL RewardTrainer (padded)", trl_pairs_s, trl_rss, padding(groups, False), trl_losses[-1], trl_acc),
    ]
    bench_cmd = shlex.join(["python", "-P", "bench/train_rm.py", *sys.argv[1:]])
    versions = ", ".join(f"{p} {metadata.version(p)}" for p in ("torch", "trl", "transformers"))
    threads = f", {args.threads} threads" if args.threads else ""
    print(f"# {args.preset}, seq {args.seq_len}, {args.pairs} pairs a step, {args.dtype}, {args.steps} steps{threads}")
    print(f"{versions}; command: `{bench_cmd}`")
    print("| trainer | pairs/s | peak RSS MiB | padding | last train loss | held-out accuracy |")
    print("|---|---|---|---|---|---|")
    for name, pairs_s, rss, pad, loss, acc in table:
        print(f"| {name} | {pairs_s:,.2f} | {rss / 2**20:,.0f} | {pad:.1%} | {loss:.4f} | {acc:.1%} |")
    half = 1.96 * math.sqrt(0.25 / n)
    print(f"ratio llamactl / TRL: {ours_pairs_s / trl_pairs_s:.2f}x pairs/s, {ours_rss / trl_rss:.2f}x memory")
    print(f"held-out: {n} pairs, 95% interval about +-{half:.1%} around chance (a few steps from a random model leave "
          "both near chance: what matters is pairs/s at accuracy equal within it)")  # fmt: skip
    print("padding: llamactl packs a step's 2 x pairs sequences into rows as wide as the longest (attention kept "
          "inside each); TRL's RewardTrainer pads each sequence to the step's longest (it has no packing)")  # fmt: skip
    print("train loss per step, llamactl: " + " ".join(f"{x:.4f}" for x in ours_losses))
    print("train loss per step, TRL:      " + " ".join(f"{x:.4f}" for x in trl_losses))
    print(f"llamactl: `llamactl train-rm -m base.safetensors --data train.jsonl -o llamactl {shlex.join(flags)}`")
    if args.csv:
        os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
        with open(args.csv, "a", newline="") as f:
            w = csv.writer(f)
            for name, pairs_s, rss, pad, loss, acc in table:
                w.writerow([args.preset, args.seq_len, args.pairs, args.dtype, args.steps, name, round(pairs_s, 3),
                            rss, round(pad, 4), round(loss, 6), round(acc, 4), n])  # fmt: skip


if __name__ == "__main__":
    main()
