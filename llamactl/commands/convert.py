"""``llamactl convert``: checkpoints between Meta, Hugging Face, llama2.c, GGUF and llamactl formats; a LoRA
adapter merged into its base (``--merge-adapter``) or exported for PEFT (``--to peft``); ``--info`` describes a
checkpoint or an adapter."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from llamactl.errors import UserError

DTYPE_CHOICES = ("keep", "fp32", "bf16", "fp16")
TO_FORMATS = ("llamactl", "hf", "gguf", "peft")  # --to


@dataclass
class ConvertConfig:
    src: str
    output: str | None = None
    info: bool = False
    src_format: str = "auto"
    to: str = "llamactl"
    tokenizer: str | None = None
    dtype: str = "keep"  # keep: each tensor as stored
    shard_size: str = "5GB"
    gguf_type: str | None = None  # None: each tensor's own dtype (f32, f16, bf16)
    merge_adapter: str | None = None  # a LoRA adapter to merge into SRC (its base)
    argv: list[str] = field(default_factory=list)

    def validate(self) -> None:
        from llamactl.checkpoint import parse_size
        from llamactl.convert import FORMATS
        from llamactl.files import check_output, input_problem, overlaps, same_file
        from llamactl.gguf_format import GGUF_TYPES

        problems = []
        writes = self.output is not None or self.to != "llamactl" or self.dtype != "keep" or self.shard_size != "5GB"
        if self.info and (writes or self.gguf_type is not None):
            problems.append(
                "--info prints a description and writes nothing: drop -o, --to, --dtype, --shard-size, --gguf-type"
            )
        if not self.info and self.output is None:
            problems.append("-o/--output is required (or --info to describe SRC)")
        if self.src_format not in ("auto", *FORMATS):
            problems.append(f"--from {self.src_format!r} is not one of auto, {', '.join(FORMATS)}")
        if self.to not in TO_FORMATS:
            problems.append(f"--to {self.to!r} is not one of {', '.join(TO_FORMATS)}")
        if self.to == "peft":
            given = [flag for flag, on in (("--merge-adapter", self.merge_adapter is not None),
                                           ("--tokenizer", self.tokenizer is not None),
                                           ("--shard-size", self.shard_size != "5GB")) if on]  # fmt: skip
            if given:
                problems.append(f"{', '.join(given)}: --to peft exports an adapter file as it is (only --dtype "
                                "applies)")  # fmt: skip
        if self.merge_adapter is not None:
            if self.info:
                problems.append("--merge-adapter writes a model; --info describes SRC (or the adapter: convert "
                                "--info ADAPTER)")  # fmt: skip
            if self.src_format not in ("auto", "llamactl"):
                problems.append(f"--merge-adapter merges into a llamactl checkpoint; --from {self.src_format}: convert "
                                "it to llamactl first")  # fmt: skip
            if problem := input_problem(self.merge_adapter, "adapter file"):
                problems.append(f"--merge-adapter {problem}")
        if self.gguf_type is not None and self.gguf_type not in GGUF_TYPES:
            problems.append(f"--gguf-type {self.gguf_type!r} is not one of {', '.join(GGUF_TYPES)}")
        if self.gguf_type is not None and self.to != "gguf" and not self.info:
            problems.append("--gguf-type applies to GGUF output only: add --to gguf")
        if self.to == "gguf" and self.dtype != "keep":
            problems.append(f"--dtype {self.dtype}: GGUF output takes --gguf-type ({', '.join(GGUF_TYPES)})")
        if self.to == "gguf" and self.shard_size != "5GB":
            problems.append("--shard-size: GGUF output is one file")
        if self.dtype not in DTYPE_CHOICES:
            problems.append(f"--dtype {self.dtype!r} is not one of {', '.join(DTYPE_CHOICES)}")
        if self.output is not None:
            if problem := check_output(self.output, "-o/--output", directory=self.to in ("hf", "peft")):
                problems.append(problem)
            elif self.to == "llamactl" and not self.output.endswith(".safetensors"):
                problems.append(f"-o {self.output}: a llamactl checkpoint is a .safetensors file")
            elif self.to == "gguf" and not self.output.endswith(".gguf"):
                problems.append(f"-o {self.output}: --to gguf writes a .gguf file")
            else:
                inputs = [("", f) for f in _input_files(self.src)] + [("--tokenizer", self.tokenizer or "")]
                inputs.append(("--merge-adapter", self.merge_adapter or ""))
                problems += overlaps([("-o/--output", self.output)], inputs)
                if self.to in ("hf", "peft"):  # the export rewrites its directory's weight, config and tokenizer files
                    inside = [p for _, p in inputs if p and same_file(os.path.dirname(os.path.abspath(p)), self.output)]
                    problems += [
                        f"-o/--output {self.output} holds the input {p}; export to another directory" for p in inside
                    ]
        if self.tokenizer is not None and (problem := input_problem(self.tokenizer, "tokenizer file", True)):
            problems.append(f"--tokenizer {problem}")
        try:
            parse_size(self.shard_size)
        except UserError as e:
            problems.append(str(e))
        if problems:
            raise UserError("; ".join(problems))


def config_line(a) -> str:
    return (f"dim={a.dim} n_layers={a.n_layers} n_heads={a.n_heads} n_kv_heads={a.n_kv_heads} "
            f"hidden_dim={a.hidden_dim} vocab_size={a.vocab_size} max_seq_len={a.max_seq_len} "
            f"norm_eps={a.norm_eps} rope_theta={a.rope_theta}")  # fmt: skip


def lineage_lines(lineage: dict) -> list[str]:
    """A lineage as --info prints it: the command that made the file, then each parent's."""
    lines, depth = [], 0
    while lineage:
        step = f" step={lineage['step']}" if "step" in lineage else ""
        inputs = ", ".join(f"{i['path']} (sha256 {i['sha256'][:12]})" for i in lineage.get("inputs", []))
        lines.append(
            f"{'lineage' if depth == 0 else 'from':12} llamactl {lineage.get('command', '?')}"
            f" v{lineage.get('llamactl', '?')}{step}" + (f" <- {inputs}" if inputs else "")
        )
        lineage, depth = lineage.get("parent"), depth + 1
    return lines


def describe_adapter(meta, tensors: dict, path: str) -> str:
    """What --info says of a LoRA adapter file."""
    extra = sum(tensors[e].numel() for e in meta.extra)
    lora = sum(t.numel() for t in tensors.values()) - extra
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
    source = f", quantized from sha256 {meta.base_source_sha256[:12]}" if meta.base_source_sha256 else ""
    return "\n".join([
        f"adapter      {path}",
        f"lora         {meta.spec.describe()}",
        f"parameters   {lora:,} in {len(tensors) - len(meta.extra)} adapter tensors"
        + (f", {extra:,} in {', '.join(meta.extra)} (trained in full)" if meta.extra else ""),
        f"dtype        {', '.join(dtypes)}",
        f"makes        {meta.describe_model()}",
        f"base         sha256 {meta.base_sha256[:12]}{source}",
        f"base config  {config_line(meta.base_args)}",
        *lineage_lines(meta.lineage),
    ])  # fmt: skip


def describe(src, path: str) -> str:
    a = src.args
    lines = [
        f"checkpoint   {path}",
        f"parameters   {a.num_params() if src.quant else sum(p.nbytes // p.dtype.itemsize for p in src.plans):,}",
        f"dtype        {str(src.dtype).removeprefix('torch.')}",
        *(
            [
                f"quantized    {src.quant.describe()} from sha256 {src.quant.source_sha256[:12]}, "
                f"{sum(p.nbytes for p in src.plans) / 1e6:,.1f} MB of tensors"
            ]
            if src.quant
            else []
        ),  # fmt: skip
        f"head         {a.head}{' (tied to embeddings)' if a.tie_embeddings else ''}"
        + (f", {src.role} {'model' if src.role == 'value' else 'reward model'}" if src.role else ""),
        f"config       {config_line(a)}",
        *(f"{key:12} {text}" for key, text in src.details),
    ]
    if src.tokenizer is not None:
        from llamactl.tokenizer import Tokenizer

        tok = Tokenizer(src.tokenizer, path)
        lines.append(f"tokenizer    SentencePiece, {tok.vocab_size} pieces, bos={tok.bos_id} eos={tok.eos_id}")
    else:
        lines.append("tokenizer    none (attach one with convert --tokenizer)")
    return "\n".join(lines + lineage_lines(src.lineage))


def run(cfg: ConvertConfig) -> list[str]:
    """Convert (or describe) a checkpoint; returns the paths written."""
    import torch

    from llamactl import convert as cv
    from llamactl.checkpoint import CheckpointMeta, check_state, make_lineage, parse_size
    from llamactl.device import DTYPES
    from llamactl.swap import build

    cfg.validate()
    from llamactl.lora import is_adapter

    if cfg.src_format in ("auto", "llamactl") and is_adapter(cfg.src):
        return _convert_adapter(cfg)
    if cfg.src_format in ("auto", "run") and cv.detect_format(cfg.src) == "run" and not cfg.info:
        if written := _run_adapter(cfg):
            return written
    if cfg.to == "peft":
        raise UserError(f"{cfg.src}: --to peft exports a LoRA adapter file, and this is a model checkpoint")
    if cfg.merge_adapter is not None:
        src = cv.read_merged(cfg.src, cfg.merge_adapter)
    else:
        src = cv.read_source(cfg.src, cfg.src_format)
    if cfg.to == "gguf" and not cfg.tokenizer:  # with --tokenizer, checked once it is attached
        _refuse_gguf_export(src, cfg.src)
    if cfg.tokenizer:
        from llamactl.tokenizer import Tokenizer

        tok = Tokenizer.from_file(cfg.tokenizer)
        if tok.vocab_size > src.args.vocab_size:
            raise UserError(
                f"--tokenizer {cfg.tokenizer}: {tok.vocab_size} pieces do not fit the model's vocabulary "
                f"of {src.args.vocab_size}"
            )
        src.tokenizer = tok.model_bytes
        if cfg.to == "gguf":
            _refuse_gguf_export(src, cfg.src, cfg.tokenizer)
    if cfg.info:
        print(describe(src, cfg.src))
        return []
    if src.quant is not None and cfg.to != "gguf":  # (the GGUF export refuses it above, saying what to do)
        raise UserError(f"{cfg.src}: is quantized ({src.quant.describe()}); convert rewrites floating-point "
                        "checkpoints (--info describes this one; every command loads it as it is)")  # fmt: skip
    # Names and shapes checked against the architecture before anything is hashed or written.
    expected = build(src.args).state_dict()
    check_state(cfg.src, expected, {p.name: torch.empty(p.shape, device="meta") for p in src.plans})
    order = {name: i for i, name in enumerate(expected)}
    src.plans.sort(key=lambda p: order[p.name])
    if cfg.dtype != "keep":  # "keep": every tensor as stored, mixed dtypes included
        dtype = DTYPES[cfg.dtype]
        src.plans = [
            cv.TensorPlan(p.name, p.shape, dtype if p.dtype.is_floating_point else p.dtype,
                          lambda p=p, d=dtype: p.produce().to(d))
            for p in src.plans
        ]  # fmt: skip
        src.dtype = dtype
    if cfg.to == "gguf":
        from llamactl.gguf_format import gguf_output_name, write_gguf

        return write_gguf(cfg.output, src, cfg.gguf_type, gguf_output_name(cfg.src))
    shard_size = parse_size(cfg.shard_size)
    if cfg.to == "hf":
        return cv.write_hf(cfg.output, src, shard_size)
    inputs = source_files(cfg.src) + [p for p in (cfg.merge_adapter, cfg.tokenizer) if p]
    lineage = make_lineage("convert", cfg.argv or sys.argv[1:], inputs, parent=src.lineage or None)
    return cv.save_plans(cfg.output, src.plans, CheckpointMeta(src.args, src.tokenizer, lineage, src.role), shard_size)


def _convert_adapter(cfg: ConvertConfig) -> list[str]:
    """SRC is a LoRA adapter: --info describes it, --to peft exports it; nothing else applies."""
    from llamactl.convert import write_peft
    from llamactl.device import DTYPES
    from llamactl.lora import read_adapter

    meta, tensors = read_adapter(cfg.src)
    if cfg.info:
        print(describe_adapter(meta, tensors, cfg.src))
        return []
    if cfg.to != "peft" or cfg.merge_adapter is not None or cfg.tokenizer is not None:
        raise UserError(f"{cfg.src}: is a LoRA adapter: --to peft exports it, --info describes it, llamactl convert "
                        f"BASE --merge-adapter {cfg.src} merges it into the model it was trained on")  # fmt: skip
    return write_peft(cfg.output, meta, tensors, DTYPES[cfg.dtype] if cfg.dtype != "keep" else None)


def _run_adapter(cfg: ConvertConfig) -> list[str]:
    """SRC is a training checkpoint of a LoRA run: its adapter (ppo: the policy's) written as an adapter file;
    nothing (an empty list) where the run trained a whole model (``read_run`` reads that one)."""
    from llamactl.checkpoint import CheckpointMeta
    from llamactl.convert import run_part
    from llamactl.training import checkpoints

    folder, _, prefix, meta = run_part(cfg.src)
    if isinstance(meta, CheckpointMeta):
        return []
    if cfg.to != "llamactl" or cfg.merge_adapter is not None or cfg.tokenizer is not None:
        raise UserError(f"{folder}: holds LoRA adapters: convert {cfg.src} -o adapter.safetensors writes them as an "
                        "adapter file (then --to peft, or BASE --merge-adapter)")  # fmt: skip
    checkpoints.write_part(folder, prefix, meta, cfg.output)
    return [cfg.output]


def _refuse_gguf_export(src, path: str, tokenizer: str | None = None) -> None:
    from llamactl.gguf_format import export_problem

    if problem := export_problem(src, path, tokenizer):
        raise UserError(problem)


def _input_files(src: str) -> list[str]:
    """The files SRC stands for, for the check that the output is none of them (nothing, where SRC is not there)."""
    try:
        return [src, *source_files(src)]
    except (UserError, OSError):
        return [src]


def source_files(src: str) -> list[str]:
    """The files a conversion reads, for the lineage: a directory's files, or a checkpoint's index and shards."""
    from llamactl.checkpoint import checkpoint_files
    from llamactl.convert import detect_format, run_checkpoint

    if os.path.isdir(src) and detect_format(src) == "run":  # the checkpoint's own record (its shards: a 7B's 84 GB)
        return [os.path.join(run_checkpoint(src), "trainer.json")]
    if os.path.isdir(src):
        return sorted(os.path.join(src, f) for f in os.listdir(src) if os.path.isfile(os.path.join(src, f)))
    return checkpoint_files(src) if src.endswith((".safetensors", ".json")) else [src]
