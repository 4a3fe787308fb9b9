"""`llamactl eval` against what a Python user writes instead: transformers' LlamaForCausalLM in the Hugging Face
perplexity guide's sliding-window loop, on the same weights and text, same windows.

    python -P bench/eval.py [--preset llama2-60m] [--context 512] [--stride 256] [--tokens 20000]

Each side runs in a process of its own (its peak RSS is measured); both in fp32, batch 1 for transformers (the
guide's loop) and llamactl's default batch. Prints a markdown table (tokens scored per second, peak memory, the
perplexity each reports) and writes CSV rows to --csv.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import measure, write_csv  # noqa: E402


def hf_side(hf_dir: str, tokens_file: str, context: int, stride: int) -> None:
    """The guide's loop: windows of ``context`` advancing by ``stride``, labels -100 on the part already scored."""
    import torch
    from transformers import LlamaForCausalLM

    ids = torch.tensor(json.load(open(tokens_file)))[None]
    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    t = time.perf_counter()
    nll, count, prev_end = 0.0, 0, 0
    with torch.inference_mode():
        for begin in range(0, ids.shape[1], stride):
            end = min(begin + context, ids.shape[1])
            target = end - prev_end
            x = ids[:, begin:end]
            labels = x.clone()
            labels[:, :-target] = -100
            n = int((labels[:, 1:] != -100).sum())
            nll += model(x, labels=labels).loss.item() * n
            count += n
            prev_end = end
            if end == ids.shape[1]:
                break
    print(
        json.dumps(
            {
                "seconds": time.perf_counter() - t,
                "tokens": count,
                "perplexity": float(torch.exp(torch.tensor(nll / count))),
            }
        )
    )


def ours_side(model: str, tokens_file: str, context: int, stride: int) -> None:
    from llamactl.commands.eval import EvalConfig, run

    data = tokens_file + ".jsonl"
    with open(data, "w") as f:
        f.write(json.dumps({"tokens": json.load(open(tokens_file))}) + "\n")
    out = tokens_file + ".out.json"
    t = time.perf_counter()
    run(EvalConfig(model=model, data=data, output=out, context=context, stride=stride, dtype="fp32", device="cpu"))
    summary = json.load(open(out))
    print(json.dumps({"seconds": time.perf_counter() - t, "tokens": summary["tokens_scored"],
                      "perplexity": summary["perplexity"]}))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama2-60m")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--stride", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=20000)
    ap.add_argument("--csv", default="bench/results/eval.csv")
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--args", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        model, tokens_file = args.args
        (hf_side if args.side == "hf" else ours_side)(model, tokens_file, args.context, args.stride)
        return

    import torch

    from llamactl.checkpoint import save_model
    from llamactl.convert import read_source, write_hf
    from llamactl.model import Transformer, preset
    from llamactl.tokenizer import Tokenizer

    tok = Tokenizer.from_file(os.path.join(ROOT, "tests", "fixtures", "llama2-tokenizer.model"))
    text = open(os.path.join(ROOT, "examples", "tinyshakespeare.txt")).read()
    ids = tok.encode(text, bos=True)[: args.tokens]
    torch.manual_seed(0)
    model = Transformer(preset(args.preset))
    model.init_weights(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, hf_dir, tokens_file = (os.path.join(tmp, n) for n in ("m.safetensors", "hf", "tokens.json"))
        save_model(ckpt, model, tokenizer=tok.model_bytes)
        write_hf(hf_dir, read_source(ckpt), None)
        json.dump(ids, open(tokens_file, "w"))
        for side, path in (("llamactl", ckpt), ("hf", hf_dir)):
            cmd = [sys.executable, "-P", os.path.abspath(__file__), "--side", side, "--context", str(args.context),
                   "--stride", str(args.stride), "--args", path, tokens_file]  # fmt: skip
            out, _, peak = measure(cmd)
            r = json.loads(out.strip().splitlines()[-1])
            rows.append(dict(impl="llamactl eval" if side == "llamactl" else "transformers (guide loop)",
                             tok_s=r["tokens"] / r["seconds"], tokens=r["tokens"], perplexity=r["perplexity"],
                             peak_rss_mb=peak / 1e6))  # fmt: skip
    print(f"# {args.preset}, fp32, {len(ids)} tokens of tiny Shakespeare (Llama 2 tokenizer), context {args.context}, "
          f"stride {args.stride}")  # fmt: skip
    print("\n| impl | tokens scored | tokens/s | peak RSS MB | perplexity |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['impl']} | {r['tokens']} | {r['tok_s']:.0f} | {r['peak_rss_mb']:.0f} | {r['perplexity']:.4f} |")
    print(f"llamactl: {rows[0]['tok_s'] / rows[1]['tok_s']:.2f}x the tokens/s at "
          f"{rows[0]['peak_rss_mb'] / rows[1]['peak_rss_mb']:.2f}x the memory")  # fmt: skip
    write_csv(rows, args.csv)


if __name__ == "__main__":
    main()
