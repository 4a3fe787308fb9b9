"""``llamactl gatt-augment``: Ghost Attention training dialogs (Llama 2, section 3.3), in steps that compose.

Without ``-m`` it writes prepared dialogs: an instruction (from ``--instructions``, or the built-in generator of the
paper's kinds) attached to every user message, with ``gatt_instruction`` naming it, ready for any sampler.
``--finalize`` turns sampled dialogs into training examples (instruction only in the first turn, as the system
message; ``"loss": false`` on every earlier turn). With ``-m`` it does all three, answering every turn with the
model through the generation engine.
"""

from __future__ import annotations

from dataclasses import dataclass

from llamactl.errors import UserError
from llamactl.flags import SamplingFlags

INSTRUCTION_FIELD = "gatt_instruction"


SAMPLING = ("max_new_tokens", "temperature", "top_p", "batch_size", "device", "dtype", "adapter")  # only -m uses


@dataclass(kw_only=True)
class GattConfig(SamplingFlags):
    input: str = "-"
    output: str = "-"
    field: str | None = None  # a record field holding HH text (or a message list)
    instructions: str | None = None  # JSONL {"instruction": ...} or one per line; None: the built-in generator
    finalize: bool = False
    model: str | None = None
    adapter: str | None = None  # a LoRA adapter trained on the model
    max_new_tokens: int = 128

    def validate(self) -> None:
        from llamactl.files import io_problems
        from llamactl.flags import sampling_problems

        problems = sampling_problems(self)
        if self.finalize and (self.model or self.instructions):
            problems.append("--finalize takes sampled dialogs that name their instruction: no -m, no --instructions")
        if not self.model:  # nothing is sampled: a sampling flag set to anything but its default would be ignored
            fields = GattConfig.__dataclass_fields__
            given = [n for n in SAMPLING if getattr(self, n) != fields[n].default]
            if given:
                flags = ", ".join("--" + n.replace("_", "-") for n in given)
                problems.append(f"{flags}: without -m nothing is sampled (these flags set how the model samples)")
        problems += io_problems(
            [
                ("-i/--input", self.input, "dialogs JSONL file", True),
                ("--instructions", self.instructions, "instructions file", False),
                ("-m/--model", self.model, "checkpoint", False),
                ("--adapter", self.adapter, "adapter file", False),
            ],
            self.output,
        )
        if problems:
            raise UserError("; ".join(problems))


def read_instructions(path: str) -> list[str]:
    """Instructions from JSONL (``{"instruction": ...}`` a line) or plain text (one a line); empty is an error."""
    import json

    from llamactl.files import display_name

    name, out = display_name(path), []
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            lines = f.read().splitlines()
        except UnicodeDecodeError as e:
            raise UserError(f"{name}: not UTF-8 text ({e.reason})") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{name}:{i}: invalid JSON: {e.msg}") from None
            text = rec.get("instruction") if isinstance(rec, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise UserError(f"{name}:{i}: needs a non-empty string field 'instruction'")
            out.append(text.strip())
        else:
            out.append(line.strip())
    if not out:
        raise UserError(f"{name}: no instructions in it")
    return out


def run(cfg: GattConfig) -> int:
    """Write one output record per input dialog; returns how many."""
    import random

    from llamactl import gatt
    from llamactl.chat_format import DialogError, check_dialog
    from llamactl.jsonl import display_name, dumps, open_output, read_jsonl
    from llamactl.records import record_messages

    cfg.validate()
    pool = read_instructions(cfg.instructions) if cfg.instructions else None
    rng = random.Random(cfg.seed)
    name = display_name(cfg.input)
    records = []
    for lineno, rec in (item for item in read_jsonl(cfg.input) if item is not None):
        where = f"{name}:{lineno}"
        try:
            if cfg.finalize:
                inst = rec.get(INSTRUCTION_FIELD)
                if not isinstance(inst, str) or not inst:
                    raise DialogError(f"no string {INSTRUCTION_FIELD!r} field (write it with gatt-augment first)")
                messages = check_dialog(rec.get("messages"))
                out = {k: v for k, v in rec.items() if k != INSTRUCTION_FIELD}
                out["messages"] = gatt.finalize(messages, inst)
            else:
                messages = record_messages(rec, cfg.field)
                if not any(m["role"] == "user" for m in messages):
                    raise DialogError("no user message to attach an instruction to")
                inst = rng.choice(pool) if pool else gatt.builtin_instruction(rng)
                out = {k: v for k, v in rec.items() if k != cfg.field}
                out["messages"], out[INSTRUCTION_FIELD] = gatt.attach(messages, inst), inst
        except (DialogError, ValueError) as e:
            raise UserError(f"{where}: {e}") from None
        records.append((where, out))
    if cfg.model is not None:
        from llamactl.policy import answer_turns

        chat = answer_turns(cfg, records)
        if cfg.timings:
            chat.report()
        if records:
            import sys

            turns = [sum(m["role"] == "user" for m in out["messages"]) for _, out in records]
            cost = [len(chat.tokenizer.encode(out[INSTRUCTION_FIELD] + "\n\n")) for _, out in records]
            per_dialog = sum(c * t for c, t in zip(cost, turns, strict=True)) / len(records)
            print(
                f"llamactl gatt-augment: {len(records)} dialogs; the instruction costs {sum(cost) / len(cost):.1f} "
                f"tokens on each user turn while sampling, {per_dialog:.0f} a dialog "
                f"({per_dialog / chat.context:.1%} of the context of {chat.context}), and once in the training example",
                file=sys.stderr,
            )
        for where, out in records:
            try:
                out["messages"] = gatt.finalize(out["messages"], out.pop(INSTRUCTION_FIELD))
            except ValueError as e:
                raise UserError(f"{where}: {e}") from None
    with open_output(cfg.output) as f:
        for _, out in records:
            f.write(dumps(out) + "\n")
    return len(records)
