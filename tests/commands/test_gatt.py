"""gatt-augment: the instruction rides on every user turn while sampling, and the training example carries it once,
as the system message, with only the last turn trained on."""

import json
import os
import random

import pytest
from helpers import FIXTURES, run_cli, save_chatty_model

from llamactl import gatt
from llamactl.chat_format import encode_dialog
from llamactl.tokenizer import Tokenizer

DIALOG = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "How are you?"},
    {"role": "assistant", "content": "Fine."},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Goodbye."},
]


def test_attach_then_finalize():
    inst = "Always answer in French."
    attached = gatt.attach(DIALOG, inst)
    assert [m["content"] for m in attached if m["role"] == "user"] == [f"{inst}\n\n{u}" for u in ("Hi", "How are you?",
                                                                                                 "Bye")]  # fmt: skip
    final = gatt.finalize(attached, inst)
    assert final[0] == {"role": "system", "content": inst}
    assert [m["content"] for m in final[1:]] == [m["content"] for m in DIALOG]
    # every message before the last user turn, answers included, is loss-free; the last exchange is not marked
    assert [m.get("loss", True) for m in final[1:]] == [False, False, False, False, True, True]
    # so sft trains on exactly the last answer, as Meta's format with the loss on the last turn only would
    tok = Tokenizer.from_file(os.path.join(FIXTURES, "llama2-tokenizer.model"))
    plain = [{"role": "system", "content": inst}, *DIALOG]
    assert encode_dialog(tok, final).mask == encode_dialog(tok, plain, train_on="last").mask


def test_finalize_keeps_the_dialogs_own_system_prompt():
    inst = "Act as Napoleon."
    attached = gatt.attach([{"role": "system", "content": "Be kind."}, *DIALOG[:2]], inst)
    assert gatt.finalize(attached, inst)[0] == {"role": "system", "content": "Be kind.\nAct as Napoleon."}


def test_builtin_instructions_are_seeded_and_of_the_papers_kinds():
    def draw(seed):
        rng = random.Random(seed)
        return [gatt.builtin_instruction(rng) for _ in range(60)]

    a = draw(3)
    assert a == draw(3) and a != draw(4)
    assert all(s.startswith(("You enjoy", "Always answer in", "Act as")) for s in a)
    assert any(s.count(".") == 2 for s in a)  # some combine two kinds


def test_cli_prepare_finalize_and_with_a_model(tmp_path):
    dialogs = tmp_path / "d.jsonl"
    dialogs.write_text(json.dumps({"id": 1, "messages": DIALOG[:4]}) + "\n")
    inst = tmp_path / "inst.txt"
    inst.write_text("Answer in one word.\n")
    prepared = run_cli("gatt-augment", "-i", dialogs, "--instructions", inst)
    assert prepared.returncode == 0, prepared.stderr
    rec = json.loads(prepared.stdout)
    assert rec["gatt_instruction"] == "Answer in one word." and rec["id"] == 1
    finalized = run_cli("gatt-augment", "--finalize", stdin=prepared.stdout)
    assert finalized.returncode == 0, finalized.stderr
    out = json.loads(finalized.stdout)
    assert "gatt_instruction" not in out and out["messages"][0]["content"] == "Answer in one word."

    model = str(tmp_path / "m.safetensors")
    save_chatty_model(model, max_seq_len=128)
    sampled = run_cli("gatt-augment", "-i", dialogs, "--instructions", inst, "-m", model, "--max-new-tokens", "4")
    assert sampled.returncode == 0, sampled.stderr
    msgs = json.loads(sampled.stdout)["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
    assert [m["content"] for m in msgs if m["role"] == "user"] == ["Hi", "How are you?"]
    assert msgs[2]["content"] != "Hello." and msgs[2]["loss"] is False and "loss" not in msgs[4]


def test_each_answer_is_sampled_from_the_dialog_so_far_with_the_instruction_on_every_turn(tmp_path, monkeypatch):
    """gatt-augment -m, in this process, with the sampler's entry point (Chatter.answer_all) recording each prompt it
    is given: the answer to user turn k is sampled from BOS [INST] inst\\n\\nu_1 [/INST] a_1 EOS ... BOS [INST]
    inst\\n\\nu_k [/INST], built here with sentencepiece (the dialog's own system prompt merged into the first turn),
    where a_j are the answers the model gave before; and the training example written then carries the instruction
    once, as the system prompt of the first turn, the user turns as they came and the sampled answers."""
    import sentencepiece as spm

    from llamactl.commands.gatt_augment import GattConfig, run
    from llamactl.policy import Chatter

    sp = spm.SentencePieceProcessor(model_file=os.path.join(FIXTURES, "llama2-tokenizer.model"))
    inst = "Answer in one word."
    dialogs = [DIALOG[:4], [{"role": "system", "content": "Be kind."}, *DIALOG]]  # two and three user turns
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"messages": d}) + "\n" for d in dialogs))
    (tmp_path / "inst.txt").write_text(inst + "\n")
    model = str(tmp_path / "m.safetensors")
    save_chatty_model(model, max_seq_len=256)

    seen = []  # (prompt tokens, the answer sampled from them)
    real = Chatter.answer_all

    def spy(self, prompts, rows=None):
        texts = real(self, prompts, rows)
        seen.extend((tuple(p), t) for p, t in zip(prompts, texts, strict=True))
        return texts

    monkeypatch.setattr(Chatter, "answer_all", spy)
    out = tmp_path / "out.jsonl"
    cfg = GattConfig(input=str(src), output=str(out), instructions=str(tmp_path / "inst.txt"), model=model,
                     max_new_tokens=6, batch_size=2, dtype="fp32", device="cpu")  # fmt: skip
    assert run(cfg) == 2
    results = [json.loads(line)["messages"] for line in open(out)]
    assert len(seen) == 5  # one answer a user turn (2 + 3), none sampled again
    sampled = dict(seen)

    for given, got in zip(dialogs, results, strict=True):
        system = given[0]["content"] if given[0]["role"] == "system" else None
        users = [m["content"] for m in given if m["role"] == "user"]
        answers = [m["content"] for m in got if m["role"] == "assistant"]
        assert len(answers) == len(users) and all(answers)
        sys_text = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if system else ""
        for k in range(len(users)):
            turn = [sys_text * (j == 0) + f"{inst}\n\n{users[j]}" for j in range(k + 1)]
            prompt = []
            for j in range(k):
                prompt += [1] + sp.encode(f"[INST] {turn[j]} [/INST] {answers[j]} ") + [2]
            prompt += [1] + sp.encode(f"[INST] {turn[k]} [/INST]")
            assert sampled.get(tuple(prompt)) == answers[k], (k, sp.decode(prompt))
        # the training example: the instruction once, as the first turn's system prompt; loss on the last turn only
        assert got[0] == {"role": "system", "content": (system + "\n" if system else "") + inst}
        assert [m["content"] for m in got[1:] if m["role"] == "user"] == users
        assert [m.get("loss", True) for m in got[1:]] == [False] * (2 * len(users) - 2) + [True, True]
        tok = Tokenizer.from_file(os.path.join(FIXTURES, "llama2-tokenizer.model"))
        tokens = encode_dialog(tok, got).tokens
        first = f"<<SYS>>\n{got[0]['content']}\n<</SYS>>\n\n{users[0]}"
        want = [t for j, u in enumerate(users) for t in
                [1] + sp.encode(f"[INST] {first if j == 0 else u} [/INST] {answers[j]} ") + [2]]  # fmt: skip
        assert tokens == want and sp.decode(tokens).count(inst) == 1


@pytest.mark.parametrize(
    "stdin, needle",
    [
        ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}\n',
         "gatt_instruction"),
        ('{"gatt_instruction": "Z.", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", '
         '"content": "y"}]}\n', "does not start with the instruction"),
    ],
)  # fmt: skip
def test_finalize_refuses_what_was_not_prepared(stdin, needle):
    proc = run_cli("gatt-augment", "--finalize", stdin=stdin)
    assert proc.returncode == 2 and needle in proc.stderr and len(proc.stderr.splitlines()) == 1
