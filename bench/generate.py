"""Batch-1 decode and prefill speed of llamactl's generation engine against transformers, same weights, same run.

    python bench/generate.py [--preset llama2-60m] [--dtypes fp32,bf16] [--new-tokens 64] [--prompt-len 256]
                             [--baseline REV]

Prints a markdown table and writes CSV rows (one per measurement) to --csv. Decode is also reported as a fraction
of the memory-bandwidth limit: weight bytes read per token x tokens/s over the measured copy bandwidth.
``--baseline REV`` adds the engine as it was at git revision REV (its ``llamactl/generate.py``, run on today's
model), measured in the same rounds: before and after a change to the engine, in one run.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
import types

import torch

from llamactl.checkpoint import build_model, save_model
from llamactl.convert import read_source, write_hf
from llamactl.device import DTYPES
from llamactl.generate import SamplingParams, generate
from llamactl.model import Transformer, preset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import write_csv  # noqa: E402


def copy_bandwidth(nbytes: int = 1 << 29, repeats: int = 5) -> float:
    """Bytes/s of a large tensor copy (read + write counted), the practical memory-bandwidth ceiling."""
    src = torch.empty(nbytes // 4, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def engine_at(rev: str) -> types.ModuleType:
    """``llamactl/generate.py`` as it was at git revision ``rev``, as a module of its own (its imports are today's)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    show = ["git", "show", f"{rev}:llamactl/generate.py"]
    src = subprocess.run(show, cwd=root, capture_output=True, text=True, check=True).stdout
    module = types.ModuleType(f"llamactl_generate_{rev}")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(src, f"{rev}:llamactl/generate.py", "exec"), module.__dict__)
    return module


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama2-60m")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--csv", default="bench/results/generate.csv")
    ap.add_argument("--baseline", help="a git revision whose engine to measure alongside (before/after)")
    args = ap.parse_args()
    before = engine_at(args.baseline) if args.baseline else None

    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = Transformer(preset(args.preset))
    model.init_weights(0)
    bw = copy_bandwidth()
    device = f"{cpu_name()} x{torch.get_num_threads()} threads"
    print(
        f"# {args.preset} ({model.args.num_params() / 1e6:.1f}M params), copy bandwidth {bw / 1e9:.1f} GB/s, {device}"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "m.safetensors")
        save_model(ckpt, model)
        write_hf(os.path.join(tmp, "hf"), read_source(ckpt), None)
        for dname in args.dtypes.split(","):
            dtype = DTYPES[dname]
            # as `llamactl generate` loads it: fused, packed projections
            ours = build_model(model.args, model.state_dict(), "bench", "cpu", dtype, decode=True).eval()
            hf = LlamaForCausalLM.from_pretrained(os.path.join(tmp, "hf"), dtype=dtype).eval()
            prompt = torch.randint(3, model.args.vocab_size, (args.prompt_len,)).tolist()
            short = prompt[:8]

            def ours_gen(p, n, ours=ours):
                return lambda: generate(ours, [p], SamplingParams(max_new_tokens=n, temperature=0), eos_id=None)

            def hf_gen(p, n, hf=hf):
                ids = torch.tensor([p])
                return lambda: hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

            def before_gen(p, n, ours=ours):
                params = before.SamplingParams(max_new_tokens=n, temperature=0)
                return lambda: before.generate(ours, [p], params, eos_id=None)

            weight_bytes = hf.num_parameters() * torch.empty((), dtype=dtype).element_size()  # read once per token
            impls = {"llamactl": ours_gen, "transformers": hf_gen}
            if before is not None:
                impls[f"llamactl@{args.baseline}"] = before_gen
            best = {(name, what): float("inf") for name in impls for what in ("prefill", "one", "many")}
            with torch.inference_mode():
                # Rounds alternate the two sides so that a slow spell of this shared machine hits both alike.
                for _ in range(args.repeats):
                    for name, gen in impls.items():
                        for what, fn in (
                            ("prefill", gen(prompt, 1)),
                            ("one", gen(short, 1)),
                            ("many", gen(short, args.new_tokens + 1)),
                        ):
                            best[name, what] = min(best[name, what], best_of(fn, 1))
            for name in impls:
                decode = args.new_tokens / (best[name, "many"] - best[name, "one"])
                rows.append(
                    dict(
                        impl=name,
                        dtype=dname,
                        prefill_tok_s=args.prompt_len / best[name, "prefill"],
                        decode_tok_s=decode,
                        bw_fraction=weight_bytes * decode / bw,
                        params_m=model.args.num_params() / 1e6,
                        device=device,
                    )
                )
    print("\n| impl | dtype | prefill tok/s | decode tok/s | decode / bandwidth limit |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['impl']} | {r['dtype']} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | "
            f"{r['bw_fraction']:.0%} |"
        )
    for dname in args.dtypes.split(","):
        o, h = (next(r for r in rows if r["impl"] == i and r["dtype"] == dname) for i in ("llamactl", "transformers"))
        print(
            f"{dname}: decode {o['decode_tok_s'] / h['decode_tok_s']:.2f}x transformers, "
            f"prefill {o['prefill_tok_s'] / h['prefill_tok_s']:.2f}x"
        )
        if before is not None:
            b = next(r for r in rows if r["impl"] == f"llamactl@{args.baseline}" and r["dtype"] == dname)
            print(f"{dname}: decode {o['decode_tok_s'] / b['decode_tok_s']:.2f}x llamactl@{args.baseline}")
    write_csv(rows, args.csv)


if __name__ == "__main__":
    main()
