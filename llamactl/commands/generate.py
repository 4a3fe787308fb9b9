"""``llamactl generate``: JSONL prompts in, JSONL completions out, batched over one KV-cache engine."""

from __future__ import annotations

from dataclasses import dataclass

from llamactl.errors import UserError


@dataclass
class GenerateConfig:
    model: str
    input: str = "-"
    output: str = "-"
    max_new_tokens: int = 256
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 0
    batch_size: int = 8
    logprobs: bool = False
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"

    def validate(self) -> None:
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            problems.append(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            problems.append(f"--top-k must be >= 0, got {self.top_k}")
        if self.batch_size < 1:
            problems.append(f"--batch-size must be at least 1, got {self.batch_size}")
        if problems:
            raise UserError("; ".join(problems))


def read_prompts(path: str, tokenizer, vocab_size: int, max_len: int) -> list[tuple[dict, list[int]]]:
    """Every record with its prompt ids, all checked before any generation starts (so bad input writes nothing)."""
    from llamactl.jsonl import display_name, field, read_jsonl

    records = []
    for lineno, rec in read_jsonl(path):
        where = f"{display_name(path)}:{lineno}"
        if ("prompt" in rec) == ("tokens" in rec):
            raise UserError(f"{where}: give exactly one of the fields 'prompt' (text) and 'tokens' (ids)")
        if "prompt" in rec:
            text = field(rec, "prompt", str, where)
            if tokenizer is None:
                raise UserError(f"{where}: field 'prompt' needs a tokenizer, and the model has none; send 'tokens'")
            ids = tokenizer.encode(text, bos=True)
        else:
            ids = field(rec, "tokens", list, where)
            if not ids:
                raise UserError(f"{where}: field 'tokens' is empty")
            bad = [t for t in ids if type(t) is not int or not 0 <= t < vocab_size]
            if bad:
                raise UserError(f"{where}: field 'tokens' holds {bad[0]!r}, not a token id in [0, {vocab_size})")
        if len(ids) >= max_len:
            raise UserError(f"{where}: prompt of {len(ids)} tokens leaves no room in the context of {max_len}")
        records.append((rec, ids))
    return records


def continuation(tokenizer, prompt: list[int], new: list[int]) -> str:
    """The text the new ids add to the prompt's text. Decoding them alone would drop the space SentencePiece
    marks on a word's first piece ("We are" + "▁wors" must give " wors", not "wors")."""
    head = tokenizer.decode(prompt)
    full = tokenizer.decode(prompt + new)
    return full[len(head) :] if full.startswith(head) else tokenizer.decode(new)


def run(cfg: GenerateConfig) -> int:
    """Generate for every input record; returns the number of records written."""
    import time

    import torch
    from tqdm import tqdm

    from llamactl.checkpoint import load_model
    from llamactl.device import resolve_device, resolve_dtype
    from llamactl.generate import SamplingParams, generate, pack_for_cpu_decode
    from llamactl.jsonl import dumps, open_output
    from llamactl.tokenizer import Tokenizer

    cfg.validate()
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    model, meta = load_model(cfg.model, device, dtype)  # memory-mapped: cheap even when refused just below
    if meta.args.head != "lm":
        raise UserError(f"{cfg.model}: has a scalar (reward/value) head, not a language-model head to generate with")
    pack_for_cpu_decode(model)
    tokenizer = Tokenizer(meta.tokenizer, cfg.model) if meta.tokenizer is not None else None
    records = read_prompts(cfg.input, tokenizer, model.args.vocab_size, model.args.max_seq_len)
    params = SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.top_k, cfg.logprobs)
    eos = tokenizer.eos_id if tokenizer is not None else 2  # Llama's EOS id when no tokenizer says otherwise
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    n_tokens, t0 = 0, time.perf_counter()
    with open_output(cfg.output) as out, tqdm(total=len(records), unit="seq", desc="generate", leave=False) as bar:
        for s in range(0, len(records), cfg.batch_size):
            chunk = records[s : s + cfg.batch_size]
            results = generate(model, [ids for _, ids in chunk], params, eos, gen)
            for (rec, ids), res in zip(chunk, results, strict=True):
                new = res.tokens[:-1] if res.finish_reason == "eos" else res.tokens
                result = dict(rec)
                if tokenizer is not None:
                    result["completion"] = continuation(tokenizer, ids, new)
                result["tokens"] = ids + res.tokens
                result["finish_reason"] = res.finish_reason
                if cfg.logprobs:
                    result["logprobs"] = res.logprobs
                out.write(dumps(result) + "\n")
                n_tokens += len(res.tokens)
            out.flush()
            bar.update(len(chunk))
            bar.set_postfix(tok_s=f"{n_tokens / (time.perf_counter() - t0):.1f}")
    return len(records)
