"""Loading a model for use: a checkpoint's header checked for the use (``read_checked_meta``), its tensors
memory-mapped and assigned to the model the one builder makes (``llamactl.swap.build``), with the decode transform
for generation on a CPU; a LoRA adapter merged into a floating-point base at load (``merged_tensors``), written out
merged (``merged_plans``) or kept beside a quantized base (``adapted_tensors``). ``llamactl.checkpoint`` is the file
format alone."""

from __future__ import annotations

import torch

from llamactl.checkpoint import (
    CheckpointMeta,
    TensorPlan,
    check_state,
    is_scale,
    load_tensors,
    read_meta,
    stored_dtype,
)
from llamactl.config import check_memory, rope_bytes
from llamactl.errors import UserError
from llamactl.lora import AdapterMeta, adapter_names
from llamactl.model import ModelArgs, Transformer
from llamactl.quant import QuantSpec, dequantize, linear_names
from llamactl.swap import build, finish, for_decode


def build_model(
    args: ModelArgs,
    tensors: dict[str, torch.Tensor],
    source: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    quant: QuantSpec | None = None,
    decode: bool = False,
    lora=None,
) -> Transformer:
    """A model whose parameters are ``tensors`` (assigned, not copied, when device and dtype already match), through
    the module-swap step (``llamactl.swap``): quantized linear layers where ``quant`` says, LoRA adapters over them
    where ``lora`` (a ``lora.LoraSpec``) says (``tensors`` then hold the adapters' too), and with ``decode`` on a
    CPU, fused and packed projections for inference. ``dtype`` None keeps the stored one."""
    model = build(args, quant, lora)
    check_state(source, model.state_dict(), tensors)
    check_memory(rope_bytes(args), f"max_seq_len {args.max_seq_len}: the rotary tables", source, device)
    compute = dtype or stored_dtype(tensors)
    decode = decode and torch.device(device).type == "cpu"
    if decode:
        tensors = for_decode(model, tensors, compute)
    # quantization scales keep their own (fp16) dtype: the kernels read them as stored
    recast = {k for k, t in tensors.items() if dtype is not None and t.is_floating_point() and not is_scale(k)}
    state = {k: t.to(device=device, dtype=dtype if k in recast else t.dtype) for k, t in tensors.items()}
    model.load_state_dict(state, assign=True)
    model.reset_rope(device)
    finish(model, compute, decode, {k for k, t in state.items() if t is not tensors[k]})
    return model


def load_model(
    path: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> tuple[Transformer, CheckpointMeta]:
    """Load a llamactl checkpoint; ``dtype`` None keeps the stored dtype."""
    meta = read_meta(path)
    model = build_model(meta.args, load_tensors(path), path, device, dtype, meta.quant)
    model.eval()
    return model, meta


def read_checked_meta(
    path: str, head: str | None, purpose: str, need_tokenizer: bool = True, train: bool = False
) -> CheckpointMeta:
    """A checkpoint's header, refusing with one line a model of the other ``head`` (None: either), when
    ``need_tokenizer`` one without a tokenizer (or with more pieces than embeddings), and when ``train`` a quantized
    one; ``purpose`` completes the refusal ("to chat with", "to fine-tune" ...)."""
    meta = read_meta(path)
    if train and meta.quant is not None:
        raise UserError(
            f"{path}: is quantized ({meta.quant.describe()}): its weights cannot be trained {purpose}; use the "
            "floating-point checkpoint it was made from"
        )
    if head is not None and meta.args.head != head:
        kind = "a scalar (reward/value) head" if meta.args.head == "scalar" else "a language-model head"
        want = "a reward model (scalar head)" if head == "scalar" else "a language model"
        raise UserError(f"{path}: has {kind}; {want} is needed {purpose}")
    if need_tokenizer:
        if meta.tokenizer is None:
            raise UserError(f"{path}: has no tokenizer to read and write text with (convert it with --tokenizer)")
        from llamactl.tokenizer import Tokenizer

        n = Tokenizer(meta.tokenizer, path).vocab_size
        if n > meta.args.vocab_size:
            raise UserError(f"{path}: its tokenizer has {n} pieces for {meta.args.vocab_size} embeddings")
    return meta


def load_for_inference(
    path: str,
    device: torch.device,
    dtype: str,
    head: str,
    purpose: str,
    need_tokenizer: bool = True,
    decode: bool = False,
    adapter: str | None = None,
) -> tuple[Transformer, CheckpointMeta]:
    """A checkpoint's model in eval mode on ``device`` (``dtype`` resolved as ``--dtype``: auto keeps the stored one
    where native), refusing with one line a model of the other ``head`` or, when ``need_tokenizer``, one without a
    tokenizer. ``purpose`` completes the refusal: "to chat with", "to score with" ... Quantized checkpoints load as
    such; ``decode`` readies the model for token-by-token generation (CPU packing, see ``llamactl.swap``): such a
    model cannot be trained.

    ``adapter``: a LoRA adapter file trained on this checkpoint (``llamactl.lora``; refused in one line otherwise).
    A floating-point model gets it merged into its weights before it is built (inference then costs what the base
    costs); a quantized one gets ``LoRALinear`` wrappers over its quantized layers. The meta returned is the adapted
    model's (its head and role the adapter's)."""
    from llamactl.device import resolve_dtype

    meta = read_checked_meta(path, None if adapter else head, purpose, need_tokenizer)
    tensors = load_tensors(path)  # memory-mapped
    lora = None
    if adapter is not None:
        from llamactl import lora as lo

        ameta, atensors = lo.read_adapter(adapter)
        lo.check_base(ameta, path, meta)
        lo.check_adapted_head(ameta, path, head, purpose)
        if meta.quant is None:
            tensors = merged_tensors(tensors, meta, ameta, atensors, path)
        else:
            tensors, lora = adapted_tensors(tensors, meta, ameta, atensors, path), ameta.spec
        meta = ameta.adapted(meta, merged=meta.quant is None)
    # auto runs a quantized model as if it were stored in bf16 (bf16 where native): torch's int8/int4 CPU kernels are
    # fast in bf16 only (quant.QuantLinear.prepare), and the Triton kernels' bf16 dots run on tensor cores
    stored = torch.bfloat16 if meta.quant is not None else stored_dtype(tensors)
    compute = resolve_dtype(dtype, device, stored)
    model = build_model(meta.args, tensors, path, device, compute, meta.quant, decode, lora)
    return model.eval(), meta


def merged_plans(
    base_tensors: dict[str, torch.Tensor],
    base_meta: CheckpointMeta,
    adapter_meta: AdapterMeta,
    adapter_tensors: dict[str, torch.Tensor],
    source: str = "the base",
) -> list[TensorPlan]:
    """The adapted model's tensors as plans, each produced on demand (one merged layer in memory at a time): per
    target ``W + scale * B @ A`` in fp32, then the base's dtype; a quantized base's linears dequantized first (the
    result is a floating-point model); the extra tensors in place of the base's."""
    spec, quant = adapter_meta.spec, base_meta.quant
    base_model = build(base_meta.args, quant)
    expected = build(adapter_meta.args).state_dict()
    check_state(source, base_model.state_dict(), base_tensors)
    dtype = stored_dtype(base_tensors)
    quantized = set(linear_names(base_meta.args, quant)) if quant is not None else set()
    adapted = set(adapter_names(adapter_meta.args, spec))

    def weight(name: str) -> torch.Tensor:
        if name in quantized:
            t = {k: base_tensors.get(f"{name}.{k}") for k in ("qweight", "scales", "zeros")}
            return dequantize(t["qweight"], t["scales"], t["zeros"], quant.scheme).to(dtype)
        return base_tensors[f"{name}.weight"]

    def merged(name: str) -> torch.Tensor:
        w = weight(name)
        a, b = adapter_tensors[f"{name}.lora_A"].float(), adapter_tensors[f"{name}.lora_B"].float()
        return (w.float() + spec.scale * (b @ a)).to(w.dtype)

    plans = []
    for key, t in expected.items():
        name = key.removesuffix(".weight")
        if key in adapter_meta.extra:
            x = adapter_tensors[key]
            plans.append(TensorPlan(key, tuple(x.shape), dtype, lambda x=x: x.to(dtype)))
        elif name in adapted:
            out_dtype = base_tensors[key].dtype if key in base_tensors else dtype  # a dequantized one: the base's
            plans.append(TensorPlan(key, tuple(t.shape), out_dtype, lambda n=name: merged(n)))
        elif name in quantized:
            plans.append(TensorPlan(key, tuple(t.shape), dtype, lambda n=name: weight(n)))
        else:
            x = base_tensors[key]
            plans.append(TensorPlan(key, tuple(x.shape), x.dtype, lambda x=x: x))
    return plans


def merged_tensors(
    base_tensors: dict[str, torch.Tensor],
    base_meta: CheckpointMeta,
    adapter_meta: AdapterMeta,
    adapter_tensors: dict[str, torch.Tensor],
    source: str = "the base",
) -> dict[str, torch.Tensor]:
    """The adapted model's tensors (see ``merged_plans``), every merged one computed now."""
    return {p.name: p.produce() for p in merged_plans(base_tensors, base_meta, adapter_meta, adapter_tensors, source)}


def adapted_tensors(
    base_tensors: dict[str, torch.Tensor],
    base_meta: CheckpointMeta,
    adapter_meta: AdapterMeta,
    adapter_tensors: dict[str, torch.Tensor],
    source: str = "the base",
) -> dict[str, torch.Tensor]:
    """The tensors of a wrapped (unmerged) adapted model: the base's, without those the adapted model lacks (a
    language-model head under a scalar one) or the extras replace, and the adapter's."""
    if base_meta.quant is not None:
        quantized = set(linear_names(base_meta.args, base_meta.quant))
        if stored := [e for e in adapter_meta.extra if e.removesuffix(".weight") in quantized]:
            raise UserError(f"{adapter_meta.path or 'the adapter'}: trains {stored[0]} in full, which {source} stores "
                            "quantized; apply it to the floating-point model")  # fmt: skip
    # the adapted model's modules decide what of the base stays
    modules = {k.split(".")[0] for k in build(adapter_meta.args).state_dict()}
    kept = {k: v for k, v in base_tensors.items() if k.split(".")[0] in modules and k not in adapter_meta.extra}
    return kept | dict(adapter_tensors)
