"""``llamactl convert``: checkpoints between Meta, Hugging Face, llama2.c and llamactl formats; ``--info`` describes."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from llamactl.errors import UserError

DTYPE_CHOICES = ("keep", "fp32", "bf16", "fp16")


@dataclass
class ConvertConfig:
    src: str
    output: str | None = None
    info: bool = False
    src_format: str = "auto"
    to: str = "llamactl"
    tokenizer: str | None = None
    dtype: str = "keep"
    shard_size: str = "5GB"
    argv: list[str] = field(default_factory=list)

    def validate(self) -> None:
        from llamactl.convert import FORMATS

        problems = []
        if self.info and self.output:
            problems.append("--info prints a description and writes nothing: drop -o")
        if not self.info and not self.output:
            problems.append("-o/--output is required (or --info to describe SRC)")
        if self.src_format not in ("auto", *FORMATS):
            problems.append(f"--from {self.src_format!r} is not one of auto, {', '.join(FORMATS)}")
        if self.to not in ("llamactl", "hf"):
            problems.append(f"--to {self.to!r} is not one of llamactl, hf")
        if self.dtype not in DTYPE_CHOICES:
            problems.append(f"--dtype {self.dtype!r} is not one of {', '.join(DTYPE_CHOICES)}")
        if self.output and self.to == "llamactl" and not self.output.endswith(".safetensors"):
            problems.append(f"-o {self.output}: a llamactl checkpoint is a .safetensors file")
        if self.tokenizer and not os.path.isfile(self.tokenizer):
            problems.append(f"--tokenizer {self.tokenizer}: no such file")
        if problems:
            raise UserError("; ".join(problems))


def describe(src, path: str) -> str:
    a = src.args
    lines = [
        f"checkpoint   {path}",
        f"parameters   {sum(p.nbytes // p.dtype.itemsize for p in src.plans):,}",
        f"dtype        {str(src.dtype).removeprefix('torch.')}",
        f"head         {a.head}{' (tied to embeddings)' if a.tie_embeddings else ''}",
        f"config       dim={a.dim} n_layers={a.n_layers} n_heads={a.n_heads} n_kv_heads={a.n_kv_heads} "
        f"hidden_dim={a.hidden_dim} vocab_size={a.vocab_size} max_seq_len={a.max_seq_len} "
        f"norm_eps={a.norm_eps} rope_theta={a.rope_theta}",
    ]
    if src.tokenizer is not None:
        from llamactl.tokenizer import Tokenizer

        tok = Tokenizer(src.tokenizer)
        lines.append(f"tokenizer    SentencePiece, {tok.vocab_size} pieces, bos={tok.bos_id} eos={tok.eos_id}")
    else:
        lines.append("tokenizer    none (attach one with convert --tokenizer)")
    lineage = src.lineage
    depth = 0
    while lineage:
        step = f" step={lineage['step']}" if "step" in lineage else ""
        inputs = ", ".join(f"{i['path']} (sha256 {i['sha256'][:12]})" for i in lineage.get("inputs", []))
        lines.append(
            f"{'lineage' if depth == 0 else 'from':12} llamactl {lineage.get('command', '?')}"
            f" v{lineage.get('llamactl', '?')}{step}" + (f" <- {inputs}" if inputs else "")
        )
        lineage, depth = lineage.get("parent"), depth + 1
    return "\n".join(lines)


def run(cfg: ConvertConfig) -> list[str]:
    """Convert (or describe) a checkpoint; returns the paths written."""
    import torch

    from llamactl import convert as cv
    from llamactl.checkpoint import CheckpointMeta, check_state, make_lineage, parse_size
    from llamactl.device import DTYPES
    from llamactl.model import Transformer

    cfg.validate()
    src = cv.read_source(cfg.src, cfg.src_format)
    if cfg.tokenizer:
        from llamactl.tokenizer import Tokenizer

        tok = Tokenizer.from_file(cfg.tokenizer)
        if tok.vocab_size > src.args.vocab_size:
            raise UserError(
                f"--tokenizer {cfg.tokenizer}: {tok.vocab_size} pieces do not fit the model's vocabulary "
                f"of {src.args.vocab_size}"
            )
        src.tokenizer = tok.model_bytes
    if cfg.info:
        print(describe(src, cfg.src))
        return []
    dtype = src.dtype if cfg.dtype == "keep" else DTYPES[cfg.dtype]
    shard_size = parse_size(cfg.shard_size)
    if cfg.to == "hf":
        return cv.write_hf(cfg.output, src, dtype, shard_size)
    plans = [
        cv.TensorPlan(
            p.name, p.shape, dtype if p.dtype.is_floating_point else p.dtype, lambda p=p, d=dtype: p.produce().to(d)
        )
        for p in src.plans
    ]
    inputs = (
        [cfg.src]
        if os.path.isfile(cfg.src)
        else sorted(os.path.join(cfg.src, f) for f in os.listdir(cfg.src) if os.path.isfile(os.path.join(cfg.src, f)))
    )
    lineage = make_lineage(
        "convert",
        cfg.argv or sys.argv[1:],
        inputs + ([cfg.tokenizer] if cfg.tokenizer else []),
        parent=src.lineage or None,
    )
    # Check names and shapes against the architecture before writing anything.

    with torch.device("meta"):
        expected = Transformer(src.args).state_dict()
    check_state(cfg.src, expected, {p.name: torch.empty(p.shape, device="meta") for p in plans})
    order = {name: i for i, name in enumerate(expected)}
    plans.sort(key=lambda p: order[p.name])
    return cv.save_plans(cfg.output, plans, CheckpointMeta(src.args, src.tokenizer, lineage), shard_size)
