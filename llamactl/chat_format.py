"""Llama 2's chat format, token for token as Meta's reference ``chat_completion`` (``llama/generation.py``) builds it.

A dialog is a list of ``{"role": "system" | "user" | "assistant", "content": str}``: an optional system message,
then user and assistant messages alternating, starting with the user. The system prompt is merged into the first
user message as ``<<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user}``; each finished (user, assistant) pair is encoded on its
own as BOS + ``[INST] {user.strip()} [/INST] {assistant.strip()} `` + EOS, and a final user message as
BOS + ``[INST] {user.strip()} [/INST]``. BOS and EOS are token ids, never text. Content holding one of the special
tags is refused, as Meta's code refuses it.

sft, gatt-augment, chat, rejection-sample and ppo all encode dialogs through this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from llamactl.errors import UserError
from llamactl.tokenizer import Tokenizer

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")
ROLES = ("system", "user", "assistant")


class DialogError(UserError):
    """A dialog that Llama 2's chat format cannot encode; the message names the offending ``messages[i]``."""


@dataclass(frozen=True)
class EncodedDialog:
    tokens: list[int]
    mask: list[int]  # 1 on the tokens of each assistant answer and its EOS: the tokens the loss is taken on
    answers: list[tuple[int, int]]  # [start, end) of every assistant answer in ``tokens``, its EOS included


def check_dialog(messages: object) -> list[dict]:
    """``messages`` if it is a dialog Llama 2's format accepts (it may end with either role), else DialogError."""
    if not isinstance(messages, list) or not messages:
        raise DialogError("a dialog must be a non-empty list of messages")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise DialogError(f"messages[{i}] must be an object with 'role' and 'content', got {type(msg).__name__}")
        for key in ("role", "content"):
            if key not in msg:
                raise DialogError(f"messages[{i}] has no {key!r}")
            if not isinstance(msg[key], str):
                raise DialogError(f"messages[{i}].{key} must be a string, got {type(msg[key]).__name__}")
        if msg["role"] not in ROLES:
            raise DialogError(f"messages[{i}].role is {msg['role']!r}; allowed: {', '.join(ROLES)}")
        if not isinstance(msg.get("loss", True), bool):
            raise DialogError(f"messages[{i}].loss must be true or false, got {msg['loss']!r}")
        for tag in SPECIAL_TAGS:
            if tag in msg["content"]:
                raise DialogError(f"messages[{i}] ({msg['role']}) contains the special tag {tag!r}: not allowed")
    first = 1 if messages[0]["role"] == "system" else 0
    if first and len(messages) == 1:
        raise DialogError("a system message must be followed by a user message")
    for i in range(first, len(messages)):
        expected = "user" if (i - first) % 2 == 0 else "assistant"
        if messages[i]["role"] != expected:
            raise DialogError(
                f"messages[{i}] is from {messages[i]['role']!r} where {expected!r} was expected: after an optional "
                "system message, user and assistant alternate, starting with the user"
            )
    return messages


def dialog_turns(messages: list[dict]) -> tuple[list[tuple[str, str]], str | None]:
    """The (prompt, answer) pairs and the final prompt (None if the dialog ends with an answer), as the exact
    strings Meta's ``chat_completion`` encodes: system prompt merged, contents stripped."""
    check_dialog(messages)
    contents = [m["content"] for m in messages]
    if messages[0]["role"] == "system":
        contents = [B_SYS + contents[0] + E_SYS + contents[1], *contents[2:]]
    pairs = [
        (f"{B_INST} {prompt.strip()} {E_INST}", f" {answer.strip()} ")
        for prompt, answer in zip(contents[::2], contents[1::2], strict=False)
    ]
    final = f"{B_INST} {contents[-1].strip()} {E_INST}" if len(contents) % 2 == 1 else None
    return pairs, final


def encode_dialog(
    tokenizer: Tokenizer, messages: list[dict], train_on: Literal["all", "last"] = "all"
) -> EncodedDialog:
    """Tokens of a whole dialog in Llama 2's chat format, with the loss mask on the assistant answers.

    ``train_on="last"`` masks only the last assistant answer (Ghost Attention trains on the last turn only), and an
    assistant message carrying ``"loss": false`` is never trained on; ``answers`` lists every answer either way.

    Each pair is encoded in one piece, as Meta does, so the answer's first token is found by also encoding the
    prompt alone: with Llama 2's tokenizer (and any trained by ``train_bpe``) pieces never cross the space after
    ``[/INST]``, and the prompt's tokens are a prefix of the pair's. For a tokenizer that merges across it, the
    tokens the two encodings share are the prompt and everything from the first difference on is the answer (the
    merged piece is trained on).
    """
    assert train_on in ("all", "last"), f"train_on must be 'all' or 'last', got {train_on!r}"
    pairs, final = dialog_turns(messages)
    answer_msgs = [m for m in messages if m["role"] == "assistant"]
    tokens: list[int] = []
    mask: list[int] = []
    answers: list[tuple[int, int]] = []
    for k, (prompt, answer) in enumerate(pairs):
        full = tokenizer.encode(prompt + answer, bos=True, eos=True)
        head = tokenizer.encode(prompt, bos=True)
        n = 0
        while n < len(head) and n < len(full) - 1 and full[n] == head[n]:
            n += 1
        trained = (train_on == "all" or k == len(pairs) - 1) and answer_msgs[k].get("loss", True)
        answers.append((len(tokens) + n, len(tokens) + len(full)))
        tokens += full
        mask += [0] * n + [int(trained)] * (len(full) - n)
    if final is not None:
        head = tokenizer.encode(final, bos=True)
        tokens += head
        mask += [0] * len(head)
    return EncodedDialog(tokens, mask, answers)


def encode_prompt(tokenizer: Tokenizer, messages: list[dict]) -> list[int]:
    """The prompt tokens Meta's ``chat_completion`` feeds the model: the dialog must end with a user message."""
    check_dialog(messages)
    if messages[-1]["role"] != "user":
        last = messages[-1]["role"]
        raise DialogError(f"the last message must be from the user to prompt for an answer, got {last!r}")
    return encode_dialog(tokenizer, messages).tokens
