"""Readers and writers of other checkpoint formats: Meta, Hugging Face, llama2.c, and GGUF (``gguf_format``); a
model with a LoRA adapter merged in; LoRA adapters out to PEFT's layout.

Every reader returns a ``source.Source``: the model config, the tokenizer bytes when it has them, and tensor plans named
as llamactl (Meta's) names, each produced on demand from memory-mapped inputs, so that a conversion streams
tensor by tensor. A converter is a key map plus, for Hugging Face, the rotary permutation of wq/wk.
"""

from __future__ import annotations

import glob
import json
import os
import struct

import numpy as np
import torch

from llamactl.checkpoint import (
    FORMAT,
    TensorPlan,
    group_plans,
    load_tensors,
    read_meta,
    read_safetensors,
    save_plans,
    stored_dtype,
    write_safetensors,
)
from llamactl.config import model_args
from llamactl.errors import UserError
from llamactl.files import atomic_path, kind_of, os_reason, require_input
from llamactl.model import ModelArgs
from llamactl.source import Source

FORMATS = ("llamactl", "meta", "hf", "llama2c", "gguf", "run")


def detect_format(path: str) -> str:
    if os.path.isdir(path):
        if any(os.path.isfile(os.path.join(path, f)) for f in ("trainer.json", "latest")):
            return "run"
        if os.path.isfile(os.path.join(path, "params.json")):
            return "meta"
        if os.path.isfile(os.path.join(path, "config.json")):
            return "hf"
        raise UserError(f"{path}: is a directory without params.json (Meta) or config.json (Hugging Face)")
    if not os.path.isfile(path + ".index.json"):
        require_input(path, "checkpoint file or directory")
    if path.endswith((".safetensors", ".json")) or os.path.isfile(path + ".index.json"):
        return "llamactl"
    if path.endswith(".gguf"):
        return "gguf"
    if path.endswith(".bin"):
        return "llama2c"
    with open(path, "rb") as f:
        magic = f.read(16)
    if len(magic) >= 9 and magic[8:9] == b"{":
        return "llamactl"
    if magic[:4] == b"GGUF":
        return "gguf"
    raise UserError(f"{path}: unknown checkpoint format; name it with --from ({', '.join(FORMATS)})")


def read_json_object(path: str) -> dict:
    require_input(path, "JSON file")
    try:
        with open(path, "rb") as f:
            obj = json.load(f)
    except OSError as e:
        raise UserError(f"{path}: {os_reason(e)}") from None
    except (ValueError, RecursionError) as e:
        raise UserError(f"{path}: not JSON ({str(e)[:120]})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: not a JSON object")
    return obj


def _read_tokenizer(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as f:
        return f.read()


def _find_tokenizer(*dirs: str) -> bytes | None:
    for d in dirs:
        p = os.path.join(d, "tokenizer.model")
        if os.path.isfile(p):
            return _read_tokenizer(p)
    return None


# ---------------------------------------------------------------------------------------------------- llamactl


def read_llamactl(path: str) -> Source:
    meta = read_meta(path)
    tensors = load_tensors(path)
    plans = [TensorPlan(k, tuple(t.shape), t.dtype, lambda t=t: t) for k, t in tensors.items()]
    return Source(meta.args, plans, meta.tokenizer, meta.lineage, stored_dtype(tensors), meta.role, meta.quant)


def read_merged(base: str, adapter: str) -> Source:
    """A llamactl checkpoint with a LoRA adapter merged into it (``loading.merged_plans``: one merged layer in memory at
    a time); the adapter must be one trained on it (``lora.check_base``). A quantized base gives a floating-point
    model."""
    from llamactl import loading, lora

    meta = read_meta(base)
    ameta, atensors = lora.read_adapter(adapter)
    lora.check_base(ameta, base, meta)
    tensors = load_tensors(base)
    plans = loading.merged_plans(tensors, meta, ameta, atensors, base)
    out = ameta.adapted(meta, merged=True)
    return Source(out.args, plans, out.tokenizer, out.lineage, stored_dtype(tensors), out.role)


# ---------------------------------------------------------------------------------------------------- Meta

# How Meta's model-parallel layers split each weight (fairscale): ColumnParallelLinear splits the output dim (0),
# RowParallelLinear and ParallelEmbedding the input/embedding dim (1); norms are replicated.
_META_SPLIT_DIM = {"wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w3": 0, "w2": 1, "output": 0, "tok_embeddings": 1}


def _meta_split_dim(name: str) -> int | None:
    for part in name.split("."):
        if part in _META_SPLIT_DIM:
            return _META_SPLIT_DIM[part]
    return None


def read_meta_checkpoint(path: str) -> Source:
    params_file = os.path.join(path, "params.json")
    params = read_json_object(params_file)
    shards = sorted(glob.glob(os.path.join(path, "consolidated.*.pth")))
    if not shards:
        raise UserError(f"{path}: no consolidated.NN.pth files next to params.json")
    parts = []
    for s in shards:
        try:
            parts.append(torch.load(s, map_location="cpu", weights_only=True, mmap=True))
        except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError... for a damaged file
            raise UserError(f"{s}: cannot read this PyTorch checkpoint ({str(e).splitlines()[0][:120]})") from None
    names = [k for k in parts[0] if not k.endswith("rope.freqs")]
    for s, p in zip(shards, parts, strict=True):
        if [k for k in p if not k.endswith("rope.freqs")] != names:
            raise UserError(f"{s}: holds other tensors than {os.path.basename(shards[0])}")
    plans = []
    for name in names:
        pieces = [p[name] for p in parts]
        dim = _meta_split_dim(name) if len(pieces) > 1 else None
        shape = list(pieces[0].shape)
        if dim is not None:
            shape[dim] = sum(t.shape[dim] for t in pieces)
        produce = (lambda ps=pieces, d=dim: torch.cat(ps, dim=d)) if dim is not None else (lambda t=pieces[0]: t)
        plans.append(TensorPlan(name, tuple(shape), pieces[0].dtype, produce))
    shapes = {p.name: p.shape for p in plans}
    if "tok_embeddings.weight" not in shapes or "layers.0.feed_forward.w1.weight" not in shapes:
        raise UserError(f"{shards[0]}: not a Llama checkpoint (no tok_embeddings / feed_forward weights)")
    vocab, dim = shapes["tok_embeddings.weight"]
    known = {"dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "ffn_dim_multiplier", "norm_eps", "rope_theta"}
    cfg = {k: v for k, v in params.items() if k in known and v is not None}
    args = model_args(
        {
            **cfg,
            "vocab_size": vocab,
            "hidden_dim": shapes["layers.0.feed_forward.w1.weight"][0],
            "max_seq_len": params.get("max_seq_len", 4096),  # Llama 2's context; params.json does not say it
            "tie_embeddings": "output.weight" not in shapes,
        },
        params_file,
    )
    if args.dim != dim:
        raise UserError(f"{params_file}: dim {args.dim} does not match tok_embeddings width {dim}")
    return Source(args, plans, _find_tokenizer(path, os.path.dirname(os.path.abspath(path))), {}, plans[0].dtype)


# ---------------------------------------------------------------------------------------------------- Hugging Face

_HF_LAYER = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
_HF_TOP = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "score.weight": "score.weight",
}


def hf_to_llamactl_name(name: str) -> str | None:
    if name in _HF_TOP:
        return _HF_TOP[name]
    parts = name.split(".")
    if len(parts) >= 5 and parts[0] == "model" and parts[1] == "layers":
        sub = ".".join(parts[3:-1])
        if sub in _HF_LAYER:
            return f"layers.{parts[2]}.{_HF_LAYER[sub]}.{parts[-1]}"
    return None


def llamactl_to_hf_name(name: str) -> str:
    for hf, ours in _HF_TOP.items():
        if name == ours:
            return hf
    parts = name.split(".")
    sub = ".".join(parts[2:-1])
    for hf, ours in _HF_LAYER.items():
        if sub == ours:
            return f"model.layers.{parts[1]}.{hf}.{parts[-1]}"
    raise ValueError(f"no Hugging Face name for {name}")


def permute_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved rotary pairs (2i, 2i+1) -> Hugging Face's halves (i, i + hd/2), per head, on rows."""
    out, dim = w.shape
    return w.view(n_heads, out // n_heads // 2, 2, dim).transpose(1, 2).reshape(out, dim)


def permute_from_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    out, dim = w.shape
    return w.view(n_heads, 2, out // n_heads // 2, dim).transpose(1, 2).reshape(out, dim)


def _hf_weight_files(path: str) -> tuple[list[str], str]:
    for index_name, kind in (("model.safetensors.index.json", "safetensors"), ("pytorch_model.bin.index.json", "bin")):
        index = os.path.join(path, index_name)
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    files = sorted(set(json.load(f)["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                raise UserError(f"{index}: not a weight index (JSON with 'weight_map')") from None
            return [os.path.join(path, f) for f in files], kind
    for name, kind in (("model.safetensors", "safetensors"), ("pytorch_model.bin", "bin")):
        if os.path.isfile(os.path.join(path, name)):
            return [os.path.join(path, name)], kind
    raise UserError(f"{path}: no model.safetensors or pytorch_model.bin (nor their index) in this directory")


# ModelArgs fields and the config.json keys they are read from
_HF_CONFIG = {
    "dim": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "vocab_size": "vocab_size",
    "hidden_dim": "intermediate_size",
    "norm_eps": "rms_norm_eps",
    "rope_theta": "rope_theta",
    "max_seq_len": "max_position_embeddings",
    "tie_embeddings": "tie_word_embeddings",
}


def read_hf(path: str) -> Source:
    cfg_file = os.path.join(path, "config.json")
    cfg = read_json_object(cfg_file)
    if cfg.get("model_type") != "llama":
        raise UserError(f"{cfg_file}: model_type is {cfg.get('model_type')!r}, only 'llama' converts")
    for key, ok in (("rope_scaling", None), ("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu")):
        if cfg.get(key, ok) != ok:
            raise UserError(f"{cfg_file}: {key}={cfg[key]!r} is not the Llama 2 architecture")
    architectures = cfg.get("architectures") or []
    if not isinstance(architectures, list):
        raise UserError(f"{cfg_file}: architectures must be a list, got {architectures!r}")
    defaults = {"rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096}
    defaults.update(tie_word_embeddings=False, num_key_value_heads=cfg.get("num_attention_heads"))
    missing = [k for k in _HF_CONFIG.values() if cfg.get(k, defaults.get(k)) is None]
    if missing:
        raise UserError(f"{cfg_file}: missing field {missing[0]!r}")
    values = {ours: cfg.get(theirs, defaults.get(theirs)) for ours, theirs in _HF_CONFIG.items()}
    values["head"] = "scalar" if "LlamaForSequenceClassification" in architectures else "lm"
    args = model_args(values, cfg_file, _HF_CONFIG)
    if cfg.get("head_dim") not in (None, args.head_dim):
        raise UserError(f"{cfg_file}: head_dim {cfg['head_dim']} differs from hidden_size / num_attention_heads")
    files, kind = _hf_weight_files(path)
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        if not os.path.isfile(f):
            raise UserError(f"{f}: weight file named by the index is missing")
        if kind == "safetensors":
            tensors.update(read_safetensors(f))
        else:
            try:
                tensors.update(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
            except Exception as e:  # a damaged pickle raises many types
                raise UserError(f"{f}: cannot read this PyTorch checkpoint ({str(e).splitlines()[0][:120]})") from None
    plans = []
    for hf_name, t in tensors.items():
        name = hf_to_llamactl_name(hf_name)
        if name is None:
            if hf_name.endswith("rotary_emb.inv_freq"):
                continue  # a buffer older transformers saved; recomputed from rope_theta
            raise UserError(f"{files[0]}: unexpected tensor {hf_name!r} for a Llama model")
        if args.tie_embeddings and name == "output.weight":
            continue
        heads = args.n_heads if name.endswith("wq.weight") else args.n_kv_heads if name.endswith("wk.weight") else 0
        produce = (lambda t=t, h=heads: permute_from_hf(t, h)) if heads else (lambda t=t: t)
        plans.append(TensorPlan(name, tuple(t.shape), t.dtype, produce))
    return Source(args, plans, _find_tokenizer(path), {}, stored_dtype(tensors))


def hf_config(args: ModelArgs, dtype: torch.dtype) -> dict:
    return {
        "architectures": ["LlamaForSequenceClassification" if args.head == "scalar" else "LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_attention_heads": args.n_heads,
        "num_hidden_layers": args.n_layers,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": args.norm_eps,
        "vocab_size": args.vocab_size,
        "max_position_embeddings": args.max_seq_len,
        "rope_theta": args.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": args.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "bos_token_id": 1,
        "eos_token_id": 2,
        **({"num_labels": 1} if args.head == "scalar" else {}),
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def write_hf(out_dir: str, src: Source, shard_size: int | None) -> list[str]:
    """A directory that ``LlamaForCausalLM.from_pretrained`` loads: config.json, safetensors (+ index), tokenizer."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"{out_dir}: exists and is not a directory (--to hf writes a directory)")
    os.makedirs(out_dir, exist_ok=True)
    plans = []
    for p in src.plans:
        heads = src.args.n_heads if p.name.endswith("wq.weight") else 0
        heads = src.args.n_kv_heads if p.name.endswith("wk.weight") else heads
        produce = (lambda p=p, h=heads: permute_to_hf(p.produce(), h)) if heads else p.produce
        plans.append(TensorPlan(llamactl_to_hf_name(p.name), p.shape, p.dtype, produce))
    written = []
    total = sum(p.nbytes for p in plans)
    if shard_size is None or total <= shard_size:
        name = os.path.join(out_dir, "model.safetensors")
        write_safetensors(name, plans, {"format": "pt"})
        written.append(name)
    else:
        groups = group_plans(plans, shard_size)
        weight_map = {}
        for i, group in enumerate(groups):
            name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            write_safetensors(os.path.join(out_dir, name), group, {"format": "pt"})
            weight_map.update({p.name: name for p in group})
            written.append(os.path.join(out_dir, name))
        written.append(
            _write_json(
                os.path.join(out_dir, "model.safetensors.index.json"),
                {"metadata": {"total_size": total}, "weight_map": weight_map},
            )
        )
    # Weights of an earlier export in the other layout (or with more shards) would be loaded instead or beside.
    stale = glob.glob(os.path.join(out_dir, "model*.safetensors*")) + glob.glob(os.path.join(out_dir, "pytorch_model*"))
    for f in set(stale) - set(written):
        os.unlink(f)
    written.append(_write_json(os.path.join(out_dir, "config.json"), hf_config(src.args, src.dtype)))
    written.append(
        _write_json(
            os.path.join(out_dir, "generation_config.json"), {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
        )
    )
    if src.tokenizer is not None:
        tok = os.path.join(out_dir, "tokenizer.model")
        with atomic_path(tok) as tmp, open(tmp, "wb") as f:
            f.write(src.tokenizer)
        written.append(tok)
        written.append(
            _write_json(
                os.path.join(out_dir, "tokenizer_config.json"),
                {
                    "tokenizer_class": "LlamaTokenizer",
                    "bos_token": "<s>",
                    "eos_token": "</s>",
                    "unk_token": "<unk>",
                    "add_bos_token": True,
                    "add_eos_token": False,
                    "legacy": True,
                    "clean_up_tokenization_spaces": False,
                },
            )
        )
    return written


def _write_json(path: str, obj: dict) -> str:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    return path


# PEFT's names for our block linears, and for the tensors an adapter may train in full (``modules_to_save``)
PEFT_TARGETS = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj", "w1": "gate_proj", "w2": "down_proj",
                "w3": "up_proj"}  # fmt: skip
PEFT_EXTRA = {"score.weight": "score", "output.weight": "lm_head"}


def write_peft(out_dir: str, meta, tensors: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> list[str]:
    """A LoRA adapter (``lora.AdapterMeta`` and its tensors) as a directory that PEFT's ``PeftModel.from_pretrained``
    loads onto the base exported by ``write_hf``: ``adapter_config.json`` and ``adapter_model.safetensors``. The
    export permutes the rows of wq/wk (Hugging Face's rotary layout), so lora_B of wq/wk gets the same row
    permutation; lora_A, which acts on the inputs, none. A scalar head trained beside the adapter goes to
    ``modules_to_save`` (``LlamaForSequenceClassification``'s ``score``)."""
    from llamactl.lora import adapter_names

    unsupported = [e for e in meta.extra if e not in PEFT_EXTRA]
    if unsupported:
        raise UserError(f"{meta.path}: trains {unsupported[0]!r} in full beside its adapters, which PEFT's layout "
                        f"has no place for (it keeps {', '.join(PEFT_EXTRA)}); merge it instead: llamactl convert "
                        f"BASE --merge-adapter {meta.path}")  # fmt: skip
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"{out_dir}: exists and is not a directory (--to peft writes a directory)")
    os.makedirs(out_dir, exist_ok=True)
    args, plans = meta.args, []
    for name in adapter_names(args, meta.spec):
        hf = "base_model.model." + llamactl_to_hf_name(f"{name}.weight").removesuffix(".weight")
        heads = {"wq": args.n_heads, "wk": args.n_kv_heads}.get(name.rsplit(".", 1)[1], 0)
        a, b = tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"]
        plans.append(TensorPlan(f"{hf}.lora_A.weight", tuple(a.shape), dtype or a.dtype, lambda a=a: a))
        produce = (lambda b=b, h=heads: permute_to_hf(b, h)) if heads else (lambda b=b: b)
        plans.append(TensorPlan(f"{hf}.lora_B.weight", tuple(b.shape), dtype or b.dtype, produce))
    for name in meta.extra:
        t = tensors[name]
        plans.append(TensorPlan(f"base_model.model.{llamactl_to_hf_name(name)}", tuple(t.shape), dtype or t.dtype,
                                lambda t=t: t))  # fmt: skip
    plans = [TensorPlan(p.name, p.shape, p.dtype, lambda p=p: p.produce().to(p.dtype)) for p in plans]
    weights = os.path.join(out_dir, "adapter_model.safetensors")
    write_safetensors(weights, plans, {"format": "pt"})
    stale = os.path.join(out_dir, "adapter_model.bin")  # an earlier export's would be loaded instead
    if os.path.isfile(stale):
        os.unlink(stale)
    config = {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS" if args.head == "scalar" else "CAUSAL_LM",
        "base_model_name_or_path": None,
        "r": meta.spec.rank,
        "lora_alpha": meta.spec.alpha,
        "lora_dropout": meta.spec.dropout,
        "target_modules": [PEFT_TARGETS[t] for t in meta.spec.targets],
        "modules_to_save": [PEFT_EXTRA[e] for e in meta.extra] or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }
    return [weights, _write_json(os.path.join(out_dir, "adapter_config.json"), config)]


# ---------------------------------------------------------------------------------------------------- llama2.c

_L2C_HEADER = struct.Struct("<7i")


def read_llama2c(path: str) -> Source:
    """llama2.c's legacy v0 ``.bin``: 7 int32 header fields, then float32 tensors in a fixed order."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(_L2C_HEADER.size)
    if len(head) < _L2C_HEADER.size:
        raise UserError(f"{path}: too short for a llama2.c header ({size} bytes)")
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq = _L2C_HEADER.unpack(head)
    shared = vocab > 0
    vocab = abs(vocab)
    if min(dim, hidden, n_layers, n_heads, n_kv, vocab, seq) <= 0 or dim % n_heads or n_heads % n_kv:
        raise UserError(f"{path}: header {(dim, hidden, n_layers, n_heads, n_kv, vocab, seq)} is not a llama2.c model")
    hd = dim // n_heads
    kv_dim = n_kv * hd
    layout = [
        ("tok_embeddings.weight", None, (vocab, dim)),
        ("attention_norm.weight", n_layers, (dim,)),
        ("attention.wq.weight", n_layers, (dim, dim)),
        ("attention.wk.weight", n_layers, (kv_dim, dim)),
        ("attention.wv.weight", n_layers, (kv_dim, dim)),
        ("attention.wo.weight", n_layers, (dim, dim)),
        ("ffn_norm.weight", n_layers, (dim,)),
        ("feed_forward.w1.weight", n_layers, (hidden, dim)),
        ("feed_forward.w2.weight", n_layers, (dim, hidden)),
        ("feed_forward.w3.weight", n_layers, (hidden, dim)),
        ("norm.weight", None, (dim,)),
        ("freq_cis_real", None, (seq, hd // 2)),  # RoPE tables, recomputed by the model
        ("freq_cis_imag", None, (seq, hd // 2)),
    ]
    if not shared:
        layout.append(("output.weight", None, (vocab, dim)))
    count = sum((n or 1) * int(np.prod(shape)) for _, n, shape in layout)
    expected = _L2C_HEADER.size + 4 * count
    if size != expected:
        raise UserError(
            f"{path}: header says dim={dim} hidden={hidden} layers={n_layers} vocab={vocab} seq={seq} "
            f"({expected} bytes) but the file has {size} bytes"
        )
    data = torch.from_numpy(np.memmap(path, dtype=np.float32, mode="c", offset=_L2C_HEADER.size, shape=(count,)))
    plans, offset = [], 0
    for name, n, shape in layout:
        numel = int(np.prod(shape))
        for i in range(n or 1):
            if not name.startswith("freq_cis"):
                full = f"layers.{i}.{name}" if n else name
                plans.append(
                    TensorPlan(full, shape, torch.float32, lambda o=offset, k=numel, s=shape: data[o : o + k].view(s))
                )
            offset += numel
    plans.sort(key=lambda p: _meta_order(p.name))
    args = model_args(dict(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv, vocab_size=vocab,
                           hidden_dim=hidden, max_seq_len=seq, tie_embeddings=shared), path)  # fmt: skip
    return Source(args, plans, None, {}, torch.float32)


def _meta_order(name: str) -> tuple:
    """Sort key: embeddings, then layer by layer, then final norm and head (the order a model's state_dict has)."""
    parts = name.split(".")
    if parts[0] == "layers":
        return (1, int(parts[1]), ".".join(parts[2:]))
    return (0 if parts[0] == "tok_embeddings" else 2, 0, name)


# ---------------------------------------------------------------------------------------------------- GGUF


def read_gguf(path: str) -> Source:
    from llamactl.gguf_format import read_gguf as read  # imports the gguf package: only for GGUF files

    return read(path)


def run_checkpoint(path: str) -> str:
    """The checkpoint folder ``path`` names: itself (``RUN/step-NNNNNNN``), or a run directory's latest."""
    from llamactl.training import checkpoints

    if os.path.isfile(os.path.join(path, "trainer.json")):
        return path
    folder = checkpoints.latest_checkpoint(path)
    if folder is None:
        raise UserError(f"{path}: a run directory without a checkpoint yet")
    return folder


def run_part(path: str) -> tuple:
    """(checkpoint folder, file, state-dict prefix, header) of the first file a training checkpoint makes: the run's
    model or adapter (ppo: its policy's)."""
    from llamactl.training import checkpoints

    folder = run_checkpoint(path)
    parts = checkpoints.saved_parts(folder)
    if not parts:
        raise UserError(f"{folder}: its trainer.json does not say what the run makes (an older llamactl's run)")
    file, (prefix, meta) = next(iter(parts.items()))
    return folder, file, prefix, meta


def read_run(path: str) -> Source:
    """A training checkpoint (``RUN/step-NNNNNNN/``, or a run directory: its latest) as a model: the run's model
    (ppo: its policy), each tensor streamed out of every rank's shards when it is written."""
    from llamactl.checkpoint import CheckpointMeta
    from llamactl.training import checkpoints

    folder, file, prefix, meta = run_part(path)
    if not isinstance(meta, CheckpointMeta):
        raise UserError(f"{folder}: holds LoRA adapters, not a model: convert {path} -o adapter.safetensors writes "
                        "them as an adapter file")  # fmt: skip
    plans = checkpoints.part_plans(folder, prefix)
    dtype = plans[0].dtype if plans else torch.float32
    details = [("trainer", f"{folder}, step {meta.lineage.get('step')}, the run's {file}")]
    return Source(meta.args, plans, meta.tokenizer, meta.lineage, dtype, meta.role, None, details)


READERS = {
    "run": read_run,
    "llamactl": read_llamactl,
    "meta": read_meta_checkpoint,
    "hf": read_hf,
    "llama2c": read_llama2c,
    "gguf": read_gguf,
}


def read_source(path: str, fmt: str = "auto") -> Source:
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt not in READERS:
        raise UserError(f"--from: unknown format {fmt!r}; use auto, {', '.join(FORMATS)}")
    if not (fmt == "llamactl" and os.path.isfile(path + ".index.json")):
        want_dir = fmt in ("meta", "hf", "run")
        if kind_of(path) != ("a directory" if want_dir else "a regular file"):
            require_input(path, "checkpoint directory" if want_dir else "checkpoint file")
            if want_dir:
                raise UserError(f"{path}: is a file; --from {fmt} reads a directory")
    return READERS[fmt](path)


__all__ = ["FORMAT", "FORMATS", "detect_format", "read_source", "save_plans", "write_hf"]
