"""Process start to first token: ``llamactl generate`` against llama.cpp (llama-cpp-python) on the same weights.

    python -P bench/first_token.py [--preset llama2-1b] [--dtype bf16] [--repeats 3] [--dir DIR] [--cold]

Each run is a fresh process that imports its library, loads the checkpoint, prefills an 8-token prompt and samples
one token (greedy), timed from outside (``time.perf_counter`` around the whole process). llamactl reads the
safetensors file it writes; llama.cpp the GGUF that ``llamactl convert --to gguf`` makes of it (BF16 for bf16, F32
for fp32). ``llamactl generate`` runs with ``--dtype auto`` (the stored dtype where the CPU runs it natively, else
fp32) and with the stored dtype forced. Warm: the best of ``--repeats`` after one untimed run (the files in the page
cache). With ``--cold`` (root only), the page cache is dropped before each run. Also timed: a process that only
imports torch, the floor of any torch program. ``--dir`` keeps the checkpoints between runs (made once: a 1.1B
model takes a minute).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import write_csv  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = [1, 450, 4996, 17354, 1701, 432, 17204, 975]  # 8 ids of Llama 2's vocabulary

LLAMACPP = """
import sys, time
t0 = time.perf_counter()
import numpy as np, llama_cpp
t1 = time.perf_counter()
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, n_threads=int(sys.argv[2]), verbose=False)
t2 = time.perf_counter()
llm.eval([int(t) for t in sys.argv[3].split(",")])
logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
print(int(np.argmax(logits)), f"import {t1 - t0:.2f} load {t2 - t1:.2f} first {time.perf_counter() - t2:.2f}")
"""


def make(preset: str, dtype: str, where: str) -> tuple[str, str]:
    """The checkpoint (random weights, Llama 2's tokenizer) and its GGUF, made once in ``where``."""
    os.makedirs(where, exist_ok=True)
    ckpt, gguf = os.path.join(where, f"{preset}-{dtype}.safetensors"), os.path.join(where, f"{preset}-{dtype}.gguf")
    if not os.path.exists(ckpt):
        import torch

        from llamactl.checkpoint import save_model
        from llamactl.model import Transformer
        from llamactl.model import preset as make_args
        from llamactl.tokenizer import Tokenizer

        with torch.device("meta"):
            model = Transformer(make_args(preset))
        model.to_empty(device="cpu")
        model.init_weights(0)
        model.reset_rope()
        tok = Tokenizer.from_file(os.path.join(ROOT, "tests", "fixtures", "llama2-tokenizer.model")).model_bytes
        save_model(ckpt, model, tokenizer=tok, dtype={"bf16": torch.bfloat16, "fp32": torch.float32}[dtype])
    if not os.path.exists(gguf):
        cli = os.path.join(os.path.dirname(sys.executable), "llamactl")
        subprocess.run([cli, "convert", ckpt, "--to", "gguf", "--gguf-type", dtype, "-o", gguf], check=True)
    return ckpt, gguf


def timed(cmd: list[str], stdin: str | None, cold: bool) -> tuple[float, str, str]:
    if cold:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    t = time.perf_counter()
    p = subprocess.run(cmd, input=stdin, capture_output=True, text=True)
    took = time.perf_counter() - t
    if p.returncode:
        raise SystemExit(f"{cmd[:3]} failed:\n{p.stderr[-2000:]}")
    return took, p.stdout, p.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama2-1b")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--dir", default="bench/results/models")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each run (root)")
    ap.add_argument("--csv", default="bench/results/first_token.csv")
    args = ap.parse_args()
    ckpt, gguf = make(args.preset, args.dtype, args.dir)
    env_py = sys.executable
    cli = os.path.join(os.path.dirname(env_py), "llamactl")
    record = json.dumps({"tokens": PROMPT}) + "\n"
    ours = [
        cli,
        "generate",
        "-m",
        ckpt,
        "--max-new-tokens",
        "1",
        "--temperature",
        "0",
        "--timings",
        "--compile",
        "never",
    ]
    sides = {
        "import torch (the floor)": ([env_py, "-P", "-c", "import torch"], None),
        "llamactl generate": (ours, record),
        "llamactl generate --dtype bf16": ([*ours, "--dtype", "bf16"], record),
        "llama.cpp (llama-cpp-python)": (
            [env_py, "-P", "-c", LLAMACPP, gguf, str(args.threads), ",".join(map(str, PROMPT))],
            None,
        ),  # fmt: skip
    }
    rows = []
    for mode in ["warm"] + (["cold"] if args.cold else []):
        for name, (cmd, stdin) in sides.items():
            if mode == "warm":
                timed(cmd, stdin, False)  # the files into the page cache
            runs = [timed(cmd, stdin, mode == "cold") for _ in range(args.repeats)]
            best = min(runs, key=lambda r: r[0])
            detail = ""
            if "timings:" in best[2]:
                detail = re.search(r"load [0-9.]+ s", best[2]).group(0)
            elif name.startswith("llama.cpp"):
                detail = best[1].split(" ", 1)[1].strip()
            rows.append(dict(side=name, mode=mode, seconds=round(best[0], 3), detail=detail, preset=args.preset,
                             dtype=args.dtype))  # fmt: skip
    base = {r["mode"]: r["seconds"] for r in rows if r["side"].startswith("llama.cpp")}
    print(f"| {args.preset} {args.dtype} | cache | start to first token, s | vs llama.cpp | detail |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['side']} | {r['mode']} | {r['seconds']:.2f} | {r['seconds'] / base[r['mode']]:.2f}x | "
              f"{r['detail']} |")  # fmt: skip
    write_csv(rows, args.csv)


if __name__ == "__main__":
    main()
