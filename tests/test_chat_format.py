"""Llama 2's chat format against Meta's recipe, recomputed here with sentencepiece alone on Llama 2's tokenizer."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import sentencepiece as spm

from llamactl.chat_format import DialogError, check_dialog, encode_dialog, encode_prompt
from llamactl.tokenizer import Tokenizer, train_bpe

LLAMA2 = Path(__file__).parent / "fixtures" / "llama2-tokenizer.model"


def meta_chat_tokens(sp: spm.SentencePieceProcessor, dialog: list[dict]) -> list[int]:
    """Meta's ``chat_completion`` (llama/generation.py), transcribed: BOS/EOS as ids 1/2 around sp.encode.

    Meta requires the dialog to end with a user message; a training dialog that ends with an answer is the same
    pairs without the final prompt.
    """
    b_inst, e_inst = "[INST]", "[/INST]"
    b_sys, e_sys = "<<SYS>>\n", "\n<</SYS>>\n\n"
    if dialog[0]["role"] == "system":
        dialog = [
            {"role": dialog[1]["role"], "content": b_sys + dialog[0]["content"] + e_sys + dialog[1]["content"]}
        ] + dialog[2:]
    tokens = sum(
        [
            [sp.bos_id()]
            + sp.encode(f"{b_inst} {(prompt['content']).strip()} {e_inst} {(answer['content']).strip()} ")
            + [sp.eos_id()]
            for prompt, answer in zip(dialog[::2], dialog[1::2], strict=False)
        ],
        [],
    )
    if dialog[-1]["role"] == "user":
        tokens += [sp.bos_id()] + sp.encode(f"{b_inst} {(dialog[-1]['content']).strip()} {e_inst}")
    return tokens


def u(text: str) -> dict:
    return {"role": "user", "content": text}


def a(text: str) -> dict:
    return {"role": "assistant", "content": text}


def s(text: str) -> dict:
    return {"role": "system", "content": text}


DIALOGS = {
    "one turn": [u("What is the capital of France?")],
    "one turn answered": [u("What is the capital of France?"), a("Paris.")],
    "system": [s("Always answer with emojis."), u("How do I go from Paris to NY?")],
    "system answered": [s("Be brief."), u("2+2?"), a("4")],
    "several turns": [u("Hi!"), a("Hello! How can I help?"), u("Tell me a joke."), a("No."), u("Please?")],
    "several turns with system": [
        s("You are a pirate."),
        u("Where is the treasure?"),
        a("Arr, buried on the isle."),
        u("Which isle?"),
        a("Tortuga, matey!"),
    ],
    "unicode": [
        s("Réponds en français, s'il te plaît. 日本語も可。"),
        u("Ça va? 🦙 Ελληνικά עברית"),
        a("Très bien 🔥 — merci!"),
        u("Straße naïve ＡＢＣ ﬁ"),
    ],
    "odd whitespace": [
        s("  \n system with spaces around \t\n"),
        u("\n\n  user with newlines\r\n and  double  spaces \t "),
        a("   \tanswer\n\nwith\tstuff  \n"),
        u("   "),
        a(""),
        u("\tlast\t"),
    ],
    "empty system": [s(""), u("hello"), a("hi")],
    "empty contents": [u(""), a(""), u("")],
}


@pytest.fixture(scope="module")
def llama() -> tuple[Tokenizer, spm.SentencePieceProcessor]:
    return Tokenizer.from_file(str(LLAMA2)), spm.SentencePieceProcessor(model_file=str(LLAMA2))


def test_golden_ids(llama):
    tok, _ = llama
    # [INST] is 518 25580 29962 and [/INST] 518 29914 25580 29962 in Llama 2's vocabulary.
    assert encode_prompt(tok, [u("Hi")]) == [1, 518, 25580, 29962, 6324, 518, 29914, 25580, 29962]


@pytest.mark.parametrize("name", list(DIALOGS))
def test_tokens_are_metas(llama, name):
    tok, sp = llama
    dialog = DIALOGS[name]
    encoded = encode_dialog(tok, dialog)
    assert encoded.tokens == meta_chat_tokens(sp, dialog)
    if dialog[-1]["role"] == "user":
        assert encode_prompt(tok, dialog) == encoded.tokens


@pytest.mark.parametrize("name", list(DIALOGS))
def test_mask_covers_exactly_the_answers(llama, name):
    tok, sp = llama
    dialog = DIALOGS[name]
    encoded = encode_dialog(tok, dialog)
    answers = [m["content"] for m in dialog if m["role"] == "assistant"]
    assert len(encoded.mask) == len(encoded.tokens)
    assert len(encoded.answers) == len(answers)
    expected = [0] * len(encoded.tokens)
    for (start, end), answer in zip(encoded.answers, answers, strict=True):
        expected[start:end] = [1] * (end - start)
        assert encoded.tokens[end - 1] == sp.eos_id()  # the EOS closing the answer is trained on
        assert encoded.tokens[start - 4 : start] == [518, 29914, 25580, 29962]  # right after [/INST]
        assert sp.decode(encoded.tokens[start:end]).strip() == answer.strip()
    assert encoded.mask == expected
    trained = [t for t, m in zip(encoded.tokens, encoded.mask, strict=True) if m]
    assert encoded.mask[0] == 0 and sp.bos_id() not in trained


def test_train_on_last(llama):
    tok, _ = llama
    dialog = DIALOGS["several turns with system"]
    full, last = encode_dialog(tok, dialog), encode_dialog(tok, dialog, train_on="last")
    assert last.tokens == full.tokens and last.answers == full.answers
    start, end = full.answers[-1]
    assert last.mask == [int(start <= i < end) for i in range(len(full.tokens))]


def test_loss_false_answers_are_not_trained(llama):
    """gatt-augment marks earlier answers "loss": false: their tokens stay in the dialog, outside the mask."""
    tok, _ = llama
    dialog = [dict(m) for m in DIALOGS["several turns with system"]]
    answers = [i for i, m in enumerate(dialog) if m["role"] == "assistant"]
    for i in answers[:-1]:
        dialog[i]["loss"] = False
    full, marked = encode_dialog(tok, DIALOGS["several turns with system"]), encode_dialog(tok, dialog)
    assert marked.tokens == full.tokens
    assert marked.mask == encode_dialog(tok, DIALOGS["several turns with system"], train_on="last").mask
    dialog[answers[-1]]["loss"] = "no"
    with pytest.raises(DialogError, match=r"messages\[\d+\]\.loss must be true or false"):
        encode_dialog(tok, dialog)


@pytest.mark.parametrize("tag", ["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"])
@pytest.mark.parametrize("where", [0, 1, 2])
def test_special_tags_are_refused(llama, tag, where):
    tok, _ = llama
    dialog = [s("system"), u("user"), a("answer")]
    dialog[where] = {**dialog[where], "content": f"look: {tag} inside"}
    with pytest.raises(DialogError, match=rf"messages\[{where}\] \({dialog[where]['role']}\) contains the special tag"):
        encode_dialog(tok, dialog)


@pytest.mark.parametrize(
    ("dialog", "message"),
    [
        ([], "non-empty list"),
        ("hello", "non-empty list"),
        ([u("hi"), u("again")], r"messages\[1\] is from 'user' where 'assistant' was expected"),
        ([a("hi")], r"messages\[0\] is from 'assistant' where 'user' was expected"),
        ([s("sys")], "must be followed by a user message"),
        ([s("sys"), a("hi")], r"messages\[1\] is from 'assistant' where 'user'"),
        ([u("hi"), s("sys")], r"messages\[1\] is from 'system' where 'assistant'"),
        ([u("hi"), a("yo"), s("sys"), a("x")], r"messages\[2\] is from 'system' where 'user'"),
        ([{"role": "bot", "content": "x"}], r"messages\[0\]\.role is 'bot'; allowed: system, user, assistant"),
        ([{"role": "user"}], r"messages\[0\] has no 'content'"),
        ([{"role": "user", "content": 3}], r"messages\[0\]\.content must be a string, got int"),
        (["hi"], r"messages\[0\] must be an object"),
    ],
)
def test_bad_dialogs(dialog, message):
    with pytest.raises(DialogError, match=message):
        check_dialog(dialog)


def test_prompt_needs_a_final_user_message(llama):
    tok, _ = llama
    with pytest.raises(DialogError, match="last message must be from the user"):
        encode_prompt(tok, DIALOGS["one turn answered"])


def test_mask_when_a_piece_crosses_into_the_answer():
    # A tokenizer without Llama 2's split at whitespace learns "at▁[/INST]▁Sure", a piece that starts in the prompt
    # and ends in the answer: the tokens stay Meta's, and the mask starts where the prompt-only encoding stops
    # matching, so that piece is trained on.
    words = ["apple", "bird", "cat", "dog", "egg", "fish", "goat", "hat", "ink", "jam"]
    words += ["kite", "lamp", "moon", "nut", "owl", "pig", "quail", "rat", "sun", "toy"]
    lines = [f"[INST] {x} {y} [/INST] Sure {y} " for x, y in itertools.product(words, words)]
    tok = train_bpe(lines, 350, num_threads=1, split_by_whitespace=False, split_by_unicode_script=False)
    sp = tok.sp
    prompt = [1, *sp.encode("[INST] cat [/INST]")]
    full = [1, *sp.encode("[INST] cat [/INST] Sure "), 2]
    assert full[: len(prompt)] != prompt, "this tokenizer should merge across the prompt/answer boundary"
    shared = next(i for i, (x, y) in enumerate(zip(full, prompt, strict=False)) if x != y)
    encoded = encode_dialog(tok, [u("cat"), a("Sure")])
    assert encoded.tokens == full == meta_chat_tokens(sp, [u("cat"), a("Sure")])
    assert encoded.mask == [0] * shared + [1] * (len(full) - shared)
    assert "[/INST]" in sp.id_to_piece(full[shared]).replace("▁", " ")
