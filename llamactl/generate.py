"""The generation engine: prefill, decode_one_token, sample, and a token stream over a caller-owned KV cache.

One engine for generate, chat, rejection-sample and ppo. The caller owns the ``KVCache`` (``llamactl.model``):

    cache = KVCache(model.args, batch, max_len, device, dtype)
    logits = prefill(model, cache, prompts)              # extend each row at its length; logits after its last token
    for step in stream(model, cache, logits, params, eos_id):   # one Step per decoding step, tokens on the device
        ...
    cache.truncate(n); logits = prefill(model, cache, [[...]])  # undo / retry, then extend again
    many = cache.fork([0] * n)                           # one prefilled prompt, n rows to sample from

Rows of different lengths are batched right-padded: each row writes its own cache slots at its own positions, so
padding is never attended and never shifts rotary positions. Positions live on the host (the cache's ``lengths``);
which rows are done is a mask on the device, read once every few steps (never once per row), and rows that are done
leave the batch when enough of them are.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from llamactl.model import KVCache, Transformer


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.8  # 0 = greedy
    top_p: float = 1.0  # 1 = off
    top_k: int = 0  # 0 = off
    logprobs: bool = False
    min_new_tokens: int = 0  # EOS cannot be sampled before this many new tokens (a chat answer is never empty)


@dataclass
class Completion:
    tokens: list[int]  # the new tokens only, the EOS included when it ended the sequence
    finish_reason: str  # "eos" or "length"
    logprobs: list[float] = field(default_factory=list)


def sample(
    logits: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0, generator=None
) -> torch.Tensor:
    """Next tokens (B,) from logits (B, V): greedy at temperature 0, else temperature, top-k, then top-p."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = _descending(probs, top_p)
        # drop a token when the mass before it already reaches top_p (the most likely token always stays)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
        return idx.gather(-1, inverse_cdf(sorted_p.masked_fill(drop, 0.0), generator)[:, None]).squeeze(-1)
    return inverse_cdf(probs, generator)


def _descending(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The probabilities in descending order with their indices, as far as the nucleus needs them. On a CPU the
    1,024 largest are enough whenever they hold ``top_p`` of the mass (the nucleus is then inside them); checking
    that costs a host sync, which a GPU's decode loop avoids, so a GPU sorts the whole row.

    NOTE: sorting 16 rows of 32,000 took 56 ms on this CPU, topk(1024) 8 ms."""
    k = min(probs.shape[-1], 1024)
    if probs.device.type == "cpu" and k < probs.shape[-1]:
        top, idx = torch.topk(probs, k, dim=-1)
        if bool((top.sum(-1) >= top_p).all()):
            return top, idx
    return torch.sort(probs, dim=-1, descending=True)


def inverse_cdf(weights: torch.Tensor, generator=None) -> torch.Tensor:
    """One index per row of ``weights`` (B, V) (>= 0, not necessarily normalised), drawn with probability
    proportional to its weight: the first index whose cumulative weight reaches u x the row's total, u uniform in
    (0, 1], so a zero-weight index is never drawn.

    NOTE: torch.multinomial took 21 ms for 16 rows of 32,000 on this CPU, cumsum + searchsorted 0.25 ms: at batch 16
    the draw cost two thirds of a small model's decode step."""
    cdf = weights.float().cumsum(-1)
    u = 1.0 - torch.rand(weights.shape[0], 1, generator=generator, device=weights.device)
    return torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(-1).clamp(max=weights.shape[-1] - 1)


@dataclass
class Step:
    """One decoding step of a batch: what each row sampled, still on the device (reading it is the caller's sync)."""

    rows: list[int]  # the row each entry belongs to, numbered as the batch the stream started with
    tokens: torch.Tensor  # (b,) int64: the token each row sampled
    live: torch.Tensor  # (b,) bool: False where the row had already finished (its token is to be ignored)
    logprobs: torch.Tensor | None  # (b,) fp32: log-probability of each token under the model (params.logprobs)
    finished: list[int]  # rows whose last token is in this step or an earlier one, each reported once


@torch.inference_mode()
def prefill(model: Transformer, cache: KVCache, tokens: list[list[int]]) -> torch.Tensor:
    """Extend row b of ``cache`` by ``tokens[b]`` at its length ``cache.lengths[b]``; logits (B, V) after each row's
    last new token. On a fresh cache this is the prompt prefill; after ``cache.truncate`` it is a retry."""
    assert len(tokens) == cache.batch and all(tokens), "one non-empty list of new tokens per cache row"
    device = model.tok_embeddings.weight.device
    starts, n = cache.lengths, [len(t) for t in tokens]
    ends = [s + k for s, k in zip(starts, n, strict=True)]
    assert max(ends) <= cache.max_len, f"rows would reach {max(ends)} positions in a cache of {cache.max_len}"
    T = max(n)
    if max(starts) + T > cache.max_len:
        # A short row padded up to T would write past the end of the cache: feed the rows one at a time.
        logits = []
        for b, new in enumerate(tokens):
            one = cache.row(b)
            logits.append(prefill(model, one, [new]))
            cache.lengths[b] = one.lengths[0]
        return torch.cat(logits)
    batch = torch.tensor([t + [0] * (T - len(t)) for t in tokens], device=device)  # (B, T) right-padded
    start = None if not any(starts) else torch.tensor(starts, device=device)  # None: plain causal attention
    h = model.hidden(batch, cache=cache, start=start)
    last = h[torch.arange(len(tokens), device=device), torch.tensor(n, device=device) - 1]
    cache.lengths = ends
    return model.logits(last)


@torch.inference_mode()
def decode_one_token(model: Transformer, token: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Feed one token per sequence (B,) at positions pos (B,); logits (B, V) for the next."""
    h = model.hidden(token[:, None], cache=cache, start=pos)
    return model.logits(h[:, 0])


@torch.inference_mode()
def stream(
    model: Transformer,
    cache: KVCache,
    logits: torch.Tensor,
    params: SamplingParams,
    eos_id: int | None,
    generator: torch.Generator | None = None,
    *,
    shrink: bool = True,
    sync_every: int | None = None,
) -> Iterator[Step]:
    """Sample from ``logits`` (B, V) (what ``prefill`` returned for the cache's rows), then decode step by step.

    A row finishes at ``eos_id``, after ``params.max_new_tokens`` or when its sequence fills the cache; the stream
    ends when every row has. The last token of a row is not fed: afterwards ``cache.lengths`` counts each row's
    prompt and every new token but its last, so a caller continues by extending with that token (chat's next turn).
    The done mask is read every ``sync_every`` steps (default 1 on a CPU, where reading it costs nothing); at those
    steps finished rows are reported, and with ``shrink`` they leave the batch (and the cache, in place) once at
    least half of the rows are done. ``Step.rows`` says which rows the entries are.
    """
    device = logits.device
    assert logits.shape[0] == cache.batch and min(cache.lengths) >= 1, "logits for every row of a filled cache"
    # On a GPU, reading the mask every step would make the host wait for each step before it queues the next, so it
    # is read every 8 steps there (up to 7 steps computed past the last row's end). Not measured on a GPU yet.
    sync_every = sync_every or (1 if device.type == "cpu" else 8)
    rows, start, pos = list(range(cache.batch)), list(cache.lengths), list(cache.lengths)  # host
    reported = [False] * len(rows)
    pos_dev = torch.tensor(pos, device=device)
    done = torch.zeros(len(rows), dtype=torch.bool, device=device)
    count = torch.zeros(len(rows), dtype=torch.long, device=device)  # tokens each row has produced
    try:
        for step in range(params.max_new_tokens):
            if step < params.min_new_tokens and eos_id is not None:
                logits = logits.clone()
                logits[:, eos_id] = float("-inf")
            tok = sample(logits, params.temperature, params.top_p, params.top_k, generator)
            lp = torch.log_softmax(logits, -1).gather(1, tok[:, None]).squeeze(1) if params.logprobs else None
            live = ~done
            count += live
            if eos_id is not None:
                done |= tok == eos_id
            if max(pos) + 1 >= cache.max_len:  # the host knows when a row can fill its cache: no check before
                done |= pos_dev + 1 >= cache.max_len
            last = step + 1 == params.max_new_tokens or min(pos) + 1 >= cache.max_len
            flags = None
            if last or (step + 1) % sync_every == 0:
                flags = done.tolist()  # the one read of the device per sync, whatever the batch size
                last = last or all(flags)
            finished = []
            if flags is not None:
                finished = [r for r, f, seen in zip(rows, flags, reported, strict=True) if (f or last) and not seen]
                reported = [seen or f or last for f, seen in zip(flags, reported, strict=True)]
            cache.lengths = list(pos)  # exact for live rows; done rows are set right below and at the end
            yield Step(rows, tok, live, lp, finished)
            if last:
                break
            if shrink and flags is not None and 2 * sum(flags) >= len(rows) > 1:
                keep = [i for i, f in enumerate(flags) if not f]
                idx = torch.tensor(keep, device=device)
                cache.keep(keep)
                rows, start, pos, reported = ([x[i] for i in keep] for x in (rows, start, pos, reported))
                tok, pos_dev, done, count = (t.index_select(0, idx) for t in (tok, pos_dev, done, count))
            # A done row keeps decoding in place until the batch shrinks; its slots past its length are never read.
            at = pos_dev if max(pos) < cache.max_len else pos_dev.clamp(max=cache.max_len - 1)
            logits = decode_one_token(model, tok, at, cache)
            pos = [p + 1 for p in pos]
            pos_dev = pos_dev + 1
    finally:  # also when the caller stops early (Ctrl-C in chat): lengths exact for every row
        cache.lengths = [s + c - 1 for s, c in zip(start, count.tolist(), strict=True)]


def finished_rows(steps: Iterable[Step], eos_id: int | None) -> Iterator[tuple[int, Completion]]:
    """(row, Completion) for each row as soon as the stream reports it finished, reading the device only then."""
    out: dict[int, list[int]] = {}
    lps: dict[int, list[float]] = {}
    pending: list[Step] = []
    for step in steps:
        pending.append(step)
        if not step.finished:
            continue
        # one transfer for every step since the last report
        toks = torch.cat([s.tokens for s in pending]).tolist()
        live = torch.cat([s.live for s in pending]).tolist()
        lp = torch.cat([s.logprobs for s in pending]).tolist() if step.logprobs is not None else None
        for i, row in enumerate(r for s in pending for r in s.rows):
            if live[i]:
                out.setdefault(row, []).append(toks[i])
                if lp is not None:
                    lps.setdefault(row, []).append(lp[i])
        pending.clear()
        for row in step.finished:
            new = out.pop(row)
            reason = "eos" if eos_id is not None and new[-1] == eos_id else "length"
            yield row, Completion(new, reason, lps.pop(row, []))


def completions(
    model: Transformer,
    prompts: list[list[int]],
    params: SamplingParams,
    eos_id: int | None,
    generator: torch.Generator | None = None,
) -> Iterator[Completion]:
    """Complete a batch of token prompts over a cache of their own; each completion is yielded, in prompt order, as
    soon as it and those before it are finished. Stops at EOS, max_new_tokens or the context end."""
    assert prompts and all(prompts), "every prompt needs at least one token"
    max_len = min(max(len(p) for p in prompts) + params.max_new_tokens, model.args.max_seq_len)
    weight = model.tok_embeddings.weight
    cache = KVCache(model.args, len(prompts), max_len, weight.device, weight.dtype)
    logits = prefill(model, cache, prompts)
    ready: dict[int, Completion] = {}
    nxt = 0
    for row, completion in finished_rows(stream(model, cache, logits, params, eos_id, generator), eos_id):
        ready[row] = completion
        while nxt in ready:
            yield ready.pop(nxt)
            nxt += 1
    assert nxt == len(prompts), f"the stream reported {nxt} of {len(prompts)} rows finished"


def generate(
    model: Transformer,
    prompts: list[list[int]],
    params: SamplingParams,
    eos_id: int | None,
    generator: torch.Generator | None = None,
) -> list[Completion]:
    """Complete a batch of token prompts (the engine's convenience for callers that want every result at once)."""
    return list(completions(model, prompts, params, eos_id, generator))


def sample_k(
    model: Transformer,
    prompts: list[list[int]],
    k: int,
    params: SamplingParams,
    eos_id: int | None,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[int, int, Completion]]:
    """``k`` samples of each prompt with each prompt prefilled once: its cache row is forked to ``k`` rows
    (``KVCache.fork``) that decode as one batch. Yields (prompt index, sample index, Completion) for each sample as
    soon as it is finished (rejection sampling's best-of-K, ppo's rollouts)."""
    assert prompts and all(prompts) and k >= 1, "at least one non-empty prompt and k >= 1"
    max_len = min(max(len(p) for p in prompts) + params.max_new_tokens, model.args.max_seq_len)
    weight = model.tok_embeddings.weight
    cache = KVCache(model.args, len(prompts), max_len, weight.device, weight.dtype)
    logits = prefill(model, cache, prompts)  # (B, V)
    forked = cache.fork([b for b in range(len(prompts)) for _ in range(k)])  # row b * k + j: sample j of prompt b
    del cache  # the B prefilled rows live on in their copies only
    logits = logits.repeat_interleave(k, dim=0)  # (B * k, V)
    for row, completion in finished_rows(stream(model, forked, logits, params, eos_id, generator), eos_id):
        yield row // k, row % k, completion
