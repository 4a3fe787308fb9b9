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
