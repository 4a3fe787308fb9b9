"""Supervised fine-tuning speed and peak memory of `llamactl sft` against TRL's SFTTrainer, same run.

    python -P bench/sft.py [--preset llama2-60m] [--seq-len 512] [--rows 8] [--steps 8] [--dtype bf16]
                           [--lora-rank R]

With --lora-rank both sides also train LoRA adapters of rank R on every block linear (alpha 2R, dropout 0.05): ours
with --lora-rank, TRL's with PEFT's LoraConfig; the table then has four rows, with the trainable parameters.

Same random model (saved once, exported to Hugging Face for TRL), same single-turn HH pairs (the first exchange of
each chosen dialog of examples/hh-harmless-chosen.jsonl, as prompt and completion in Llama 2's chat format), same
sequence length, rows per step and dtype, both packing and taking the loss on the answers only. Each side runs in
its own process, so its peak memory (ru_maxrss) is its own. Throughput counts the real tokens of each step (no
padding), median over the steps after the first two; TRL needs the bench extras (trl, datasets, protobuf).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import measure  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "tests", "fixtures", "llama2-tokenizer.model")

TRL_SCRIPT = r"""
import json, sys, time, torch
from datasets import Dataset
from transformers import AutoTokenizer, LlamaForCausalLM, TrainerCallback
from trl import SFTConfig, SFTTrainer

cfg = json.loads(sys.argv[1])
torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained(cfg["hf"])
tok.pad_token = tok.unk_token
model = LlamaForCausalLM.from_pretrained(cfg["hf"], dtype=torch.float32)
rows = [json.loads(x) for x in open(cfg["data"])]
data = Dataset.from_list([{"prompt": r["prompt_text"], "completion": r["completion_text"]} for r in rows])
counts = []
model.register_forward_pre_hook(lambda m, args, kw: counts.append(int(kw["input_ids"].numel())), with_kwargs=True)
times = []
class Clock(TrainerCallback):
    def on_step_begin(self, *a, **k):
        self.t = time.perf_counter(); counts.clear()
    def on_step_end(self, *a, **k):
        times.append(time.perf_counter() - self.t)
        print(json.dumps({"step": len(times), "seconds": times[-1], "tokens": sum(counts)}), flush=True)
args = SFTConfig(
    output_dir=cfg["out"], max_length=cfg["seq_len"], packing=True, per_device_train_batch_size=cfg["rows"],
    gradient_accumulation_steps=1, max_steps=cfg["steps"], learning_rate=2e-5, weight_decay=0.1,
    lr_scheduler_type="cosine", bf16=cfg["dtype"] == "bf16", use_cpu=True, logging_steps=1, report_to=[],
    save_strategy="no", completion_only_loss=True, dataloader_num_workers=0, seed=0,
)
peft = None
if cfg["lora_rank"]:
    from peft import LoraConfig
    peft = LoraConfig(r=cfg["lora_rank"], lora_alpha=2 * cfg["lora_rank"], lora_dropout=0.05, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, callbacks=[Clock()],
                     peft_config=peft)
print(json.dumps({"trainable": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)}), flush=True)
trainer.train()
"""


def pairs(path: str, n: int) -> list[dict]:
    """The first exchange of each HH dialog, in both formats: ours (prompt/response) and TRL's (text strings of
    Llama 2's chat format, the completion with its EOS piece)."""
    out = []
    for line in open(path):
        text = json.loads(line)["chosen"]
        turns = re.split(r"\n\n(?:Human|Assistant): ", text)[1:3]
        if len(turns) == 2 and all(t.strip() for t in turns):
            p, a = (t.strip() for t in turns)
            out.append({"prompt": p, "response": a, "prompt_text": f"[INST] {p} [/INST]", "completion_text": f" {a}"})
        if len(out) == n:
            break
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama2-60m")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--rows", type=int, default=8, help="rows (packed sequences) per optimizer step")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--lora-rank", type=int, default=0, help="also LoRA of this rank, against TRL with PEFT")
    ap.add_argument("--csv", default=os.path.join(ROOT, "bench", "results", "sft.csv"))
    args = ap.parse_args()

    from llamactl.checkpoint import save_model
    from llamactl.convert import read_source, write_hf
    from llamactl.model import Transformer, preset
    from llamactl.tokenizer import Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        model = Transformer(preset(args.preset, vocab_size=32000, max_seq_len=args.seq_len))
        model.init_weights(0)
        ckpt = os.path.join(tmp, "base.safetensors")
        save_model(ckpt, model, tokenizer=Tokenizer.from_file(TOKENIZER).model_bytes)
        write_hf(os.path.join(tmp, "hf"), read_source(ckpt), None)
        data = os.path.join(tmp, "pairs.jsonl")
        with open(data, "w") as f:
            for r in pairs(os.path.join(ROOT, "examples", "hh-harmless-chosen.jsonl"), 600):
                f.write(json.dumps(r) + "\n")

        table = []
        for rank in [0] + ([args.lora_rank] if args.lora_rank else []):
            kind = f"LoRA r={rank}" if rank else "full"
            run = os.path.join(tmp, f"run-{rank}")
            ours_cmd = [sys.executable, "-m", "llamactl.cli", "sft", "-m", ckpt, "--data", data, "-o", run]
            ours_cmd += ["--seq-len", str(args.seq_len), "--batch-size", str(args.rows), "--global-batch-size"]
            ours_cmd += [str(args.rows), "--steps", str(args.steps), "--dtype", args.dtype, "--save-every", "0"]
            ours_cmd += ["--lora-rank", str(rank)]
            _, err, ours_rss = measure(ours_cmd)
            padding = float(re.search(r"padding ([\d.]+)%", err).group(1)) / 100
            rows = [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl"))]
            ours_tok_s = statistics.median(r["tokens_per_s"] for r in rows[2:]) * (1 - padding)
            trained = model.args.num_params()
            if rank:
                from llamactl.lora import read_adapter

                trained = sum(t.numel() for t in read_adapter(os.path.join(run, "adapter.safetensors"))[1].values())
            table.append((f"llamactl sft, {kind}", trained, ours_tok_s, ours_rss, padding))

            cfg = dict(hf=os.path.join(tmp, "hf"), data=data, out=os.path.join(tmp, f"trl-{rank}"), lora_rank=rank,
                       seq_len=args.seq_len, rows=args.rows, steps=args.steps, dtype=args.dtype)  # fmt: skip
            out, _, trl_rss = measure([sys.executable, "-c", TRL_SCRIPT, json.dumps(cfg)])
            steps = [json.loads(x) for x in out.splitlines() if x.startswith('{"step"')]
            trl_trained = next(json.loads(x)["trainable"] for x in out.splitlines() if x.startswith('{"trainable"'))
            trl_tok_s = statistics.median(s["tokens"] / s["seconds"] for s in steps[2:])
            trl_padding = 1 - statistics.mean(s["tokens"] for s in steps) / (args.rows * args.seq_len)
            name = "TRL SFTTrainer (packing)" + (" + PEFT" if rank else "") + f", {kind}"
            table.append((name, trl_trained, trl_tok_s, trl_rss, trl_padding))

    print(f"# {args.preset}, seq {args.seq_len}, {args.rows} rows a step, {args.dtype}, {args.steps} steps")
    print("| trainer | trainable parameters | real tokens/s | peak RSS MiB | padding |")
    print("|---|---|---|---|---|")
    for name, trained, tok_s, rss, pad in table:
        print(f"| {name} | {trained:,} | {tok_s:,.0f} | {rss / 2**20:,.0f} | {pad:.1%} |")
    for i in range(0, len(table), 2):
        (ours, _, a, ra, _), (_, _, b, rb, _) = table[i], table[i + 1]
        print(f"ratio {ours} / TRL: {a / b:.2f}x tokens/s, {ra / rb:.2f}x memory")
    if len(table) == 4:
        print(
            f"llamactl LoRA / full: {table[2][2] / table[0][2]:.2f}x tokens/s, {table[2][3] / table[0][3]:.2f}x memory"
        )
    os.makedirs(os.path.dirname(args.csv), exist_ok=True)
    with open(args.csv, "a", newline="") as f:
        w = csv.writer(f)
        for name, trained, tok_s, rss, pad in table:
            w.writerow([args.preset, args.seq_len, args.rows, args.dtype, name, trained, round(tok_s, 1), rss,
                        round(pad, 4)])  # fmt: skip


if __name__ == "__main__":
    main()
