"""Throughput on many prompts of mixed lengths: llamactl's engine (continuous batching, eager and compiled) against
the engine as it was at a git revision (static batches) and transformers' ``generate`` (static, padded batches).

    python -P bench/continuous.py [--preset llama2-60m] [--dtype fp32] [--prompts 256] [--rows 16]
                                  [--baseline 2698cdc] [--sides now,compiled,baseline,transformers]

Prompts of 8 to 512 tokens and answers of 16 to 256 (uniform, seeded), greedy, random weights, one process. Each
prompt's answer length is its own limit: llamactl's requests carry it (``run_requests``); the static engines cannot
stop a row at its own length, so each batch (prompts in input order, ``--rows`` at a time) decodes to its longest
answer, as a batch waits for its longest EOS. Tokens/s counts the answers' tokens only (what each prompt asked for),
over the whole run: prefills, decoding and, for the compiled engine, its compiles (reported apart too).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import write_csv  # noqa: E402
from generate import cpu_name, engine_at  # noqa: E402

from llamactl import compiled  # noqa: E402
from llamactl.checkpoint import save_model  # noqa: E402
from llamactl.convert import read_source, write_hf  # noqa: E402
from llamactl.generate import SamplingParams, Timings, run_requests  # noqa: E402
from llamactl.loading import load_for_inference  # noqa: E402
from llamactl.model import Transformer, preset  # noqa: E402


def workload(n: int, vocab: int, seed: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([1] + [rng.randrange(3, vocab) for _ in range(rng.randint(8, 512) - 1)], rng.randint(16, 256))
            for _ in range(n)]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama2-60m")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--baseline", default="2698cdc", help="git revision of the engine before continuous batching")
    ap.add_argument("--sides", default="now,compiled,baseline,transformers")
    ap.add_argument("--csv", default="bench/results/continuous.csv")
    args = ap.parse_args()
    torch.manual_seed(0)
    base = Transformer(preset(args.preset, max_seq_len=1024))
    base.init_weights(0)
    work = workload(args.prompts, base.args.vocab_size, 0)
    wanted = sum(m for _, m in work)
    print(f"# {args.preset} {args.dtype}, {args.prompts} prompts ({sum(len(p) for p, _ in work)} prompt tokens), "
          f"{wanted} answer tokens, {args.rows} rows, {cpu_name()} x{torch.get_num_threads()} threads")  # fmt: skip
    rows, answers = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "m.safetensors")
        save_model(ckpt, base, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype])
        for side in args.sides.split(","):
            t0 = time.perf_counter()
            extra = ""
            if side in ("now", "compiled"):
                model, _ = load_for_inference(ckpt, torch.device("cpu"), args.dtype, "lm", "to bench", False,
                                              decode=True)  # fmt: skip
                if side == "compiled":
                    compiled.enable(model, "always", 0)
                timings = Timings()
                got = {i: c.tokens for i, _, c in run_requests(
                    model, iter([(p, 1, m) for p, m in work]), SamplingParams(256, temperature=0), None,
                    rows=args.rows, timings=timings)}  # fmt: skip
                answers[side] = [got[i] for i in range(len(work))]
                extra = f"prompt {timings.prompt_s:.1f} s, decode {timings.decode_s:.1f} s"
                extra += " (the compiles inside it: the first step of each shape)" if side == "compiled" else ""
            elif side == "baseline":
                old = engine_at(args.baseline)
                model, _ = load_for_inference(ckpt, torch.device("cpu"), args.dtype, "lm", "to bench", False,
                                              decode=True)  # fmt: skip
                out = []
                for s in range(0, len(work), args.rows):
                    chunk = work[s : s + args.rows]
                    params = old.SamplingParams(max_new_tokens=max(m for _, m in chunk), temperature=0)
                    done = old.generate(model, [p for p, _ in chunk], params, eos_id=None)
                    out += [c.tokens[:m] for c, (_, m) in zip(done, chunk, strict=True)]
                answers[side] = out
            elif side == "transformers":
                from transformers import LlamaForCausalLM

                write_hf(os.path.join(tmp, "hf"), read_source(ckpt), None)
                dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
                hf = LlamaForCausalLM.from_pretrained(os.path.join(tmp, "hf"), dtype=dt).eval()
                t0 = time.perf_counter()  # its load is not counted (nor is ours beyond the model's)
                out = []
                with torch.inference_mode():
                    for s in range(0, len(work), args.rows):
                        chunk = work[s : s + args.rows]
                        width = max(len(p) for p, _ in chunk)
                        ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in chunk])  # left-padded
                        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in chunk])
                        most = max(m for _, m in chunk)
                        gen = hf.generate(ids, attention_mask=mask, max_new_tokens=most, min_new_tokens=most,
                                          do_sample=False, pad_token_id=0)  # fmt: skip
                        out += [g[width : width + m].tolist() for g, (_, m) in zip(gen, chunk, strict=True)]
                answers[side] = out
            else:
                raise SystemExit(f"unknown side {side!r}")
            took = time.perf_counter() - t0
            rows.append(dict(side=side, seconds=round(took, 1), tok_s=round(wanted / took, 1), detail=extra,
                             preset=args.preset, dtype=args.dtype, prompts=args.prompts, rows=args.rows))  # fmt: skip
            print(f"{side}: {took:.1f} s, {wanted / took:.1f} answer tok/s {extra}", flush=True)
    ref = answers.get("now")
    print("\n| engine | s | answer tok/s | vs baseline | same greedy answers as `now` |")
    print("|---|---|---|---|---|")
    base_s = next((r["seconds"] for r in rows if r["side"] == "baseline"), None)
    for r in rows:
        same = sum(a == b for a, b in zip(answers[r["side"]], ref, strict=True)) if ref else 0
        vs = f"{base_s / r['seconds']:.2f}x" if base_s else ""
        print(f"| {r['side']} | {r['seconds']} | {r['tok_s']} | {vs} | {same}/{len(work)} |")
    write_csv(rows, args.csv)


if __name__ == "__main__":
    main()
