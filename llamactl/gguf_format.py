"""GGUF, llama.cpp's model file: a llamactl model out (config, SentencePiece vocabulary, Llama 2's chat template,
tensors in F32, F16, BF16 or Q8_0) and back in, through the ``gguf`` package that llama.cpp maintains.

Layout. GGUF's ``llama`` architecture keeps Meta's parameter layout: llama.cpp's rotary embedding for it rotates
adjacent pairs (2i, 2i+1) of each head, as Meta's code does, so wq and wk are written as llamactl holds them (only
Hugging Face's halves layout needs ``convert.permute_*``). A torch weight of shape (out, in) is a GGUF tensor of
ne = [in, out], the same bytes. Norms are always F32 (llama.cpp adds them to F32 activations); without an
``output`` tensor llama.cpp reuses ``token_embd`` as the head (tied embeddings).

Vocabulary. ``tokenizer.ggml.model = "llama"`` is SentencePiece BPE: tokens are its pieces (``▁`` for a space,
``<0x0A>`` byte pieces), with their scores and piece types (GGUF's token types number them as SentencePiece does).
llama.cpp re-implements that encoder without SentencePiece's normaliser, so only an identity-normalised BPE model
exports. Reading a GGUF back rebuilds a SentencePiece model file from the same lists.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch

from llamactl.checkpoint import TensorPlan
from llamactl.errors import UserError
from llamactl.files import atomic_path
from llamactl.model import ModelArgs
from llamactl.source import Source

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
ARCH = "llama"

# Llama 2's chat format as a chat template, rendering the text that ``chat_format.encode_dialog`` encodes: the system
# prompt merged into the first user message, each (user, answer) pair as BOS + "[INST] {user} [/INST] {answer} " +
# EOS, a final user message as BOS + "[INST] {user} [/INST]". The merged prompt is stripped whole (Meta strips
# after merging); BOS and EOS are written as their piece text, which llama.cpp parses back to the special ids.
LLAMA2_CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set offset = 1 -%}{%- set system = messages[0]['content'] -%}"
    "{%- else -%}{%- set offset = 0 -%}{%- endif -%}"
    "{%- if offset and messages | length == 1 -%}"
    "{{- raise_exception('a system message must be followed by a user message') -}}{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- for tag in ['[INST]', '[/INST]', '<<SYS>>', '<</SYS>>'] -%}{%- if tag in message['content'] -%}"
    "{{- raise_exception('a message contains the special tag ' + tag) -}}{%- endif -%}{%- endfor -%}"
    "{%- endfor -%}"
    "{%- for message in messages[offset:] -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('after an optional system message, user and assistant alternate, starting with the user')"
    " -}}{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if loop.first and offset -%}"
    "{%- set content = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + message['content'] -%}"
    "{%- else -%}{%- set content = message['content'] -%}{%- endif -%}"
    "{{- bos_token + '[INST] ' + content | trim + ' [/INST]' -}}"
    "{%- else -%}"
    "{{- ' ' + message['content'] | trim + ' ' + eos_token -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# llamactl (Meta) names -> llama.cpp names; per layer, then the rest
_LAYER = {
    "attention.wq": "attn_q",
    "attention.wk": "attn_k",
    "attention.wv": "attn_v",
    "attention.wo": "attn_output",
    "feed_forward.w1": "ffn_gate",
    "feed_forward.w2": "ffn_down",
    "feed_forward.w3": "ffn_up",
    "attention_norm": "attn_norm",
    "ffn_norm": "ffn_norm",
}
_TOP = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output"}


def gguf_name(name: str) -> str:
    """``layers.3.attention.wq.weight`` -> ``blk.3.attn_q.weight``."""
    parts = name.split(".")
    if parts[0] == "layers":
        return f"blk.{parts[1]}.{_LAYER['.'.join(parts[2:-1])]}.{parts[-1]}"
    return f"{_TOP[parts[0]]}.{parts[-1]}"


def llamactl_name(name: str) -> str | None:
    """The inverse of ``gguf_name``; None for a tensor the Llama 2 architecture does not have."""
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[3] == "weight":
        ours = {v: k for k, v in _LAYER.items()}.get(parts[2])
        return f"layers.{int(parts[1])}.{ours}.weight" if ours else None
    ours = {v: k for k, v in _TOP.items()}.get(parts[0])
    return f"{ours}.weight" if ours and parts[1:] == ["weight"] else None


# ---------------------------------------------------------------------------------------------------- vocabulary

_PIECE_TYPES = ("NORMAL", "UNKNOWN", "CONTROL", "USER_DEFINED", "UNUSED", "BYTE")  # SentencePiece's and GGUF's


def _model_proto(model_bytes: bytes, source: str):
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    try:
        m.ParseFromString(model_bytes)
    except Exception as e:  # protobuf's DecodeError; the bytes were loaded by SentencePiece before, so rare
        raise UserError(f"{source}: the tokenizer does not parse as a SentencePiece model ({e})") from None
    return m


def vocab_problem(model_bytes: bytes) -> str | None:
    """Why llama.cpp would tokenize differently with this SentencePiece model than SentencePiece does, or None."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = _model_proto(model_bytes, "tokenizer")
    kind = pb.TrainerSpec.ModelType.Name(m.trainer_spec.model_type)
    ns = m.normalizer_spec
    if kind != "BPE":
        return f"the tokenizer is a SentencePiece {kind} model; GGUF's 'llama' vocabulary is BPE"
    if ns.precompiled_charsmap or ns.normalization_rule_tsv:
        return f"the tokenizer normalises text ({ns.name}); llama.cpp does not, so encodings would differ"
    if ns.remove_extra_whitespaces:
        return "the tokenizer collapses runs of spaces; llama.cpp's 'llama' vocabulary does not"
    if m.trainer_spec.treat_whitespace_as_suffix:
        return "the tokenizer puts spaces after words; llama.cpp's 'llama' vocabulary puts them before"
    return None


def pad_piece(i: int) -> str:
    """The token that fills vocabulary slot ``i`` past the tokenizer's pieces (llama.cpp wants one per embedding row;
    llama.cpp's own converter names them so)."""
    return f"[PAD{i}]"


def vocab_metadata(model_bytes: bytes, vocab_size: int) -> dict:
    """Tokens, scores, token types and special ids of a SentencePiece model, padded to ``vocab_size`` entries."""
    m = _model_proto(model_bytes, "tokenizer")
    tokens = [p.piece for p in m.pieces]
    scores = [float(p.score) for p in m.pieces]
    types = [int(p.type) for p in m.pieces]
    for i in range(len(tokens), vocab_size):
        tokens.append(pad_piece(i))
        scores.append(-1000.0)
        types.append(_PIECE_TYPES.index("UNUSED") + 1)
    ts = m.trainer_spec
    return {
        "tokens": tokens,
        "scores": scores,
        "types": types,
        "bos": ts.bos_id,
        "eos": ts.eos_id,
        "unk": ts.unk_id,
        "pad": ts.pad_id,
        "add_space_prefix": m.normalizer_spec.add_dummy_prefix,
    }


def sentencepiece_model(tokens: list[str], scores: list[float], types: list[int], special: dict[str, int],
                        add_space_prefix: bool) -> bytes:  # fmt: skip
    """A SentencePiece BPE model file of these pieces: identity normalisation, byte fallback where there are byte
    pieces, the settings Llama 2's tokenizer has that decide how text encodes."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    for token, score, kind in zip(tokens, scores, types, strict=True):
        m.pieces.add(piece=token, score=score, type=kind)
    ts = m.trainer_spec
    ts.model_type = pb.TrainerSpec.BPE
    ts.vocab_size = len(tokens)
    ts.byte_fallback = _PIECE_TYPES.index("BYTE") + 1 in types
    ts.allow_whitespace_only_pieces = True
    ts.split_digits = True
    ts.unk_id, ts.bos_id, ts.eos_id, ts.pad_id = (special.get(k, -1) for k in ("unk", "bos", "eos", "pad"))
    for key in ("unk", "bos", "eos", "pad"):
        if special.get(key, -1) >= 0:
            setattr(ts, f"{key}_piece", tokens[special[key]])
    ns = m.normalizer_spec
    ns.name = "identity"
    ns.add_dummy_prefix = add_space_prefix
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True
    return m.SerializeToString()


# ---------------------------------------------------------------------------------------------------- writing


def default_type(dtype: torch.dtype) -> str:
    """The GGUF type a tensor of ``dtype`` keeps (``--gguf-type`` not given)."""
    return {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}.get(dtype, "f32")


def export_problem(src: Source, path: str, tokenizer_path: str | None = None) -> str | None:
    """Why ``src`` (read from ``path``, its tokenizer from ``tokenizer_path`` where given) cannot become a GGUF
    file llama.cpp runs as Llama, or None."""
    if src.quant is not None:
        return (
            f"{path}: is quantized ({src.quant.describe()}); GGUF export takes a floating-point checkpoint "
            "(export the one it was quantized from, with --gguf-type q8_0 for a quantized GGUF)"
        )
    if src.args.head == "scalar":
        role = f" ({src.role} {'model' if src.role == 'value' else 'reward model'})" if src.role else ""
        return f"{path}: has a scalar head{role}; GGUF's llama architecture holds language models only"
    if src.tokenizer is None:
        return f"{path}: has no tokenizer, and a GGUF file needs its vocabulary (attach one with --tokenizer)"
    problem = vocab_problem(src.tokenizer)
    return f"{tokenizer_path or path}: {problem}" if problem else None


def write_gguf(path: str, src: Source, gguf_type: str | None, name: str) -> list[str]:
    """Write ``src`` (plans in the model's order, names and shapes checked) as a GGUF file; returns ``[path]``.

    ``gguf_type`` None keeps each tensor's dtype (f32, f16, bf16). Q8_0 needs rows of a multiple of 32 values; a
    matrix with other rows keeps its dtype, as norms always stay F32. Tensors are produced, converted and written
    one at a time.
    """
    import gguf

    a = src.args
    vocab = vocab_metadata(src.tokenizer, a.vocab_size)
    if len(vocab["tokens"]) > a.vocab_size:
        raise UserError(f"{path}: the tokenizer has {len(vocab['tokens'])} pieces for {a.vocab_size} embeddings")
    file_type = gguf_type or default_type(src.dtype)
    plan = []  # (gguf name, plan, GGML type)
    for p in src.plans:
        kind = gguf_type or default_type(p.dtype)
        if len(p.shape) == 1:
            kind = "f32"
        elif kind == "q8_0" and p.shape[-1] % 32:
            kind = default_type(p.dtype)
        plan.append((gguf_name(p.name), p, kind))
    kept = [p for _, p, kind in plan if len(p.shape) > 1 and kind != file_type]
    if gguf_type == "q8_0" and kept:
        widths = ", ".join(sorted({str(p.shape[-1]) for p in kept}))
        print(f"note: {len(kept)} matrices keep their dtype: rows of {widths} values are not whole Q8_0 blocks of 32",
              file=sys.stderr)  # fmt: skip

    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(tmp, ARCH)
        try:
            w.add_name(name)
            w.add_file_type(_FILE_TYPES[file_type])
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
            w.add_vocab_size(a.vocab_size)
            w.add_context_length(a.max_seq_len)
            w.add_embedding_length(a.dim)
            w.add_block_count(a.n_layers)
            w.add_feed_forward_length(a.hidden_dim)
            w.add_rope_dimension_count(a.head_dim)
            w.add_head_count(a.n_heads)
            w.add_head_count_kv(a.n_kv_heads)
            w.add_layer_norm_rms_eps(a.norm_eps)
            w.add_rope_freq_base(a.rope_theta)
            w.add_tokenizer_model("llama")
            w.add_token_list(vocab["tokens"])
            w.add_token_scores(vocab["scores"])
            w.add_token_types(vocab["types"])
            for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id),
                             ("unk", w.add_unk_token_id), ("pad", w.add_pad_token_id)):  # fmt: skip
                if vocab[key] >= 0:
                    add(vocab[key])
            w.add_add_bos_token(True)  # Llama 2 starts every sequence with BOS and ends none with EOS
            w.add_add_eos_token(False)
            w.add_add_space_prefix(vocab["add_space_prefix"])
            w.add_chat_template(LLAMA2_CHAT_TEMPLATE)
            for gname, p, kind in plan:
                qtype = _ggml_type(kind)
                if kind == "q8_0":
                    shape = gguf.quant_shape_to_byte_shape(p.shape, qtype)
                    w.add_tensor_info(gname, shape, np.dtype(np.uint8), int(np.prod(shape)), raw_dtype=qtype)
                else:
                    nbytes = int(np.prod(p.shape)) * _ITEMSIZE[kind]
                    w.add_tensor_info(gname, p.shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for gname, p, kind in plan:
                w.write_tensor_data(_encode(p.produce(), kind, gname))
        finally:
            w.close()
    return [path]


_FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}  # gguf.LlamaFileType: ALL_F32, MOSTLY_F16, ...
_ITEMSIZE = {"f32": 4, "f16": 2, "bf16": 2}


def _ggml_type(kind: str):
    import gguf

    return gguf.GGMLQuantizationType[kind.upper()]


def _encode(t: torch.Tensor, kind: str, name: str) -> np.ndarray:
    """The bytes of one tensor as GGUF stores them (little-endian, row-major, as a numpy array)."""
    t = t.detach().to("cpu").contiguous()
    if kind == "f32":
        return t.to(torch.float32).numpy()
    if kind == "f16":
        return t.to(torch.float16).numpy()
    if kind == "bf16":
        return t.to(torch.bfloat16).view(torch.int16).numpy()
    import gguf

    assert kind == "q8_0", f"{name}: no encoder for {kind}"
    return gguf.quants.quantize(t.to(torch.float32).numpy(), _ggml_type("q8_0"))


# ---------------------------------------------------------------------------------------------------- reading


def _open(path: str):
    import gguf

    try:
        reader = gguf.GGUFReader(path, "c")  # copy-on-write: writable arrays for torch, the file untouched
    except (ValueError, IndexError, KeyError, OverflowError, TypeError, MemoryError) as e:
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        if isinstance(e, IndexError) or "cannot reshape" in reason:  # a read past the end of the memory map
            part = "tensor data" if "cannot reshape" in reason else "header"
            reason = f"the file ends inside its {part}: truncated"
        raise UserError(f"{path}: not a readable GGUF file ({reason})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    if reader.byte_order != "I":
        raise UserError(f"{path}: a big-endian GGUF file; only little-endian ones convert")
    return reader


def _value(reader, key: str, path: str, kind: type, default=None, required: bool = True, of: type | None = None):
    """Metadata ``key`` as ``kind`` (int, float, str, bool, or list ``of`` int, float or str); ``default`` where it
    is absent and not ``required``."""
    import gguf

    field = reader.get_field(key)
    if field is None:
        if required:
            raise UserError(f"{path}: metadata key {key!r} is missing")
        return default
    vt = gguf.GGUFValueType
    ints = {vt.UINT8, vt.INT8, vt.UINT16, vt.INT16, vt.UINT32, vt.INT32, vt.UINT64, vt.INT64}
    allowed = {int: ints, float: ints | {vt.FLOAT32, vt.FLOAT64}, str: {vt.STRING}, bool: {vt.BOOL}, list: {vt.ARRAY}}
    if field.types[0] not in allowed[kind]:
        raise UserError(f"{path}: metadata key {key!r} is {field.types[0].name}, not {kind.__name__}")
    if of is not None and len(field.types) > 1 and field.types[-1] not in allowed[of]:
        raise UserError(f"{path}: metadata key {key!r} is an array of {field.types[-1].name}, not of {of.__name__}")
    value = field.contents()
    if kind is float and field.types[0] == vt.FLOAT32:
        # the shortest decimal that is this float32: 1e-05, not 9.99999974738e-06 (the config a writer gave)
        return float(str(np.float32(value)))
    return kind(value) if kind is not list else value


def read_gguf(path: str) -> Source:
    """A GGUF file of the llama architecture as a Source: config from its metadata, a SentencePiece model rebuilt
    from its vocabulary, and plans for its tensors (F32, F16 and BF16 as stored, Q8_0 dequantized to float32, which
    holds every scale x int8 product exactly)."""
    reader = _open(path)
    arch = _value(reader, "general.architecture", path, str)
    if arch != ARCH:
        raise UserError(f"{path}: general.architecture is {arch!r}; only {ARCH!r} (Llama 2) converts")
    k = f"{ARCH}."
    for key in (k + "expert_count", k + "rope.scaling.factor"):
        v = _value(reader, key, path, float, required=False)
        if v not in (None, 0, 1):
            raise UserError(f"{path}: {key} = {v:g} is not the Llama 2 architecture")
    scaling = _value(reader, k + "rope.scaling.type", path, str, "none", required=False)
    if scaling not in ("none", "linear"):  # linear with a factor of 1 (checked above) is no scaling
        raise UserError(f"{path}: {k}rope.scaling.type = {scaling!r} is not the Llama 2 architecture")
    for key in ("attention.head_count", "attention.head_count_kv"):
        field = reader.get_field(k + key)
        if field is not None and field.types[0].name == "ARRAY":
            raise UserError(f"{path}: {k}{key} differs per layer; Llama 2 has one head count for all layers")
    names = {
        "max_seq_len": "context_length",
        "dim": "embedding_length",
        "n_layers": "block_count",
        "hidden_dim": "feed_forward_length",
        "n_heads": "attention.head_count",
        "n_kv_heads": "attention.head_count_kv",
        "norm_eps": "attention.layer_norm_rms_epsilon",
        "rope_theta": "rope.freq_base",
    }
    optional = {"n_kv_heads": None, "rope_theta": 10000.0}
    values = {}
    for ours, theirs in names.items():
        kind = float if ours in ("norm_eps", "rope_theta") else int
        values[ours] = _value(reader, k + theirs, path, kind, optional.get(ours), required=ours not in optional)

    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise UserError(f"{path}: tensor 'token_embd.weight' is missing")
    values["vocab_size"] = int(tensors["token_embd.weight"].shape[1])  # ne = [dim, vocab]
    values["tie_embeddings"] = "output.weight" not in tensors
    from llamactl.config import model_args

    args = model_args(values, path, {ours: k + theirs for ours, theirs in names.items()})
    for key, want in (("rope.dimension_count", args.head_dim), ("attention.key_length", args.head_dim),
                      ("attention.value_length", args.head_dim)):  # fmt: skip
        got = _value(reader, k + key, path, int, required=False)
        if got not in (None, want):
            raise UserError(f"{path}: {k}{key} = {got} where Llama 2 has the head dim {want}")

    plans, counts = [], {}
    for t in reader.tensors:
        name = llamactl_name(t.name)
        if name is None:
            raise UserError(f"{path}: tensor {t.name!r} is not part of the Llama 2 architecture")
        kind = t.tensor_type.name
        if kind not in ("F32", "F16", "BF16", "Q8_0"):
            raise UserError(f"{path}: tensor {t.name!r} is {kind}; only F32, F16, BF16 and Q8_0 tensors convert")
        counts[kind] = counts.get(kind, 0) + 1
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}.get(kind, torch.float32)
        plans.append(TensorPlan(name, shape, dtype, lambda t=t, s=shape: _decode(t, s)))
    tokenizer = _read_vocab(reader, path, args)
    template = _value(reader, "tokenizer.chat_template", path, str, required=False)
    floats = [p.dtype for p in plans if p.dtype != torch.float32 or len(p.shape) > 1]
    dtype = max(set(floats), key=floats.count) if floats else torch.float32
    file_type = _value(reader, "general.file_type", path, int, required=False)
    file_type_name = next((n for n, v in _FILE_TYPES.items() if v == file_type), file_type)
    chat = "none" if template is None else "Llama 2's" if template == LLAMA2_CHAT_TEMPLATE else "another (not kept)"
    details = [
        (
            "gguf",
            f"v{_value(reader, 'GGUF.version', path, int)}, file type {file_type_name or '?'}, tensors "
            + ", ".join(f"{n} x {kind}" for kind, n in sorted(counts.items(), key=lambda kv: -kv[1]))
            + f"; chat template {chat}",
        )
    ]
    return Source(args, plans, tokenizer, {}, dtype, details=details)


def _decode(t, shape: tuple[int, ...]) -> torch.Tensor:
    """One tensor's values as torch: F32/F16 as stored, BF16 from its raw bytes, Q8_0 dequantized."""
    import gguf

    kind = t.tensor_type.name
    if kind in ("F32", "F16"):
        return torch.from_numpy(t.data).reshape(shape)
    if kind == "BF16":
        return torch.from_numpy(t.data).view(torch.bfloat16).reshape(shape)
    return torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(shape)


def _read_vocab(reader, path: str, args: ModelArgs) -> bytes | None:
    """The SentencePiece model file of a GGUF's ``llama`` vocabulary (None where the file has no vocabulary)."""
    model = _value(reader, "tokenizer.ggml.model", path, str, required=False)
    if model is None or model == "none":
        return None
    if model != "llama":
        raise UserError(f"{path}: tokenizer.ggml.model is {model!r}; only SentencePiece vocabularies ('llama') convert")
    tokens = _value(reader, "tokenizer.ggml.tokens", path, list, of=str)
    n = len(tokens)
    scores = _value(reader, "tokenizer.ggml.scores", path, list, [0.0] * n, required=False, of=float)
    types = _value(reader, "tokenizer.ggml.token_type", path, list, [1] * n, required=False, of=int)
    if len(scores) != n or len(types) != n:
        raise UserError(f"{path}: {n} tokens but {len(scores)} scores and {len(types)} token types")
    if n > args.vocab_size:
        raise UserError(f"{path}: {n} tokens for {args.vocab_size} rows of token_embd.weight")
    bad = [t for t in types if not 1 <= t <= len(_PIECE_TYPES)]
    if bad:
        raise UserError(f"{path}: tokenizer.ggml.token_type holds {bad[0]}, not a token type (1-6)")
    unused = _PIECE_TYPES.index("UNUSED") + 1
    while n and types[n - 1] == unused and tokens[n - 1] == pad_piece(n - 1):  # a writer's padding to the rows
        n -= 1
    special = {}
    for key, name in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"),
                      ("pad", "padding_token_id")):  # fmt: skip
        i = _value(reader, f"tokenizer.ggml.{name}", path, int, required=False)
        if i is not None and not 0 <= i < n:
            raise UserError(f"{path}: tokenizer.ggml.{name} = {i} is not one of the {n} tokens")
        if i is not None:
            special[key] = i
    if "unk" not in special:
        kinds = [i for i, t in enumerate(types[:n]) if t == _PIECE_TYPES.index("UNKNOWN") + 1]
        if not kinds:
            raise UserError(f"{path}: the vocabulary has no unknown token (tokenizer.ggml.unknown_token_id)")
        special["unk"] = kinds[0]
    if special.get("pad") in {v for key, v in special.items() if key != "pad"}:
        del special["pad"]  # a padding id that names BOS/EOS/UNK as well; SentencePiece wants a piece of its own
    add_prefix = _value(reader, "tokenizer.ggml.add_space_prefix", path, bool, True, required=False)
    if _value(reader, "tokenizer.ggml.remove_extra_whitespaces", path, bool, False, required=False):
        raise UserError(f"{path}: tokenizer.ggml.remove_extra_whitespaces is set; Llama 2's tokenizer keeps spaces")
    model_bytes = sentencepiece_model(tokens[:n], [float(s) for s in scores[:n]], types[:n], special, add_prefix)
    from llamactl.tokenizer import Tokenizer

    Tokenizer(model_bytes, f"{path}: its vocabulary")  # SentencePiece's own checks, as a one-line error
    return model_bytes


def gguf_output_name(src_path: str) -> str:
    """``general.name`` of an export: the source's file or directory name without its extension."""
    base = os.path.basename(os.path.normpath(src_path))
    return base.split(".")[0] or "llamactl"
