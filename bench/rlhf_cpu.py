"""The reward model and PPO on this CPU, from the demo's chat model (run `make demo` first):

    python -P bench/rlhf_cpu.py [-m runs/demo/shakespeare/sft/model.safetensors] [--out DIR]

1. A safety reward model trained by `llamactl train-rm` on examples/hh-harmless-pairs.jsonl (Anthropic's harmless
   pairs, unrated: no margin), one epoch, 10% of the pairs held out; its held-out accuracy against chance (50%, with
   a 95% Wilson interval), and accuracy by the size of the reward gap |r_c - r_r| (quartiles): the pairs carry no
   annotator rating, so the paper's per-rating table (Table 8) cannot be made from them, and the gap stands in for
   how sure the model is.
2. `llamactl ppo` against that model for a few iterations: seconds per iteration split into generation, scoring and
   training (the generation share is the one to drive down).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args: str, stdin: str | None = None) -> str:
    proc = subprocess.run([sys.executable, "-m", "llamactl.cli", *args], input=stdin, capture_output=True, text=True,
                          cwd=ROOT)  # fmt: skip
    if proc.returncode:
        raise SystemExit(f"llamactl {args[0]} failed: {proc.stderr.strip()[-800:]}")
    return proc.stdout


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", default=os.path.join(ROOT, "runs/demo/shakespeare/sft/model.safetensors"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--iterations", type=int, default=3)
    a = ap.parse_args()
    out = a.out or tempfile.mkdtemp(prefix="rlhf-cpu-")
    pairs = [json.loads(x) for x in open(os.path.join(ROOT, "examples/hh-harmless-pairs.jsonl"))]
    import random

    order = list(range(len(pairs)))
    random.Random(0).shuffle(order)
    n_val = len(pairs) // 10
    # held out: pairs whose last exchange fits the model's context (train-rm leaves the others out; score refuses them)
    from llamactl.checkpoint import read_meta
    from llamactl.data import encode_pairs
    from llamactl.records import record_pair
    from llamactl.tokenizer import Tokenizer

    meta = read_meta(a.model)
    tok = Tokenizer(meta.tokenizer, a.model)
    fits = [len(encode_pairs(tok, [record_pair(pairs[i])], meta.args.max_seq_len, "none")) for i in order[:n_val]]
    val = [pairs[i] for i, ok in zip(order[:n_val], fits, strict=True) if ok]
    train = os.path.join(out, "train.jsonl")
    with open(train, "w") as f:
        f.writelines(json.dumps(pairs[i]) + "\n" for i in order[n_val:])
    t = time.perf_counter()
    cli("train-rm", "-m", a.model, "--data", train, "-o", f"{out}/rm", "--kind", "safety", "--seq-len", "256",
        "--batch-size", "8", "--global-batch-size", "32", "--epochs", str(a.epochs), "--lr", "3e-4", "--save-every",
        "0")  # fmt: skip
    rm_s = time.perf_counter() - t
    rows = [json.loads(x) for x in open(f"{out}/rm/metrics.jsonl")]
    pairs_s = sorted(r["pairs_per_s"] for r in rows[2:])[len(rows[2:]) // 2] if len(rows) > 2 else float("nan")
    rm = f"{out}/rm/model.safetensors"
    side = {}
    for field in ("chosen", "rejected"):
        text = "".join(json.dumps({field: p[field]}) + "\n" for p in val)
        side[field] = [
            json.loads(x)["score"] for x in cli("score", "-m", rm, "--field", field, stdin=text).splitlines()
        ]
    gaps = [(c - r) for c, r in zip(side["chosen"], side["rejected"], strict=True)]
    right = sum(g > 0 for g in gaps)
    lo, hi = wilson(right, len(gaps))
    print(f"## safety reward model: {len(pairs) - n_val} training pairs, {a.epochs} epoch(s), {len(rows)} steps, "
          f"{rm_s:.0f} s ({pairs_s:.1f} pairs/s median)\n")  # fmt: skip
    print(f"held-out accuracy: {right}/{len(gaps)} = {right / len(gaps):.1%} (95% Wilson interval {lo:.1%}-{hi:.1%}; "
          "chance 50%)\n")  # fmt: skip
    ranked = sorted(gaps, key=abs)
    q = len(ranked) // 4
    print("| reward gap quartile | pairs | mean abs gap | accuracy |\n|---|---|---|---|")
    for i in range(4):
        part = ranked[i * q : (i + 1) * q if i < 3 else len(ranked)]
        print(f"| {i + 1} | {len(part)} | {sum(map(abs, part)) / len(part):.3f} | "
              f"{sum(g > 0 for g in part) / len(part):.1%} |")  # fmt: skip

    prompts = os.path.join(ROOT, "examples/hh-prompts.jsonl")
    cli("ppo", "-m", a.model, "--rm", rm, "--safety-rm", rm, "--prompts", prompts,
        "-o", f"{out}/ppo", "--iterations", str(a.iterations), "--prompts-per-iteration", "16", "--minibatch-size", "8",
        "--batch-size", "8", "--max-new-tokens", "32", "--lr", "2e-5")  # fmt: skip
    its = [json.loads(x) for x in open(f"{out}/ppo/metrics.jsonl")]
    its = [r for r in its if "iteration" in r]
    print("\n## ppo: seconds per iteration (16 prompts, answers of at most 32 tokens, minibatches of 8)\n")
    print("| iteration | generation s | scoring s | training s | generation share | reward | KL | answer tokens |")
    print("|---|---|---|---|---|---|---|---|")
    for r in its:
        total = r["gen_s"] + r["score_s"] + r["train_s"]
        split = f"{r['gen_s']:.1f} | {r['score_s']:.1f} | {r['train_s']:.1f} | {r['gen_s'] / total:.0%}"
        print(f"| {r['iteration']} | {split} | {r['reward_raw']:.3f} | {r['kl']:.4f} | {r['response_length']:.1f} |")


if __name__ == "__main__":
    main()
