"""--adapter on every inference command: each command's output with a base and an adapter is its output with the
model ``convert --merge-adapter`` writes (merging itself is checked against W + alpha/rank B A in tests/test_lora.py,
and against PEFT's merge in tests/test_lora_peft.py), and differs from the base's alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import peaked_model, save_chatty_model, save_reward_model
from lora_helpers import random_adapter

from llamactl.checkpoint import load_tensors, model_sha256, read_meta, save_model, sha256_file
from llamactl.commands import chat, compare, gatt_augment, generate, quantize, rejection_sample, score
from llamactl.commands import eval as evaluate
from llamactl.commands.convert import ConvertConfig
from llamactl.commands.convert import run as convert
from llamactl.lora import TARGETS, LoraSpec

QUESTIONS = [{"prompt": "Tell me a story."}, {"messages": [{"role": "user", "content": "2+2?"}]}]
ANSWERS = [{"prompt": "Tell me a story.", "response": "Once upon a time."}, {"prompt": "2+2?", "response": "4"}]


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """A chat model and a reward model, adapters trained on each (one making the chat model a reward model), and
    the models ``convert --merge-adapter`` makes of them."""
    root = tmp_path_factory.mktemp("adapters")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(root / "cache"))  # the checkpoints' sha256 cache
        yield _world(root)


def _world(root: Path) -> dict[str, str]:
    w = {"root": str(root)}
    w["base"] = str(root / "base.safetensors")
    save_chatty_model(w["base"])
    w["rm"] = save_reward_model(w["base"], str(root / "rm.safetensors"), seed=1, role="helpfulness")
    for name, on, spec, head in (
        ("adapter", "base", LoraSpec(4, 8.0, 0.0, TARGETS), False),
        ("rm_adapter", "rm", LoraSpec(2, 4.0, 0.0, ("wq", "wv", "w2")), False),
        ("to_rm", "base", LoraSpec(2, 4.0, 0.0, ("wq", "w1")), True),  # a language model -> a reward model
    ):
        w[name] = str(root / f"{name}.safetensors")
        random_adapter(w[on], w[name], spec, len(w), head=head, role="helpfulness" if head else None)
        w[f"merged_{name}"] = str(root / f"merged_{name}.safetensors")
        convert(ConvertConfig(src=w[on], merge_adapter=w[name], output=w[f"merged_{name}"]))
    for name, records in (("questions", QUESTIONS), ("answers", ANSWERS)):
        w[name] = str(root / f"{name}.jsonl")
        Path(w[name]).write_text("".join(json.dumps(r) + "\n" for r in records))
    w["prompts"] = str(root / "prompts.jsonl")
    Path(w["prompts"]).write_text('{"tokens": [1, 15043, 3186]}\n{"prompt": "Once upon a time"}\n')
    w["text"] = str(root / "text.txt")
    Path(w["text"]).write_text("The quick brown fox jumps over the lazy dog. " * 6)
    return w


def _lines(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _outputs(tmp_path: Path, run, make, variants: dict[str, dict]) -> dict[str, list[dict]]:
    """Run a command once per variant (its config's fields), each writing its own output; the records written."""
    out = {}
    for name, fields in variants.items():
        path = str(tmp_path / f"{name}.jsonl")
        run(make(output=path, **fields))
        out[name] = _lines(path)
    return out


def _three(w: dict, tmp_path: Path, run, make, cfg: dict) -> dict[str, list[dict]]:
    """A command's records with the chat model and its adapter, with the merged model, and with the base alone."""
    variants = {"adapted": dict(model=w["base"], adapter=w["adapter"]), "merged": dict(model=w["merged_adapter"]),
                "base": dict(model=w["base"])}  # fmt: skip
    return _outputs(tmp_path, run, make, {name: {**fields, **cfg} for name, fields in variants.items()})


def test_generate(w, tmp_path):
    cfg = dict(input=w["prompts"], max_new_tokens=6, temperature=0.0, logprobs=True)
    got = _three(w, tmp_path, generate.run, generate.GenerateConfig, cfg)
    assert got["adapted"] == got["merged"]
    assert [r["logprobs"] for r in got["adapted"]] != [r["logprobs"] for r in got["base"]]


def test_generate_on_a_quantized_base_runs_the_adapters_unmerged(tmp_path):
    """A quantized base keeps its int8 layers and runs the adapters beside them (fused for decode); the merged
    model is a float one (dequantized + B A): the same greedy tokens, log-probabilities to float rounding."""
    base, q = str(tmp_path / "base.safetensors"), str(tmp_path / "q.safetensors")
    save_model(base, peaked_model())
    quantize.run(quantize.QuantizeConfig(model=base, output=q, scheme="int8"))
    adapter, merged = str(tmp_path / "a.safetensors"), str(tmp_path / "merged.safetensors")
    random_adapter(base, adapter, LoraSpec(4, 8.0, 0.0, ("wq", "wk", "wo", "w1", "w2")), 0, scale=0.1)
    convert(ConvertConfig(src=q, merge_adapter=adapter, output=merged))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"tokens": [1, 5, 9]}\n{"tokens": [3, 7, 11, 13, 2]}\n')
    cfg = dict(input=str(prompts), max_new_tokens=10, temperature=0.0, logprobs=True, dtype="fp32")
    got = _outputs(tmp_path, generate.run, generate.GenerateConfig, {
        "adapted": dict(model=q, adapter=adapter, **cfg),
        "merged": dict(model=merged, **cfg),
        "base": dict(model=q, **cfg),
    })  # fmt: skip
    assert [r["tokens"] for r in got["adapted"]] == [r["tokens"] for r in got["merged"]]
    assert [r["tokens"] for r in got["adapted"]] != [r["tokens"] for r in got["base"]]
    for a, m in zip(got["adapted"], got["merged"], strict=True):
        # W x + s B (A x) against (W + s B A) x in fp32
        torch.testing.assert_close(torch.tensor(a["logprobs"]), torch.tensor(m["logprobs"]), rtol=1e-4, atol=1e-4)


def test_chat(w, tmp_path):
    dialogs = tmp_path / "dialogs.jsonl"
    dialogs.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}]}) + "\n"
                               for q in ("Tell me a story.", "2+2?")))  # fmt: skip
    cfg = dict(input=str(dialogs), batch=True, max_new_tokens=6, temperature=0.0)
    got = _three(w, tmp_path, chat.run, chat.ChatConfig, cfg)
    assert got["adapted"] == got["merged"] != got["base"]


def test_score(w, tmp_path):
    got = _outputs(tmp_path, score.run, score.ScoreConfig, {
        "adapted": dict(model=w["rm"], adapter=w["rm_adapter"], input=w["answers"]),
        "merged": dict(model=w["merged_rm_adapter"], input=w["answers"]),
        "base": dict(model=w["rm"], input=w["answers"]),
        "to_rm": dict(model=w["base"], adapter=w["to_rm"], input=w["answers"]),  # a language model made a judge
        "to_rm_merged": dict(model=w["merged_to_rm"], input=w["answers"]),
    })  # fmt: skip
    assert got["adapted"] == got["merged"] != got["base"]
    assert got["to_rm"] == got["to_rm_merged"]


def test_eval(w, tmp_path):
    cfg = dict(data=w["text"], context=16)
    got = _outputs(tmp_path, evaluate.run, evaluate.EvalConfig, {
        "adapted": dict(model=w["base"], adapter=w["adapter"], reference=w["base"], **cfg),
        "merged": dict(model=w["merged_adapter"], reference=w["base"], **cfg),
        "ref_adapted": dict(model=w["base"], reference=w["base"], reference_adapter=w["adapter"], **cfg),
        "ref_merged": dict(model=w["base"], reference=w["merged_adapter"], **cfg),
    })  # fmt: skip
    adapted, merged = got["adapted"][0], got["merged"][0]
    assert adapted.pop("adapter") == w["adapter"] and adapted.pop("model") == w["base"]
    assert merged.pop("model") == w["merged_adapter"]
    assert adapted == merged and adapted["kl_mean"] > 0  # against the base: the adapter's difference
    ref_adapted, ref_merged = got["ref_adapted"][0], got["ref_merged"][0]
    assert ref_adapted.pop("reference_adapter") == w["adapter"]
    ref_adapted.pop("reference"), ref_merged.pop("reference")
    assert ref_adapted == ref_merged


def test_rejection_sample(w, tmp_path):
    cfg = dict(input=w["questions"], k=2, max_new_tokens=5, seed=3)
    got = _outputs(tmp_path, rejection_sample.run, rejection_sample.RejectionSampleConfig, {
        "adapted": dict(model=w["base"], adapter=w["adapter"], rm=w["base"], rm_adapter=w["to_rm"], safety_rm=w["rm"],
                        safety_rm_adapter=w["rm_adapter"], **cfg),
        "merged": dict(model=w["merged_adapter"], rm=w["merged_to_rm"], safety_rm=w["merged_rm_adapter"], **cfg),
        "base": dict(model=w["base"], rm=w["merged_to_rm"], safety_rm=w["merged_rm_adapter"], **cfg),
    })  # fmt: skip
    for rec in got["adapted"]:
        assert rec.pop("sampled_by") == f"{w['base']} --adapter {w['adapter']}"
    for rec in got["merged"] + got["base"]:
        rec.pop("sampled_by")
    assert got["adapted"] == got["merged"] != got["base"]


def test_compare(w, tmp_path):
    keep = {name: str(tmp_path / f"{name}.keep.jsonl") for name in ("adapted", "merged")}
    got = _outputs(tmp_path, compare.run, compare.CompareConfig, {
        "adapted": dict(model_a=w["base"], adapter_a=w["adapter"], model_b=w["base"], rm=w["base"],
                        rm_adapter=w["to_rm"], input=w["questions"], keep=keep["adapted"], max_new_tokens=5),
        "merged": dict(model_a=w["merged_adapter"], model_b=w["base"], rm=w["merged_to_rm"], input=w["questions"],
                       keep=keep["merged"], max_new_tokens=5),
    })  # fmt: skip
    adapted, merged = _lines(keep["adapted"]), _lines(keep["merged"])
    assert adapted == merged
    assert all(r["answer_a"] != r["answer_b"] for r in adapted)  # A (adapted) and B (the base) answer differently
    summary = got["adapted"][0]
    assert (summary["adapter_a"], summary["rm_adapter"]) == (w["adapter"], w["to_rm"])
    for key in ("model_a", "rm", "adapter_a", "rm_adapter"):
        summary.pop(key, None), got["merged"][0].pop(key, None)
    assert summary == got["merged"][0]


def test_gatt_augment(w, tmp_path):
    dialogs = tmp_path / "dialogs.jsonl"
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
             {"role": "user", "content": "Bye"}]  # fmt: skip
    dialogs.write_text(json.dumps({"messages": turns}) + "\n")
    cfg = dict(input=str(dialogs), max_new_tokens=5, temperature=0.0)
    got = _three(w, tmp_path, gatt_augment.run, gatt_augment.GattConfig, cfg)
    assert got["adapted"] == got["merged"] != got["base"]


def test_quantize(w, tmp_path):
    adapted, merged = str(tmp_path / "adapted.safetensors"), str(tmp_path / "merged.safetensors")
    quantize.run(quantize.QuantizeConfig(model=w["base"], adapter=w["adapter"], output=adapted, scheme="int8"))
    quantize.run(quantize.QuantizeConfig(model=w["merged_adapter"], output=merged, scheme="int8"))
    a, m = load_tensors(adapted), load_tensors(merged)
    assert sorted(a) == sorted(m) and all(torch.equal(a[k], m[k]) for k in a)
    meta = read_meta(adapted)
    assert meta.quant.source_sha256 == f"{model_sha256(w['base'])}+{sha256_file(w['adapter'])}"
    assert [i["path"] for i in meta.lineage["inputs"]] == [w["base"], w["adapter"]]
    assert meta.tokenizer == read_meta(w["base"]).tokenizer
