"""Does Ghost Attention keep a system instruction alive over turns? Baseline against GAtt on a small chat model.

    python -P bench/gatt_effect.py --data HH.jsonl.gz [-m MODEL] [--steps 80] [--seeds 0 1] [--out DIR]

Three instructions, each with a detector, one drawn per dialog, so a model must read the system prompt to know
which applies: "Answer in capital letters." (no lowercase letter), "Answer in lowercase letters." (no capital
letter), "Begin every answer with 'Verily'." (its first word is Verily); a case detector needs at least 3 letters.

Data: Anthropic HH harmless-base test dialogs (``--data``, field ``chosen``: the whole public test split, of which
examples/hh-harmless-chosen.jsonl is a 600-dialog part; examples/ holds too few dialogs of 4+ exchanges), every
message cut to 60 characters at a word boundary so that 4 turns fit the demo model's 256-token context. Held out:
120 dialogs of at least 4 exchanges that are not in examples/ (the start model was fine-tuned on those), 40 per
instruction. From the rest, 600 "instructed" dialogs of 1 to 4 exchanges (a quarter of each length) and 600 plain
dialogs (no instruction, loss on every answer).

Both models start from the same chat model (by default the one `make demo` makes) and get the same `llamactl sft`
run (same steps, learning rate, seed) on the plain dialogs plus 600 instruction-following examples:

- GAtt: the instructed dialogs through `llamactl gatt-augment` (the instruction attached to every user turn, drawn
  from the three by its seed), answered by a sampler that follows it -- here a program that rewrites the dialog's
  own reference answers (upper-cased, lower-cased, or "Verily, " in front), standing in for a model that obeys --
  then `gatt-augment --finalize` (instruction once, as the system message; earlier turns ``"loss": false``);
- baseline: the same examples cut to their last exchange: the same system prompt and the same trained answer, but
  seen one turn after the instruction, never after a history.

Evaluation, greedy (`llamactl chat --batch --temperature 0`, 16 new tokens), the share of answers at turn 1..4 that
follow the dialog's instruction, with the instruction as system prompt and as history before turn N:

- reference: the held-out dialog's own earlier answers, which do not follow the instruction (only the system
  prompt carries it);
- own: the model's own earlier answers, turn by turn (the paper's setting);
- control: reference history, no system prompt: how often the detector fires anyway.

The start model is evaluated too. First table: a row per model, seed and history; a cell is the share of answers
that follow their dialog's instruction and, in parentheses, the share that follow one of the other two instead (a
model that learnt "there is an instruction" but not which). Second table: a row per detector; a cell is its share
among the dialogs asked for it / among the dialogs asked for another instruction. Data, answers (``eval-*.jsonl``),
runs and results.json are kept in ``--out`` (a fresh temporary directory by default); an sft run already there is
reused.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TURNS, CHARS, NEW_TOKENS = 4, 60, 16
N_EVAL, N_INSTRUCTED, N_PLAIN = 120, 600, 600


def letters(text: str) -> list[str]:
    return [c for c in text if c.isalpha()]


# instruction -> (the stand-in sampler's rewrite of a reference answer, the detector)
INSTRUCTIONS: dict[str, tuple[Callable[[str], str], Callable[[str], bool]]] = {
    "Answer in capital letters.": (
        str.upper,
        lambda a: len(letters(a)) >= 3 and not any(c.islower() for c in letters(a)),
    ),
    "Answer in lowercase letters.": (
        str.lower,
        lambda a: len(letters(a)) >= 3 and not any(c.isupper() for c in letters(a)),
    ),
    "Begin every answer with 'Verily'.": (
        lambda a: f"Verily, {a}",
        lambda a: re.match(r"\W*verily\b", a, re.IGNORECASE) is not None,
    ),
}


def parse_hh(text: str) -> list[dict] | None:
    """An HH transcript as alternating user/assistant messages, each cut to CHARS; None if it does not alternate."""
    parts = re.split(r"\n\n(Human|Assistant): ", text)
    msgs = [
        {"role": "user" if r == "Human" else "assistant", "content": cut(c.strip())}
        for r, c in zip(parts[1::2], parts[2::2], strict=True)
    ]
    msgs = msgs[: len(msgs) // 2 * 2]
    ok = msgs and all(m["role"] == ("user", "assistant")[i % 2] and m["content"] for i, m in enumerate(msgs))
    return msgs if ok else None


def cut(text: str) -> str:
    if len(text) <= CHARS:
        return text
    head = text[:CHARS]
    return head[: head.rfind(" ")].rstrip() if " " in head else head


def read_texts(path: str) -> list[str]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["chosen"] for line in f if line.strip()]


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "llamactl.cli", *args], input=stdin, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"llamactl {' '.join(args[:2])} failed: {proc.stderr.strip()[-800:]}")
    return proc


def jsonl(records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def write(path: str, records) -> str:
    with open(path, "w") as f:
        f.write(jsonl(records))
    return path


def chat(model: str, dialogs: list[list[dict]], work: str, name: str) -> list[str]:
    """Greedy answers to ``dialogs`` (each ending with a user message), via `llamactl chat --batch`."""
    path = write(os.path.join(work, f"{name}.in.jsonl"), ({"messages": d} for d in dialogs))
    out = os.path.join(work, f"{name}.out.jsonl")
    cli("chat", "-m", model, "--batch", "-i", path, "-o", out, "--temperature", "0", "--seed", "0",
        "--max-new-tokens", str(NEW_TOKENS), "--batch-size", "32")  # fmt: skip
    with open(out) as f:
        return [json.loads(line)["messages"][-1]["content"] for line in f]


def evaluate(model: str, held_out: list[tuple[str, list[dict]]], work: str, tag: str) -> list[dict]:
    """One row per answer: its history (reference, own, control), turn, the dialog's instruction, the answer, and
    which instructions' detectors it passes."""
    prompts, keys = [], []
    for history in ("reference", "control"):
        for turn in range(1, TURNS + 1):
            for inst, d in held_out:
                system = [{"role": "system", "content": inst}] if history == "reference" else []
                prompts.append(system + d[: 2 * turn - 1])
                keys.append((history, turn, inst))
    answers = chat(model, prompts, work, f"eval-{tag}-reference")
    own = [[{"role": "system", "content": inst}] for inst, _ in held_out]
    for turn in range(1, TURNS + 1):
        for o, (_, d) in zip(own, held_out, strict=True):
            o.append(d[2 * turn - 2])
        for o, a in zip(own, chat(model, own, work, f"eval-{tag}-own-{turn}"), strict=True):
            o.append({"role": "assistant", "content": a})
        keys += [("own", turn, inst) for inst, _ in held_out]
        answers += [o[-1]["content"] for o in own]
    return [
        {
            "history": h,
            "turn": t,
            "instruction": i,
            "answer": a,
            "passes": [j for j, (_, ok) in INSTRUCTIONS.items() if ok(a)],
        }
        for (h, t, i), a in zip(keys, answers, strict=True)
    ]


def rate(rows: list[dict], history: str, turn: int, hit: Callable[[dict], bool], among=lambda r: True) -> float:
    """Share of the answers at ``turn`` after ``history`` (of the dialogs ``among`` keeps) for which ``hit`` holds."""
    hits = [hit(r) for r in rows if r["history"] == history and r["turn"] == turn and among(r)]
    return sum(hits) / len(hits)


def follows(r: dict) -> bool:
    return r["instruction"] in r["passes"]


def follows_another(r: dict) -> bool:
    return any(i != r["instruction"] for i in r["passes"])


def passes(inst: str) -> Callable[[dict], bool]:
    return lambda r: inst in r["passes"]


def asked(inst: str) -> Callable[[dict], bool]:
    return lambda r: r["instruction"] == inst


def asked_another(inst: str) -> Callable[[dict], bool]:
    return lambda r: r["instruction"] != inst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default=os.path.join(ROOT, "runs/demo/shakespeare/sft/model.safetensors"))
    what = "Anthropic's harmless-base test split (public, MIT), or any HH JSONL (.gz or not) with field 'chosen'"
    ap.add_argument("--data", required=True, help=what)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    start = time.time()
    work = args.out or tempfile.mkdtemp(prefix="gatt-effect-")
    os.makedirs(work, exist_ok=True)
    print(f"working in {work}", file=sys.stderr)

    from llamactl.chat_format import encode_prompt
    from llamactl.checkpoint import read_meta
    from llamactl.tokenizer import Tokenizer

    meta = read_meta(args.model)
    tok, context = Tokenizer(meta.tokenizer), meta.args.max_seq_len

    def fits(d: list[dict]) -> bool:
        """Turn TURNS leaves room for an answer after the reference answers, and after own answers of up to
        NEW_TOKENS tokens each (counted on top of a one-letter placeholder)."""
        system = [{"role": "system", "content": max(INSTRUCTIONS, key=len)}]
        short = [{**m, "content": "x"} if m["role"] == "assistant" else m for m in d]
        own = len(encode_prompt(tok, system + short[: 2 * TURNS - 1])) + (TURNS - 1) * NEW_TOKENS
        return max(own, len(encode_prompt(tok, system + d[: 2 * TURNS - 1]))) + NEW_TOKENS <= context

    seen = set(read_texts(os.path.join(ROOT, "examples", "hh-harmless-chosen.jsonl")))
    pool, held_out = [], []
    for text in read_texts(args.data):
        d = parse_hh(text)
        if d is None:
            continue
        if len(held_out) < N_EVAL and text not in seen and len(d) >= 2 * TURNS and fits(d):
            held_out.append((list(INSTRUCTIONS)[len(held_out) % len(INSTRUCTIONS)], d[: 2 * TURNS]))
        else:
            pool.append(d)
    random.Random(0).shuffle(pool)
    instructed = []
    for i in range(N_INSTRUCTED):  # a quarter each of 1, 2, 3 and 4 exchanges
        k = i % TURNS + 1
        j = next(j for j, d in enumerate(pool) if len(d) >= 2 * k)
        instructed.append(pool.pop(j)[: 2 * k])
    plain = [{"messages": d[: 2 * TURNS]} for d in pool[:N_PLAIN]]
    assert len(held_out) == N_EVAL and len(plain) == N_PLAIN, (len(held_out), len(plain))
    print(f"{len(held_out)} held-out dialogs, {len(instructed)} instructed, {len(plain)} plain", file=sys.stderr)
    given = [INSTRUCTIONS[inst][1](m["content"]) for inst, d in held_out for m in d[1 : 2 * TURNS - 2 : 2]]
    history_note = f"{sum(given)} of the {len(given)} reference answers in the histories follow their instruction"
    instructions = os.path.join(work, "instructions.txt")
    with open(instructions, "w") as f:
        f.write("".join(i + "\n" for i in INSTRUCTIONS))

    results = {"start": {None: evaluate(args.model, held_out, work, "start")}}
    flags = ["--seq-len", str(context), "--batch-size", "8", "--global-batch-size", "16", "--lr", "3e-4"]
    flags += ["--steps", str(args.steps), "--save-every", "0"]
    for seed in args.seeds:
        prepared = cli("gatt-augment", "--instructions", instructions, "--seed", str(seed),
                       stdin=jsonl({"messages": d} for d in instructed)).stdout  # fmt: skip
        sampled = []
        for line in prepared.splitlines():
            rec = json.loads(line)
            rewrite = INSTRUCTIONS[rec["gatt_instruction"]][0]
            rec["messages"] = [{**m, "content": rewrite(m["content"])} if m["role"] == "assistant" else m
                               for m in rec["messages"]]  # fmt: skip
            sampled.append(rec)
        final = [json.loads(x) for x in cli("gatt-augment", "--finalize", stdin=jsonl(sampled)).stdout.splitlines()]
        single = [{"messages": [r["messages"][0], *r["messages"][-2:]]} for r in final]
        for name, examples in (("baseline", single), ("GAtt", final)):
            run = os.path.join(work, f"{name}-{seed}")
            data = write(os.path.join(work, f"{name}-{seed}.jsonl"), plain + examples)
            if not os.path.exists(os.path.join(run, "model.safetensors")):
                log = cli("sft", "-m", args.model, "--data", data, "-o", run, "--seed", str(seed), *flags).stderr
                print(f"{name} seed {seed}: " + " / ".join(x for x in log.splitlines() if "sft:" in x), file=sys.stderr)
            model = os.path.join(run, "model.safetensors")
            results.setdefault(name, {})[seed] = evaluate(model, held_out, work, f"{name}-{seed}")

    turns = " | ".join(f"turn {t}" for t in range(1, TURNS + 1))
    print(f"# {N_EVAL} held-out dialogs, {TURNS} turns, {args.steps} sft steps, {time.time() - start:.0f} s in all")
    print(f"# {history_note}\n")
    print(f"| model | seed | history | {turns} |\n|---|---|---|" + "---|" * TURNS)
    for name, by_seed in results.items():
        for seed, rows in by_seed.items():
            for history in ("control", "reference", "own"):
                cells = [f"{rate(rows, history, t, follows):.0%} ({rate(rows, history, t, follows_another):.0%})"
                         for t in range(1, TURNS + 1)]  # fmt: skip
                print(f"| {name} | {'-' if seed is None else seed} | {history} | " + " | ".join(cells) + " |")
    print(f"\n| model | seed | detector | reference: {turns} | own: {turns} |\n|---|---|---|" + "---|" * 2 * TURNS)
    for name, by_seed in results.items():
        for seed, rows in by_seed.items():
            for inst in INSTRUCTIONS:
                cells = [f"{rate(rows, h, t, passes(inst), asked(inst)):.0%} / "
                         f"{rate(rows, h, t, passes(inst), asked_another(inst)):.0%}"
                         for h in ("reference", "own") for t in range(1, TURNS + 1)]  # fmt: skip
                print(f"| {name} | {'-' if seed is None else seed} | {inst} | " + " | ".join(cells) + " |")
    with open(os.path.join(work, "results.json"), "w") as f:
        json.dump({n: {str(s): r for s, r in b.items()} for n, b in results.items()}, f, indent=0)


if __name__ == "__main__":
    main()
