"""What a decode step's matrix-vector products cost on this CPU per weight shape and dtype, in each form the loader
can give a weight: torch's plain ``F.linear`` on the (memory-mapped) weight as stored, and oneDNN's packed copy
(``swap.PackedLinear``), with the time the packing takes at load. This is the measurement behind the loader's rule
of what to transform (``swap.cpu_packing``). Where oneDNN cannot pack a dtype on this CPU, its row says so.

    python -P bench/decode_linears.py [--shapes 60m,1b] [--rows 1,8] [--repeats 50]

Prints a markdown table and writes CSV rows to --csv.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

from llamactl.model import preset
from llamactl.swap import PackedLinear

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import best_of, write_csv  # noqa: E402


def shapes(name: str) -> list[tuple[str, int, int]]:
    """(what, out, in) of one block's projections, fused as the decode loader fuses them, and the output head."""
    a = preset({"60m": "llama2-60m", "1b": "llama2-1b", "7b": "llama2-7b"}[name])
    kv = a.n_kv_heads * a.head_dim
    return [
        (f"{name} wqkv", a.dim + 2 * kv, a.dim),
        (f"{name} wo", a.dim, a.dim),
        (f"{name} w13", 2 * a.hidden_dim, a.dim),
        (f"{name} w2", a.dim, a.hidden_dim),
        (f"{name} head", a.vocab_size, a.dim),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="60m,1b")
    ap.add_argument("--rows", default="1,8")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--csv", default="bench/results/decode_linears.csv")
    args = ap.parse_args()
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    rows = []
    print("| weight | dtype | rows | MB | F.linear us | GB/s | packed us | GB/s | packing ms | packed / plain |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with torch.inference_mode():
        for name in args.shapes.split(","):
            for what, n, k in shapes(name):
                for dn in args.dtypes.split(","):
                    dt = dtypes[dn]
                    w = (torch.randn(n, k) * 0.02).to(dt)
                    mb = w.numel() * w.element_size() / 1e6
                    # as in a decode step, each call reads its weight from memory, not from a cache: the calls cycle
                    # through copies that together pass the last-level cache many times over
                    copies = max(1, int(512 / mb))
                    ws = [w.clone() for _ in range(copies)]
                    t0 = time.perf_counter()
                    try:
                        packs = [PackedLinear.of(c.clone()) for c in ws]
                    except RuntimeError as e:  # e.g. bf16 on a CPU without AVX-512: oneDNN refuses
                        print(f"| {what} ({n}x{k}) | {dn} | | {mb:.1f} | oneDNN cannot pack: {str(e)[:80]} |")
                        continue
                    pack_s = (time.perf_counter() - t0) / copies
                    for m in map(int, args.rows.split(",")):
                        x = torch.randn(m, k).to(dt)

                        def plain_all(x=x, ws=ws):
                            for c in ws:
                                F.linear(x, c)

                        def packed_all(x=x, packs=packs):
                            for p in packs:
                                p(x)

                        plain = best_of(plain_all, args.repeats) / copies
                        pk = best_of(packed_all, args.repeats) / copies
                        rows.append(dict(weight=what, dtype=dn, rows=m, mb=round(mb, 2), plain_us=plain * 1e6,
                                         plain_gb_s=mb / 1e3 / plain, packed_us=pk * 1e6, packed_gb_s=mb / 1e3 / pk,
                                         packing_ms=pack_s * 1e3, ratio=pk / plain))  # fmt: skip
                        r = rows[-1]
                        print(f"| {what} ({n}x{k}) | {dn} | {m} | {mb:.1f} | {r['plain_us']:.0f} | "
                              f"{r['plain_gb_s']:.1f} | {r['packed_us']:.0f} | {r['packed_gb_s']:.1f} | "
                              f"{r['packing_ms']:.1f} | {r['ratio']:.2f} |", flush=True)  # fmt: skip
    write_csv(rows, args.csv)


if __name__ == "__main__":
    main()
