"""rejection-sample's sampling: K answers per prompt with the prompt prefilled once and its KV cache forked to the K
rows (``generate.sample_k``, what ``llamactl rejection-sample`` runs) against K independent generations of the same
prompts (``generate.completions`` over each prompt repeated K times), same model, same run.

    python -P bench/rejection_sample.py [--preset llama2-15m] [--prompt-len 256] [--k 8] [--prompts 2]
                                        [--new-tokens 32,64,128] [--dtype fp32] [--device cpu] [--repeats 3]

Random weights, random prompt tokens, no EOS (every sample is exactly --new-tokens long, so both sides do the same
decoding work), sampling at temperature 1 (the command's default). Rounds alternate the two sides; best of
--repeats. The prefill columns time the prompts' prefill alone (plus the fork, for the forked side): what forking
saves is that, so the ratio is bounded by total / (total - prefill saved). Prints a markdown table and writes CSV
rows to --csv.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from llamactl.device import DTYPES
from llamactl.generate import SamplingParams, completions, prefill, sample_k
from llamactl.loading import build_model
from llamactl.model import KVCache, Transformer, preset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import write_csv  # noqa: E402


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = "cpu"
    return f"{cpu} x{torch.get_num_threads()} threads"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama2-15m")
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=2, help="prompts sampled at once (rejection-sample --batch-size)")
    ap.add_argument("--new-tokens", default="32,64,128")
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--csv", default="bench/results/rejection_sample.csv")
    args = ap.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = Transformer(preset(args.preset, max_seq_len=args.max_seq_len))
    model.init_weights(0)
    # as the command loads it (packed for decode on a CPU, as it is on a GPU)
    model = build_model(model.args, model.state_dict(), "bench", device, DTYPES[args.dtype], decode=True).eval()
    vocab, B, K = model.args.vocab_size, args.prompts, args.k
    prompts = [torch.randint(3, vocab, (args.prompt_len,)).tolist() for _ in range(B)]
    name = device_name(device)
    print(f"# {args.preset} ({model.args.num_params() / 1e6:.1f}M params, {args.dtype}) on {name}: {B} prompts of "
          f"{args.prompt_len} tokens, K = {K}")  # fmt: skip
    gen = torch.Generator(device=device).manual_seed(0)

    def forked(params):
        return lambda: sum(1 for _ in sample_k(model, prompts, K, params, None, gen))

    def independent(params):
        return lambda: sum(1 for _ in completions(model, [p for p in prompts for _ in range(K)], params, None, gen))

    def prefill_forked(n):
        def fn():
            cache = KVCache(model.args, B, args.prompt_len + n, device, model.tok_embeddings.weight.dtype)
            prefill(model, cache, prompts)
            cache.fork([b for b in range(B) for _ in range(K)])

        return fn

    def prefill_independent(n):
        def fn():
            cache = KVCache(model.args, B * K, args.prompt_len + n, device, model.tok_embeddings.weight.dtype)
            prefill(model, cache, [p for p in prompts for _ in range(K)])

        return fn

    rows = []
    with torch.inference_mode():
        for n in (int(x) for x in args.new_tokens.split(",")):
            params = SamplingParams(max_new_tokens=n, temperature=1.0, top_p=1.0)
            sides = {"forked": forked(params), "independent": independent(params),
                     "prefill_forked": prefill_forked(n), "prefill_independent": prefill_independent(n)}  # fmt: skip
            for fn in sides.values():  # warm-up
                fn()
            best = dict.fromkeys(sides, float("inf"))
            # Rounds alternate the sides so that a slow spell of this shared machine hits both alike.
            for _ in range(args.repeats):
                for side, fn in sides.items():
                    best[side] = min(best[side], timed(fn, device))
            rows.append(dict(new_tokens=n, k=K, prompts=B, prompt_len=args.prompt_len, preset=args.preset,
                             dtype=args.dtype, forked_samples_s=B * K / best["forked"],
                             independent_samples_s=B * K / best["independent"],
                             ratio=best["independent"] / best["forked"], prefill_forked_s=best["prefill_forked"],
                             prefill_independent_s=best["prefill_independent"], forked_s=best["forked"],
                             independent_s=best["independent"], device=name))  # fmt: skip
    print("\n| new tokens | forked samples/s | independent samples/s | ratio | prefill share of independent | bound |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        saved = r["prefill_independent_s"] - r["prefill_forked_s"]
        bound = r["independent_s"] / (r["independent_s"] - saved)
        share = r["prefill_independent_s"] / r["independent_s"]
        print(f"| {r['new_tokens']} | {r['forked_samples_s']:.2f} | {r['independent_samples_s']:.2f} | "
              f"{r['ratio']:.2f}x | {share:.0%} | {bound:.2f}x |")  # fmt: skip
    write_csv(rows, args.csv)


if __name__ == "__main__":
    main()
