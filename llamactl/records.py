"""Training and sampling records read from JSONL: dialogs (a message list, or Anthropic HH text), preference pairs
with Llama 2's rating levels, prompts for the sampling stages, and documents for evaluation and calibration. Each
bad record is a UserError naming its file, line and field. Turning them into tokens and batches is
``llamactl.data``'s."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from llamactl.chat_format import DialogError, check_dialog
from llamactl.errors import UserError

HH_TURN = re.compile(r"\n\nHuman: |\n\nAssistant: ")


def hh_messages(text: str) -> list[dict]:
    """Anthropic HH text ("\\n\\nHuman: ...\\n\\nAssistant: ...") as chat messages; the roles are checked later by
    the chat format like any other dialog's."""
    marks = list(HH_TURN.finditer(text))
    if not marks or text[: marks[0].start()].strip():
        raise DialogError('HH text must start with "\\n\\nHuman: "')
    messages = []
    for k, m in enumerate(marks):
        end = marks[k + 1].start() if k + 1 < len(marks) else len(text)
        role = "user" if "Human" in m.group() else "assistant"
        messages.append({"role": role, "content": text[m.end() : end]})
    return messages


def record_messages(rec: dict, field: str | None) -> list[dict]:
    """The dialog of one JSONL record: ``{"messages": [...]}``, ``{"prompt", "response"}`` (with an optional
    ``"system"``), or HH text (or a message list) in ``field``. Raises DialogError naming what is wrong."""
    if field is not None:
        if field not in rec:
            raise DialogError(f"no {field!r} field (--field)")
        value = rec[field]
        messages = hh_messages(value) if isinstance(value, str) else value
    elif "messages" in rec:
        messages = rec["messages"]
    elif "prompt" in rec or "response" in rec:
        for key in ("prompt", "response"):
            if not isinstance(rec.get(key), str):
                raise DialogError(f"a prompt/response record needs a string {key!r}")
        messages = [{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": rec["response"]}]
        if isinstance(rec.get("system"), str):
            messages.insert(0, {"role": "system", "content": rec["system"]})
    else:
        raise DialogError("no 'messages', no 'prompt'/'response', and no --field naming HH text")
    check_dialog(messages)
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"].strip():
            raise DialogError(f"messages[{i}] is an empty answer")
    return messages


# Llama 2, section 3.2.1: the annotators' four levels, most confident first ("unsure" goes with the last).
RATINGS = ("significantly better", "better", "slightly better", "negligibly better")


RATING_ALIASES = {"unsure": "negligibly better", "negligibly better / unsure": "negligibly better"}


@dataclass
class Pair:
    chosen: list[dict]  # each a whole dialog ending with the assistant's answer
    rejected: list[dict]
    rating: str | float | None  # one of RATINGS, a number (the margin itself), or None (unrated)


def rating_of(value: object) -> str | float | None:
    """A record's ``rating``: one of the paper's levels (any case), a finite number >= 0 (taken as the margin
    itself, for a scale of one's own), or absent/null. Raises DialogError for anything else."""
    if value is None:
        return None
    if isinstance(value, str):
        level = RATING_ALIASES.get(value.strip().lower(), value.strip().lower())
        if level not in RATINGS:
            raise DialogError(f"rating {value!r} is not one of: {', '.join(RATINGS)}, unsure (or a number)")
        return level
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
        return float(value)
    raise DialogError(f"rating {value!r} is neither one of the paper's levels nor a number >= 0")


def record_pair(rec: dict) -> Pair:
    """The preference pair of one JSONL record: ``{"messages"|"prompt", "chosen", "rejected", "rating"?}`` (the
    answers as text after a dialog ending with the user's turn, or a prompt with an optional "system"), or
    Anthropic HH pairs (``{"chosen": "\\n\\nHuman: ...", "rejected": ...}``, two whole dialogs)."""
    for key in ("chosen", "rejected"):
        if key not in rec:
            raise DialogError(f"no {key!r} field")
        if not isinstance(rec[key], str):
            raise DialogError(f"field {key!r} must be a string, got {type(rec[key]).__name__}")
    rating = rating_of(rec.get("rating"))
    if "messages" in rec or "prompt" in rec:
        if "messages" in rec:
            prompt = check_dialog(rec["messages"])
            if prompt[-1]["role"] != "user":
                raise DialogError("'messages' must end with the user's turn that 'chosen' and 'rejected' answer")
        else:
            if not isinstance(rec["prompt"], str):
                raise DialogError(f"field 'prompt' must be a string, got {type(rec['prompt']).__name__}")
            prompt = [{"role": "user", "content": rec["prompt"]}]
            if isinstance(rec.get("system"), str):
                prompt.insert(0, {"role": "system", "content": rec["system"]})
        chosen = [*prompt, {"role": "assistant", "content": rec["chosen"]}]
        rejected = [*prompt, {"role": "assistant", "content": rec["rejected"]}]
    else:
        chosen, rejected = hh_messages(rec["chosen"]), hh_messages(rec["rejected"])
    for key, msgs in (("chosen", chosen), ("rejected", rejected)):
        try:
            check_dialog(msgs)
        except DialogError as e:
            raise DialogError(f"{key}: {e}") from None
        if msgs[-1]["role"] != "assistant" or not msgs[-1]["content"].strip():
            raise DialogError(f"{key!r} must end with a non-empty answer from the assistant")
    if [(m["role"], m["content"].strip()) for m in chosen] == [(m["role"], m["content"].strip()) for m in rejected]:
        raise DialogError("'chosen' equals 'rejected': a pair must prefer one answer over a different one")
    return Pair(chosen, rejected, rating)


def rating_label(rating: str | float | None) -> str:
    """The name of a rating in metrics ("significantly_better", "margin_0.5", "unrated")."""
    if rating is None:
        return "unrated"
    if isinstance(rating, str):
        return rating.replace(" ", "_")
    return f"margin_{rating:g}"


@dataclass
class Prompt:
    where: str  # "file:line"
    index: int  # its place in the input
    rec: dict  # the record's other fields, passed through
    messages: list[dict]  # the dialog to answer, ending with the user's turn
    is_safety: bool
    ids: list[int] = field(default_factory=list)  # its tokens in the chat format


def prompt_dialog(rec: dict, where: str) -> tuple[list[dict], dict]:
    """The dialog a prompt record asks to answer, and the record's other fields (``prompt`` and ``system`` become
    the dialog)."""
    from llamactl.chat_format import DialogError, check_dialog
    from llamactl.jsonl import field as get_field

    if "messages" in rec and "prompt" in rec:
        raise UserError(f"{where}: give one of the fields 'messages' (a dialog) and 'prompt' (text), not both")
    if "messages" in rec:
        try:
            messages = check_dialog(rec["messages"])
        except DialogError as e:
            raise UserError(f"{where}: {e}") from None
        rest = dict(rec)
    elif "prompt" in rec:
        if "response" in rec:
            raise UserError(f"{where}: already has an answer (field 'response'); a prompt is the question alone")
        messages = [{"role": "user", "content": get_field(rec, "prompt", str, where)}]
        if get_field(rec, "system", str, where, required=False) is not None:
            messages.insert(0, {"role": "system", "content": rec["system"]})
        rest = {k: v for k, v in rec.items() if k not in ("prompt", "system")}
    else:
        raise UserError(f"{where}: no 'messages' (a dialog ending with the user's turn) and no 'prompt' (text)")
    if messages[-1]["role"] != "user":
        raise UserError(f"{where}: the dialog already ends with an answer (messages[{len(messages) - 1}] is the "
                        f"{messages[-1]['role']}'s); a prompt ends with the user's turn")  # fmt: skip
    return messages, rest


def read_prompts(path: str, writes: tuple[str, ...]) -> list[Prompt]:
    """Every prompt record of ``path`` (read whole, checked before any sampling); ``writes``: fields the command
    adds, refused on input."""
    from llamactl.jsonl import check_free, display_name, read_jsonl
    from llamactl.jsonl import field as get_field

    name = display_name(path)
    out = []
    for lineno, rec in read_jsonl(path):
        where = f"{name}:{lineno}"
        check_free(rec, writes, where)
        messages, rest = prompt_dialog(rec, where)
        is_safety = get_field(rec, "is_safety", bool, where, required=False) or False
        out.append(Prompt(where, len(out), rest, messages, is_safety))
    return out


def read_documents(path: str, fmt: str, field: str | None) -> list[tuple[str, str | list]]:
    """(where, text or ids) for each document of ``path``: the whole file when it is text, each record of JSONL.
    ``where`` names the file (and line) in messages; ids are checked against the vocabulary later."""
    from llamactl.files import display_name
    from llamactl.jsonl import decode_text, input_kind, read_chunks, read_jsonl
    from llamactl.jsonl import field as get_field

    name = display_name(path)
    if input_kind(path, fmt) == "text":
        return [(name, decode_text(b"".join(read_chunks(path)), name, 1))]
    key = field or "text"
    docs: list[tuple[str, str | list]] = []
    for lineno, rec in read_jsonl(path):
        where = f"{name}:{lineno}"
        if "tokens" in rec and key in rec:
            raise UserError(f"{where}: give one of the fields 'tokens' (ids) and {key!r} (text), not both")
        if "tokens" in rec:
            docs.append((where, get_field(rec, "tokens", list, where)))
        elif key not in rec:
            raise UserError(f"{where}: missing field {key!r} (the text to evaluate) and no 'tokens'")
        else:
            docs.append((where, get_field(rec, key, str, where)))
    return docs
