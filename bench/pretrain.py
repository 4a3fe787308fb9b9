"""Training speed and peak memory of `llamactl pretrain` against transformers' LlamaForCausalLM + torch AdamW.

    python -P bench/pretrain.py [--preset llama2-60m] [--seq-len 256] [--batch-size 8] [--steps 8] [--dtypes fp32,bf16]

Same config, same data, same dtype, same machine, in one run. Each side runs in its own process so its peak memory
(ru_maxrss) is its own; tokens/s is the median over the steps after the first two (warm-up). MFU is against the
matmul peak of the dtype measured in the same run.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HF_SCRIPT = r"""
import json, sys, time, torch
from transformers import LlamaConfig, LlamaForCausalLM
from llamactl.data import Windows
from llamactl.convert import hf_config
from llamactl.model import preset
from llamactl.shards import open_shards
cfg = json.loads(sys.argv[1])
torch.manual_seed(0)
args = preset(cfg["preset"], vocab_size=32000)
hf_cfg = hf_config(args, torch.float32)
hf_cfg.pop("torch_dtype"); hf_cfg.pop("architectures")
model = LlamaForCausalLM(LlamaConfig(**hf_cfg))
model.train()
opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1)
windows = Windows(open_shards(cfg["data"]).split("train"), cfg["seq_len"], 0)
bf16 = cfg["dtype"] == "bf16"
times = []
for step in range(cfg["steps"]):
    t = time.perf_counter()
    x, y = windows.batch(step * cfg["batch_size"], cfg["batch_size"])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step(); opt.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - t)
    print(json.dumps({"step": step + 1, "loss": loss.item(), "seconds": times[-1]}), flush=True)
"""


def measure(cmd: list[str]) -> tuple[list[float], int]:
    """Per-step seconds printed by the command, and that process's own peak RSS in bytes (from wait4)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            sys.exit(f"{cmd[:4]} failed:\n{err.read()[-2000:]}")
        lines = out.read().splitlines()
    return [json.loads(line)["seconds"] for line in lines if line.startswith("{")], usage.ru_maxrss * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama2-60m")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--csv", default="bench/results/pretrain.csv")
    args = ap.parse_args()

    import torch

    from llamactl.model import preset
    from llamactl.shards import ShardWriter
    from llamactl.tokenizer import Tokenizer
    from llamactl.training.loop import flops_per_token, matmul_peak_flops

    tok = Tokenizer.from_file(
        os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "llama2-tokenizer.model")
    )
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "shards")
        need = args.steps * args.batch_size * (args.seq_len + 1) * 2
        with ShardWriter(data, tok) as w:
            w.add(rng.integers(3, 32000, size=need))
        margs = preset(args.preset, vocab_size=32000)
        flops_tok = flops_per_token(margs, args.seq_len)
        tokens = args.batch_size * args.seq_len
        for dname in args.dtypes.split(","):
            peak = matmul_peak_flops(torch.bfloat16 if dname == "bf16" else torch.float32, torch.device("cpu"))
            hf_cfg = dict(
                preset=args.preset,
                data=data,
                seq_len=args.seq_len,
                batch_size=args.batch_size,
                steps=args.steps,
                dtype=dname,
            )
            hf_times, hf_peak = measure([sys.executable, "-c", HF_SCRIPT, json.dumps(hf_cfg)])
            out = os.path.join(tmp, f"run-{dname}")
            ours_cmd = [
                sys.executable,
                "-c",
                _OURS_SCRIPT,
                data,
                out,
                args.preset,
                str(args.seq_len),
                str(args.batch_size),
                str(args.steps),
                dname,
            ]
            ours_times, ours_peak = measure(ours_cmd)
            for name, times, mem in (("transformers", hf_times, hf_peak), ("llamactl", ours_times, ours_peak)):
                tok_s = tokens / statistics.median(times[2:])
                rows.append(
                    dict(
                        impl=name,
                        dtype=dname,
                        preset=args.preset,
                        seq_len=args.seq_len,
                        batch_size=args.batch_size,
                        tokens_per_s=round(tok_s, 1),
                        peak_rss_mb=round(mem / 1e6),
                        mfu=round(tok_s * flops_tok / peak, 4),
                        matmul_peak_gflops=round(peak / 1e9, 1),
                    )
                )
    print("| impl | dtype | tokens/s | peak RSS MB | MFU |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['impl']} | {r['dtype']} | {r['tokens_per_s']:.0f} | {r['peak_rss_mb']} | {r['mfu']:.1%} |")
    for dname in args.dtypes.split(","):
        h, o = (next(r for r in rows if r["impl"] == i and r["dtype"] == dname) for i in ("transformers", "llamactl"))
        print(
            f"{dname}: {o['tokens_per_s'] / h['tokens_per_s']:.2f}x the tokens/s, "
            f"{o['peak_rss_mb'] / h['peak_rss_mb']:.2f}x the peak memory of transformers"
        )
    os.makedirs(os.path.dirname(args.csv), exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)


# Runs `llamactl pretrain` itself and prints its per-step wall time from the tqdm-free metrics log.
_OURS_SCRIPT = r"""
import json, sys, time
from llamactl.commands.pretrain import PretrainConfig, run
data, out, preset, seq, bs, steps, dtype = sys.argv[1:]
run(PretrainConfig(data=data, output=out, preset=preset, seq_len=int(seq), batch_size=int(bs), steps=int(steps),
                   eval_every=0, save_every=0, dtype=dtype))
for line in open(out + "/metrics.jsonl"):
    r = json.loads(line)
    print(json.dumps({"step": r["step"], "seconds": int(bs) * int(seq) / r["tokens_per_s"]}))
"""

if __name__ == "__main__":
    start = time.time()
    main()
    print(f"({time.time() - start:.0f} s)", file=sys.stderr)
