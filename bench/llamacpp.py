"""llama.cpp's batch-1 greedy decode on a GGUF file (through llama-cpp-python), to set beside llamactl's engine on
the same weights (``llamactl convert MODEL.safetensors --to gguf -o MODEL.gguf``).

    python -P bench/llamacpp.py MODEL.gguf [--prompt-len 128] [--new-tokens 64] [--threads 2] [--repeats 3]

Prints a markdown table and writes a CSV row to --csv. Other benchmarks import ``llamacpp_decode`` (by path, as
they import benchlib): one prefill of the prompt, then greedy decoding by exact argmax over llama.cpp's logits,
with loading and prefill timed apart from the decode.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np


def llamacpp_decode(gguf_path: str, prompt_ids: list[int], new_tokens: int, threads: int = 2) -> dict:
    """Greedy continuation of ``prompt_ids`` by llama.cpp: ``new_tokens`` tokens, the first from the prefill's
    logits, each of the others from one decode step.

    Returns ``tokens``; ``prefill_s`` (the prompt in one batch, and the first argmax); ``decode_s`` (the
    ``new_tokens - 1`` steps after it, each one token through the model and an argmax); ``tok_per_s``, steps per
    second of decode (the figure bench/generate.py reports as decode tok/s). Loading the file is not timed.
    """
    import llama_cpp

    assert prompt_ids and new_tokens >= 2, "a prompt, and at least 2 new tokens (1 from prefill, 1 decoded)"
    n_ctx = len(prompt_ids) + new_tokens
    llm = llama_cpp.Llama(
        model_path=gguf_path,
        n_ctx=n_ctx,
        n_batch=n_ctx,  # the whole prompt in one batch
        n_ubatch=n_ctx,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    try:
        n_vocab = llm.n_vocab()

        def next_token() -> int:
            # the last evaluated position's logits, read in place (Llama.scores is only filled with logits_all)
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
            return int(np.argmax(logits))

        t0 = time.perf_counter()
        llm.eval(prompt_ids)
        tokens = [next_token()]
        t1 = time.perf_counter()
        for _ in range(new_tokens - 1):
            llm.eval([tokens[-1]])
            tokens.append(next_token())
        t2 = time.perf_counter()
    finally:
        llm.close()
    return {"tokens": tokens, "decode_s": t2 - t1, "tok_per_s": (new_tokens - 1) / (t2 - t1), "prefill_s": t1 - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a GGUF file")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="runs; the best decode and prefill are reported")
    ap.add_argument("--csv", default="bench/results/llamacpp.csv")
    args = ap.parse_args()

    import llama_cpp

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from benchlib import write_csv

    vocab = llama_cpp.Llama(model_path=args.model, vocab_only=True, verbose=False)
    n_vocab, bos = vocab.n_vocab(), vocab.token_bos()
    vocab.close()
    rng = np.random.default_rng(0)
    prompt = [bos] + rng.integers(3, n_vocab, args.prompt_len - 1).tolist()  # ids past UNK/BOS/EOS
    runs = [llamacpp_decode(args.model, prompt, args.new_tokens, args.threads) for _ in range(args.repeats)]
    assert all(r["tokens"] == runs[0]["tokens"] for r in runs), "greedy decoding differed between runs"
    row = {
        "impl": f"llama.cpp (llama-cpp-python {llama_cpp.__version__})",
        "model": os.path.basename(args.model),
        "threads": args.threads,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "prefill_tok_s": args.prompt_len / min(r["prefill_s"] for r in runs),
        "decode_tok_s": max(r["tok_per_s"] for r in runs),
    }
    print("| impl | model | threads | prefill tok/s | decode tok/s |")
    print("|---|---|---|---|---|")
    print(
        f"| {row['impl']} | {row['model']} | {row['threads']} | {row['prefill_tok_s']:.0f} | "
        f"{row['decode_tok_s']:.1f} |"
    )
    write_csv([row], args.csv)


if __name__ == "__main__":
    main()
