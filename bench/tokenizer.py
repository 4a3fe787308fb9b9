"""Encode throughput of ``llamactl tokenize encode`` against a plain single-process sentencepiece loop, same text.

    python bench/tokenizer.py [--tokenizer tests/fixtures/llama2-tokenizer.model] [--repeat 16] [--workers 1,2]

The text is tiny Shakespeare repeated ``--repeat`` times; its paragraphs are the documents. The baseline is
``[sp.encode(p) for p in paragraphs]`` on text already in memory, timed alone; llamactl is timed end to end
(read the file, encode, write shards or JSONL, workers started included). The cases run interleaved for
``--rounds`` rounds and the fastest of each counts; CPU seconds (this process and its workers) show the work
done, which wall time on a busy machine does not. Prints a markdown table and writes CSV rows to --csv.
"""

import argparse
import contextlib
import io
import os
import platform
import resource
import sys
import tempfile
import time

import sentencepiece as spm

from llamactl.commands.tokenize import EncodeConfig, run_encode, split_documents

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import write_csv  # noqa: E402


def measure(fn) -> tuple[float, float]:
    """Wall seconds and CPU seconds (this process and the worker processes it waited for) of one call."""
    before = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    t = time.perf_counter()
    fn()
    wall = time.perf_counter() - t
    after = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    cpu = sum(a.ru_utime + a.ru_stime - b.ru_utime - b.ru_stime for a, b in zip(after, before, strict=True))
    return wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", default="tests/fixtures/llama2-tokenizer.model")
    ap.add_argument("--text", default="examples/tinyshakespeare.txt")
    ap.add_argument("--repeat", type=int, default=16, help="Copies of the text (16: 18 MB).")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--outputs", default="shards,jsonl")
    ap.add_argument("--rounds", type=int, default=3, help="Rounds over all cases, interleaved; the best counts.")
    ap.add_argument("--csv", default="bench/results/tokenize.csv")
    args = ap.parse_args()

    with open(args.text, encoding="utf-8") as f:
        text = f.read().rstrip("\n")
    corpus = "\n\n".join([text] * args.repeat) + "\n"
    docs = split_documents(corpus, "paragraph")
    sp = spm.SentencePieceProcessor(model_file=args.tokenizer)
    n_bytes = len(corpus.encode("utf-8"))
    n_tokens = sum(len(ids) for ids in sp.encode(docs))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    device = f"{platform.processor() or platform.machine()}, {cpus} CPUs"
    print(
        f"# {n_bytes / 1e6:.1f} MB, {len(docs):,} documents, {n_tokens:,} tokens; tokenizer {args.tokenizer} "
        f"({sp.vocab_size()}); {device}; load average {os.getloadavg()[0]:.2f} before the run"
    )

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "corpus.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write(corpus)

        def ours(workers: int, output: str):
            where = {"out": os.path.join(tmp, "shards")} if output == "shards" else {"output": os.path.join(tmp, "o")}
            cfg = EncodeConfig(tokenizer=args.tokenizer, inputs=[path], workers=workers, **where)

            def encode():
                with contextlib.redirect_stderr(io.StringIO()):
                    run_encode(cfg)

            return encode

        cases = {("sentencepiece loop", "-", 1): lambda: [sp.encode(d) for d in docs]}
        for workers in map(int, args.workers.split(",")):
            for output in args.outputs.split(","):
                cases[("llamactl encode", output, workers)] = ours(workers, output)
        best: dict[tuple, tuple[float, float]] = {}
        for _ in range(args.rounds):
            for key, fn in cases.items():
                wall, cpu = measure(fn)
                if key not in best or wall < best[key][0]:
                    best[key] = (wall, cpu)

    base = best[("sentencepiece loop", "-", 1)][0]
    rows = [
        dict(
            impl=impl,
            output=output,
            workers=workers,
            seconds=wall,
            cpu_seconds=cpu,
            mb_s=n_bytes / 1e6 / wall,
            tokens_s=n_tokens / wall,
            vs_loop=base / wall,
            device=device,
        )
        for (impl, output, workers), (wall, cpu) in best.items()
    ]
    print("\n| impl | output | workers | seconds | CPU seconds | MB/s | tokens/s | vs loop |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['impl']} | {r['output']} | {r['workers']} | {r['seconds']:.2f} | {r['cpu_seconds']:.2f} | "
            f"{r['mb_s']:.2f} | {r['tokens_s']:,.0f} | {r['vs_loop']:.2f}x |"
        )
    write_csv(rows, args.csv)


if __name__ == "__main__":
    main()
