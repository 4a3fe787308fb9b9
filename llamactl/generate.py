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
which rows are done is a mask on the device, read once every few steps (never once per row). ``run_requests`` is
continuous batching over a stream of prompts: at each read, finished rows are refilled with waiting prompts; without
more to come, rows that are done leave the batch when enough of them are.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch

from llamactl.compiled import batch_bucket, cache_size, compiled
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
    logits: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0, generator=None, u=None
) -> torch.Tensor:
    """Next tokens (B,) from logits (B, V): greedy at temperature 0, else temperature, top-k, then top-p. The draw
    is ``u`` (B, 1) in (0, 1] where given (the engine's per-sequence ``uniforms``), else from ``generator``."""
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
        return idx.gather(-1, inverse_cdf(sorted_p.masked_fill(drop, 0.0), generator, u)[:, None]).squeeze(-1)
    return inverse_cdf(probs, generator, u)


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


def inverse_cdf(weights: torch.Tensor, generator=None, u=None) -> torch.Tensor:
    """One index per row of ``weights`` (B, V) (>= 0, not necessarily normalised), drawn with probability
    proportional to its weight: the first index whose cumulative weight reaches u x the row's total, u uniform in
    (0, 1], so a zero-weight index is never drawn.

    NOTE: torch.multinomial took 21 ms for 16 rows of 32,000 on this CPU, cumsum + searchsorted 0.25 ms: at batch 16
    the draw cost two thirds of a small model's decode step."""
    cdf = weights.float().cumsum(-1)
    if u is None:
        u = 1.0 - torch.rand(weights.shape[0], 1, generator=generator, device=weights.device)
    return torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(-1).clamp(max=weights.shape[-1] - 1)


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_GAMMA, _M1, _M2 = _signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 (wrapping) arithmetic; ``>>`` made logical by masking the sign's copies."""
    z = z + _GAMMA
    z = (z ^ ((z >> 30) & ((1 << 34) - 1))) * _M1
    z = (z ^ ((z >> 27) & ((1 << 37) - 1))) * _M2
    return z ^ ((z >> 31) & ((1 << 33) - 1))


def uniforms(base: int, keys: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """(B, 1) fp32 draws in (0, 1], one per row, counter-based: row b's draw depends on ``base`` (one per stream,
    from its generator), the key of its sequence and its step only, so a sequence samples the same tokens whatever
    batch it shares, whichever row it is given and whenever a streamed input arrives (continuous batching)."""
    h = _mix(_mix(keys + base) + steps * _GAMMA)
    return (1.0 - ((h >> 11) & ((1 << 53) - 1)).double() * 2.0**-53).float()[:, None]


@dataclass
class Timings:
    """What generation cost, counted by the engine as llama.cpp counts its own: the model's load, the prompt tokens
    prefilled and their time, the new tokens sampled and the decode time (sampling included; the time a consumer
    spends between steps is not). The engine adds to the one it is given; ``line`` is what ``--timings`` prints."""

    load_s: float = 0.0
    prompt_tokens: int = 0
    prompt_s: float = 0.0
    new_tokens: int = 0
    decode_s: float = 0.0
    sequences: int = 0

    def line(self, name: str = "") -> str:
        def rate(n: int, s: float) -> str:
            return f"{n / s:.1f} tok/s" if s > 0 else "- tok/s"

        who = f" {name}" if name else ""
        prompt = f"{self.prompt_tokens} tokens in {self.prompt_s:.2f} s ({rate(self.prompt_tokens, self.prompt_s)})"
        decode = f"{self.new_tokens} tokens in {self.decode_s:.2f} s ({rate(self.new_tokens, self.decode_s)})"
        done = f"{self.sequences} sequences"
        return f"timings{who}: load {self.load_s:.2f} s | prompt {prompt} | decode {decode} | {done}"


def _synced(device: torch.device) -> float:
    """The time once the device has done what was queued (what a timing of GPU work must wait for)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@dataclass
class Step:
    """One decoding step of a batch: what each row sampled, still on the device (reading it is the caller's sync)."""

    rows: list[int]  # the row each entry belongs to, numbered as the batch the stream started with
    tokens: torch.Tensor  # (b,) int64: the token each row sampled
    live: torch.Tensor  # (b,) bool: False where the row had already finished or is free (its token is to be ignored)
    logprobs: torch.Tensor | None  # (b,) fp32: log-probability of each token under the model (params.logprobs)
    finished: list[int]  # rows whose last token is in this step or an earlier one, each reported once per sequence


# refill(free rows, idle) -> [(row, logits (V,), key, max_new_tokens), ...]: sequences put into free rows of the
# cache (prefilled there, the cache's ``lengths`` set), each with a key naming it for its random draws and its own
# limit of new tokens, or None once there will be no more. With ``idle`` (every row is free) it waits for at
# least one sequence or returns None.
Refill = Callable[[list[int], bool], "list[tuple[int, torch.Tensor, int, int]] | None"]


@torch.inference_mode()
def prefill(
    model: Transformer, cache: KVCache, tokens: list[list[int]], timings: Timings | None = None
) -> torch.Tensor:
    """Extend row b of ``cache`` by ``tokens[b]`` at its length ``cache.lengths[b]``; logits (B, V) after each row's
    last new token. On a fresh cache this is the prompt prefill; after ``cache.truncate`` it is a retry."""
    assert len(tokens) == cache.batch and all(tokens), "one non-empty list of new tokens per cache row"
    device = model.tok_embeddings.weight.device
    t0 = time.perf_counter() if timings is not None else 0.0
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
        out = torch.cat(logits)
    else:
        batch = torch.tensor([t + [0] * (T - len(t)) for t in tokens], device=device)  # (B, T) right-padded
        start = None if not any(starts) else torch.tensor(starts, device=device)  # None: plain causal attention
        h = model.hidden(batch, cache=cache, start=start)
        last = h[torch.arange(len(tokens), device=device), torch.tensor(n, device=device) - 1]
        cache.lengths = ends
        out = model.logits(last)
    if timings is not None:
        timings.prompt_tokens += sum(n)
        timings.prompt_s += _synced(device) - t0
    return out


@torch.inference_mode()
def decode_one_token(model: Transformer, token: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Feed one token per sequence (B,) at positions pos (B,); logits (B, V) for the next: the model's compiled
    step when it has one (``llamactl.compiled``), else its eager one."""
    return (model.compiled_decode or model.decode)(token, pos, cache)


@torch.inference_mode()
def stream(
    model: Transformer,
    cache: KVCache,
    logits: torch.Tensor | None,
    params: SamplingParams,
    eos_id: int | None,
    generator: torch.Generator | None = None,
    *,
    shrink: bool = True,
    sync_every: int | None = None,
    refill: Refill | None = None,
    timings: Timings | None = None,
) -> Iterator[Step]:
    """Sample from ``logits`` (B, V) (what ``prefill`` returned for the cache's rows), then decode step by step.

    A row finishes at ``eos_id``, after ``params.max_new_tokens`` or when its sequence fills the cache. The last
    token of a row is not fed: afterwards ``cache.lengths`` counts each row's prompt and every new token but its
    last, so a caller continues by extending with that token (chat's next turn). The done mask is read every
    ``sync_every`` steps (default 1 on a CPU, where reading it costs nothing) and whenever a row reaches its length
    limit; at those reads finished rows are reported.

    Continuous batching: with ``refill``, a finished row is free, and at each read the free rows are offered to
    ``refill``, which puts new sequences into them (``logits`` may then be None: every row starts free); the stream
    ends when every row is free and ``refill`` has no more. Without it (or once it has no more), with ``shrink`` the
    finished rows leave the batch (and the cache, in place) once at least half of the rows are. ``Step.rows`` says
    which rows the entries are.
    """
    device = model.tok_embeddings.weight.device
    sync_every = sync_every or (1 if device.type == "cpu" else 8)
    n = cache.batch
    fixed = compiled(model)
    # per row, on the host: where its sequence started and its next position, tokens sampled, finish reported
    rows, start, pos = list(range(n)), list(cache.lengths), list(cache.lengths)
    made = [0] * n
    limit = [params.max_new_tokens] * n  # per row: its sequence's most new tokens
    reported = [logits is None] * n
    assert logits is None or (logits.shape[0] == n and min(cache.lengths) >= 1), "logits for each row of a filled cache"
    assert logits is not None or refill is not None, "rows start free only when there is a refill to fill them"
    pos_dev = torch.tensor(pos, device=device)
    keys = torch.arange(n, device=device)  # each sequence's key for its draws: its row, or what refill says
    base = 0
    if params.temperature > 0:  # one draw of the generator a stream: a chat's turns sample differently
        gen_device = generator.device if generator is not None else "cpu"
        base = int(torch.randint(-(2**62), 2**62, (), generator=generator, device=gen_device))
    done = torch.tensor(reported, device=device)
    count = torch.zeros(n, dtype=torch.long, device=device)  # tokens each row's sequence has produced
    new_tokens = torch.zeros((), dtype=torch.long, device=device)
    exhausted = refill is None
    busy, resumed = 0.0, time.perf_counter()  # the stream's own time, for timings (None while at a yield)
    synced, step = True, 0
    try:
        while True:
            if not exhausted and synced and any(reported):
                free = [i for i, r in enumerate(reported) if r]
                busy += time.perf_counter() - resumed
                got = refill(free, len(free) == len(rows))
                resumed = time.perf_counter()
                if got is None:
                    exhausted = True
                elif got:
                    if logits is None:
                        logits = torch.zeros(n, got[0][1].shape[-1], device=device)
                    idx = torch.tensor([g[0] for g in got], device=device)
                    logits[idx] = torch.stack([g[1] for g in got]).to(logits.dtype)
                    keys[idx] = torch.tensor([g[2] for g in got], device=device)
                    for i, _, _, most in got:
                        limit[i] = most
                        start[i] = pos[i] = cache.lengths[i]
                        made[i], reported[i] = 0, False
                    done[idx], count[idx] = False, 0
                    pos_dev[idx] = torch.tensor([pos[g[0]] for g in got], device=device)
            if all(reported):
                if exhausted:
                    break
                assert refill is not None
                continue  # refill found nothing now (an idle refill waits, so this is not reached)
            early = [i for i, m in enumerate(made) if m < params.min_new_tokens]
            if early and eos_id is not None:
                logits = logits.clone()
                logits[torch.tensor(early, device=device), eos_id] = float("-inf")
            u = uniforms(base, keys, count) if params.temperature > 0 else None
            tok = sample(logits, params.temperature, params.top_p, params.top_k, u=u)
            lp = torch.log_softmax(logits, -1).gather(1, tok[:, None]).squeeze(1) if params.logprobs else None
            live = ~done
            count += live
            new_tokens += live.sum()
            if eos_id is not None:
                done |= tok == eos_id
            made = [m + 1 for m in made]
            # the host knows when a row reaches max_new_tokens or fills its cache: no read of the device for that
            ends = [not r and (m >= most or p + 1 >= cache.max_len)
                    for m, most, p, r in zip(made, limit, pos, reported, strict=True)]  # fmt: skip
            flags = None
            if any(ends):
                done |= torch.tensor(ends, device=device)
            step += 1
            if any(ends) or step % sync_every == 0:
                flags = done.tolist()  # the one read of the device per sync, whatever the batch size
            synced = flags is not None
            finished = []
            if synced:
                finished = [rows[i] for i, f in enumerate(flags) if f and not reported[i]]
                reported = [r or f for r, f in zip(reported, flags, strict=True)]
            cache.lengths = list(pos)  # exact for live rows; done rows are set right below and at the end
            busy += time.perf_counter() - resumed
            resumed = None
            yield Step(rows, tok, live, lp, finished)
            resumed = time.perf_counter()
            if synced and all(reported):
                continue  # nothing left to decode: refill, or the end
            if shrink and exhausted and synced and 2 * sum(reported) >= len(rows) > 1:
                keep = [i for i, r in enumerate(reported) if not r]
                if fixed:  # a compiled step's batch is a power of two: finished rows pad it
                    keep += [i for i, r in enumerate(reported) if r][: batch_bucket(len(keep)) - len(keep)]
                idx = torch.tensor(keep, device=device)
                cache.keep(keep)
                rows, start, pos, made, limit, reported = (
                    [x[i] for i in keep] for x in (rows, start, pos, made, limit, reported)
                )
                tok, pos_dev, done, count, keys = (t.index_select(0, idx) for t in (tok, pos_dev, done, count, keys))
            # A done row keeps decoding in place until it is refilled or the batch shrinks; its slots past its length
            # are never read.
            at = pos_dev if max(pos) < cache.max_len else pos_dev.clamp(max=cache.max_len - 1)
            logits = decode_one_token(model, tok, at, cache)
            pos = [p + 1 for p in pos]
            pos_dev = pos_dev + 1
    finally:  # also when the caller stops early (Ctrl-C in chat): lengths exact for every row
        cache.lengths = [s + max(c - 1, 0) for s, c in zip(start, count.tolist(), strict=True)]
        if timings is not None:
            timings.new_tokens += int(new_tokens)
            timings.decode_s += busy + (_synced(device) - resumed if resumed is not None else 0.0)


def finished_rows(steps: Iterable[Step], eos_id: int | None) -> Iterator[tuple[int, Completion]]:
    """(row, Completion) for each row as soon as the stream reports it finished, reading the device only then. A
    row the stream refills gives one Completion per sequence it held."""
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


def _background(requests: Iterable[Request | None]):
    """A generator over ``requests`` read ahead by a daemon thread: ``send(block)`` gives the next request, or None
    when none has come and ``block`` is false; an error raised while reading them is raised here."""
    import queue
    import threading

    box: queue.Queue = queue.Queue()
    end = object()

    def read() -> None:
        try:
            for r in requests:
                if r is not None:
                    box.put(r)
            box.put(end)
        except BaseException as e:  # noqa: BLE001 - handed to the engine's thread, which raises it
            box.put(e)

    threading.Thread(target=read, name="llamactl-requests", daemon=True).start()
    block = yield  # started by a first next()
    while True:
        try:
            got = box.get(block=bool(block))
        except queue.Empty:
            block = yield None
            continue
        if got is end:
            return
        if isinstance(got, BaseException):
            raise got
        block = yield got


# A request: a prompt's tokens, how many samples to draw from it (each its own row, from one prefill) and optionally
# its own most new tokens (default ``params.max_new_tokens``); or None: nothing has come yet (a pipe), so the engine
# goes on with what it has.
Request = tuple[list[int], int] | tuple[list[int], int, int]


def run_requests(
    model: Transformer,
    requests: Iterable[Request | None],
    params: SamplingParams,
    eos_id: int | None,
    generator: torch.Generator | None = None,
    *,
    rows: int,
    timings: Timings | None = None,
    reserve: Callable[[int, int], None] | None = None,
    sync_every: int | None = None,
    background: bool = False,
) -> Iterator[tuple[int, int, Completion]]:
    """The engine with continuous batching: (request index, sample index, Completion) for each sample of each
    request as soon as it is finished, decoding ``rows`` sequences at a time (fewer when the requests are fewer).

    Requests are taken as rows free up: a finished row is refilled with the next waiting sample at the next read of
    the done mask, its prompt prefilled beside the running batch (the samples of one prompt admitted together share
    one prefill, their cache rows copies of it), instead of the batch draining. The cache holds what the first
    requests need, and grows when a later one needs more, up to the context;
    ``reserve(rows, max_len)`` is called before it is made or grown (a memory check that refuses in one line).

    With ``background`` the requests are read in a thread of their own (input that arrives over time, a pipe, whose
    read blocks): the engine takes what has come at each read of the done mask and waits only when no row is busy.
    Without it, a None from ``requests`` says that nothing has come yet."""
    src = _background(requests) if background else iter(requests)
    if background:
        next(src)  # start it: it waits for the first send
    waiting: deque[tuple[int, list[int], int, int]] = deque()  # (request, prompt, sample, most new) not admitted
    ended = False
    count = 0
    weight = model.tok_embeddings.weight
    context = model.args.max_seq_len

    def pull(want: int, block: bool) -> None:
        nonlocal ended, count
        while not ended and len(waiting) < want:
            try:
                req = src.send(block and not waiting) if background else next(src)
            except StopIteration:
                ended = True
                break
            if req is None:
                if block and not waiting:
                    continue
                break
            prompt, k, most = req if len(req) == 3 else (*req, params.max_new_tokens)
            assert prompt and 1 <= k <= rows and len(prompt) < context, "a non-empty prompt, 1 <= k <= rows"
            assert most >= 1, "at least one new token"
            waiting.extend((count, prompt, j, most) for j in range(k))
            count += 1

    fixed = compiled(model)  # a compiled step: batches and cache sizes to its buckets (llamactl.compiled)

    def room(items) -> int:  # the positions (request, prompt, sample, most new) items need
        need = min(max(len(p) + most for _, p, _, most in items), context)
        return cache_size(need, context) if fixed else need

    pull(rows, True)
    if not waiting:
        return
    if not ended:  # more may come: the batch keeps all its rows
        n_rows = rows
    else:
        n_rows = min(rows, len(waiting))
    if fixed:
        n_rows = batch_bucket(n_rows)  # the padding rows stay free
    size = room(waiting)
    if reserve is not None:
        reserve(n_rows, size)
    cache = KVCache(model.args, n_rows, size, weight.device, weight.dtype)
    held: dict[int, tuple[int, int]] = {}  # cache row -> (request, sample)

    def admit(free: list[int], idle: bool) -> list[tuple[int, torch.Tensor, int, int]] | None:
        pull(len(free), idle)
        if not waiting:
            return None if ended else []
        take = [waiting.popleft() for _ in range(min(len(free), len(waiting)))]
        groups: dict[int, list[int]] = {}  # request -> positions in take
        for t, (req, *_) in enumerate(take):
            groups.setdefault(req, []).append(t)
        prompts = [take[ts[0]][1] for ts in groups.values()]
        need = room(take)
        if need > cache.max_len:
            grown = min(context, max(need, 2 * cache.max_len))
            grown = cache_size(grown, context) if fixed else grown
            if reserve is not None:
                reserve(cache.batch, grown)
            cache.grow(grown)
        fresh = KVCache(model.args, len(prompts), max(len(p) for p in prompts), weight.device, weight.dtype)
        logits = prefill(model, fresh, prompts, timings)
        out = []
        for g, ts in enumerate(groups.values()):
            for t in ts:
                row = free[t]
                cache.put(row, fresh, g)
                held[row] = take[t][0], take[t][2]
                out.append((row, logits[g], take[t][0] << 20 | take[t][2], take[t][3]))  # key: (request, sample)
        return out

    for row, completion in finished_rows(
        stream(model, cache, None, params, eos_id, generator, refill=admit, timings=timings, sync_every=sync_every),
        eos_id,
    ):
        if timings is not None:
            timings.sequences += 1
        req, j = held.pop(row)
        yield req, j, completion


def completions(
    model: Transformer,
    prompts: Iterable[list[int] | None],
    params: SamplingParams,
    eos_id: int | None,
    generator: torch.Generator | None = None,
    *,
    rows: int | None = None,
    timings: Timings | None = None,
    reserve: Callable[[int, int], None] | None = None,
    background: bool = False,
) -> Iterator[Completion]:
    """Complete token prompts, ``rows`` at a time (default: a list's all at once) with continuous batching; each
    completion is yielded, in prompt order, as soon as it and those before it are finished. ``prompts`` may be a
    stream, with None where nothing has come yet (see ``run_requests``). Stops at EOS, max_new_tokens or the context
    end."""
    if rows is None:
        prompts = list(prompts)
        assert prompts and all(prompts), "every prompt needs at least one token"
        rows = len(prompts)
    ready: dict[int, Completion] = {}
    nxt = 0
    requests = (None if p is None else (p, 1) for p in prompts)
    for i, _, completion in run_requests(model, requests, params, eos_id, generator, rows=rows, timings=timings,
                                         reserve=reserve, background=background):  # fmt: skip
        ready[i] = completion
        while nxt in ready:
            yield ready.pop(nxt)
            nxt += 1
    assert not ready, f"the engine finished {nxt} prompts in order and {len(ready)} past a gap"


def generate(
    model: Transformer,
    prompts: list[list[int]],
    params: SamplingParams,
    eos_id: int | None,
    generator: torch.Generator | None = None,
    **kw,
) -> list[Completion]:
    """Complete a batch of token prompts (the engine's convenience for callers that want every result at once)."""
    return list(completions(model, prompts, params, eos_id, generator, **kw))


def sample_k(
    model: Transformer,
    prompts: Iterable[list[int] | None],
    k: int,
    params: SamplingParams,
    eos_id: int | None,
    generator: torch.Generator | None = None,
    *,
    rows: int | None = None,
    timings: Timings | None = None,
) -> Iterator[tuple[int, int, Completion]]:
    """``k`` samples of each prompt with each prompt prefilled once: its cache row is copied to ``k`` rows that decode
    together, ``rows`` rows at a time (default all at once) with continuous batching. Yields (prompt index, sample
    index, Completion) for each sample as soon as it is finished (rejection sampling's best-of-K, ppo's rollouts)."""
    assert k >= 1, "k >= 1"
    if rows is None:
        prompts = list(prompts)
        assert prompts and all(prompts), "at least one non-empty prompt"
        rows = len(prompts) * k
    requests = (None if p is None else (p, k) for p in prompts)
    yield from run_requests(model, requests, params, eos_id, generator, rows=max(rows, k), timings=timings)
