"""``llamactl quantize``: a checkpoint's linear layers in int8 or int4, written as a checkpoint every command loads.

Round to nearest by default; with ``--calibration``, GPTQ on that text (``llamactl.quant.quantize_gptq``). Each
layer's error goes to stderr as it is done; the output's header says the scheme, the group size, the method and the
source's sha256, so nothing else is needed to load it. With ``--adapter`` the model quantized is the checkpoint with
that LoRA adapter merged in (``loading.merged_tensors``); the source's identity is then the base's and the adapter's.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from llamactl.errors import UserError


@dataclass(kw_only=True)
class QuantizeConfig:
    model: str
    output: str
    scheme: str
    group_size: int | None = None  # int4: 128 unless given
    head: bool = False
    calibration: str | None = None
    calibration_format: str = "auto"
    calibration_field: str | None = None  # "text" unless given
    calibration_samples: int = 128
    calibration_len: int | None = None  # 512, or the model's context if shorter
    damp: float = 0.01
    seed: int = 0
    device: str = "auto"
    shard_size: str = "5GB"
    adapter: str | None = None  # a LoRA adapter trained on the model, merged in before quantizing
    argv: list[str] = field(default_factory=list)

    def validate(self) -> None:
        from llamactl.files import io_problems
        from llamactl.quant import GROUP_SIZES, SCHEMES

        problems = []
        if self.scheme not in SCHEMES:
            problems.append(f"--scheme {self.scheme!r} is not one of {', '.join(SCHEMES)}")
        elif self.scheme == "int8" and self.group_size is not None:
            problems.append("--group-size is for int4; int8 has one scale per output channel")
        elif self.scheme == "int4" and self.group_size is not None and self.group_size not in GROUP_SIZES:
            problems.append(f"--group-size {self.group_size} is not one of {', '.join(map(str, GROUP_SIZES))}")
        calibrated = {"calibration_samples": 128, "calibration_len": None, "damp": 0.01, "seed": 0}
        calibrated |= {"calibration_format": "auto", "calibration_field": None, "device": "auto"}
        if self.calibration is None:
            changed = [k for k, v in calibrated.items() if getattr(self, k) != v]
            if changed:
                problems.append(f"--{changed[0].replace('_', '-')} is for GPTQ, which needs --calibration DATA")
        elif self.calibration_field is not None:
            from llamactl.jsonl import input_kind

            if input_kind(self.calibration, self.calibration_format) == "text":
                problems.append(f"--calibration-field names a JSONL field; --calibration {self.calibration} is text")
        if self.calibration_format not in ("auto", "text", "jsonl"):
            problems.append(f"--calibration-format {self.calibration_format!r} is not one of auto, text, jsonl")
        if self.calibration_samples < 1 or (self.calibration_len is not None and self.calibration_len < 2):
            problems.append("--calibration-samples must be at least 1 and --calibration-len at least 2")
        if not 0 < self.damp < 1:
            problems.append(f"--damp {self.damp} must be between 0 and 1 (a fraction of the mean diagonal)")
        inputs = [("-m/--model", self.model, "checkpoint", False), ("--adapter", self.adapter, "adapter file", False)]
        if self.calibration is not None:
            inputs.append(("--calibration", self.calibration, "text or JSONL file", True))
        problems += io_problems(inputs, self.output)
        from llamactl.checkpoint import parse_size

        try:
            parse_size(self.shard_size)
        except UserError as e:
            problems.append(str(e))
        if not self.output.endswith(".safetensors"):
            problems.append(f"-o {self.output}: a llamactl checkpoint is a .safetensors file")
        if problems:
            raise UserError("; ".join(problems))


def _calibration_sequences(cfg: QuantizeConfig, tokenizer, vocab: int, context: int):
    """``calibration_samples`` windows of ``calibration_len`` tokens from the calibration documents laid end to end,
    drawn without replacement (seeded) from the non-overlapping windows there are."""
    import torch

    from llamactl.data import document_ids
    from llamactl.records import read_documents

    length = cfg.calibration_len or min(512, context)
    if length > context:
        raise UserError(f"--calibration-len {length} is longer than the model's context {context}")
    raw = read_documents(cfg.calibration, cfg.calibration_format, cfg.calibration_field or "text")
    if tokenizer is None and any(isinstance(doc, str) for _, doc in raw):
        raise UserError(f"{cfg.model}: has no tokenizer to read calibration text with (give token JSONL)")
    docs = document_ids(raw, tokenizer, vocab)
    ids = torch.tensor([t for d in docs for t in d], dtype=torch.long)
    n = ids.numel() // length
    if n == 0:
        raise UserError(
            f"{cfg.calibration}: {ids.numel()} tokens of calibration text; one sequence of --calibration-len "
            f"{length} needs more"
        )
    if n < cfg.calibration_samples:
        print(f"quantize: {cfg.calibration} holds {n} windows of {length} tokens, fewer than --calibration-samples "
              f"{cfg.calibration_samples}: GPTQ uses all {n}", file=sys.stderr)  # fmt: skip
    gen = torch.Generator().manual_seed(cfg.seed)
    pick = torch.randperm(n, generator=gen)[: cfg.calibration_samples].sort().values
    windows = ids[: n * length].view(n, length)
    return windows[pick]


def run(cfg: QuantizeConfig) -> dict:
    """Quantize ``cfg.model`` into ``cfg.output``; returns a summary (per-layer errors, sizes)."""
    import json
    import os

    import torch

    from llamactl.checkpoint import (
        CheckpointMeta,
        TensorPlan,
        cached_sha256,
        check_state,
        checkpoint_files,
        load_tensors,
        make_lineage,
        model_sha256,
        parse_size,
        save_plans,
    )
    from llamactl.device import resolve_device
    from llamactl.loading import build_model, read_checked_meta
    from llamactl.quant import (
        Quantized,
        QuantLinear,
        QuantSpec,
        linear_names,
        quantize_calibrated,
        quantize_rtn,
        undivided_dims,
    )
    from llamactl.swap import build
    from llamactl.tokenizer import Tokenizer

    cfg.validate()
    meta = read_checked_meta(cfg.model, None, "to quantize", need_tokenizer=False)
    if meta.quant is not None:
        raise UserError(f"{cfg.model}: is already quantized ({meta.quant.describe()}); quantize the checkpoint it was "
                        "made from")  # fmt: skip
    tensors = load_tensors(cfg.model)  # memory-mapped
    source_sha = model_sha256(cfg.model)
    if cfg.adapter is not None:
        from llamactl import loading, lora

        ameta, atensors = lora.read_adapter(cfg.adapter)
        lora.check_base(ameta, cfg.model, meta)
        tensors = loading.merged_tensors(tensors, meta, ameta, atensors, cfg.model)
        meta = ameta.adapted(meta, merged=True)
        source_sha += "+" + cached_sha256(cfg.adapter)  # the merged model exists as these two files only
    args = meta.args
    if cfg.head and args.head != "lm":
        raise UserError(f"{cfg.model}: --head quantizes a language model's output layer; this model's head is a "
                        "one-row scalar (reward/value) head, which stays as it is")  # fmt: skip
    if cfg.head and args.tie_embeddings:
        raise UserError(f"{cfg.model}: --head: its output layer is the embedding table (tied), which stays as it is")
    group = cfg.group_size or (128 if cfg.scheme == "int4" else None)
    if bad := undivided_dims(args, group):
        raise UserError(f"{cfg.model}: int4 --group-size {group} does not divide the input dims of its linear "
                        f"layers ({', '.join(bad)}); choose a group size that does")  # fmt: skip
    check_state(cfg.model, build(args).state_dict(), tensors)
    method = "gptq" if cfg.calibration else "rtn"
    tokenizer = Tokenizer(meta.tokenizer, cfg.model) if meta.tokenizer is not None else None
    sequences = None
    if cfg.calibration:
        sequences = _calibration_sequences(cfg, tokenizer, args.vocab_size, args.max_seq_len)
    spec = QuantSpec(cfg.scheme, group, method, cfg.head, source_sha)
    names = linear_names(args, spec)
    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    errors: dict[str, dict] = {}

    def report(name: str, q: Quantized) -> None:
        errors[name] = {"max": q.max_error, "rel": q.rel_error} | ({"out": q.out_error} if q.out_error else {})
        out = f"  output rel {q.out_error:.4f}" if q.out_error is not None else ""
        say(f"quantize: {name:<28} max {q.max_error:.3g}  rel {q.rel_error:.4f}{out}")

    say(f"quantize: {cfg.model} -> {spec.describe()}, {len(names)} linear layers")
    if sequences is not None:
        device = resolve_device(cfg.device)
        say(f"quantize: GPTQ on {sequences.shape[0]} sequences of {sequences.shape[1]} tokens from {cfg.calibration}")
        model = build_model(args, tensors, cfg.model, device, torch.float32).eval()
        done = quantize_calibrated(model, sequences, spec, cfg.damp, 8, report)
        produce = {n: (lambda n=n: done[n]) for n in names}
    else:
        cache: dict[str, Quantized] = {}

        def rtn(n: str) -> Quantized:  # on demand, as the writer reaches the layer: one layer in memory at a time
            if n not in cache:
                cache.clear()
                cache[n] = quantize_rtn(tensors[f"{n}.weight"], spec)
                if n not in errors:  # (the writer asks for a layer's scales before its levels: see below)
                    report(n, cache[n])
            return cache[n]

        produce = {n: (lambda n=n: rtn(n)) for n in names}

    plans = []
    for key, t in tensors.items():
        name = key.removesuffix(".weight")
        if name not in produce:
            plans.append(TensorPlan(key, tuple(t.shape), t.dtype, lambda t=t: t))
            continue
        layer = QuantLinear(t.shape[1], t.shape[0], spec.scheme, spec.group_size, device="meta")  # the format's tensors
        for part, b in layer.named_buffers():
            plans.append(
                TensorPlan(f"{name}.{part}", tuple(b.shape), b.dtype, lambda n=name, p=part: produce[n]().tensors[p])
            )
    # Wider elements first, so that every tensor starts aligned to its element size (the data section starts 8-byte
    # aligned, and safetensors packs tensors back to back). Round to nearest then makes each layer twice (once for
    # its fp16 scales, once for its 1-byte levels): cheap, and it keeps one layer in memory at a time.
    plans.sort(key=lambda p: -torch.empty((), dtype=p.dtype).element_size())
    inputs = checkpoint_files(cfg.model) + ([cfg.adapter] if cfg.adapter else [])
    lineage = make_lineage("quantize", cfg.argv, inputs, meta.lineage, scheme=spec.describe())
    out_meta = CheckpointMeta(args, meta.tokenizer, lineage, meta.role, spec)
    written = save_plans(cfg.output, plans, out_meta, parse_size(cfg.shard_size))
    size_in = sum(os.path.getsize(f) for f in checkpoint_files(cfg.model))
    size_out = sum(os.path.getsize(f) for f in written)
    summary = {
        "model": cfg.model,
        "output": cfg.output,
        "scheme": spec.describe(),
        "bytes_in": size_in,
        "bytes_out": size_out,
        "max_rel_error": max(e["rel"] for e in errors.values()),
        "mean_rel_error": sum(e["rel"] for e in errors.values()) / len(errors),
    }
    say(f"quantize: wrote {cfg.output} ({size_out / 1e6:.1f} MB, {size_out / size_in:.2f}x the source's "
        f"{size_in / 1e6:.1f} MB); mean relative error {summary['mean_rel_error']:.4f}")  # fmt: skip
    print(json.dumps(summary))
    return summary
