"""Peak memory of `llamactl convert` on a synthetic multi-shard Meta checkpoint.

    python bench/convert_memory.py [--dim 2048] [--layers 8] [--shards 2]

Writes a random Meta-layout checkpoint (params.json + consolidated.NN.pth), converts it in a subprocess and samples
that process's /proc status every 5 ms: RssAnon is memory the converter allocated itself, VmRSS also counts the
pages of the memory-mapped inputs it has touched (file-backed, reclaimable).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch


def write_meta(directory: str, dim: int, layers: int, shards: int, vocab: int = 32000) -> int:
    hidden = int(2 * 4 * dim / 3 + 255) // 256 * 256
    params = dict(dim=dim, n_layers=layers, n_heads=dim // 128, multiple_of=256, norm_eps=1e-5, vocab_size=-1)
    with open(os.path.join(directory, "params.json"), "w") as f:
        json.dump(params, f)
    total = 0
    for s in range(shards):
        g = torch.Generator().manual_seed(s)
        shard = {
            "tok_embeddings.weight": torch.randn(vocab, dim // shards, generator=g),
            "norm.weight": torch.ones(dim),
            "output.weight": torch.randn(vocab // shards, dim, generator=g),
        }
        for i in range(layers):
            p = f"layers.{i}."
            for name, shape in (
                ("attention.wq", (dim // shards, dim)),
                ("attention.wk", (dim // shards, dim)),
                ("attention.wv", (dim // shards, dim)),
                ("attention.wo", (dim, dim // shards)),
                ("feed_forward.w1", (hidden // shards, dim)),
                ("feed_forward.w2", (dim, hidden // shards)),
                ("feed_forward.w3", (hidden // shards, dim)),
            ):
                shard[p + name + ".weight"] = torch.randn(*shape, generator=g)
            shard[p + "attention_norm.weight"] = torch.ones(dim)
            shard[p + "ffn_norm.weight"] = torch.ones(dim)
        torch.save(shard, os.path.join(directory, f"consolidated.{s:02d}.pth"))
        total += sum(t.numel() * 4 for t in shard.values())
        del shard
    return total


def peak_of(cmd: list[str]) -> tuple[int, int, float]:
    """(peak RssAnon, peak VmRSS) in bytes and wall seconds of a command."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd)
    anon = rss = 0
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        anon = max(anon, int(line.split()[1]) * 1024)
                    elif line.startswith("VmRSS:"):
                        rss = max(rss, int(line.split()[1]) * 1024)
        except FileNotFoundError:
            break
        time.sleep(0.005)
    if proc.wait() != 0:
        sys.exit(f"convert failed with exit code {proc.returncode}")
    return anon, rss, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--shards", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "meta")
        os.makedirs(src)
        total = write_meta(src, args.dim, args.layers, args.shards)
        largest = max(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src) if f.endswith(".pth"))
        base_anon, _, _ = peak_of([sys.executable, "-c", "import torch, llamactl.convert"])
        out = os.path.join(tmp, "out.safetensors")
        anon, rss, secs = peak_of([sys.executable, "-m", "llamactl.cli", "convert", src, "-o", out])
    mb = 1e6
    print(
        f"checkpoint {total / mb:.0f} MB in {args.shards} shards (largest {largest / mb:.0f} MB), "
        f"converted in {secs:.1f} s"
    )
    print(
        f"peak anonymous memory {anon / mb:.0f} MB ({(anon - base_anon) / mb:.0f} MB above the "
        f"{base_anon / mb:.0f} MB of an idle python with torch); peak RSS incl. mapped input pages {rss / mb:.0f} MB"
    )


if __name__ == "__main__":
    main()
