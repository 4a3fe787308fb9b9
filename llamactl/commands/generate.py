"""``llamactl generate``: JSONL prompts in, JSONL completions out, batched over one KV-cache engine."""

from __future__ import annotations

from dataclasses import dataclass

from llamactl.errors import UserError
from llamactl.flags import SamplingFlags


@dataclass(kw_only=True)
class GenerateConfig(SamplingFlags):
    model: str
    input: str = "-"
    output: str = "-"
    max_new_tokens: int = 256
    temperature: float = 0.8  # completion, not chat: llama's text_completion example samples at 0.8 / 0.95
    top_p: float = 0.95
    top_k: int = 0
    logprobs: bool = False
    adapter: str | None = None  # a LoRA adapter trained on the model

    def validate(self) -> None:
        from llamactl.files import io_problems, overlaps
        from llamactl.flags import sampling_problems

        problems = sampling_problems(self)
        problems += io_problems(
            [("-i/--input", self.input, "file", True), ("--adapter", self.adapter, "adapter file", False)], self.output
        )
        model = [("-m/--model", self.model), ("-m/--model", self.model + ".index.json")]  # checked when loaded
        problems += overlaps([("-o/--output", self.output)], model)
        if problems:
            raise UserError("; ".join(problems))


def prompt_ids(rec: dict, where: str, tokenizer, vocab_size: int, max_len: int, writes: tuple[str, ...]) -> list[int]:
    """The prompt of one record as token ids, checked; ``writes``: the fields the result adds, refused on input."""
    from llamactl.jsonl import check_free, check_token_ids, field

    if ("prompt" in rec) == ("tokens" in rec):
        raise UserError(f"{where}: give exactly one of the fields 'prompt' (text) and 'tokens' (ids)")
    check_free(rec, writes, where)
    if "prompt" in rec:
        text = field(rec, "prompt", str, where)
        if tokenizer is None:
            raise UserError(f"{where}: field 'prompt' needs a tokenizer, and the model has none; send 'tokens'")
        ids = tokenizer.encode(text, bos=True)
    else:
        ids = field(rec, "tokens", list, where)
        if not ids:
            raise UserError(f"{where}: field 'tokens' is empty")
        check_token_ids(ids, vocab_size, where)
    if len(ids) >= max_len:
        raise UserError(f"{where}: prompt of {len(ids)} tokens leaves no room in the context of {max_len}")
    return ids


def continuation(tokenizer, prompt: list[int], new: list[int]) -> str:
    """The text the new ids add to the prompt's text. Decoding them alone would drop the space SentencePiece
    marks on a word's first piece ("We are" + "▁wors" must give " wors", not "wors")."""
    head = tokenizer.decode(prompt)
    full = tokenizer.decode(prompt + new)
    return full[len(head) :] if full.startswith(head) else tokenizer.decode(new)


def run(cfg: GenerateConfig) -> int:
    """Generate for every input record; returns the number of records written.

    Records are processed as they arrive, --batch-size sequences decoding at a time with continuous batching (a
    finished row takes the next record); while the input has had nothing new for ``jsonl.BATCH_WAIT_S`` the running
    rows decode on. Results are written in input order and flushed as they are ready. A regular file is read and
    checked whole first, so that a bad record in it writes nothing.
    """
    import sys
    import time
    from collections import deque

    import torch

    from llamactl import compiled
    from llamactl.config import check_memory, kv_cache_bytes
    from llamactl.device import resolve_device
    from llamactl.generate import SamplingParams, Timings, completions
    from llamactl.jsonl import BATCH_WAIT_S, dumps, open_output, parsed_records
    from llamactl.loading import load_for_inference
    from llamactl.progress import progress
    from llamactl.tokenizer import Tokenizer

    cfg.validate()
    device = resolve_device(cfg.device)
    t_load = time.perf_counter()
    model, meta = load_for_inference(
        cfg.model, device, cfg.dtype, "lm", "to generate with", need_tokenizer=False, decode=True, adapter=cfg.adapter
    )
    timings = Timings(load_s=time.perf_counter() - t_load)
    dtype = model.tok_embeddings.weight.dtype
    tokenizer = Tokenizer(meta.tokenizer, cfg.model) if meta.tokenizer is not None else None
    writes = ("finish_reason",) + (("completion",) if tokenizer else ()) + (("logprobs",) if cfg.logprobs else ())
    vocab, max_len = model.args.vocab_size, model.args.max_seq_len
    prompts, total = parsed_records(
        cfg.input, lambda where, rec: (rec, prompt_ids(rec, where, tokenizer, vocab, max_len, writes)), BATCH_WAIT_S
    )
    params = SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.top_k, cfg.logprobs)
    eos = tokenizer.eos_id if tokenizer is not None else 2  # Llama's EOS id when no tokenizer says otherwise
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    held: deque[tuple[dict, list[int]]] = deque()  # the records taken and not yet written, in order

    def requests():
        for item in prompts:
            if item is not None:
                held.append(item)
                yield item[1]
            else:
                yield None  # nothing new on the input yet: the running rows decode on

    def reserve(rows: int, length: int) -> None:
        cache = kv_cache_bytes(model.args, rows, length, dtype)
        check_memory(cache, f"the KV cache of {rows} x {length} tokens", cfg.model, device)

    rows = cfg.batch_size if total is None else max(1, min(cfg.batch_size, total))
    # a pipe's length is unknown: its work is reckoned as one batch's
    compiled.enable(model, cfg.compile, (total or rows) * cfg.max_new_tokens, rows)
    n_records = n_tokens = 0
    t0 = time.perf_counter()
    with open_output(cfg.output) as out, progress("generate", "seq", total=total) as bar:
        # continuous batching: a finished row takes the next record at once; results come in input order, each as
        # soon as it and those before it are done
        for res in completions(
            model, requests(), params, eos, gen, rows=rows, timings=timings, reserve=reserve, background=total is None
        ):
            rec, ids = held.popleft()
            new = res.tokens[:-1] if res.finish_reason == "eos" else res.tokens
            result = dict(rec)
            if tokenizer is not None:
                result["completion"] = continuation(tokenizer, ids, new)
            result["tokens"] = ids + res.tokens
            result["finish_reason"] = res.finish_reason
            if cfg.logprobs:
                result["logprobs"] = res.logprobs
            out.write(dumps(result) + "\n")
            out.flush()
            n_tokens += len(res.tokens)
            n_records += 1
            bar.update(1)
            bar.set_postfix(tok_s=f"{n_tokens / (time.perf_counter() - t0):.1f}")
    if cfg.timings:
        print(timings.line(), file=sys.stderr)
    return n_records
