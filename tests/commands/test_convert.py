"""convert: Hugging Face, Meta and llama2.c in; llamactl and Hugging Face out; --info; bad inputs."""

import json
import os

import pytest
import torch
from helpers import FIXTURES, assert_user_error, run_cli
from llama2c_ref import Llama2cRef
from safetensors.torch import load_file

from llamactl.checkpoint import load_tensors, read_meta, save_model
from llamactl.commands.convert import ConvertConfig, run
from llamactl.convert import _META_SPLIT_DIM
from llamactl.generate import SamplingParams, generate
from llamactl.loading import load_model
from llamactl.model import ModelArgs, Transformer

STORIES = os.path.join(FIXTURES, "stories260K.bin")
LLAMA_TOKENIZER = os.path.join(FIXTURES, "llama2-tokenizer.model")


def test_hf_round_trip_is_bit_exact(hf_model_dir, tmp_path):
    path, hf = hf_model_dir
    ours = str(tmp_path / "m.safetensors")
    run(ConvertConfig(src=path, output=ours))
    run(ConvertConfig(src=ours, output=str(tmp_path / "back"), to="hf"))
    a, b = load_file(os.path.join(path, "model.safetensors")), load_file(str(tmp_path / "back" / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_hf_export_loads_in_transformers_with_identical_outputs(hf_model_dir, tmp_path):
    from transformers import LlamaForCausalLM

    path, hf = hf_model_dir
    ours = str(tmp_path / "m.safetensors")
    run(ConvertConfig(src=path, output=ours))
    run(ConvertConfig(src=ours, output=str(tmp_path / "back"), to="hf", shard_size="100KB"))
    assert os.path.isfile(tmp_path / "back" / "model.safetensors.index.json")  # sharded like Hugging Face
    hf2 = LlamaForCausalLM.from_pretrained(str(tmp_path / "back")).eval()
    model, _ = load_model(ours)
    tokens = torch.randint(0, 128, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(hf2(tokens).logits, hf(tokens).logits, rtol=0, atol=0)
        torch.testing.assert_close(model(tokens), hf(tokens).logits, rtol=1e-5, atol=1e-5)


def test_bf16_conversion_rounds_each_weight_once(hf_model_dir, tmp_path):
    path, hf = hf_model_dir
    out = str(tmp_path / "m.safetensors")
    run(ConvertConfig(src=path, output=out, dtype="bf16"))
    got = load_tensors(out)
    assert got["layers.1.feed_forward.w2.weight"].dtype == torch.bfloat16
    torch.testing.assert_close(
        got["layers.1.feed_forward.w2.weight"],
        hf.model.layers[1].mlp.down_proj.weight.to(torch.bfloat16),
        rtol=0,
        atol=0,
    )


def _meta_state(args: ModelArgs, seed: int = 0) -> dict[str, torch.Tensor]:
    model = Transformer(args)
    model.init_weights(seed)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _write_meta(directory, state, params, n_shards):
    """Meta's layout: params.json and consolidated.NN.pth, split as fairscale's model-parallel layers split."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "params.json"), "w") as f:
        json.dump(params, f)
    for i in range(n_shards):
        shard = {}
        for k, v in state.items():
            dim = next((d for part, d in _META_SPLIT_DIM.items() if f".{part}." in f".{k}"), None)
            shard[k] = v.chunk(n_shards, dim=dim)[i].clone() if dim is not None and n_shards > 1 else v
        shard["rope.freqs"] = torch.zeros(4)  # Meta's checkpoints carry this buffer; converters drop it
        torch.save(shard, os.path.join(directory, f"consolidated.{i:02d}.pth"))


def test_meta_two_shards_convert_to_the_unsplit_model(tmp_path):
    params = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, norm_eps=1e-5, vocab_size=-1)
    args = ModelArgs(**{k: v for k, v in params.items() if k != "vocab_size"}, vocab_size=96, max_seq_len=4096)
    state = _meta_state(args)
    _write_meta(tmp_path / "one", state, params, 1)
    _write_meta(tmp_path / "two", state, params, 2)
    run(ConvertConfig(src=str(tmp_path / "one"), output=str(tmp_path / "one.safetensors")))
    run(ConvertConfig(src=str(tmp_path / "two"), output=str(tmp_path / "two.safetensors")))
    one, two = load_tensors(str(tmp_path / "one.safetensors")), load_tensors(str(tmp_path / "two.safetensors"))
    assert sorted(one) == sorted(two) == sorted(state)
    for k in state:
        assert torch.equal(one[k], state[k]) and torch.equal(two[k], state[k]), k
    assert read_meta(str(tmp_path / "two.safetensors")).args == args


def test_stories260k_greedy_equals_llama2c_reference(tmp_path):
    out = str(tmp_path / "s.safetensors")
    run(ConvertConfig(src=STORIES, output=out))
    model, meta = load_model(out)
    assert (model.args.dim, model.args.n_layers, model.args.n_heads, model.args.n_kv_heads) == (64, 5, 8, 4)
    assert meta.lineage["inputs"][0]["sha256"]
    ref = Llama2cRef(STORIES).greedy([1], 48)
    got = generate(model, [[1]], SamplingParams(max_new_tokens=48, temperature=0), eos_id=None)[0]
    assert [1] + got.tokens == ref


def test_sharded_checkpoint_loads_like_a_single_file(tmp_path):
    run(ConvertConfig(src=STORIES, output=str(tmp_path / "one.safetensors")))
    run(ConvertConfig(src=STORIES, output=str(tmp_path / "many.safetensors"), shard_size="300KB"))
    assert os.path.isfile(tmp_path / "many.safetensors.index.json")
    assert not os.path.exists(tmp_path / "many.safetensors")
    a, b = load_tensors(str(tmp_path / "one.safetensors")), load_tensors(str(tmp_path / "many.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_resaving_in_the_other_layout_replaces_the_checkpoint(tmp_path):
    a = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=64, multiple_of=16, max_seq_len=32))
    b = Transformer(a.args)
    a.init_weights(0)
    b.init_weights(1)
    path = str(tmp_path / "m.safetensors")
    for first, second, shards in ((a, b, 20_000), (b, a, None)):
        save_model(path, first, shard_size=None if shards else 20_000)
        save_model(path, second, shard_size=shards)
        got = load_tensors(path)
        assert all(torch.equal(got[k], v) for k, v in second.state_dict().items())
        assert os.path.isfile(path) == (shards is None) and os.path.isfile(path + ".index.json") == bool(shards)
    assert os.listdir(tmp_path) == ["m.safetensors"]  # the sharded save's files are gone


def test_info_describes_a_checkpoint(tmp_path):
    out = str(tmp_path / "s.safetensors")
    assert run_cli("convert", STORIES, "-o", out, "--dtype", "bf16").returncode == 0
    proc = run_cli("convert", "--info", out)
    assert proc.returncode == 0, proc.stderr
    assert "dim=64 n_layers=5 n_heads=8 n_kv_heads=4" in proc.stdout
    assert "bfloat16" in proc.stdout and "260,032" in proc.stdout
    assert "lineage      llamactl convert" in proc.stdout and "stories260K.bin" in proc.stdout


def test_tokenizer_is_embedded_and_must_fit(tmp_path):
    proc = run_cli("convert", STORIES, "-o", str(tmp_path / "s.safetensors"), "--tokenizer", LLAMA_TOKENIZER)
    assert_user_error(proc, "32000 pieces do not fit", "512")
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize(
    "make, needles",
    [
        (lambda d: str(d / "missing.safetensors"), ["missing.safetensors", "no such"]),
        (lambda d: _junk(d / "junk.safetensors", b"\x00" * 100), ["junk.safetensors", "not a readable safetensors"]),
        (lambda d: _truncated(d), ["cut.safetensors"]),
        (lambda d: _junk(d / "bad.bin", open(STORIES, "rb").read()[:5000]), ["bad.bin", "header says", "5000 bytes"]),
    ],
    ids=["missing", "junk", "truncated", "llama2c-size-mismatch"],
)
def test_bad_checkpoints_fail_with_one_line(tmp_path, make, needles):
    src = make(tmp_path)
    out = tmp_path / "out" / "o.safetensors"
    for args in (("convert", src, "-o", str(out)), ("convert", "--info", src)):
        assert_user_error(run_cli(*args), *needles)
    assert not out.parent.exists() or not os.listdir(out.parent)


def _junk(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _truncated(d) -> str:
    good = d / "good.safetensors"
    run(ConvertConfig(src=STORIES, output=str(good)))
    return _junk(d / "cut.safetensors", good.read_bytes()[:-1000])


def test_impossible_flags_fail_before_work(tmp_path):
    assert_user_error(run_cli("convert", "--info", STORIES, "-o", str(tmp_path / "x.safetensors")), "--info")
    assert_user_error(run_cli("convert", "--info", STORIES, "--to", "hf"), "--info", "--to")
    assert_user_error(run_cli("convert", STORIES), "-o/--output is required")
    assert_user_error(run_cli("convert", STORIES, "-o", str(tmp_path / "x.pt")), ".safetensors")
    assert_user_error(run_cli("convert", STORIES, "-o", str(tmp_path / "x.safetensors"), "--dtype", "fp8"), "fp8")


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors-shards", "bin-shards"])
def test_sharded_hf_directories_convert(tmp_path, safe):
    from helpers import tiny_hf_config
    from transformers import LlamaForCausalLM

    torch.manual_seed(1)
    hf = LlamaForCausalLM(tiny_hf_config()).eval()
    src = tmp_path / "hf"
    if safe:
        hf.save_pretrained(src, max_shard_size="100KB")
    else:  # pytorch_model-0000K-of-0000N.bin + pytorch_model.bin.index.json, as older Hugging Face repositories hold
        from llamactl.convert import _write_json

        src.mkdir()
        state = hf.state_dict()
        names = sorted(state)
        half = len(names) // 2
        weight_map = {}
        for i, part in enumerate((names[:half], names[half:])):
            fname = f"pytorch_model-{i + 1:05d}-of-00002.bin"
            torch.save({k: state[k].clone() for k in part}, src / fname)
            weight_map.update(dict.fromkeys(part, fname))
        _write_json(str(src / "pytorch_model.bin.index.json"), {"metadata": {}, "weight_map": weight_map})
        hf.config.save_pretrained(src)
    assert len([f for f in os.listdir(src) if f.startswith(("model-", "pytorch_model-"))]) >= 2
    out = str(tmp_path / "m.safetensors")
    run(ConvertConfig(src=str(src), output=out))
    model, _ = load_model(out)
    tokens = torch.randint(0, 128, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, rtol=1e-5, atol=1e-5)


def test_scalar_head_exports_as_sequence_classifier(tmp_path):
    from transformers import LlamaForSequenceClassification

    args = ModelArgs(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=16, max_seq_len=64, head="scalar"
    )
    model = Transformer(args)
    model.init_weights(0)
    save_model(str(tmp_path / "rm.safetensors"), model)
    run(ConvertConfig(src=str(tmp_path / "rm.safetensors"), output=str(tmp_path / "rm-hf"), to="hf"))
    hf = LlamaForSequenceClassification.from_pretrained(str(tmp_path / "rm-hf")).eval()
    tokens = torch.randint(0, 128, (1, 23))
    with torch.no_grad():
        # Hugging Face scores a sequence at its last token; ours gives a score at every position
        torch.testing.assert_close(hf(tokens).logits[0, 0], model(tokens)[0, -1], rtol=1e-5, atol=1e-5)
    run(ConvertConfig(src=str(tmp_path / "rm-hf"), output=str(tmp_path / "back.safetensors")))
    assert read_meta(str(tmp_path / "back.safetensors")).args.head == "scalar"
