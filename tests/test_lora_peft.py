"""convert --to peft and --merge-adapter against Hugging Face PEFT: our adapter exported, loaded by
``PeftModel.from_pretrained`` onto the base exported with ``convert --to hf``, gives our outputs; PEFT's
``merge_and_unload`` gives our merged weights."""

from __future__ import annotations

import json
import os

import pytest
import torch
from lora_helpers import random_adapter
from safetensors.torch import load_file

from llamactl.checkpoint import load_tensors
from llamactl.commands.convert import ConvertConfig, run
from llamactl.loading import load_for_inference, load_model
from llamactl.lora import TARGETS, LoraSpec, add_lora, read_adapter

peft = pytest.importorskip("peft")

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _sha_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture
def base(hf_model_dir, tmp_path) -> tuple[str, str]:
    """A random GQA Llama (made by transformers) as our checkpoint, and our export of it for transformers."""
    ours, hf = str(tmp_path / "base.safetensors"), str(tmp_path / "hf_base")
    run(ConvertConfig(src=hf_model_dir[0], output=ours))
    run(ConvertConfig(src=ours, output=hf, to="hf"))
    return ours, hf


def _tokens() -> torch.Tensor:
    return torch.randint(1, 128, (2, 13), generator=torch.Generator().manual_seed(0))  # no 0: the pad id below


def test_peft_loads_our_adapter_with_our_outputs_and_merges_to_our_weights(base, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    ours, hf = base
    adapter, out = str(tmp_path / "adapter.safetensors"), str(tmp_path / "peft")
    random_adapter(ours, adapter, LoraSpec(4, 8.0, 0.1, TARGETS), 0, scale=0.05)
    assert sorted(run(ConvertConfig(src=adapter, output=out, to="peft"))) == [
        os.path.join(out, "adapter_config.json"), os.path.join(out, "adapter_model.safetensors")]  # fmt: skip
    config = json.load(open(os.path.join(out, "adapter_config.json")))
    assert (config["r"], config["lora_alpha"], config["task_type"]) == (4, 8.0, "CAUSAL_LM")
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in load_file(
        os.path.join(out, "adapter_model.safetensors"))  # fmt: skip

    peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(hf), out).eval()
    model, _ = load_for_inference(ours, CPU, "fp32", "lm", "", need_tokenizer=False, adapter=adapter)  # merged
    wrapped, _ = load_model(ours)  # and unmerged: LoRALinear wrappers, as training runs it
    add_lora(wrapped, read_adapter(adapter)[0].spec)
    wrapped.load_state_dict(load_tensors(adapter), strict=False)
    tokens = _tokens()
    with torch.no_grad():
        want = peft_model(tokens).logits
        base_logits = LlamaForCausalLM.from_pretrained(hf).eval()(tokens).logits
        assert (want - base_logits).abs().max() > 1e-2  # the adapter changes the outputs
        torch.testing.assert_close(model(tokens), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(wrapped.eval()(tokens), want, rtol=1e-5, atol=1e-5)

    merged_hf, merged = str(tmp_path / "merged_hf"), str(tmp_path / "merged.safetensors")
    run(ConvertConfig(src=ours, merge_adapter=adapter, output=merged_hf, to="hf"))
    run(ConvertConfig(src=ours, merge_adapter=adapter, output=merged))
    theirs = {k: v for k, v in peft_model.merge_and_unload().state_dict().items()}
    got = load_file(os.path.join(merged_hf, "model.safetensors"))
    assert sorted(got) == sorted(theirs)
    for k, v in theirs.items():
        torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-6, msg=k)
    # and the llamactl file holds the same model (its q/k rows in Meta's rotary layout)
    merged_model, meta = load_for_inference(merged, CPU, "fp32", "lm", "", need_tokenizer=False)
    assert meta.lineage["inputs"][-1]["path"] == adapter
    with torch.no_grad():
        torch.testing.assert_close(merged_model(tokens), want, rtol=1e-5, atol=1e-5)


def test_a_reward_model_adapter_exports_for_sequence_classification(base, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForSequenceClassification

    ours, hf = base
    adapter, out = str(tmp_path / "rm.safetensors"), str(tmp_path / "peft_rm")
    random_adapter(ours, adapter, LoraSpec(2, 4.0, 0.0, ("wq", "wk", "w2")), 1, head=True, scale=0.05)
    run(ConvertConfig(src=adapter, output=out, to="peft"))
    config = json.load(open(os.path.join(out, "adapter_config.json")))
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    assert config["target_modules"] == ["q_proj", "k_proj", "down_proj"]

    hf_rm = LlamaForSequenceClassification.from_pretrained(hf, num_labels=1, pad_token_id=0)  # a new (random) score
    peft_model = PeftModel.from_pretrained(hf_rm, out).eval()
    model, _ = load_for_inference(ours, CPU, "fp32", "scalar", "", need_tokenizer=False, adapter=adapter)
    tokens = _tokens()
    with torch.no_grad():
        want = peft_model(tokens).logits[:, 0]  # the score at the last (non-pad) token
        torch.testing.assert_close(model(tokens)[:, -1], want, rtol=1e-5, atol=1e-5)
    assert torch.equal(load_tensors(adapter)["score.weight"], peft_model.base_model.model.score.weight.detach())


def test_a_head_trained_in_full_goes_to_modules_to_save(base, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    ours, hf = base
    adapter, out = str(tmp_path / "a.safetensors"), str(tmp_path / "peft")
    random_adapter(ours, adapter, LoraSpec(2, 4.0, 0.0, ("wv",)), 2, scale=0.05, extra=("output.weight",))
    run(ConvertConfig(src=adapter, output=out, to="peft"))
    assert json.load(open(os.path.join(out, "adapter_config.json")))["modules_to_save"] == ["lm_head"]
    peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(hf), out).eval()
    model, _ = load_for_inference(ours, CPU, "fp32", "lm", "", need_tokenizer=False, adapter=adapter)
    tokens = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), peft_model(tokens).logits, rtol=1e-5, atol=1e-5)
