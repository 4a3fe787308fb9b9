"""Does Ghost Attention keep a system instruction alive over turns? Before/after on a small chat model.

    python -P bench/gatt_effect.py -m runs/demo/shakespeare/sft/model.safetensors [--steps 60] [--out DIR]

The instruction is one a detector can check: "Answer in capital letters." (an answer follows it when at least 80% of
its letters are capitals). Both models start from the same chat model (by default the one `make demo` makes) and
are fine-tuned with `llamactl sft` for the same number of steps:

- baseline: HH dialogs without instruction, plus single-turn dialogs whose system prompt is the instruction and
  whose answer follows it (the instruction is seen, but only ever one turn after it);
- GAtt: the same, plus Ghost Attention dialogs made by `llamactl gatt-augment`: the instruction attached to every
  user turn, the turns answered by a sampler that follows it (here: the dialog's own answers in capitals, a program
  standing in for a model that obeys), then `--finalize` (instruction once, as the system message; only the last
  turn trained on).

Evaluation: held-out 3-turn dialogs with the instruction as system prompt; at each turn the model answers
(`llamactl chat`, batch mode, greedy) after the earlier turns' reference answers in capitals; the table gives the
share of answers in capitals at turn 1, 2 and 3.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTRUCTION = "Answer in capital letters."


def caps(text: str) -> bool:
    letters = [c for c in text if c.isalpha()]
    return bool(letters) and sum(c.isupper() for c in letters) / len(letters) >= 0.8


def dialogs(path: str) -> list[list[dict]]:
    out = []
    for line in open(path):
        text = json.loads(line)["chosen"]
        marks = re.split(r"\n\n(Human|Assistant): ", text)
        roles, contents = marks[1::2], [c.strip() for c in marks[2::2]]
        msgs = [
            {"role": "user" if r == "Human" else "assistant", "content": c}
            for r, c in zip(roles, contents, strict=True)
        ]
        out.append(msgs)
    return out


def cli(*args: str, stdin: str | None = None) -> str:
    proc = subprocess.run([sys.executable, "-m", "llamactl.cli", *args], input=stdin, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"llamactl {' '.join(args[:2])} failed: {proc.stderr.strip()[-500:]}")
    return proc.stdout


def write(path: str, records) -> str:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default=os.path.join(ROOT, "runs/demo/shakespeare/sft/model.safetensors"))
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    work = args.out or tempfile.mkdtemp(prefix="gatt-effect-")
    os.makedirs(work, exist_ok=True)
    hh = dialogs(os.path.join(ROOT, "examples", "hh-harmless-chosen.jsonl"))
    multi = dialogs_of_shared_size(hh, 3)
    print(f"{len(multi)} short 3-turn dialogs", file=sys.stderr)
    short = [d for d in hh if len(d) == 2 and len(d[0]["content"]) + len(d[1]["content"]) < 300]
    evaluation, gatt_source = [], []
    for d in multi:  # held out: the first 40 whose third turn, answers in capitals, fits the context with its answer
        (evaluation if len(evaluation) < 40 and fits(args.model, d) else gatt_source).append(d)
    plain = [{"messages": d} for d in hh[:200]]
    single = [
        {"messages": [{"role": "system", "content": INSTRUCTION}, d[0], {**d[1], "content": d[1]["content"].upper()}]}
        for d in short[:200]
    ]
    baseline_data = write(os.path.join(work, "baseline.jsonl"), plain + single)

    multi_path = write(os.path.join(work, "multi.jsonl"), [{"messages": d} for d in gatt_source])
    prepared = cli("gatt-augment", "-i", multi_path, "--instructions", _inst(work))
    sampled = []
    for line in prepared.splitlines():
        rec = json.loads(line)
        rec["messages"] = [{**m, "content": m["content"].upper()} if m["role"] == "assistant" else m
                           for m in rec["messages"]]  # fmt: skip
        sampled.append(rec)
    final = cli("gatt-augment", "--finalize", stdin="".join(json.dumps(r) + "\n" for r in sampled))
    gatt_data = os.path.join(work, "gatt.jsonl")
    with open(gatt_data, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in plain + single))
        f.write(final)

    flags = ["--seq-len", "256", "--batch-size", "8", "--global-batch-size", "16", "--lr", "3e-4"]
    flags += ["--steps", str(args.steps), "--save-every", "0"]
    models = {}
    for name, data in (("baseline", baseline_data), ("GAtt", gatt_data)):
        run = os.path.join(work, name)
        if not os.path.exists(os.path.join(run, "model.safetensors")):
            cli("sft", "-m", args.model, "--data", data, "-o", run, *flags)
        models[name] = os.path.join(run, "model.safetensors")

    rows = {}
    for name, model in models.items():
        rates = []
        for turn in (1, 2, 3):
            records = []
            for d in evaluation:
                users = [m for m in d if m["role"] == "user"][:turn]
                answers = [m for m in d if m["role"] == "assistant"][: turn - 1]
                msgs = [{"role": "system", "content": INSTRUCTION}]
                for i, u in enumerate(users):
                    msgs.append(u)
                    if i < len(answers):
                        msgs.append({**answers[i], "content": answers[i]["content"].upper()})
                records.append({"messages": msgs})
            out = cli("chat", "-m", model, "--batch", "--temperature", "0", "--max-new-tokens", "24",
                      stdin="".join(json.dumps(r) + "\n" for r in records))  # fmt: skip
            answers = [json.loads(x)["messages"][-1]["content"] for x in out.splitlines()]
            rates.append(sum(map(caps, answers)) / len(answers))
        rows[name] = rates
    print(f"# {len(evaluation)} held-out 3-turn dialogs, system prompt {INSTRUCTION!r}, {args.steps} sft steps each")
    print("| model | turn 1 | turn 2 | turn 3 |")
    print("|---|---|---|---|")
    for name, rates in rows.items():
        print(f"| {name} | " + " | ".join(f"{r:.0%}" for r in rates) + " |")


def dialogs_of_shared_size(hh: list[list[dict]], turns: int) -> list[list[dict]]:
    """HH dialogs with at least ``turns`` exchanges and short turns, cut to ``turns`` exchanges."""
    out = []
    for d in hh:
        if len(d) >= 2 * turns and all(len(m["content"]) < 160 for m in d[: 2 * turns]):
            if [m["role"] for m in d[: 2 * turns]] == ["user", "assistant"] * turns:
                out.append(d[: 2 * turns])
    return out


def fits(model: str, d: list[dict], room: int = 24) -> bool:
    from llamactl.chat_format import encode_prompt
    from llamactl.checkpoint import read_meta
    from llamactl.tokenizer import Tokenizer

    meta = read_meta(model)
    msgs = [{"role": "system", "content": INSTRUCTION}]
    msgs += [{**m, "content": m["content"].upper()} if m["role"] == "assistant" else m for m in d[:5]]
    return len(encode_prompt(Tokenizer(meta.tokenizer), msgs)) + room <= meta.args.max_seq_len


def _inst(work: str) -> str:
    path = os.path.join(work, "inst.txt")
    with open(path, "w") as f:
        f.write(INSTRUCTION + "\n")
    return path


if __name__ == "__main__":
    main()
