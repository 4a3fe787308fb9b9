"""``llamactl eval``: a language model's perplexity on text, over a sliding window; with ``--reference``, how far its
next-token distributions are from another model's on the same windows (what quantizing a model cost).

Documents. A text file is one document. A JSONL record is one: its ``"tokens"`` (ids, used as they are; ``tokenize
encode`` puts the BOS in front) or the text in ``--field`` (default ``text``). Text is tokenized with a BOS in front,
as training reads it. Each document is evaluated on its own: no window crosses from one into the next. A document of
fewer than 2 tokens has nothing to predict and is skipped (``documents_skipped`` counts it).

Windows (the Hugging Face perplexity guide's scheme). Over a document of n tokens, windows of ``--context`` tokens
start at 0, stride, 2 * stride ... until one reaches the end (the last may be shorter). Each window scores the tokens
from where the previous window ended to its own end, but never its own first token, which has no history inside the
window. With stride < context every token but the document's first is scored once, each one after the first window
with at least context - stride tokens before it; with disjoint windows (stride = context, the default) the first
token of each window is context only (n - ceil(n / context) tokens are scored). A window that would score nothing
(a last window of one token) is not run.

The summary, one JSON object: ``documents``, ``documents_skipped``, ``windows``, ``tokens_scored``, ``context``,
``stride``, ``dtype``, ``nll_mean`` (mean negative log-likelihood over the scored tokens, in nats) and ``perplexity``
(its exp). With ``--reference`` also, per scored position, KL(P_ref || P_model) = sum_v p_ref(v) (log p_ref(v) -
log p_model(v)) of the two next-token distributions: ``kl_mean``, ``kl_median``, ``kl_p99``, ``kl_p999`` (99.9th
percentile, interpolated linearly between the sorted values as llama.cpp's ``perplexity --kl-divergence`` does) and
``kl_max``; ``same_top``, the share of positions where both models' most likely token is the same; and the
reference's own ``reference_nll_mean`` and ``reference_perplexity``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llamactl.errors import UserError

if TYPE_CHECKING:
    import torch

    from llamactl.checkpoint import CheckpointMeta

# Log-probabilities are computed for at most this many (position, vocab) entries at a time, fp32: 64 MiB, 524
# positions of Llama 2's vocabulary, instead of (batch, context, vocab) at once (4 GiB for 8 windows of 4096).
LOGIT_ELEMENTS = 1 << 24


@dataclass(kw_only=True)
class EvalConfig:
    model: str
    data: str
    reference: str | None = None
    output: str = "-"
    format: str = "auto"  # auto: .jsonl files and stdin are JSONL, other files text
    field: str | None = None  # the text field of JSONL records; None: "text"
    context: int | None = None  # None: the model's max_seq_len (the smaller one's with --reference)
    stride: int | None = None  # None: the context (disjoint windows)
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "auto"
    adapter: str | None = None  # a LoRA adapter trained on the model
    reference_adapter: str | None = None  # one trained on the reference

    def validate(self) -> None:
        from llamactl.files import io_problems, overlaps
        from llamactl.jsonl import FORMATS, input_kind

        problems = []
        if self.format not in FORMATS:
            problems.append(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        elif self.field is not None and input_kind(self.data, self.format) == "text":
            problems.append(f"--field names a field of JSONL records, and --data {self.data} is read as text")
        if self.context is not None and self.context < 2:
            problems.append(f"--context must be at least 2 (a token and one to predict), got {self.context}")
        if self.stride is not None and self.stride < 1:
            problems.append(f"--stride must be at least 1, got {self.stride}")
        elif self.stride is not None and self.context is not None and self.stride > self.context:
            problems.append(f"--stride {self.stride} is more than --context {self.context}: tokens between windows "
                            "would go unscored")  # fmt: skip
        if self.batch_size < 1:
            problems.append(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.reference_adapter is not None and self.reference is None:
            problems.append("--reference-adapter goes on a --reference, and none is given")
        inputs = [("--data", self.data, "file", True), ("--adapter", self.adapter, "adapter file", False)]
        problems += io_problems(inputs + [("--reference-adapter", self.reference_adapter, "adapter file", False)],
                                self.output)  # fmt: skip
        models = [("-m/--model", self.model)] + ([("--reference", self.reference)] if self.reference else [])
        # checkpoints are checked when read (a sharded one is its index); here only that -o is none of them
        paths = [(flag, p) for flag, m in models for p in (m, m + ".index.json")]
        problems += overlaps([("-o/--output", self.output)], paths)
        if problems:
            raise UserError("; ".join(problems))


def windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """The windows over a document of ``n`` tokens as (begin, end, first scored token), document positions: the
    window feeds tokens [begin, end) and scores tokens [first, end), each predicted from the tokens before it in the
    window. Windows that would score nothing are left out."""
    assert 1 <= stride <= context and context >= 2, f"stride {stride}, context {context}"
    out = []
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + context, n)
        first = max(prev_end, begin + 1)  # a window's own first token has no history in it
        if first < end:
            out.append((begin, end, first))
        prev_end = end
        if end == n:
            break
    return out


def check_reference(cfg: EvalConfig, meta: CheckpointMeta, ref: CheckpointMeta) -> None:
    """Refuse a reference whose token ids mean other things than the model's: its distributions would not compare."""
    why = "KL divergence compares next-token distributions over the same tokens"
    if meta.tokenizer != ref.tokenizer:
        if ref.tokenizer is None or meta.tokenizer is None:
            has, other = ("has no tokenizer", "has one") if ref.tokenizer is None else ("has a tokenizer", "has none")
            raise UserError(f"--reference {cfg.reference}: {has}, and -m {cfg.model} {other} ({why})")
        raise UserError(f"--reference {cfg.reference}: its tokenizer differs from -m {cfg.model}'s ({why})")
    if meta.args.vocab_size != ref.args.vocab_size:
        raise UserError(f"--reference {cfg.reference}: {ref.args.vocab_size} embeddings, -m {cfg.model} has "
                        f"{meta.args.vocab_size} ({why})")  # fmt: skip


def window_sizes(cfg: EvalConfig, meta: CheckpointMeta, ref: CheckpointMeta | None) -> tuple[int, int]:
    """(context, stride) resolved against the models' contexts."""
    limits = [(meta.args.max_seq_len, f"-m {cfg.model}")]
    if ref is not None:
        limits.append((ref.args.max_seq_len, f"--reference {cfg.reference}"))
    limit, whose = min(limits)
    context = cfg.context if cfg.context is not None else limit
    if context > limit:
        raise UserError(f"--context {context} is more than the context of {whose} ({limit} tokens)")
    if context < 2:
        raise UserError(f"{whose}: a context of {context} token leaves nothing to predict from")
    stride = cfg.stride if cfg.stride is not None else context
    if stride > context:
        raise UserError(f"--stride {stride} is more than the context of {context} tokens: tokens between windows "
                        "would go unscored")  # fmt: skip
    return context, stride


def percentile(sorted_values, q: float) -> float:
    """The ``q`` quantile (0..1) of ascending values, interpolated linearly between neighbours."""
    p = q * (len(sorted_values) - 1)
    i = int(p)
    j = min(i + 1, len(sorted_values) - 1)
    return float((1 - (p - i)) * sorted_values[i] + (p - i) * sorted_values[j])


def _exp(x: float) -> float:
    return math.exp(x) if x < 709 else math.inf  # past 709 a double overflows


def run(cfg: EvalConfig) -> dict:
    """Evaluate; returns the summary it writes."""
    import torch
    import torch.nn.functional as F

    from llamactl.data import document_ids
    from llamactl.device import DTYPE_NAMES, resolve_device
    from llamactl.files import display_name
    from llamactl.jsonl import dumps, open_output
    from llamactl.loading import load_for_inference, read_checked_meta
    from llamactl.progress import progress
    from llamactl.records import read_documents
    from llamactl.tokenizer import Tokenizer

    cfg.validate()
    device = resolve_device(cfg.device)
    raw = read_documents(cfg.data, cfg.format, cfg.field)
    has_text = any(isinstance(doc, str) for _, doc in raw)
    meta = read_checked_meta(cfg.model, "lm", "to evaluate", need_tokenizer=has_text)
    ref_meta = None
    if cfg.reference is not None:
        ref_meta = read_checked_meta(cfg.reference, "lm", "as the --reference", need_tokenizer=False)
        check_reference(cfg, meta, ref_meta)
    context, stride = window_sizes(cfg, meta, ref_meta)
    tokenizer = Tokenizer(meta.tokenizer, cfg.model) if has_text else None
    docs = document_ids(raw, tokenizer, meta.args.vocab_size)
    del raw
    spans = [(d, *w) for d, ids in enumerate(docs) for w in windows(len(ids), context, stride)]
    total = sum(end - first for _, _, end, first in spans)
    if total == 0:
        many = f"{len(docs)} documents, none" if len(docs) != 1 else "1 document, not"
        raise UserError(f"{display_name(cfg.data)}: no token to score ({many} of 2 tokens or more)")
    spans.sort(key=lambda s: s[2] - s[1], reverse=True)  # longest windows first: a batch's rows pad little
    docs = [torch.tensor(ids, dtype=torch.long) for ids in docs]

    dtype, ref = cfg.dtype, None
    if cfg.reference is not None:
        ref, _ = load_for_inference(cfg.reference, device, cfg.dtype, "lm", "as the --reference", need_tokenizer=False,
                                    adapter=cfg.reference_adapter)  # fmt: skip
        # both in one dtype, the reference's under auto: the KL is then the model's difference alone (a quantized
        # model would otherwise run in bf16 on a CPU against an fp32 reference)
        dtype = DTYPE_NAMES[ref.tok_embeddings.weight.dtype] if cfg.dtype == "auto" else cfg.dtype
    models = [load_for_inference(cfg.model, device, dtype, "lm", "to evaluate", need_tokenizer=has_text,
                                 adapter=cfg.adapter)[0]]  # fmt: skip
    models += [ref] if ref is not None else []
    chunk = max(1, LOGIT_ELEMENTS // meta.args.vocab_size)
    nll = [0.0] * len(models)
    kls: list[torch.Tensor] = []
    same_top = 0
    with torch.inference_mode(), progress("eval", "tok", total=total, unit_scale=True) as bar:
        for s in range(0, len(spans), cfg.batch_size):
            batch = spans[s : s + cfg.batch_size]
            tokens = torch.zeros((len(batch), max(end - begin for _, begin, end, _ in batch)), dtype=torch.long)
            rows, cols, targets = [], [], []
            for i, (d, begin, end, first) in enumerate(batch):
                tokens[i, : end - begin] = docs[d][begin:end]  # right-padded: causal attention never sees the pad
                rows.append(torch.full((end - first,), i))
                cols.append(torch.arange(first - begin - 1, end - begin - 1))  # the positions that predict them
                targets.append(docs[d][first:end])
            tokens = tokens.to(device)
            rows, cols, targets = torch.cat(rows).to(device), torch.cat(cols).to(device), torch.cat(targets).to(device)
            hidden = [m.hidden(tokens)[rows, cols] for m in models]  # (N, dim) each: the scored positions only
            for c in range(0, len(targets), chunk):
                logp = [torch.log_softmax(m.logits(h[c : c + chunk]).float(), dim=-1)
                        for m, h in zip(models, hidden, strict=True)]  # fmt: skip
                t = targets[c : c + chunk, None]
                for k, lp in enumerate(logp):
                    nll[k] -= lp.gather(1, t).sum(dtype=torch.float64).item()
                if len(logp) == 2:
                    model_lp, ref_lp = logp
                    kl = F.kl_div(model_lp, ref_lp, reduction="none", log_target=True).sum(-1)
                    kls.append(kl.cpu())
                    same_top += int((model_lp.argmax(-1) == ref_lp.argmax(-1)).sum())
            bar.update(len(targets))

    summary = {
        "model": cfg.model,
        **({"adapter": cfg.adapter} if cfg.adapter is not None else {}),
        "data": cfg.data,
        "documents": sum(len(ids) >= 2 for ids in docs),
        "documents_skipped": sum(len(ids) < 2 for ids in docs),
        "windows": len(spans),
        "tokens_scored": total,
        "context": context,
        "stride": stride,
        "dtype": DTYPE_NAMES.get(models[0].tok_embeddings.weight.dtype, str(models[0].tok_embeddings.weight.dtype)),
        "nll_mean": nll[0] / total,
        "perplexity": _exp(nll[0] / total),
    }
    if cfg.reference is not None:
        kl = torch.cat(kls).double().sort().values
        summary |= {
            "reference": cfg.reference,
            **({"reference_adapter": cfg.reference_adapter} if cfg.reference_adapter is not None else {}),
            "reference_nll_mean": nll[1] / total,
            "reference_perplexity": _exp(nll[1] / total),
            "kl_mean": float(kl.mean()),
            "kl_median": percentile(kl, 0.5),
            "kl_p99": percentile(kl, 0.99),
            "kl_p999": percentile(kl, 0.999),
            "kl_max": float(kl[-1]),
            "same_top": same_top / total,
        }
    with open_output(cfg.output) as out:
        out.write(dumps(summary) + "\n")
    return summary
