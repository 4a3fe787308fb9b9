"""The memory plan behind ``--dry-run``: what one rank holds at the peak of a training step, by component.

The plan walks one steady-state step (AdamW's moments exist) of llamactl's own training code tensor by tensor, in
the order the step makes and frees them, and keeps the largest total: the components shown are the ones live at
that moment, so they add up to the peak. What it counts:

- what each op of the model saves for its backward, on the path ``llamactl.ops`` takes on the planned device (the
  Triton kernels and FlashAttention on CUDA, the torch references on a CPU), and the working set of each block's
  backward;
- the fused loss (``kernels/fused_linear_ce.py``): the full (tokens x vocab) logits never exist; one chunk of them
  does, and the loss's gradients for the hidden states and the head, computed in the forward and kept for the
  backward;
- autocast's bf16 copies of the trained weights, kept for a micro-step (torch caches the casts of trained leaves);
- AdamW's two fp32 moments per trained parameter and fp32 master weights and gradients: 16 bytes per trained
  parameter before activations (the accounting of the ZeRO paper, Rajbhandari et al. 2020, section 3, without its
  fp16 copy; ``torch.optim.AdamW`` keeps ``exp_avg`` and ``exp_avg_sq``);
- DDP's reducer: a flat fp32 bucket per group of parameters beside their gradients (``gradient_as_bucket_view``
  off, torch.nn.parallel.DistributedDataParallel): one more copy of the gradients;
- FSDP2 (``torch.distributed.fsdp._fully_shard`` as of torch 2.13): 1/world of each parameter's rows, gradient and
  moments; a block's parameters all-gathered into a flat buffer and copied out into unsharded parameters before it
  runs, freed after its forward, the root's (embedding, final norm, head) kept for the whole step, the previous
  block prefetched in backward, each block's gradients reduce-scattered from a flat fp32 buffer that lives until
  the next block's reduce-scatter; under bf16 its MixedPrecisionPolicy (bf16 parameters, fp32 reduction);
- gradient accumulation (``train.grad_sync``): from the second micro-step on, the earlier ones' fp32 gradients are
  held. One process holds them whole, and so does DDP (``no_sync`` until the last micro-step), adding each new
  gradient into them; FSDP2 reduce-scatters on every micro-step, so each rank holds only its shard, into which every
  block's reduce-scatter output is added;
- activation checkpointing (non-reentrant ``torch.utils.checkpoint`` per block): each block's input, and one
  block's saved tensors again while its backward runs;
- LoRA (``llamactl.lora``): fp32 adapters A (rank x in) and B (out x rank) trained, the base frozen (in bf16 when
  training in bf16) or quantized (``llamactl.quant.QuantLinear``'s int8 or int4 buffers, whose backward dequantizes
  one weight at a time).

Checked against measured peaks: ``tests/test_memory.py`` and ``bench/dry_run.py``.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from llamactl.errors import UserError
from llamactl.model import ModelArgs
from llamactl.quant import QuantSpec

TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
MODES = ("full", "lora", "frozen")
OUTPUTS = ("loss", "logprobs", "scores")

# The components of a plan, in the order a table shows them.
PARAMS = "parameters (fp32, trained)"
FROZEN = "frozen weights"
GRADS = "gradients"
OPTIM = "optimizer state (AdamW)"
ACTS = "activations"
CASTS = "bf16 weight copies (autocast)"
GATHERED = "all-gathered parameters (FSDP)"
REDUCE = "reduce-scatter buffer (FSDP)"
BUCKETS = "gradient buckets (DDP)"
LOSS = "loss (logits chunk, gradients)"
TEMP = "temporaries"
OTHER = "rotary tables, batch"
ROWS = (PARAMS, FROZEN, GRADS, OPTIM, ACTS, CASTS, GATHERED, REDUCE, BUCKETS, LOSS, TEMP, OTHER)

CPU_LOSS_CHUNK = 1024  # linear_cross_entropy_sum_chunked's chunk_size (kernels/fused_linear_ce.py)


@dataclass
class Part:
    """One model of a training step: ``full`` (every weight trained), ``lora`` (frozen or quantized base, trained
    adapters, and a scalar head trained in full) or ``frozen`` (no gradients: ppo's reference and reward models).

    ``output`` is what the step takes from it: ``loss`` (the fused next-token loss: pretrain, sft), ``logprobs``
    (per-token log-probabilities: ppo's policy) or ``scores`` (the scalar head: train-rm, ppo's value model); by
    default ``loss`` for a language-model head, ``scores`` for a scalar one. ``weight_bytes``: a frozen part's bytes
    per floating-point weight (fp32 4, a model kept in bf16 2)."""

    args: ModelArgs
    mode: str = "full"
    quant: QuantSpec | None = None
    lora_rank: int = 0
    lora_targets: tuple[str, ...] = ()
    lora_dropout: float = 0.05
    output: str | None = None
    weight_bytes: int = 4

    def __post_init__(self) -> None:
        problems = []
        if self.mode not in MODES:
            problems.append(f"mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.mode == "lora" and (self.lora_rank < 1 or not self.lora_targets):
            problems.append("a lora part needs lora_rank >= 1 and lora_targets")
        if unknown := sorted(set(self.lora_targets) - set(TARGETS)):
            problems.append(f"lora targets {', '.join(unknown)} are not among {', '.join(TARGETS)}")
        if self.quant is not None and self.mode == "full":
            problems.append("a quantized model trains through LoRA adapters only (mode 'lora')")
        if self.weight_bytes not in (2, 4):
            problems.append(f"weight_bytes {self.weight_bytes!r} is not 2 or 4")
        if self.output is None:
            self.output = "loss" if self.args.head == "lm" else "scores"
        if self.output not in OUTPUTS:
            problems.append(f"output {self.output!r} is not one of {', '.join(OUTPUTS)}")
        elif (self.output == "scores") != (self.args.head == "scalar"):
            problems.append(f"output {self.output!r} does not go with the {self.args.head!r} head")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass
class MemoryPlan:
    """Bytes per rank at the planned peak, by component (``rows``, adding up to ``total``); where in the step the
    peak falls (``phase``) and what was planned (``setting``)."""

    rows: list[tuple[str, int]]
    total: int
    phase: str
    setting: str

    def table(self, device_memory: int | None = None) -> str:
        """A fixed-width table of the components and their total; with ``device_memory`` (bytes per device), a
        last line saying whether the plan fits and by what margin."""
        width = max(len(name) for name, _ in [*self.rows, ("total", 0)])
        lines = [f"memory per rank: {self.setting}", f"peak at: {self.phase}"]
        lines += [f"  {name:<{width}}  {format_bytes(n):>10}" for name, n in self.rows]
        lines += [f"  {'-' * width}  {'-' * 10}", f"  {'total':<{width}}  {format_bytes(self.total):>10}"]
        if device_memory is not None:
            margin = device_memory - self.total
            lines.append(
                f"{'fits' if margin >= 0 else 'does not fit'} in {format_bytes(device_memory)} per device: "
                f"{format_bytes(abs(margin))} {'to spare' if margin >= 0 else 'short'} "
                f"({100 * self.total / device_memory:.0f}% of it)"
            )
        return "\n".join(lines)


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def parse_memory(text: str) -> int:
    """``--device-memory``: "80GB", "24GiB", "512MiB" -> bytes (GB = 10^9, GiB = 2^30)."""
    from llamactl.checkpoint import parse_size

    try:
        n = parse_size(text)
    except UserError:
        n = 0
    if n <= 0:
        raise UserError(f"--device-memory: cannot read {text!r}; write e.g. 80GB, 24GiB or 512MiB")
    return n


def plan(
    parts: list[Part],
    *,
    micro_batch: int,
    seq_len: int,
    sequences_per_item: int = 1,
    world: int,
    strategy: str,
    bf16: bool,
    activation_checkpointing: bool,
    device: str = "cuda",
    packed: bool = False,
    grad_accumulation: int = 1,
) -> MemoryPlan:
    """The memory one rank needs at the peak of a training step of ``parts`` (run in this order in one micro-step;
    frozen ones without gradients): ``micro_batch`` items of ``sequences_per_item`` rows of ``seq_len`` tokens per
    rank; ``strategy`` ddp or fsdp over ``world`` ranks; ``bf16``: autocast (one process, DDP) or FSDP2's bf16
    mixed precision; ``device``: "cuda" plans the Triton kernels' and FlashAttention's saved tensors, "cpu" the torch
    references'; ``packed``: rows hold several sequences kept apart by segment ids (sft); ``grad_accumulation``:
    micro-steps per optimizer step (from the second on, the gradients of the earlier ones are held: whole on each
    rank in one process and under DDP, which all-reduces on the last micro-step only; this rank's shard under FSDP2,
    which reduce-scatters every micro-step's gradients and adds them into the shard)."""
    if strategy not in ("ddp", "fsdp"):
        raise ValueError(f"strategy {strategy!r} is not ddp or fsdp")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device {device!r} is not cuda or cpu")
    if min(micro_batch, seq_len, sequences_per_item, world, grad_accumulation) < 1:
        raise ValueError("micro_batch, seq_len, sequences_per_item, world and grad_accumulation must be at least 1")
    if not any(p.mode != "frozen" for p in parts):
        raise ValueError("a training step needs a trained part")
    rows = micro_batch * sequences_per_item
    s = _Setting(
        tokens=rows * seq_len, rows=rows, seq=seq_len, world=world, fsdp=world > 1 and strategy == "fsdp",
        ddp=world > 1 and strategy == "ddp", bf16=bf16, checkpointing=activation_checkpointing,
        cuda=device == "cuda", packed=packed, accumulating=grad_accumulation > 1,
    )  # fmt: skip
    models = [_Model(p, s) for p in parts]
    t = _Tracker()
    for m in models:
        _static(t, m, s)
    t.add(OTHER, 2 * 8 * s.tokens, "before the forward")  # tokens and targets, int64
    for m in models:
        if not m.trained:
            _frozen_forward(t, m, s)
    trained = [m for m in models if m.trained]
    for m in trained:
        _forward(t, m, s)
    for m in reversed(trained):
        _backward(t, m, s)
    left = {row: t.live[row] for row in (ACTS, CASTS, GATHERED, REDUCE, LOSS, TEMP) if abs(t.live[row]) > 0.5}
    assert not left, f"the walk's books do not balance after the backward: {left}"
    grads = 4 * sum(m.trained_numel() for m in trained)  # every rank its shard of every trained parameter
    assert abs(t.live[GRADS] - grads) < 1, f"gradients {t.live[GRADS]} after the backward, {grads} trained"
    _optimizer_step(t, trained, s)
    how = "one process" if world == 1 else f"{world} ranks, {strategy}"
    per_item = f" x {sequences_per_item} sequences" if sequences_per_item > 1 else ""
    accum = f" (x {grad_accumulation} micro-steps)" if grad_accumulation > 1 else ""
    setting = (
        f"{how}, {'bf16' if bf16 else 'fp32'}, micro-batch {micro_batch}{per_item} x {seq_len} tokens{accum}, "
        f"activation checkpointing {'on' if activation_checkpointing else 'off'}, on {device}"
    )
    out = [(row, round(t.at[row])) for row in ROWS if round(t.at[row]) > 0]
    return MemoryPlan(out, sum(n for _, n in out), t.phase, setting)


def block_activations(
    part: Part, *, micro_batch: int, seq_len: int, bf16: bool, device: str = "cuda", packed: bool = False
) -> int:
    """Bytes one transformer block of ``part`` saves for its backward (one process), its input included: the
    per-block term of a plan's activations."""
    s = _Setting(
        tokens=micro_batch * seq_len, rows=micro_batch, seq=seq_len, world=1, fsdp=False, ddp=False, bf16=bf16,
        checkpointing=False, cuda=device == "cuda", packed=packed,
    )  # fmt: skip
    return round(_Model(part, s).block_saved())


# ------------------------------------------------------------------------------------------------ the walk


class _Tracker:
    """Live bytes by component; the largest total seen, the components then, and where."""

    def __init__(self) -> None:
        self.live: Counter[str] = Counter()
        self.peak, self.at, self.phase = -1.0, Counter(), ""

    def add(self, row: str, n: float, phase: str | None = None) -> None:
        self.live[row] += n
        if phase is not None:
            self.check(phase)

    def free(self, row: str, n: float) -> None:
        self.live[row] -= n

    def check(self, phase: str) -> None:
        total = sum(self.live.values())
        if total > self.peak:
            self.peak, self.at, self.phase = total, Counter(self.live), phase

    def briefly(self, row: str, n: float, phase: str) -> None:
        """``n`` bytes that live only for the moment ``phase``."""
        self.add(row, n, phase)
        self.free(row, n)

    def grad(self, n: float, accumulating: bool, phase: str | None = None) -> None:
        """A gradient of ``n`` bytes arrives: it becomes the parameter's, or, when earlier micro-steps left one,
        is added into it and freed."""
        if accumulating:
            self.briefly(TEMP, n, phase or "backward")
        else:
            self.add(GRADS, n, phase)


@dataclass
class _Setting:
    tokens: int  # per micro-step and rank
    rows: int
    seq: int
    world: int
    fsdp: bool
    ddp: bool
    bf16: bool
    checkpointing: bool
    cuda: bool
    packed: bool
    accumulating: bool = False  # a micro-step after the first: the earlier ones' gradients are held

    @property
    def into_held(self) -> bool:
        """Whether autograd adds each gradient into one the earlier micro-steps left (one process, DDP's no_sync).
        FSDP2's come out unsharded as without accumulation: reduce-scattered, they are added into the held shard."""
        return self.accumulating and not self.fsdp

    @property
    def mp(self) -> bool:
        """FSDP2's mixed precision: parameters gathered, and computed with, in bf16."""
        return self.fsdp and self.bf16

    @property
    def c(self) -> int:
        """Bytes per element of matmul outputs: bf16 under autocast or FSDP's mixed precision, else fp32."""
        return 2 if self.bf16 else 4


def _linears(a: ModelArgs) -> dict[str, tuple[int, int]]:
    """(out, in) of each linear of a block."""
    q, kv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    return {"wq": (q, a.dim), "wk": (kv, a.dim), "wv": (kv, a.dim), "wo": (a.dim, q),
            "w1": (a.hidden_dim, a.dim), "w2": (a.dim, a.hidden_dim), "w3": (a.hidden_dim, a.dim)}  # fmt: skip


def _rows(shape: tuple[int, int], world: int) -> int:
    """Elements of rank 0's shard of a parameter (FSDP2 splits dim 0 as torch.chunk: ceil(rows / world) each)."""
    return -(-shape[0] // world) * shape[1]


def _padded(shape: tuple[int, int], world: int) -> int:
    """Elements of a parameter padded to a multiple of ``world`` rows (FSDP2's all-gather and reduce-scatter)."""
    return _rows(shape, world) * world


def _quant_bytes(out_f: int, in_f: int, spec: QuantSpec) -> int:
    """A quantized linear's buffers (``QuantLinear``): int8 levels and an fp16 scale per output row, or int4 levels
    two to a byte and an fp16 scale and a uint8 zero point per group of inputs of each row."""
    if spec.scheme == "int8":
        return out_f * in_f + 2 * out_f
    return out_f * in_f // 2 + 3 * out_f * (in_f // spec.group_size)


class _Model:
    """One part's tensors in the step: sizes, precisions, what it saves."""

    def __init__(self, part: Part, s: _Setting):
        self.part, self.a, self.s = part, part.args, s
        a, w = self.a, (s.world if s.fsdp else 1)
        self.lin = _linears(a)
        self.trained = part.mode != "frozen"
        self.lora = part.mode == "lora"
        self.targets = set(part.lora_targets) if self.lora else set()
        # the head: trained in full unless the part is frozen, or LoRA over a language model (its head is frozen)
        self.head_trained = self.trained and (not self.lora or a.head == "scalar")
        q = part.quant
        quantized = set(self.lin) if q is not None else set()
        self.block_quant = sum(_quant_bytes(o, i, q) for k, (o, i) in self.lin.items() if k in quantized)
        block = [sh for k, sh in self.lin.items() if k not in quantized] + [(a.dim, 1), (a.dim, 1)]
        self.block_local = sum(_rows(sh, w) for sh in block)
        self.block_padded = sum(_padded(sh, w) for sh in block)
        head_quant = q is not None and q.head and a.head == "lm" and not a.tie_embeddings
        self.head_quant = _quant_bytes(a.vocab_size, a.dim, q) if head_quant else 0
        root = [(a.vocab_size, a.dim), (a.dim, 1)]
        if a.head == "scalar":
            root.append((1, a.dim))
        elif not a.tie_embeddings and not head_quant:
            root.append((a.vocab_size, a.dim))
        self.root_local = sum(_rows(sh, w) for sh in root)
        self.root_padded = sum(_padded(sh, w) for sh in root)
        r = part.lora_rank
        adapters = [((r, i), (o, r)) for k, (o, i) in self.lin.items() if k in self.targets]
        self.adapter = sum(r * (i + o) for (_, i), (o, _) in adapters)  # one block's A and B elements
        self.adapter_local = sum(_rows(sa, w) + _rows(sb, w) for sa, sb in adapters)
        self.adapter_padded = sum(_padded(sa, w) + _padded(sb, w) for sa, sb in adapters)
        self.score_local = _rows((1, a.dim), w) if a.head == "scalar" else 0

    # -- precision -------------------------------------------------------------------------------------------

    @property
    def weight_bytes(self) -> int:
        """Bytes per frozen float weight: a LoRA base is kept in bf16 when training in bf16."""
        if self.lora:
            return 2 if self.s.bf16 else 4
        return self.part.weight_bytes if not self.trained else 4

    @property
    def r(self) -> int:
        """Bytes per element of the residual stream: the embedding's dtype (bf16 for FSDP's mixed precision and
        for a bf16 frozen base), else fp32 (autocast leaves the embedding and the residual additions in fp32)."""
        return 2 if self.s.bf16 and (self.s.fsdp or self.weight_bytes == 2) else 4

    @property
    def casts(self) -> bool:
        """Whether autocast casts the fp32 residual stream's values to bf16 for each linear they enter (a copy per
        linear, saved for its backward)."""
        return self.s.bf16 and self.r == 4

    @property
    def norm_keeps_input(self) -> bool:
        """Whether an RMSNorm saves its input itself: the Triton kernel does; the CPU path normalises x.float(),
        which is x itself only when x is fp32."""
        return self.s.cuda or self.r == 4

    # -- parameters ------------------------------------------------------------------------------------------

    def trained_numel(self) -> int:
        """Elements of this rank's share of the trained parameters."""
        if not self.trained:
            return 0
        if self.lora:
            return self.a.n_layers * self.adapter_local + self.score_local
        return self.a.n_layers * self.block_local + self.root_local

    def largest_local(self) -> int:
        """Elements of this rank's largest trained parameter shard."""
        w, a = (self.s.world if self.s.fsdp else 1), self.a
        if self.lora:
            shapes = [
                sh
                for k, (o, i) in self.lin.items()
                if k in self.targets
                for sh in ((self.part.lora_rank, i), (o, self.part.lora_rank))
            ]
            shapes += [(1, a.dim)] if a.head == "scalar" else []
        else:
            shapes = [*self.lin.values(), (a.vocab_size, a.dim)]
        return max(_rows(sh, w) for sh in shapes)

    def frozen_bytes(self) -> int:
        """Bytes of this rank's frozen weights: a frozen part's, a LoRA part's base (quantized layers whole: FSDP2
        shards parameters, not a quantized layer's buffers)."""
        if self.trained and not self.lora:
            return 0
        floats = self.a.n_layers * self.block_local + self.root_local - (self.score_local if self.lora else 0)
        return self.a.n_layers * self.block_quant + self.head_quant + self.weight_bytes * floats

    def gathered_bytes(self, n: int) -> int:
        """Bytes of ``n`` parameter elements all-gathered by FSDP2: bf16 under mixed precision."""
        return n * (2 if self.s.mp else 4)

    def block_gathered(self) -> int:
        return self.gathered_bytes(self.block_padded + self.adapter_padded)

    def root_gathered(self) -> int:
        return self.gathered_bytes(self.root_padded)

    def cast_weights(self) -> int:
        """Autocast's cache of bf16 copies of trained fp32 weights (the blocks' linears, or LoRA's A and B), kept
        through a micro-step's forward and backward. The head goes to the loss through a cast of its own."""
        if not (self.s.bf16 and not self.s.mp and self.trained):
            return 0
        if self.lora:
            return 2 * self.a.n_layers * self.adapter
        return 2 * self.a.n_layers * sum(o * i for o, i in self.lin.values())

    # -- activations: bytes per token, unless said ------------------------------------------------------------

    def norm_saved(self) -> float:
        """What an RMSNorm saves: its input (or the input's fp32 copy), 1/rms (fp32), and the normalised rows when
        its gain is trained (the product's other operand)."""
        d = self.a.dim
        x = self.r * d if self.norm_keeps_input else 4 * d
        return x + 4 + (self.r * d if self.trained and not self.lora else 0)

    def linear_inputs(self, names: tuple[str, ...], x_bytes: int) -> float:
        """What the linears ``names`` save of their one input (of ``x_bytes`` an element). A trained linear keeps it
        for its weight's gradient (under autocast a bf16 copy per linear: each op casts for itself); a frozen base
        keeps none. A LoRA adapter keeps dropout's mask (on a CPU a float tensor of the input's dtype, torch's
        composite dropout; on CUDA the fused kernel's bool mask), A's input (cast to fp32, and by autocast to bf16:
        a copy of its own) and A's output (rank wide)."""
        if not self.trained:
            return 0
        d_in, c = self.lin[names[0]][1], self.s.c
        if not self.lora:
            return (len(names) if self.casts else 1) * c * d_in
        adapted = sum(1 for k in names if k in self.targets)
        a_input = c * d_in  # A's input: autocast's bf16 copy, or the fp32 dropout output (or fp32 copy)
        if self.part.lora_dropout:
            mask = d_in if self.s.cuda else x_bytes * d_in
            return adapted * (mask + a_input + c * self.part.lora_rank)
        if not self.s.bf16 and x_bytes == 4:  # A takes the layer's own fp32 input: one tensor for all
            return adapted * c * self.part.lora_rank + (4 * d_in if adapted else 0)
        return adapted * (a_input + c * self.part.lora_rank)

    def saved_attention(self) -> float:
        """The attention half: the norm, the input of wq, wk, wv; on a CPU the cos and sin rows gathered for q and
        for k (fp32; the Triton rotary kernel keeps only the tables); q, k, v, attention's output (also wo's input)
        and its log-sum-exp per head (the CPU's SDPA flash path, FlashAttention and the Triton kernel alike)."""
        a, c = self.a, self.s.c
        out = self.norm_saved() + self.linear_inputs(("wq", "wk", "wv"), self.r)
        out += 0 if self.s.cuda else 2 * 2 * (a.head_dim // 2) * 4
        out += c * (2 * a.n_heads + 2 * a.n_kv_heads) * a.head_dim + 4 * a.n_heads
        return out + (self.linear_inputs(("wo",), c) if self.lora else 0)

    def saved_attention_rows(self) -> float:
        """Bytes per row beyond the per-token ones: on a CPU, SDPA keeps the float (T x T) mask it makes of packed
        rows' segment mask (the Triton kernel reads the segment ids)."""
        return self.s.c * self.s.seq**2 if self.s.packed and not self.s.cuda else 0

    def saved_ffn(self) -> float:
        """The feed-forward half: the norm, the input of w1 and w3, silu's input, w3's output and silu's output
        (the CPU reference; the Triton SwiGLU saves only its two inputs), w2's input."""
        c, f = self.s.c, self.a.hidden_dim
        out = self.norm_saved() + self.linear_inputs(("w1", "w3"), self.r) + (2 if self.s.cuda else 3) * c * f
        return out + (self.linear_inputs(("w2",), c) if self.lora else c * f)

    def block_saved(self) -> float:
        """Bytes one block saves for its backward, its input included when its first norm keeps it."""
        s = self.s
        return s.tokens * (self.saved_attention() + self.saved_ffn()) + s.rows * self.saved_attention_rows()

    def block_work(self) -> tuple[float, float]:
        """Per token, the temporaries at the fullest moment of the backward of the feed-forward half (SwiGLU's
        backward: the residual stream's gradient, the gradient of SwiGLU's output and the two made of it; w2's
        input is released once w2's backward has run) and of the attention half (attention's backward: the residual
        gradient, the output's, those of q, k, v; on a CPU rotary's fp32 temporaries)."""
        a, c, r = self.a, self.s.c, self.r
        hd = a.head_dim
        ffn = r * a.dim + 2 * c * a.hidden_dim + (c * a.dim if self.casts else 0)
        attn = r * a.dim + c * a.dim + c * (a.n_heads + 2 * a.n_kv_heads) * hd
        return ffn, attn + (0 if self.s.cuda else 2 * 4 * a.n_heads * hd)

    def weight_work(self) -> int:
        """Bytes beside a block's backward for its weights: under autocast a trained weight's gradient comes out in
        bf16 before its fp32 copy; a quantized base's backward dequantizes a weight to fp32 (dx = dy @ W)."""
        biggest = max(o * i for o, i in self.lin.values())
        if self.part.quant is not None:
            return 4 * biggest
        return 2 * biggest if self.casts and self.trained and not self.lora else 0


def _static(t: _Tracker, m: _Model, s: _Setting) -> None:
    """What a rank holds between steps: weights, AdamW's moments, rotary tables, DDP's buckets."""
    trained = m.trained_numel()
    t.add(PARAMS, 4 * trained)
    t.add(OPTIM, 8 * trained)
    t.add(FROZEN, m.frozen_bytes())
    if m.part.quant is not None and m.part.quant.scheme == "int4" and not s.cuda:
        t.add(FROZEN, m.a.n_layers * m.block_quant)  # torch's own packing of each int4 weight for its CPU kernel
    if s.ddp:
        t.add(BUCKETS, 4 * trained)
    if s.accumulating:  # the earlier micro-steps' gradients: fp32, this rank's shard of them under FSDP2
        t.add(GRADS, 4 * trained)
    t.add(OTHER, 2 * m.a.max_seq_len * (m.a.head_dim // 2) * 4)  # rope_cos, rope_sin (fp32)


def _loss_work(m: _Model, s: _Setting) -> int:
    """Bytes of one chunk of the fused loss at work: its logits, and in the CPU chunk op a float copy of bf16
    logits and torch.logsumexp's temporary; the Triton chunk op works in place. The chunk's rows: the CPU path's
    fixed chunk, the Triton path's rule (about as many logits as h has elements, 16 to 4096 rows)."""
    v, d, n = m.a.vocab_size, m.a.dim, s.tokens
    if s.cuda:
        chunk = min(n, max(16, min(2 ** math.ceil(math.log2(max(1, -(-n // -(-v // d))))), 4096)))
        return chunk * v * s.c
    chunk = min(CPU_LOSS_CHUNK, n)
    return chunk * v * (s.c + (4 if s.c == 2 else 0) + 4)


def _frozen_forward(t: _Tracker, m: _Model, s: _Setting) -> None:
    """A frozen model's forward without gradients (reference log-probabilities, rewards): one block's working set
    at a time, then its head's."""
    n = s.tokens
    t.briefly(TEMP, n * (m.saved_attention() + m.saved_ffn()), "forward of a frozen model")
    if m.a.head == "lm":
        t.briefly(TEMP, _loss_work(m, s), "forward of a frozen model: its head")


def _forward(t: _Tracker, m: _Model, s: _Setting) -> None:
    a, n = m.a, s.tokens
    L = a.n_layers
    if s.fsdp:
        # the root's parameters are gathered for the whole step; its flat all-gather buffer lives until the first
        # block's copy-out
        t.add(GATHERED, 2 * m.root_gathered(), "forward: the root's all-gather")
    t.add(CASTS, m.cast_weights())
    x = n * m.r * a.dim  # the residual stream: the embedding's output is the first block's input
    t.add(ACTS, x)
    saved = m.block_saved() - (x if m.norm_keeps_input else 0)  # a kept input is counted as it is made
    for i in range(L):
        phase = f"forward, block {i + 1} of {L}"
        if s.fsdp:
            # all-gather into a flat buffer, then its copy-out into the block's parameters; the previous flat buffer
            # is freed as this copy-out starts, this one as the next does
            t.add(GATHERED, m.block_gathered())
            t.free(GATHERED, m.block_gathered() if i else m.root_gathered())
            t.add(GATHERED, m.block_gathered(), phase)
        if s.checkpointing:  # the block keeps only its input (the checkpoint's); its output is the next input
            t.briefly(TEMP, saved, phase)
        else:
            t.add(ACTS, saved, phase)
            if not m.norm_keeps_input:
                t.free(ACTS, x)
        t.add(ACTS, x, phase)
        if s.fsdp:
            t.free(GATHERED, m.block_gathered())  # resharded after its forward
    _head_forward(t, m, s)
    if s.fsdp and L:
        t.free(GATHERED, m.block_gathered())  # the last flat buffer, freed as the root's forward ends


def _head_forward(t: _Tracker, m: _Model, s: _Setting) -> None:
    """The final norm and the output: the fused loss, per-token log-probabilities or the scalar head."""
    a, n, c = m.a, s.tokens, s.c
    v, d = a.vocab_size, a.dim
    x = n * m.r * d
    t.add(ACTS, n * m.norm_saved() - (x if m.norm_keeps_input else 0))
    if not m.norm_keeps_input:
        t.free(ACTS, x)
    h = n * m.r * d  # the final norm's output
    t.add(TEMP, h)
    if m.part.output == "scores":
        t.add(ACTS, n * c * d, "forward: the scalar head")  # the score layer's input (a bf16 copy under autocast)
        t.free(TEMP, h)
        return
    cast = 2 * n * d + 2 * v * d if m.casts else 0  # the loss takes h and the head in bf16 (ops._autocast_pair)
    t.add(TEMP, cast)
    head_grad = v * d * c if m.head_trained else 0
    if m.part.output == "loss":  # the loss's gradients for h and the head are made now, and kept
        t.add(LOSS, n * d * c + head_grad)
        t.briefly(LOSS, _loss_work(m, s), "forward: the fused loss")
    else:  # log-probabilities keep h and the (cast) head; their backward makes the chunks again
        t.add(LOSS, n * d * c + (2 * v * d if m.casts else 0))
        t.briefly(LOSS, _loss_work(m, s), "forward: per-token log-probabilities")
    t.free(TEMP, cast + h)


def _head_backward(t: _Tracker, m: _Model, s: _Setting) -> None:
    a, n, c = m.a, s.tokens, s.c
    v, d = a.vocab_size, a.dim
    gd = 2 if s.mp else 4  # a gradient has its parameter's dtype (FSDP's gathered ones: bf16 under mixed precision)
    grad_h = n * m.r * d
    if m.part.output == "scores":
        t.add(TEMP, grad_h, "backward: the scalar head")
        t.free(ACTS, n * c * d)
        t.grad(gd * d if m.head_trained else 0, s.into_held)
    else:
        head = v * d * c if m.head_trained else 0
        if m.part.output == "loss":  # the kept gradients times the upstream gradient: new tensors beside them
            t.add(TEMP, n * d * c + head, "backward: the fused loss")
            t.free(LOSS, n * d * c + head)
        else:
            t.add(TEMP, n * d * c + head)
            t.briefly(TEMP, _loss_work(m, s), "backward: per-token log-probabilities")
            t.free(LOSS, n * d * c + (2 * v * d if m.casts else 0))
        if m.head_trained:  # into the head's weight (under autocast through the cast's backward: an fp32 copy)
            t.grad(gd * v * d, s.into_held, "backward: the head's gradient")
            t.free(TEMP, head)
        t.add(TEMP, grad_h)
        t.free(TEMP, n * d * c)
    t.briefly(TEMP, 2 * n * 4 * d, "backward: the final norm")  # its input's gradient and the product's
    t.grad(gd * d if m.head_trained and not m.lora else 0, s.into_held)  # the final norm's gain
    t.free(ACTS, n * m.norm_saved())
    t.free(TEMP, grad_h)


def _backward(t: _Tracker, m: _Model, s: _Setting) -> None:
    a, n = m.a, s.tokens
    L = a.n_layers
    if s.fsdp and L:
        t.add(GATHERED, m.block_gathered())  # the root's pre-backward prefetches the last block
    _head_backward(t, m, s)
    ffn_work, attn_work = m.block_work()
    if m.lora:
        block_grad = 4 * (m.adapter_padded if s.fsdp else m.adapter)
    elif m.trained:
        block_grad = 4 * (m.block_padded if s.fsdp else m.block_local)
    else:
        block_grad = 0
    unsharded = block_grad // 2 if s.mp else block_grad  # FSDP2: the gathered (bf16) parameters' gradients
    ffn = sum(o * i for k, (o, i) in m.lin.items() if k in ("w1", "w2", "w3")) / sum(o * i for o, i in m.lin.values())
    x = n * m.r * a.dim
    saved = m.block_saved()
    ffn_saved = n * m.saved_ffn()
    rs_kept = 0
    for i in reversed(range(L)):
        phase = f"backward, block {i + 1} of {L}"
        if s.fsdp:
            # the copy-out of this (prefetched) block, its flat buffer then freed; the previous block's prefetch
            t.add(GATHERED, m.block_gathered(), phase)
            t.free(GATHERED, m.block_gathered())
            if i:
                t.add(GATHERED, m.block_gathered())
        if s.checkpointing:  # the block's forward again, keeping this time what it saves
            t.add(ACTS, saved - (x if m.norm_keeps_input else 0), phase + " (recomputed)")
        # the feed-forward half, then the attention half, each freeing what it saved once done
        t.briefly(TEMP, n * ffn_work + m.weight_work(), phase)
        t.grad(unsharded * ffn, s.into_held, phase)
        t.free(ACTS, ffn_saved)
        t.briefly(TEMP, n * attn_work + m.weight_work(), phase)
        t.grad(unsharded * (1 - ffn), s.into_held, phase)
        t.free(ACTS, saved - ffn_saved)
        if s.checkpointing and not m.norm_keeps_input:
            t.free(ACTS, x)  # the input the checkpoint kept
        if s.fsdp:
            # post-backward: reshard; release the previous block's reduce-scatter buffer; copy the gradients into a
            # flat fp32 buffer (kept until the next block's reduce-scatter) and reduce-scatter it into this shard
            t.free(GATHERED, m.block_gathered())
            t.free(REDUCE, rs_kept)
            rs_kept = block_grad
            t.add(REDUCE, rs_kept, phase + ": reduce-scatter")
            t.free(GRADS, unsharded)
            t.grad(block_grad // s.world, s.accumulating, phase + ": reduce-scatter output")
    if m.head_trained and not m.lora:
        # the embedding's backward: a dense (vocab x dim) fp32 gradient, added into the head's when they are tied
        emb = 4 * a.vocab_size * a.dim
        if a.tie_embeddings:
            t.briefly(TEMP, emb, "backward: the embedding")
        else:
            t.grad(emb // (2 if s.mp else 1), s.into_held, "backward: the embedding")
    if s.fsdp:
        t.free(REDUCE, rs_kept)
        if m.head_trained:  # the root's gradients go through one flat fp32 buffer too
            gd = 2 if s.mp else 4
            if m.lora:
                unsharded_root, padded, local = gd * a.dim, 4 * _padded((1, a.dim), s.world), 4 * m.score_local
            else:
                unsharded_root = gd * (a.dim + (a.vocab_size * a.dim if a.head == "lm" else a.dim))
                unsharded_root += 0 if a.tie_embeddings else gd * a.vocab_size * a.dim
                padded, local = 4 * m.root_padded, 4 * m.root_local
            t.add(REDUCE, padded, "backward: the root's reduce-scatter")
            t.free(GRADS, unsharded_root)
            t.grad(local, s.accumulating, "backward: the root's reduce-scatter output")
            t.free(REDUCE, padded)
        t.free(GATHERED, m.root_gathered())
    t.free(CASTS, m.cast_weights())


def _optimizer_step(t: _Tracker, trained: list[_Model], s: _Setting) -> None:
    """AdamW's update with every gradient present. The fused implementation (one process, DDP) and the
    single-tensor one (FSDP2's DTensors on a CPU) work in place, but for one parameter's sqrt(v) at a time in the
    latter; torch's multi-tensor one (FSDP2 on CUDA) makes sqrt(v) of every parameter at once."""
    t.check("the optimizer step")
    if s.fsdp and s.cuda:
        t.briefly(TEMP, 4 * sum(m.trained_numel() for m in trained), "the optimizer step (multi-tensor AdamW)")
    elif s.fsdp:  # sqrt(v), then sqrt(v) / (1 - beta2^t)^0.5, for the largest shard
        t.briefly(TEMP, 2 * 4 * max(m.largest_local() for m in trained), "the optimizer step")
