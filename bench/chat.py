"""Chat latency: time to first token at turn 1 and turn 10 of a dialog, with the history's KV cache reused (what
`llamactl chat` does) against recomputed from the whole history every turn; and decode tokens/s in chat against
`generate`'s engine call on the same prompt.

    python -P bench/chat.py [--preset llama2-60m] [--turns 10] [--answer-tokens 32] [--dtype bf16]

Same random model with Llama 2's tokenizer, greedy answers of a fixed length (no EOS), the same user messages.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from contextlib import redirect_stdout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "tests", "fixtures", "llama2-tokenizer.model")
QUESTIONS = [f"Tell me one more thing about the number {i}, in a full sentence please." for i in range(100)]


def first_token_seconds(session, user: str) -> tuple[float, list[int], object]:
    """Seconds from the user's message to the first answer token: prefill of the turn's new tokens (or of the whole
    history when recomputing) and one sampling step, as `Session.answer` runs them."""
    from llamactl.generate import prefill, sample

    t = time.perf_counter()
    new = session.fit_turn(user)
    logits = prefill(session.chat.model, session.cache, [new])
    sample(logits, 0.0)
    return time.perf_counter() - t, new, logits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama2-60m")
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--answer-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="bf16")
    args = ap.parse_args()

    import torch

    from llamactl.chat_format import encode_prompt
    from llamactl.checkpoint import save_model
    from llamactl.commands.chat import ChatConfig, Session
    from llamactl.generate import SamplingParams, generate
    from llamactl.model import Transformer, preset
    from llamactl.tokenizer import Tokenizer

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.safetensors")
        model = Transformer(preset(args.preset, vocab_size=32000, max_seq_len=2048))
        model.init_weights(0)
        save_model(path, model, tokenizer=Tokenizer.from_file(TOKENIZER).model_bytes)
        cfg = ChatConfig(model=path, temperature=0, max_new_tokens=args.answer_tokens, dtype=args.dtype)
        results = {}
        for mode in ("reused", "recomputed"):
            s = Session(cfg)
            s.chat.params.min_new_tokens = args.answer_tokens  # fixed-length answers: the same work every turn
            times = []
            for turn in range(args.turns):
                if mode == "recomputed":
                    s.rebuild()  # the history prefilled again from its text, as a chat without a kept cache does
                    before = len(s.fed)
                    s.reset()
                    t = time.perf_counter()
                    s.rebuild()
                    rebuild = time.perf_counter() - t
                    assert len(s.fed) == before
                else:
                    rebuild = 0.0
                dt, _, _ = first_token_seconds(s, QUESTIONS[turn])
                times.append(dt + rebuild)
                s.cache.truncate(len(s.fed))  # drop the probe: Session.answer redoes the prefill it timed
                with redirect_stdout(io.StringIO()):
                    s.answer(QUESTIONS[turn])
            results[mode] = times
        # decode speed: chat's stream against generate's engine call, same prompt, same answer length
        n = 128
        cfg_long = ChatConfig(model=path, temperature=0, max_new_tokens=n + 1, dtype=args.dtype)
        chat_rates, gen_rates = [], []
        for _ in range(3):
            c = Session(cfg_long)
            c.chat.params.min_new_tokens = n + 1
            t = time.perf_counter()
            with redirect_stdout(io.StringIO()):
                c.answer(QUESTIONS[1])
            chat_rates.append(n / (time.perf_counter() - t))
            prompt = encode_prompt(c.chat.tokenizer, [{"role": "user", "content": QUESTIONS[1]}])
            t = time.perf_counter()
            params = SamplingParams(max_new_tokens=n + 1, temperature=0, min_new_tokens=n + 1)
            generate(c.chat.model, [prompt], params, eos_id=c.chat.tokenizer.eos_id)
            gen_rates.append(n / (time.perf_counter() - t))
    print(f"# {args.preset}, {args.dtype}, answers of {args.answer_tokens} tokens, {torch.get_num_threads()} threads")
    print(f"| history | turn 1 TTFT ms | turn {args.turns} TTFT ms |")
    print("|---|---|---|")
    for mode, times in results.items():
        print(f"| {mode} | {times[0] * 1e3:.0f} | {times[-1] * 1e3:.0f} |")
    print(f"decode tok/s (median of 3, {n} tokens incl. prefill): chat {statistics.median(chat_rates):.1f}, "
          f"generate {statistics.median(gen_rates):.1f}")  # fmt: skip
    sys.stdout.flush()


if __name__ == "__main__":
    main()
