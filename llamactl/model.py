"""The Llama 2 model: one short file, Meta's parameter names, every op through ``llamactl.ops``."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from llamactl import ops
from llamactl.errors import UserError
from llamactl.kernels.rotary import rotary_tables

HEADS = ("lm", "scalar")


@dataclass
class ModelArgs:
    """Architecture of one model. Field names follow Meta's ``params.json``; ``__post_init__`` derives the rest."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    hidden_dim: int | None = None  # None: Meta's rule below; set explicitly by converters that know it
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    head: str = "lm"  # "lm": next-token logits; "scalar": one score per token (reward and value models)

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        sizes = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "max_seq_len")
        sizes += ("hidden_dim",) if self.hidden_dim is not None else ()
        reals = ("norm_eps", "rope_theta") + (("ffn_dim_multiplier",) if self.ffn_dim_multiplier is not None else ())
        wrong = [f"{k}={v!r}" for k in sizes if type(v := getattr(self, k)) is not int or v <= 0]
        wrong += [f"{k}={v!r}" for k in reals if type(v := getattr(self, k)) not in (int, float) or v <= 0]
        if wrong:  # before any arithmetic on them: a zero would divide, a string would multiply
            raise UserError(f"invalid model config: {', '.join(wrong)} (sizes are positive integers, the rest > 0)")
        if self.hidden_dim is None:
            # Meta's FeedForward sizing: 2/3 of 4*dim, scaled, rounded up to a multiple of multiple_of.
            hidden = int(2 * (4 * self.dim) / 3)
            if self.ffn_dim_multiplier is not None:
                hidden = int(self.ffn_dim_multiplier * hidden)
            self.hidden_dim = self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)
        problems = []
        if self.dim % self.n_heads:
            problems.append(f"dim {self.dim} is not a multiple of n_heads {self.n_heads}")
        elif (self.dim // self.n_heads) % 2:
            problems.append(f"head dim {self.dim // self.n_heads} must be even for rotary embeddings")
        if self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.head not in HEADS:
            problems.append(f"head {self.head!r} is not one of {', '.join(HEADS)}")
        if self.head == "scalar" and self.tie_embeddings:
            problems.append("a scalar head cannot be tied to the embeddings")
        if problems:
            raise UserError("invalid model config: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelArgs:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**d)

    def num_params(self) -> int:
        """Parameter count without building the model."""
        hd, kv = self.head_dim, self.n_kv_heads
        attn = self.dim * self.dim * 2 + 2 * self.dim * kv * hd
        ffn = 3 * self.dim * self.hidden_dim
        per_layer = attn + ffn + 2 * self.dim
        out = 0 if self.tie_embeddings else (self.vocab_size if self.head == "lm" else 1) * self.dim
        return self.vocab_size * self.dim + self.n_layers * per_layer + self.dim + out


# Meta's params.json for Llama 2 (vocab_size -1 there means "from the tokenizer": 32000), and small models for CPU
# work, shaped like llama2.c's TinyStories models, and a 1.1B model for a single GPU (TinyLlama's published shape: the
# Llama 2 architecture with grouped-query attention). Names give the parameter count.
PRESETS: dict[str, dict] = {
    "llama2-7b": dict(dim=4096, n_layers=32, n_heads=32, multiple_of=256, norm_eps=1e-5),
    "llama2-13b": dict(dim=5120, n_layers=40, n_heads=40, multiple_of=256, norm_eps=1e-5),
    "llama2-70b": dict(
        dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3, norm_eps=1e-5
    ),
    "llama2-15m": dict(dim=288, n_layers=6, n_heads=6, multiple_of=32, max_seq_len=256, tie_embeddings=True),
    "llama2-60m": dict(dim=512, n_layers=10, n_heads=8, n_kv_heads=4, multiple_of=32, max_seq_len=512),
    "llama2-110m": dict(dim=768, n_layers=12, n_heads=12, multiple_of=32, max_seq_len=1024, tie_embeddings=True),
    "llama2-1b": dict(
        dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, multiple_of=256, max_seq_len=2048, norm_eps=1e-5
    ),
}


def preset(name: str, **overrides) -> ModelArgs:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return ModelArgs(**{**PRESETS[name], **overrides})


INIT_BLOCK_ROWS = 256


def init_rows(name: str, shape: tuple[int, ...], seed: int, n_layers: int, start: int = 0, stop: int | None = None):
    """Rows ``start:stop`` of parameter ``name``'s fresh value, fp32: norms' gains 1, matrices N(0, 0.02) with the
    residual projections (wo, w2) scaled by 1/sqrt(2 * n_layers) (GPT-2's scheme, as Llama's reference training
    code); LoRA's A uniform in +-1/sqrt(fan_in) (kaiming_uniform with a = sqrt(5), PEFT's default) and B zero.

    Each block of ``INIT_BLOCK_ROWS`` rows comes from its own generator, seeded by (seed, name, block): a rank that
    materialises only its shard of a parameter draws only the blocks it holds, and gets the values a single process
    would. NOTE: about 5% more draws than a single generator at 7B (one extra block per parameter and rank)."""
    import hashlib

    stop = shape[0] if stop is None else stop
    rows = (stop - start, *shape[1:])
    if name.endswith(("norm.weight", "lora_B")):
        return torch.ones(rows) if name.endswith("norm.weight") else torch.zeros(rows)
    if name.endswith("lora_A"):
        draw, scale = (lambda n, g: torch.rand(n, generator=g) * 2 - 1), 1 / math.sqrt(shape[1])
    else:
        draw = lambda n, g: torch.randn(n, generator=g)  # noqa: E731
        scale = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("wo.weight", "w2.weight")) else 0.02
    out = torch.empty(rows)
    first, last = start // INIT_BLOCK_ROWS, (stop - 1) // INIT_BLOCK_ROWS if stop > start else -1
    for block in range(first, last + 1):
        key = hashlib.blake2b(f"{seed}/{name}/{block}".encode(), digest_size=8).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(key, "little") & (2**63 - 1))
        b0 = block * INIT_BLOCK_ROWS
        values = draw((min(b0 + INIT_BLOCK_ROWS, shape[0]) - b0, *shape[1:]), gen)
        lo, hi = max(start, b0), min(stop, b0 + INIT_BLOCK_ROWS)
        out[lo - start : hi - start] = values[lo - b0 : hi - b0]
    return out * scale


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return ops.rms_norm(x, self.weight, self.eps, residual)


class KVCache:
    """Preallocated keys and values for every layer, each (B, n_kv_heads, max_len, head_dim), owned by the caller.

    ``lengths`` (a host list, one int per row) says how many positions of each row hold keys and values; slots past
    it may hold anything finite and are never attended. Truncating is setting ``lengths``; the generation engine
    (``llamactl.generate``) extends rows at their lengths and keeps ``lengths`` up to date.
    """

    def __init__(self, args: ModelArgs, batch: int, max_len: int, device, dtype):
        assert max_len <= args.max_seq_len, f"a cache of {max_len} positions exceeds the context {args.max_seq_len}"
        shape = (batch, args.n_kv_heads, max_len, args.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.max_len = max_len
        self.lengths = [0] * batch

    @property
    def batch(self) -> int:
        return len(self.lengths)

    def truncate(self, lengths: int | list[int]) -> None:
        """Forget every position at or past ``lengths`` (one int for all rows, or one per row): undo, retry."""
        lengths = [lengths] * self.batch if isinstance(lengths, int) else list(lengths)
        assert len(lengths) == self.batch, f"{len(lengths)} lengths for {self.batch} rows"
        bad = [(n, have) for n, have in zip(lengths, self.lengths, strict=True) if not 0 <= n <= have]
        assert not bad, f"cannot truncate a row of {bad[0][1]} positions to {bad[0][0]}"
        self.lengths = lengths

    def _take(self, rows: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        assert all(0 <= r < self.batch for r in rows), f"rows {rows} outside a batch of {self.batch}"
        idx = torch.tensor(rows, device=self.k[0].device)
        return [t.index_select(0, idx) for t in self.k], [t.index_select(0, idx) for t in self.v]

    def fork(self, rows: list[int]) -> KVCache:
        """A new cache whose row i is a copy of this cache's row ``rows[i]``: ``fork([0] * n)`` gives n copies of
        one prefilled prompt to sample n answers from."""
        return self._of(*self._take(rows), [self.lengths[r] for r in rows])

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows``, in this order, in place (the batch shrinks when rows have finished)."""
        self.k, self.v = self._take(rows)
        self.lengths = [self.lengths[r] for r in rows]

    def put(self, row: int, src: KVCache, src_row: int) -> None:
        """Row ``row`` of this cache becomes a copy of ``src``'s row ``src_row`` (its filled positions; the engine
        puts a freshly prefilled prompt into a free row of a running batch)."""
        n = src.lengths[src_row]
        assert n <= self.max_len, f"a row of {n} positions does not fit a cache of {self.max_len}"
        for dst, part in ((self.k, src.k), (self.v, src.v)):
            for d, s in zip(dst, part, strict=True):
                d[row, :, :n] = s[src_row, :, :n]
        self.lengths[row] = n

    def grow(self, max_len: int) -> None:
        """Room for ``max_len`` positions a row, every row's keys and values kept (a longer prompt has come)."""
        assert max_len >= self.max_len, f"a cache of {self.max_len} positions cannot grow to {max_len}"
        grown = []
        for t in (*self.k, *self.v):
            g = t.new_zeros(*t.shape[:2], max_len, t.shape[3])
            g[:, :, : self.max_len] = t
            grown.append(g)
        n = len(self.k)
        self.k, self.v, self.max_len = grown[:n], grown[n:], max_len

    def row(self, b: int) -> KVCache:
        """Row ``b`` as a cache of one row sharing this one's storage (its ``lengths`` is a copy)."""
        return self._of([t[b : b + 1] for t in self.k], [t[b : b + 1] for t in self.v], [self.lengths[b]])

    def _of(self, k: list[torch.Tensor], v: list[torch.Tensor], lengths: list[int]) -> KVCache:
        new = object.__new__(KVCache)
        new.k, new.v, new.max_len, new.lengths = k, v, self.max_len, lengths
        return new


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.wqkv: nn.Module | None = None  # q, k, v in one projection: set by swap.fuse_projections

    def forward(self, x, cos, sin, positions, segment_ids=None, cache=None, start=None):
        B, T, _ = x.shape
        H, KV = self.n_heads, self.n_kv_heads
        if self.wqkv is not None:
            # NOTE: one rotary call for the q and k heads side by side (decode on a CPU): ~12 fewer small ops a layer
            qkv = self.wqkv(x).view(B, T, H + 2 * KV, self.head_dim)
            q, k = ops.rotary(qkv[:, :, : H + KV], cos, sin, positions).split([H, KV], dim=2)
            v = qkv[:, :, H + KV :]
        else:
            q = ops.rotary(self.wq(x).view(B, T, H, self.head_dim), cos, sin, positions)
            k = ops.rotary(self.wk(x).view(B, T, KV, self.head_dim), cos, sin, positions)
            v = self.wv(x).view(B, T, KV, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        if cache is None:
            out = ops.attention(q, k, v, causal=True, segment_ids=segment_ids)
        else:
            k_cache, v_cache = cache
            rows = torch.arange(B, device=x.device)[:, None]
            k_cache[rows, :, positions] = k.transpose(1, 2)  # positions (B, T): each sequence writes its own slots
            v_cache[rows, :, positions] = v.transpose(1, 2)
            if start is None:  # prefill of fresh sequences: the new tokens are the whole context
                out = ops.attention(q, k, v, causal=True)
            elif T == 1:
                out = ops.decode_attention(q[:, :, 0], k_cache, v_cache, start + 1)[:, :, None]
            else:
                out = ops.cached_attention(q, k_cache, v_cache, start)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w13: nn.Module | None = None  # w1 and w3 in one projection: set by swap.fuse_projections

    def forward(self, x):
        if self.w13 is not None:
            a, b = self.w13(x).chunk(2, dim=-1)
            return self.w2(ops.swiglu(a, b))
        return self.w2(ops.swiglu(self.w1(x), self.w3(x)))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, positions, segment_ids=None, cache=None, start=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, positions, segment_ids, cache, start)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        if args.head == "scalar":
            self.score = nn.Linear(args.dim, 1, bias=False)
        elif not args.tie_embeddings:
            self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.reset_rope()
        self.grad_checkpointing = False
        self.packed_head: nn.Module | None = None  # the head's CPU decode form, set by swap.finish
        # the decode step the engine runs in place of ``decode`` when it is compiled (``llamactl.compiled``)
        self.compiled_decode: Callable[[torch.Tensor, torch.Tensor, KVCache], torch.Tensor] | None = None

    def _apply(self, fn, recurse=True):
        # .to(dtype) would round the rotary tables too; they stay fp32 (as Meta's freqs_cis) whatever the weights are.
        super()._apply(fn, recurse)
        self.reset_rope(self.tok_embeddings.weight.device)
        return self

    def reset_rope(self, device: torch.device | str | None = None) -> None:
        """(Re)build the fp32 rotary tables, e.g. after weights were assigned to a model built on the meta device."""
        device = device if device is not None else self.rope_cos.device
        cos, sin = rotary_tables(self.args.head_dim, self.args.max_seq_len, self.args.rope_theta)
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)

    @property
    def output_weight(self) -> torch.Tensor:
        if self.args.tie_embeddings:
            return self.tok_embeddings.weight
        assert isinstance(self.output, nn.Linear), "a quantized output layer has no float weight for a loss to use"
        return self.output.weight

    def init_weights(self, seed: int | None = None) -> None:
        """Fresh weights for pretraining (``init_rows``): the same values for a seed however the rows are later split
        among ranks."""
        seed = int(torch.randint(2**62, ())) if seed is None else seed
        with torch.no_grad():
            for name, p in self.named_parameters():
                p.copy_(init_rows(name, tuple(p.shape), seed, self.args.n_layers))

    def hidden(self, tokens, positions=None, segment_ids=None, cache: KVCache | None = None, start=None):
        """Final-normed hidden states (B, T, dim).

        ``positions`` (B, T) default to 0..T-1 (packed rows pass per-segment positions). With a ``cache``,
        ``start`` (B,) gives each sequence's first new position; None means a fresh prefill from position 0.
        """
        B, T = tokens.shape
        if positions is None:
            base = torch.arange(T, device=tokens.device)[None, :]
            positions = base + start[:, None] if start is not None else base.expand(B, T)
        h = self.tok_embeddings(tokens)
        for i, layer in enumerate(self.layers):
            kv = (cache.k[i], cache.v[i]) if cache is not None else None
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(
                    layer, h, self.rope_cos, self.rope_sin, positions, segment_ids, kv, start, use_reentrant=False
                )
            else:
                h = layer(h, self.rope_cos, self.rope_sin, positions, segment_ids, kv, start)
        return self.norm(h)

    def decode(self, token: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """The decoding step: one token per sequence (B,) at positions ``pos`` (B,) into ``cache``; logits (B, V)."""
        return self.logits(self.hidden(token[:, None], cache=cache, start=pos)[:, 0])

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Next-token logits (..., vocab) in fp32 from hidden states (..., dim)."""
        assert self.args.head == "lm", "logits need a language-model head"
        if self.packed_head is not None and not torch.compiler.is_compiling():
            return self.packed_head(h).float()
        if self.args.tie_embeddings:
            return F.linear(h, self.tok_embeddings.weight).float()
        return self.output(h).float()  # an nn.Linear, or a quantized one

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        """Scalar-head outputs (...,) in fp32 from hidden states (..., dim)."""
        assert self.args.head == "scalar", "scores need a scalar head"
        return self.score(h).squeeze(-1).float()

    def forward(self, tokens, targets=None, mask=None, positions=None, segment_ids=None, output: str | None = None):
        """The model's one entry for training and scoring (DDP and FSDP hooks run on ``forward`` only).

        ``output`` says what comes back (default: ``loss`` when ``targets`` are given, else ``logits``/``scores``
        by head); targets equal to -100 and zeros of ``mask`` (B, T) exclude tokens:

        - ``loss``: the mean next-token cross-entropy over counted targets (fp32 scalar), never materialising the
          full logits;
        - ``loss_sum``: ``(sum, count)`` of the same, fp32: what a training loop normalises once over micro-steps
          and ranks;
        - ``logprobs``: log p(target) per token (B, T) fp32, 0 where excluded, with gradients (RL stages);
        - ``logits``: (B, T, vocab) fp32 (lm head); ``scores``: (B, T) fp32 (scalar head).
        """
        lm_outputs = ("loss", "loss_sum", "logprobs", "logits")
        output = output or ("loss" if targets is not None else "logits" if self.args.head == "lm" else "scores")
        if output not in (*lm_outputs, "scores"):
            raise ValueError(f"output {output!r}: use one of {', '.join((*lm_outputs, 'scores'))}")
        if (output in lm_outputs) != (self.args.head == "lm"):
            kind = "a language" if self.args.head == "lm" else "a scalar-head (reward)"
            raise ValueError(f"{kind} model has no {output!r} output")
        if (targets is None) == (output in ("loss", "loss_sum", "logprobs")):
            raise ValueError(f"output {output!r} {'needs' if targets is None else 'takes no'} targets")
        h = self.hidden(tokens, positions, segment_ids)
        if output == "logits":
            return self.logits(h)
        if output == "scores":
            return self.scores(h)
        flat_h, flat_t = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
        if output == "logprobs":
            lp = ops.linear_logprobs(flat_h, self.output_weight, flat_t)
            if mask is not None:
                lp = lp * mask.reshape(-1)
            return lp.view(targets.shape)
        flat_mask = mask.reshape(-1) if mask is not None else None
        total, count = ops.linear_cross_entropy_sum(flat_h, self.output_weight, flat_t, flat_mask)
        return (total, count) if output == "loss_sum" else total / count.clamp(min=1)

    def loss(self, tokens, targets, mask=None, positions=None, segment_ids=None) -> torch.Tensor:
        return self(tokens, targets, mask, positions, segment_ids)
