"""The compiled decode step against the eager one: step time, and what the compile costs a process, cold (empty
Inductor caches) and warm (a second process on the same caches). What ``llamactl.compiled.AUTO_MIN_TOKENS`` weighs.

    python -P bench/compile_step.py [--cases llama2-60m:fp32:1,llama2-60m:bf16:1,llama2-60m:fp32:8]

Each case (preset:dtype:batch, random weights, loaded in the CPU decode form as ``generate`` loads it) runs in two
fresh processes sharing a new cache directory: the first compile is the cold one, the second the warm one. A step
is one token per row at position 256 of a 512-slot cache (the compiled step attends the whole cache under a mask,
the eager one the filled part). The break-even is the compile (warm) over the time a token saves.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import best_of, write_csv  # noqa: E402


def one(preset_name: str, dtype: str, batch: int, repeats: int) -> dict:
    import torch

    from llamactl import compiled
    from llamactl.generate import decode_one_token, prefill
    from llamactl.loading import build_model
    from llamactl.model import KVCache, Transformer, preset

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    torch.manual_seed(0)
    with torch.device("meta"):
        base = Transformer(preset(preset_name))
    base.to_empty(device="cpu")
    base.init_weights(0)
    state = {k: v.to(dt) for k, v in base.state_dict().items()}
    model = build_model(base.args, state, "bench", "cpu", dt, decode=True).eval()
    cache = KVCache(base.args, batch, 512, "cpu", dt)
    prefill(model, cache, [list(range(3, 259))] * batch)
    tok, pos = torch.full((batch,), 5), torch.full((batch,), 256)
    with torch.inference_mode():
        eager = min(best_of(lambda: decode_one_token(model, tok, pos, cache), 1) for _ in range(repeats))
        compiled.enable(model, "always", 0)
        t = time.perf_counter()
        decode_one_token(model, tok, pos, cache)
        first = time.perf_counter() - t
        step = min(best_of(lambda: decode_one_token(model, tok, pos, cache), 1) for _ in range(repeats))
    return dict(eager_ms=eager * 1e3, compiled_ms=step * 1e3, compile_s=first, ok=compiled.compiled(model))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="llama2-60m:fp32:1,llama2-60m:bf16:1,llama2-60m:fp32:8")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--csv", default="bench/results/compile_step.csv")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        name, dtype, batch = args.one.split(":")
        print(json.dumps(one(name, dtype, int(batch), args.repeats)))
        return
    import torch
    from generate import cpu_name

    print(f"# {cpu_name()} x{torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| case | eager ms | compiled ms | speed-up | compile cold s | compile warm s | break-even tokens |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for case in args.cases.split(","):
        runs = []
        with tempfile.TemporaryDirectory() as cache_dir:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir}
            for _ in ("cold", "warm"):
                cmd = [sys.executable, "-P", os.path.abspath(__file__), "--one", case, "--repeats", str(args.repeats)]
                p = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if p.returncode:
                    raise SystemExit(p.stderr[-3000:])
                runs.append(json.loads(p.stdout.strip().splitlines()[-1]))
        cold, warm = runs
        saved = (warm["eager_ms"] - warm["compiled_ms"]) / 1e3
        even = f"{warm['compile_s'] / saved:,.0f}" if saved > 0 else "never"
        rows.append(dict(case=case, eager_ms=warm["eager_ms"], compiled_ms=warm["compiled_ms"],
                         compile_cold_s=cold["compile_s"], compile_warm_s=warm["compile_s"], break_even=even,
                         compiled=warm["ok"]))  # fmt: skip
        r = rows[-1]
        print(f"| {case} | {r['eager_ms']:.2f} | {r['compiled_ms']:.2f} | {r['eager_ms'] / r['compiled_ms']:.2f}x | "
              f"{r['compile_cold_s']:.1f} | {r['compile_warm_s']:.1f} | {even} |", flush=True)  # fmt: skip
    write_csv(rows, args.csv)


if __name__ == "__main__":
    main()
