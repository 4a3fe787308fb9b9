"""LoRA (llamactl.lora): the layer against its formula written out by hand and autograd of that formula, QLoRA's
input gradient against the float layer of the dequantized weight, merging against W + alpha/rank B A, the adapter
file and its checks, and the CLI's one-line refusals."""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from helpers import assert_user_error, peaked_model, run_cli, save_chatty_model
from lora_helpers import random_adapter

from llamactl.checkpoint import cached_sha256, load_tensors, model_sha256, read_meta, save_model, sha256_file
from llamactl.commands.quantize import QuantizeConfig
from llamactl.commands.quantize import run as quantize
from llamactl.errors import UserError
from llamactl.loading import load_for_inference, merged_tensors
from llamactl.lora import (
    TARGETS,
    AdapterMeta,
    LoRALinear,
    LoraSpec,
    adapter_names,
    adapter_state,
    adapters_disabled,
    add_lora,
    check_base,
    parse_targets,
    read_adapter,
    save_adapter,
)
from llamactl.model import Transformer
from llamactl.quant import QuantLinear, QuantSpec, dequantize, quantize_rtn

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _sha_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _randomize(layer: LoRALinear, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g))
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))


def _formula_and_grads(x, w, a, b, scale, upstream):
    """y = x W^T + scale x A^T B^T, and autograd's dy/dx, dy/dA, dy/dB of it, on fresh leaf copies."""
    x, a, b = (t.detach().clone().requires_grad_(True) for t in (x, a, b))
    y = x @ w.t() + scale * (x @ a.t() @ b.t())
    (y * upstream).sum().backward()
    return y.detach(), x.grad, a.grad, b.grad


# ------------------------------------------------------------------------------------------------- the layer


def test_lora_linear_is_the_formula_forward_and_backward():
    torch.manual_seed(0)
    base = nn.Linear(24, 40, bias=False)
    layer = LoRALinear(base, rank=4, scale=8 / 4)
    _randomize(layer, 1)
    x = torch.randn(3, 5, 24, requires_grad=True)
    upstream = torch.randn(3, 5, 40)
    y = layer(x)
    (y * upstream).sum().backward()
    want, dx, da, db = _formula_and_grads(x, base.weight.detach(), layer.lora_A, layer.lora_B, 2.0, upstream)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, dx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_A.grad, da, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_B.grad, db, rtol=1e-5, atol=1e-5)
    assert base.weight.grad is None and not base.weight.requires_grad  # the base is frozen
    layer.enabled = False
    torch.testing.assert_close(layer(x), x @ base.weight.t(), rtol=0, atol=0)


def test_fresh_adapter_is_initialised_as_peft_and_changes_nothing():
    torch.manual_seed(3)
    want = nn.init.kaiming_uniform_(torch.empty(4, 24), a=math.sqrt(5))  # PEFT's default for A
    layer = LoRALinear(nn.Linear(24, 40, bias=False), rank=4, scale=2.0)
    torch.manual_seed(3)
    layer.reset_parameters()
    assert torch.equal(layer.lora_A.detach(), want) and layer.lora_A.abs().max() <= 1 / math.sqrt(24)
    assert torch.equal(layer.lora_B.detach(), torch.zeros(40, 4))
    x = torch.randn(2, 24)
    assert torch.equal(layer(x), layer.base(x))


@pytest.mark.parametrize("scheme,group", [("int8", None), ("int4", 32)])
def test_qlora_input_gradient_is_the_dequantized_float_layers(scheme, group):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g)
    q = quantize_rtn(w, QuantSpec(scheme, group))
    base = QuantLinear(64, 48, scheme, group)
    for k, t in q.tensors.items():
        setattr(base, k, t)
    layer = LoRALinear(base, rank=4, scale=0.5)
    _randomize(layer, 2)
    w_deq = dequantize(base.qweight, base.scales, base.zeros, scheme)  # what the quantized layer stands for
    x = torch.randn(5, 64, generator=g, requires_grad=True)
    upstream = torch.randn(5, 48, generator=g)
    y = layer(x)
    (y * upstream).sum().backward()
    want, dx, da, db = _formula_and_grads(x, w_deq, layer.lora_A, layer.lora_B, 0.5, upstream)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, dx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_A.grad, da, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_B.grad, db, rtol=1e-5, atol=1e-5)

    # bf16 activations run torch's weight-packed CPU kernel, which has no backward of its own
    base.prepare(torch.bfloat16)
    assert base._cpu is not None
    xb = x.detach().bfloat16().requires_grad_(True)
    layer.lora_A.grad = layer.lora_B.grad = None
    (layer(xb).float() * upstream).sum().backward()
    # bf16 inputs and outputs: relative error of a few bf16 ulps (2^-8) over a 64-term dot product
    torch.testing.assert_close(xb.grad.float(), dx, rtol=3e-2, atol=3e-2)


def test_adapters_disabled_gives_the_base_model():
    model = peaked_model()
    x = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        base = model(x)
    add_lora(model, LoraSpec(4, 8.0))
    for _, m in model.named_modules():
        if isinstance(m, LoRALinear):
            _randomize(m, 0)
    reference = copy.deepcopy(model)  # (as ppo copies its policy): the wrappers copy with their names
    assert list(reference.state_dict()) == list(model.state_dict())
    with torch.no_grad():
        assert not torch.allclose(model(x), base)
        with adapters_disabled(model):
            torch.testing.assert_close(model(x), base, rtol=0, atol=0)
            assert not torch.allclose(reference(x), base)  # the copy's adapters stay on
        assert not torch.allclose(model(x), base)


def test_add_lora_on_a_meta_model_keeps_the_checkpoints_names():
    trained = peaked_model()
    spec = LoraSpec(2, 4.0, 0.1, ("wq", "wv", "w2"))
    with torch.device("meta"):
        model = Transformer(trained.args)
    names = add_lora(model, spec)
    assert names == adapter_names(model.args, spec) == [
        "layers.0.attention.wq", "layers.0.attention.wv", "layers.0.feed_forward.w2",
        "layers.1.attention.wq", "layers.1.attention.wv", "layers.1.feed_forward.w2",
    ]  # fmt: skip
    assert all(p.device.type == "meta" for p in model.parameters())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{x}" for n in names for x in "AB"}
    state = model.state_dict()
    base_names = list(trained.state_dict())
    assert [k for k in state if "lora_" not in k] == base_names  # the checkpoint's names, in its order
    assert state["layers.0.attention.wq.lora_A"].shape == (2, 64)
    assert state["layers.0.feed_forward.w2.lora_B"].shape == (64, 2)
    assert all(state[k].dtype == torch.float32 for k in state if "lora_" in k)
    # a checkpoint's tensors and an adapter's load into it as they are named
    adapter = {k: torch.randn(v.shape) for k, v in state.items() if "lora_" in k}
    model.load_state_dict(trained.state_dict() | adapter, assign=True)
    model.reset_rope("cpu")
    model.eval()  # (dropout 0.1 on the adapters' input while training)
    assert set(adapter_state(model)) == set(adapter)
    x = torch.randint(0, 97, (1, 7))
    with torch.no_grad():
        with adapters_disabled(model):
            torch.testing.assert_close(model(x), trained(x), rtol=0, atol=0)
        layer, a, b = trained.layers[1].attention.wq, adapter["layers.1.attention.wq.lora_A"], adapter[
            "layers.1.attention.wq.lora_B"]  # fmt: skip
        h = torch.randn(3, 64)
        torch.testing.assert_close(model.layers[1].attention.wq(h), h @ layer.weight.t() + 2.0 * h @ a.t() @ b.t())


def test_parse_targets():
    assert parse_targets("all") == TARGETS
    assert parse_targets("wv, wq") == ("wq", "wv")  # model order
    for bad in ("wq,xq", "", "q_proj"):
        with pytest.raises(UserError, match="--lora-targets"):
            parse_targets(bad)


# ------------------------------------------------------------------------------------------------- merging


def _model(**shape) -> Transformer:
    """A tiny GQA model whose input dims (64, 192) int4 groups of 32 divide."""
    return peaked_model(hidden_dim=192, **shape)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("lora") / "base.safetensors")
    save_model(path, _model())
    return path


def test_merge_is_w_plus_scale_b_a(base, tmp_path):
    spec = LoraSpec(4, 12.0, 0.0, ("wq", "wk", "w1", "w2"))
    ameta, at = random_adapter(base, str(tmp_path / "a.safetensors"), spec, 0)
    bt = load_tensors(base)
    for dtype in (torch.float32, torch.bfloat16):
        src = {k: v.to(dtype) for k, v in bt.items()}
        merged = merged_tensors(src, read_meta(base), ameta, at)
        assert sorted(merged) == sorted(bt)
        for k, w in src.items():
            name = k.removesuffix(".weight")
            if name.split(".")[-1] in spec.targets:
                want = (w.float() + 3.0 * (at[f"{name}.lora_B"] @ at[f"{name}.lora_A"])).to(dtype)
                assert torch.equal(merged[k], want), k
            else:
                assert torch.equal(merged[k], w), k


def test_merge_into_a_quantized_base_dequantizes_it(base, tmp_path):
    q = quantize(QuantizeConfig(model=base, output=str(tmp_path / "q.safetensors"), scheme="int4", group_size=32))
    qpath = q["output"]
    ameta, at = random_adapter(qpath, str(tmp_path / "a.safetensors"), LoraSpec(2, 2.0, 0.0, ("wv", "w3")), 1)
    qt = load_tensors(qpath)
    merged = merged_tensors(qt, read_meta(qpath), ameta, at)
    for i in range(2):
        for part in ("attention.wv", "attention.wq", "feed_forward.w3"):
            name = f"layers.{i}.{part}"
            w = dequantize(qt[f"{name}.qweight"], qt[f"{name}.scales"], qt[f"{name}.zeros"], "int4")
            if part != "attention.wq":
                w = w + at[f"{name}.lora_B"] @ at[f"{name}.lora_A"]
            assert torch.equal(merged[f"{name}.weight"], w), name
    assert not any(k.endswith(("qweight", "scales", "zeros")) for k in merged)


def test_a_quantized_base_runs_its_adapters_unmerged_fused_or_not(base, tmp_path):
    q = quantize(QuantizeConfig(model=base, output=str(tmp_path / "q.safetensors"), scheme="int8"))["output"]
    adapter = str(tmp_path / "a.safetensors")
    ameta, at = random_adapter(q, adapter, LoraSpec(4, 8.0, 0.0, ("wq", "wv", "w1", "w2")), 2)
    plain, _ = load_for_inference(q, CPU, "fp32", "lm", "", need_tokenizer=False, adapter=adapter)
    fused, _ = load_for_inference(q, CPU, "fp32", "lm", "", need_tokenizer=False, adapter=adapter, decode=True)
    assert isinstance(plain.layers[0].attention.wq, LoRALinear)
    assert isinstance(plain.layers[0].attention.wq.base, QuantLinear)
    assert isinstance(fused.layers[0].attention.wqkv, LoRALinear) and fused.layers[0].attention.wqkv.rank == 8
    # the reference: a float model holding dequantized weights with W + scale B A by hand
    ref = Transformer(plain.args).eval()
    qt = load_tensors(q)
    with torch.no_grad():
        for k, p in ref.state_dict().items():
            name = k.removesuffix(".weight")
            if f"{name}.qweight" in qt:
                w = dequantize(qt[f"{name}.qweight"], qt[f"{name}.scales"], None, "int8")
                if f"{name}.lora_A" in at:
                    w = w + 2.0 * at[f"{name}.lora_B"] @ at[f"{name}.lora_A"]
                p.copy_(w)
            else:
                p.copy_(qt[k])
    x = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        want = ref(x)
        # W x + s B (A x) against (W + s B A) x: fp32 sums in another order, through two layers of peaked weights
        torch.testing.assert_close(plain(x), want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(fused(x), plain(x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------- the file


def test_adapter_file_round_trip_and_header(base, tmp_path):
    path = str(tmp_path / "rm.safetensors")
    spec = LoraSpec(4, 8.0, 0.05, ("wq", "wv"))
    meta, tensors = random_adapter(base, path, spec, 0, head=True, role="safety")
    got_meta, got = read_adapter(path)
    assert got_meta == meta and got_meta.path == path
    assert got_meta.args.head == "scalar" and got_meta.role == "safety" and got_meta.base_args.head == "lm"
    assert set(got) == set(tensors) and all(torch.equal(got[k], tensors[k]) for k in got)
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        header = f.metadata()
    assert header["format"] == "llamactl-adapter/1"
    assert header["base_sha256"] == sha256_file(base)
    assert set(header) == {"format", "lora", "base_sha256", "base_config", "extra", "lineage", "role"}


def _damaged(base: str, tmp_path: Path, name: str, tensors=None, header=None) -> str:
    """An adapter file with its tensors or header changed."""
    from llamactl.checkpoint import plan_from_tensors, write_safetensors

    meta, good = random_adapter(base, str(tmp_path / "good.safetensors"), LoraSpec(2, 4.0, 0.0, ("wq",)), 0)
    path = str(tmp_path / name)
    write_safetensors(path, plan_from_tensors(tensors(good) if tensors else good), (header or dict)(meta.to_header()))
    return path


@pytest.mark.parametrize(
    "name,tensors,header,needle",
    [
        ("missing.safetensors", lambda t: {k: v for k, v in t.items() if "layers.1" not in k}, None,
         "'layers.1.attention.wq.lora_A' is missing"),
        ("deep.safetensors", lambda t: t | {"layers.5.attention.wq.lora_A": torch.zeros(2, 64)}, None,
         "names a layer the base does not have"),
        ("shape.safetensors", lambda t: t | {"layers.0.attention.wq.lora_A": torch.zeros(3, 64)}, None,
         "has shape (3, 64), the header says (2, 64)"),
        ("rank.safetensors", None, lambda h: h | {"lora": '{"rank": 0, "alpha": 1, "targets": ["wq"]}'},
         "rank 0 is not a positive integer"),
        ("target.safetensors", None, lambda h: h | {"lora": '{"rank": 2, "alpha": 1, "targets": ["q_proj"]}'},
         "target 'q_proj'"),
        ("extra.safetensors", None, lambda h: h | {"extra": '["layers.0.attention.wq.weight"]'},
         "a layer the adapter adapts"),
        ("nosha.safetensors", None, lambda h: {k: v for k, v in h.items() if k != "base_sha256"}, "'base_sha256'"),
        ("role.safetensors", None, lambda h: h | {"role": "safety"}, "role 'safety' for a 'lm' head"),
    ],
)  # fmt: skip
def test_damaged_adapter_files_are_one_line_naming_file_and_field(base, tmp_path, name, tensors, header, needle):
    path = _damaged(base, tmp_path, name, tensors, header)
    with pytest.raises(UserError) as e:
        read_adapter(path)
    assert str(e.value).startswith(path) and needle in str(e.value) and "\n" not in str(e.value)


def test_check_base_takes_the_base_its_quantizations_and_a_qlora_bases_source(base, tmp_path):
    q = quantize(QuantizeConfig(model=base, output=str(tmp_path / "q.safetensors"), scheme="int8"))["output"]
    other = str(tmp_path / "other.safetensors")
    save_model(other, _model(), lineage={"command": "sft"})  # the same config and weights, another file
    on_float, _ = random_adapter(base, str(tmp_path / "f.safetensors"), LoraSpec(2, 2.0), 0)
    on_quant, _ = random_adapter(q, str(tmp_path / "q_a.safetensors"), LoraSpec(2, 2.0), 0)
    assert on_quant.base_source_sha256 == model_sha256(base) and on_quant.base_sha256 == model_sha256(q)
    for meta in (on_float, on_quant):
        for path in (base, q):
            check_base(meta, path, read_meta(path))
        with pytest.raises(UserError, match="was trained on another model than"):
            check_base(meta, other, read_meta(other))
    wide = str(tmp_path / "wide.safetensors")
    save_model(wide, _model(n_layers=3))
    with pytest.raises(UserError, match="n_layers 2 there, 3 here"):
        check_base(on_float, wide, read_meta(wide))


def test_model_sha256_hashes_a_file_once(base, tmp_path, monkeypatch):
    import llamactl.checkpoint as ck

    path = str(tmp_path / "m.safetensors")
    save_model(path, _model(), shard_size=20_000)  # an index and shards
    files = ck.checkpoint_files(path)
    assert len(files) > 2
    want = ",".join(sha256_file(f) for f in files)
    assert model_sha256(path) == want
    assert os.path.isfile(tmp_path / "cache" / "llamactl" / "sha256.json")

    def no_hashing(p):
        raise AssertionError(f"hashed {p} again")

    monkeypatch.setattr(ck, "sha256_file", no_hashing)
    assert model_sha256(path) == want  # from the cache
    os.utime(files[1], ns=(0, 0))  # touched: hashed again
    with pytest.raises(AssertionError, match="hashed"):
        model_sha256(path)
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", "/proc/no-such-dir")  # a cache that cannot be written is no error
    assert cached_sha256(files[1]) == sha256_file(files[1])


# ------------------------------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("cli")
    w = {"root": str(root)}
    w["model"] = str(root / "model.safetensors")
    save_chatty_model(w["model"], max_seq_len=64)
    w["other"] = str(root / "other.safetensors")
    save_chatty_model(w["other"], max_seq_len=32)  # the same weights, another context
    w["prompts"] = str(root / "prompts.jsonl")
    Path(w["prompts"]).write_text('{"tokens": [1, 15043]}\n')
    w["adapter"] = str(root / "adapter.safetensors")
    random_adapter(w["model"], w["adapter"], LoraSpec(2, 4.0), 0)
    w["other_adapter"] = str(root / "other_adapter.safetensors")
    random_adapter(w["other"], w["other_adapter"], LoraSpec(2, 4.0), 0)
    w["truncated"] = str(root / "truncated.safetensors")
    data = Path(w["adapter"]).read_bytes()
    Path(w["truncated"]).write_bytes(data[: len(data) - 100])
    w["deep"] = str(root / "deep.safetensors")  # names layers the 1-layer model does not have
    meta, tensors = read_adapter(w["adapter"])
    from llamactl.checkpoint import plan_from_tensors, write_safetensors

    deep = tensors | {k.replace("layers.0", "layers.3"): v for k, v in tensors.items()}
    write_safetensors(w["deep"], plan_from_tensors(deep), meta.to_header())
    w["rm_adapter"] = str(root / "rm_adapter.safetensors")
    random_adapter(w["model"], w["rm_adapter"], LoraSpec(2, 4.0), 0, head=True, role="helpfulness")
    return w


GEN = "generate -m {model} -i {prompts} -o {out} --max-new-tokens 2 --adapter"
CASES = [
    ("another-base", f"{GEN} {{other_adapter}}", ["{other_adapter}", "another config", "max_seq_len 32 there"]),
    ("model-as-adapter", f"{GEN} {{other}}", ["{other}", "is a model checkpoint, not a LoRA adapter"]),
    ("truncated", f"{GEN} {{truncated}}", ["{truncated}"]),
    ("no-such-layer", f"{GEN} {{deep}}", ["{deep}", "'layers.3.attention.", "does not have (it has 1 layer)"]),
    ("adapter-as-model", "generate -m {adapter} -i {prompts} -o {out}",
     ["{adapter}", "is a LoRA adapter, not a model"]),
    ("head", f"{GEN} {{rm_adapter}}", ["{rm_adapter}", "reward model (scalar head)", "language model is needed"]),
    ("score-lm-adapter", "score -m {model} -i {prompts} -o {out} --adapter {adapter}",
     ["{adapter}", "makes {model} a language model", "reward model (scalar head) is needed"]),
    ("merge-another-base", "convert {other} --merge-adapter {adapter} -o {out}", ["{adapter}", "another config"]),
    ("merge-into-adapter", "convert {adapter} --merge-adapter {adapter} -o {out}", ["{adapter}", "--to peft"]),
    ("adapter-to-llamactl", "convert {adapter} -o {out}", ["{adapter}", "is a LoRA adapter", "--to peft"]),
    ("model-to-peft", "convert {model} --to peft -o {out}", ["{model}", "--to peft exports a LoRA adapter"]),
    ("quantize-another-base", "quantize -m {other} --scheme int8 -o {out} --adapter {adapter}", ["{adapter}"]),
    ("eval-reference-adapter", "eval -m {model} --data {prompts} -o {out} --reference-adapter {adapter}",
     ["--reference-adapter", "--reference"]),
]  # fmt: skip


@pytest.mark.parametrize("argv,needles", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_cli_refuses_in_one_line_and_writes_nothing(world, tmp_path, argv, needles):
    out = "out.safetensors" if argv.startswith(("convert", "quantize")) and "peft" not in argv else "out"
    values = {**world, "out": str(tmp_path / out)}
    proc = run_cli(*[a.format(**values) for a in argv.split()])
    assert_user_error(proc, *[n.format(**values) for n in needles])
    assert os.listdir(tmp_path) == [], os.listdir(tmp_path)  # no output, no temporary file


def test_convert_info_describes_an_adapter(world):
    proc = run_cli("convert", "--info", world["rm_adapter"])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"adapter      {world['rm_adapter']}"
    assert "lora         rank 2, alpha 4 (scale 2), dropout 0, targets wq,wk,wv,wo,w1,w2,w3" in lines
    assert "makes        a helpfulness reward model (scalar head)" in lines
    assert f"base         sha256 {sha256_file(world['model'])[:12]}" in lines
    assert any(line.startswith("parameters") and "32 in score.weight (trained in full)" in line for line in lines)


def test_save_adapter_refuses_tensors_that_do_not_fit_its_header(base, tmp_path):
    meta = AdapterMeta.of_base(LoraSpec(2, 4.0, 0.0, ("wq",)), base, read_meta(base))
    with pytest.raises(AssertionError, match="is missing"):
        save_adapter(str(tmp_path / "a.safetensors"), {}, meta)
