"""Decode and prefill speed of llamactl's generation engine against transformers and llama.cpp, same weights, same run.

    python -P bench/generate.py [--preset llama2-60m] [--schemes fp32,bf16,int8,int4-g32] [--new-tokens 64]
                                [--prompt-len 256] [--batches 8,32] [--baseline REV]
    python -P bench/generate.py --profile bf16   # where one decode step's time goes

Batch 1, greedy, per weight scheme: llamactl (the checkpoint as ``llamactl generate`` loads it: fused, packed or
quantized projections), transformers' ``generate`` (fp32 and bf16), and llama.cpp (through llama-cpp-python) on the
same weights exported by ``llamactl convert --to gguf`` (F32 for fp32, BF16 for bf16, Q8_0 for int8). Decode is also
given as a fraction of the measured read bandwidth (a sum over 512 MB): weight bytes read per token x tokens/s over
it. Then batched decode (--batches rows, the case of rejection sampling and PPO) against transformers. Prints markdown
tables and writes CSV rows (one per measurement) to --csv. ``--baseline REV`` adds the engine as it was at git
revision REV (its ``llamactl/generate.py``, run on today's model), measured in the same rounds.
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

from llamactl import compiled
from llamactl.checkpoint import save_model
from llamactl.convert import read_source, write_hf
from llamactl.device import DTYPES
from llamactl.generate import SamplingParams, generate
from llamactl.loading import build_model
from llamactl.model import Transformer, preset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import best_of, write_csv  # noqa: E402


def read_bandwidth(nbytes: int = 1 << 29, repeats: int = 5) -> float:
    """Bytes/s of reading a large tensor of real data (a sum): what a decode step does with its weights.

    NOTE: the copy bandwidth (read + write) this bench used before reads lower than a plain read here (llama.cpp reads
    fp32 weights at ~36 GB/s, more than the copy figure), and an untouched ``torch.empty`` reads from the zero page
    (230 GB/s): the data must be written first."""
    src = torch.rand(nbytes // 4)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        src.sum()
        best = min(best, time.perf_counter() - t)
    return nbytes / best


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


def profile(preset_name: str, dtype: torch.dtype, steps: int = 20) -> None:
    """One batch-1 decode step at position 256 of a 320-slot cache: its time, the time of its linear layers alone
    (the same packed projections called back to back), and torch.profiler's table of the operators it calls."""
    from torch.profiler import profile as torch_profile

    from llamactl.generate import decode_one_token, prefill
    from llamactl.model import KVCache
    from llamactl.quant import QuantLinear
    from llamactl.swap import PackedLinear

    torch.manual_seed(0)
    base = Transformer(preset(preset_name))
    base.init_weights(0)
    model = build_model(base.args, base.state_dict(), "bench", "cpu", dtype, decode=True).eval()
    cache = KVCache(base.args, 1, 320, "cpu", dtype)
    prefill(model, cache, [list(range(3, 259))])
    tok, pos = torch.tensor([5]), torch.tensor([256])
    # the layers a decode step multiplies by: the blocks' projections and the head (its packed form where made)
    linears = [m for m in model.layers.modules() if isinstance(m, (PackedLinear, QuantLinear, torch.nn.Linear))]
    linears.append(model.packed_head or getattr(model, "output", None) or PackedLinear.of(model.output_weight))
    xs = [torch.randn(1, 1, m.in_features, dtype=dtype) for m in linears]

    def step():
        decode_one_token(model, tok, pos, cache)

    def linears_alone():
        for m, x in zip(linears, xs, strict=True):
            m(x)

    with torch.inference_mode():
        t_step = min(best_of(step, 1) for _ in range(steps))
        t_lin = min(best_of(linears_alone, 1) for _ in range(steps))
        with torch_profile() as prof:
            for _ in range(steps):
                step()
    print(f"# decode step {t_step * 1e3:.2f} ms ({1 / t_step:.0f} tok/s); its {len(linears)} linear layers alone "
          f"{t_lin * 1e3:.2f} ms; the rest {(t_step - t_lin) * 1e3:.2f} ms (best of {steps})")  # fmt: skip
    print(f"# operator calls per step: {sum(e.count for e in prof.key_averages()) / steps:.0f}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


SCHEMES = {  # name: (llamactl --dtype, quantize flags or None, transformers dtype or None, GGUF type or None)
    "fp32": ("fp32", None, torch.float32, "f32"),
    "bf16": ("bf16", None, torch.bfloat16, "bf16"),
    "int8": ("bf16", ["--scheme", "int8"], None, "q8_0"),
    "int4-g32": ("bf16", ["--scheme", "int4", "--group-size", "32"], None, None),
    "int4-g128": ("bf16", ["--scheme", "int4", "--group-size", "128"], None, None),
}
DEFAULT_SCHEMES = "fp32,bf16,int8,int4-g32"  # llama2-60m's hidden dim, 1376, takes no groups of 64 or 128


def llamactl_cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "llamactl.cli", *args], check=True, capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama2-60m")
    ap.add_argument("--schemes", default=DEFAULT_SCHEMES, help=f"some of {', '.join(SCHEMES)}")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--batches", default="8,32", help="batched decode sizes (llamactl and transformers); empty: none")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--csv", default="bench/results/generate.csv")
    ap.add_argument("--baseline", help="a git revision whose engine to measure alongside (before/after)")
    ap.add_argument("--profile", choices=["fp32", "bf16"], help="instead: where one decode step's time goes")
    ap.add_argument("--compile", action="store_true", help="also the compiled decode step (--compile always)")
    args = ap.parse_args()
    if args.profile:
        return profile(args.preset, DTYPES[args.profile])
    before = engine_at(args.baseline) if args.baseline else None

    from transformers import LlamaForCausalLM

    from llamactl.checkpoint import load_tensors
    from llamactl.loading import load_for_inference
    from llamactl.tokenizer import Tokenizer

    try:
        from llamacpp import llamacpp_decode
    except ImportError:
        llamacpp_decode = None
    if llamacpp_decode is not None:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            llamacpp_decode = None

    torch.manual_seed(0)
    model = Transformer(preset(args.preset))
    model.init_weights(0)
    bw = read_bandwidth()
    device = f"{cpu_name()} x{torch.get_num_threads()} threads"
    params = model.args.num_params() / 1e6
    print(f"# {args.preset} ({params:.1f}M params), read bandwidth {bw / 1e9:.1f} GB/s, {device}")
    if llamacpp_decode is None:
        print("(llama-cpp-python is not installed: `make bench` installs it; llama.cpp columns are empty)")
    tok_file = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures",
                            "llama2-tokenizer.model")  # fmt: skip
    rows, batched = [], []
    prompt = torch.randint(3, model.args.vocab_size, (args.prompt_len,)).tolist()
    short = prompt[:8]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "m.safetensors")
        save_model(ckpt, model, tokenizer=Tokenizer.from_file(tok_file).model_bytes)  # GGUF export needs a vocabulary
        write_hf(os.path.join(tmp, "hf"), read_source(ckpt), None)
        for name in args.schemes.split(","):
            dname, qflags, hf_dtype, gguf = SCHEMES[name]
            path = ckpt
            if qflags:
                path = os.path.join(tmp, f"{name}.safetensors")
                llamactl_cli("quantize", "-m", ckpt, "-o", path, *qflags)
            # as `llamactl generate` loads it: fused, packed (or quantized) projections
            ours, _ = load_for_inference(path, torch.device("cpu"), dname, "lm", "to bench", False, decode=True)
            # bytes a decode step reads: every weight but the embedding table (one row), as loaded
            size = 4 if dname == "fp32" else 2
            weight_bytes = sum(
                t.numel() * (size if t.is_floating_point() and not k.endswith(".scales") else t.element_size())
                for k, t in load_tensors(path).items()
                if k != "tok_embeddings.weight"
            )

            def ours_gen(p, n, ours=ours, b=1):
                return lambda: generate(ours, [p] * b, SamplingParams(max_new_tokens=n, temperature=0), eos_id=None)

            impls = {"llamactl": ours_gen}
            if args.compile:
                # the same checkpoint with the compiled step (--compile always); its compiles happen in the warm-up
                oursc, _ = load_for_inference(path, torch.device("cpu"), dname, "lm", "to bench", False, decode=True)
                compiled.enable(oursc, "always", 0)

                def compiled_gen(p, n, ours=oursc, b=1):
                    return lambda: generate(ours, [p] * b, SamplingParams(max_new_tokens=n, temperature=0), None)

                impls["llamactl compiled"] = compiled_gen
            hf = None
            if hf_dtype is not None:
                hf = LlamaForCausalLM.from_pretrained(os.path.join(tmp, "hf"), dtype=hf_dtype).eval()

                def hf_gen(p, n, hf=hf, b=1):
                    ids = torch.tensor([p] * b)
                    return lambda: hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

                impls["transformers"] = hf_gen
            if before is not None and not qflags:

                def before_gen(p, n, ours=ours, b=1):
                    params = before.SamplingParams(max_new_tokens=n, temperature=0)
                    return lambda: before.generate(ours, [p] * b, params, eos_id=None)

                impls[f"llamactl@{args.baseline}"] = before_gen
            best = {(i, what): float("inf") for i in impls for what in ("prefill", "one", "many")}
            with torch.inference_mode():
                # Rounds alternate the sides so that a slow spell of this shared machine hits them alike.
                for _ in range(args.repeats):
                    for impl, gen in impls.items():
                        for what, fn in (
                            ("prefill", gen(prompt, 1)),
                            ("one", gen(short, 1)),
                            ("many", gen(short, args.new_tokens + 1)),
                        ):
                            best[impl, what] = min(best[impl, what], best_of(fn, 1))
            for impl in impls:
                decode = args.new_tokens / (best[impl, "many"] - best[impl, "one"])
                prefill = args.prompt_len / best[impl, "prefill"]
                rows.append(dict(impl=impl, scheme=name, batch=1, prefill_tok_s=prefill, decode_tok_s=decode,
                                 bw_fraction=weight_bytes * decode / bw, device=device))  # fmt: skip
            if gguf and llamacpp_decode is not None:
                g = os.path.join(tmp, f"m-{gguf}.gguf")
                llamactl_cli("convert", ckpt, "--to", "gguf", "--gguf-type", gguf, "-o", g)
                runs = [llamacpp_decode(g, short, args.new_tokens + 1) for _ in range(args.repeats)]
                mine = generate(ours, [short], SamplingParams(max_new_tokens=args.new_tokens + 1, temperature=0), None)
                same = sum(a == b for a, b in zip(mine[0].tokens, runs[0]["tokens"], strict=True))
                pre = [llamacpp_decode(g, prompt, 2) for _ in range(args.repeats)]
                decode = max(r["tok_per_s"] for r in runs)
                rows.append(dict(impl=f"llama.cpp {gguf.upper()}", scheme=name, batch=1,
                                 prefill_tok_s=args.prompt_len / min(r["prefill_s"] for r in pre), decode_tok_s=decode,
                                 bw_fraction=weight_bytes * decode / bw, device=device,
                                 same_tokens=f"{same}/{args.new_tokens + 1}"))  # fmt: skip
            for b in [int(x) for x in args.batches.split(",") if x] if hf is not None else []:
                for impl in ("llamactl", "transformers"):
                    gen = impls[impl]
                    with torch.inference_mode():
                        one = min(best_of(gen(short, 1, b=b), 1) for _ in range(2))
                        many = min(best_of(gen(short, args.new_tokens + 1, b=b), 1) for _ in range(2))
                    batched.append(dict(impl=impl, scheme=name, batch=b, prefill_tok_s=0.0,
                                        decode_tok_s=b * args.new_tokens / (many - one), bw_fraction=0.0,
                                        device=device))  # fmt: skip
            del ours, hf
    print("\n| impl | weights | prefill tok/s | decode tok/s | decode / read-bandwidth limit | greedy tokens as ours |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['impl']} | {r['scheme']} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | "
              f"{r['bw_fraction']:.0%} | {r.get('same_tokens', '')} |")  # fmt: skip
    for name in args.schemes.split(","):
        ours_row = next(r for r in rows if r["impl"] == "llamactl" and r["scheme"] == name)
        for r in rows:
            if r["scheme"] == name and r["impl"] != "llamactl":
                print(f"{name}: decode {ours_row['decode_tok_s'] / r['decode_tok_s']:.2f}x {r['impl']}, "
                      f"prefill {ours_row['prefill_tok_s'] / r['prefill_tok_s']:.2f}x")  # fmt: skip
    if batched:
        print("\n| weights | batch | llamactl decode tok/s | transformers decode tok/s | ratio |")
        print("|---|---|---|---|---|")
        for r in batched[::2]:
            h = next(x for x in batched if x["impl"] == "transformers" and x["scheme"] == r["scheme"]
                     and x["batch"] == r["batch"])  # fmt: skip
            print(f"| {r['scheme']} | {r['batch']} | {r['decode_tok_s']:.0f} | {h['decode_tok_s']:.0f} | "
                  f"{r['decode_tok_s'] / h['decode_tok_s']:.2f}x |")  # fmt: skip
    write_csv([{**r, "same_tokens": r.get("same_tokens", "")} for r in rows + batched], args.csv)


if __name__ == "__main__":
    main()
