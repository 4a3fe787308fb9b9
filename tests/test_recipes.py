"""recipes/llama2-chat.mk: `make -n` prints the paper's chain in order, and the chain runs end to end on a tiny model
with small overrides (every stage's real command, one process each)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from helpers import TESTS, save_chatty_model

ROOT = os.path.dirname(TESTS)
RECIPE = os.path.join(ROOT, "recipes", "llama2-chat.mk")


def test_dry_run_prints_the_chain_in_order():
    proc = subprocess.run(["make", "-n", "-f", RECIPE], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    stages = [line.split("llamactl.cli ")[1].split()[0] for line in proc.stdout.splitlines() if "llamactl.cli " in line]
    chat = ["sft", "train-rm", "train-rm"] + ["rejection-sample", "sft"] * 4 + ["ppo", "gatt-augment", "sft"]
    assert stages == chat + ["quantize"]
    rs = [line for line in proc.stdout.splitlines() if "rejection-sample" in line]
    assert "--pool" not in rs[0] and all("--pool" in line for line in rs[1:])  # rounds 2-4 pool the earlier best
    assert "--kind helpfulness" in proc.stdout and "--kind safety" in proc.stdout


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_the_chain_runs_end_to_end_on_a_tiny_model(tmp_path):
    base = str(tmp_path / "base.safetensors")
    save_chatty_model(base, max_seq_len=96)
    said = ["Hi there", "Hello!", "How are you?", "Fine, thanks."]
    turns = [{"role": ("user", "assistant")[i % 2], "content": c} for i, c in enumerate(said)]
    dialogs = _write(tmp_path / "sft.jsonl", [{"messages": turns}, {"messages": turns[:2]}])
    pairs = [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}, {"prompt": "Sky?", "chosen": "Blue", "rejected": "No"}]
    help_pairs = _write(tmp_path / "help.jsonl", pairs)
    safety_pairs = _write(tmp_path / "safety.jsonl", pairs)
    prompts = _write(tmp_path / "prompts.jsonl", [{"prompt": "Say hi."}, {"prompt": "Name a colour."}])
    train = "--steps 1 --seq-len 64 --batch-size 2 --global-batch-size 2 --dtype fp32 --save-every 0"
    out = tmp_path / "out"
    variables = {
        "PY": sys.executable, "BASE": base, "SFT_DATA": dialogs, "HELP_PAIRS": help_pairs,
        "SAFETY_PAIRS": safety_pairs, "PROMPTS": prompts, "OUT": str(out), "SFT_FLAGS": train,
        "RM_FLAGS": train, "RS_SFT_FLAGS": train, "RS_K": "2 2 2 2", "RS_FLAGS": "--max-new-tokens 4 --dtype fp32",
        "PPO_FLAGS": "--iterations 1 --prompts-per-iteration 2 --minibatch-size 2 --batch-size 2 --max-new-tokens 4 "
                     "--dtype fp32",
        "GATT_FLAGS": "--max-new-tokens 4 --dtype fp32",
    }  # fmt: skip
    proc = subprocess.run(["make", "-f", RECIPE, *(f"{k}={v}" for k, v in variables.items())], capture_output=True,
                          text=True, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    from llamactl.checkpoint import read_meta

    final = read_meta(str(out / "v6-gatt" / "model.safetensors"))
    chain = []
    lineage = final.lineage
    while lineage:
        chain.append(lineage["command"])
        lineage = lineage.get("parent")
    assert chain == ["sft", "ppo"] + ["sft"] * 5  # GAtt <- PPO <- V4 <- V3 <- V2 <- V1 <- sft (the base has none)
    served = read_meta(str(out / "v6-gatt" / "model-int8.safetensors"))
    assert served.quant.scheme == "int8" and served.lineage["parent"] == final.lineage
    best = [json.loads(x) for x in open(out / "best-v4.jsonl")]
    assert len(best) == 2 and all(r["messages"][-1]["role"] == "assistant" for r in best)
    assert read_meta(str(out / "rm-safety" / "model.safetensors")).role == "safety"
