"""The chat-model stages on a GPU: a few steps of sft, train-rm and ppo (and rejection-sample where present) on a
random 60M-parameter Llama with Llama 2's tokenizer and the example data, in bf16 autocast; throughput and ppo's
time split, as a markdown table on stdout (paste into docs/benchmarks.md).

    python -P bench/gpu_rlhf.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args: str, stdin: str | None = None) -> tuple[float, str]:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "llamactl.cli", *args], input=stdin, capture_output=True, text=True,
                          cwd=ROOT)  # fmt: skip
    took = time.perf_counter() - t
    if proc.returncode:
        print(f"llamactl {args[0]} failed ({proc.returncode}): {proc.stderr[-1500:]}", file=sys.stderr)
        return took, ""
    return took, proc.stdout


def rows(path: str) -> list[dict]:
    return [json.loads(x) for x in open(path)] if os.path.isfile(path) else []


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/gpu-rlhf")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    sys.path.insert(0, ROOT)
    import torch

    from llamactl.checkpoint import save_model
    from llamactl.model import Transformer, preset
    from llamactl.tokenizer import Tokenizer

    tok = Tokenizer.from_file(os.path.join(ROOT, "tests", "fixtures", "llama2-tokenizer.model"))
    base = os.path.join(a.out, "base.safetensors")
    model = Transformer(preset("llama2-60m", vocab_size=32000, max_seq_len=512))
    model.init_weights(0)
    save_model(base, model, tokenizer=tok.model_bytes)
    print(f"device: {torch.cuda.get_device_name(0)}; model: llama2-60m shape, vocab 32000, random weights\n")
    ex = os.path.join(ROOT, "examples")
    out = {}
    t, _ = cli("sft", "-m", base, "--data", f"{ex}/hh-harmless-chosen.jsonl", "--field", "chosen", "-o",
               f"{a.out}/sft", "--seq-len", "512", "--batch-size", "16", "--global-batch-size", "32", "--steps", "12",
               "--lr", "1e-4", "--dtype", "bf16")  # fmt: skip
    m = rows(f"{a.out}/sft/metrics.jsonl")
    out["sft"] = (
        t,
        f"{sum(r['tokens_per_s'] for r in m[2:]) / max(1, len(m[2:])):,.0f} tok/s (padded rows)" if m else "failed",
    )
    t, _ = cli("train-rm", "-m", f"{a.out}/sft/model.safetensors", "--data", f"{ex}/hh-harmless-pairs.jsonl", "-o",
               f"{a.out}/rm", "--seq-len", "512", "--batch-size", "16", "--global-batch-size", "64", "--steps", "12",
               "--lr", "1e-4", "--dtype", "bf16", "--val-fraction", "0.1", "--kind", "safety")  # fmt: skip
    m = rows(f"{a.out}/rm/metrics.jsonl")
    acc = m[-1].get("val_accuracy") if m else None
    out["train-rm"] = (t, f"{sum(r['pairs_per_s'] for r in m[2:]) / max(1, len(m[2:])):,.1f} pairs/s, held-out "
                          f"accuracy {acc}" if m else "failed")  # fmt: skip
    t, _ = cli("ppo", "-m", f"{a.out}/sft/model.safetensors", "--rm", f"{a.out}/rm/model.safetensors", "--safety-rm",
               f"{a.out}/rm/model.safetensors", "--prompts", f"{ex}/hh-prompts.jsonl", "-o", f"{a.out}/ppo",
               "--iterations", "3", "--prompts-per-iteration", "64", "--minibatch-size", "16", "--batch-size", "16",
               "--gen-batch-size", "64", "--max-new-tokens", "64", "--lr", "1e-5", "--dtype", "bf16")  # fmt: skip
    its = [r for r in rows(f"{a.out}/ppo/metrics.jsonl") if "iteration" in r]
    if its:
        last = its[-1]
        out["ppo"] = (t, f"iteration: generation {last['gen_s']} s, scoring {last['score_s']} s, training "
                         f"{last['train_s']} s for 64 samples of <= 64 tokens; KL {last['kl']}")  # fmt: skip
    else:
        out["ppo"] = (t, "failed")
    if os.path.isfile(os.path.join(ROOT, "llamactl", "commands", "rejection_sample.py")):
        prompts = "".join(open(f"{ex}/hh-prompts.jsonl").readlines()[:32])
        policy, rm = f"{a.out}/sft/model.safetensors", f"{a.out}/rm/model.safetensors"
        t, res = cli("rejection-sample", "-m", policy, "--rm", rm, "-k", "8", "--max-new-tokens", "64",
                     "--temperature", "1.0", stdin=prompts)  # fmt: skip
        out["rejection-sample"] = (
            t,
            f"32 prompts x 8 samples: {256 / t:.1f} samples/s end to end" if res else "failed",
        )
    print("| stage | wall s (process) | result |\n|---|---|---|")
    for k, (t, v) in out.items():
        print(f"| {k} | {t:.1f} | {v} |")


if __name__ == "__main__":
    main()
