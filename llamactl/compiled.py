"""The compiled decode step: one ``torch.compile`` of ``Transformer.decode`` over caches whose shapes do not change.

The eager step (``Transformer.decode``) reads each row's filled length on the host and attends only that far; the
compiled one attends over the whole cache under a mask (``ops.decode_attention`` under the compiler), so a step's
shapes depend only on the batch and the cache's size. The engine keeps those few: with a compiled step, batches are
padded to powers of two (``batch_bucket``, the padding rows free), shrink only from one such size to a smaller one,
and caches are sized in blocks of ``CACHE_BLOCK`` positions (``cache_size``). Each shape is compiled once a process,
and torch's on-disk caches (Inductor's FX graph and kernel caches) keep the generated code, so a later process on the
machine pays the tracing only.

On a CPU the compiler is Inductor's C++ backend; on a GPU, CUDA graphs (``mode="reduce-overhead"``). ``--compile``:

- ``never``: the eager step, the reference the tests compare the compiled one with;
- ``always``: compile;
- ``auto``: compile where the work repays the compile (``worth_compiling``) and say so once on stderr.

A compile that fails falls back to the eager step with one line on stderr, never a traceback.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from llamactl.errors import UserError
from llamactl.model import KVCache, Transformer

MODES = ("auto", "always", "never")
CACHE_BLOCK = 256

# NOTE: what ``auto`` weighs, measured by ``python -P bench/compile_step.py`` (docs/benchmarks.md, "generate: the
# compiled decode step"), 60M preset on the 2-core AVX2 CPU VM (2026-12-08): at batch 1 the compiled step took
# 12.6 ms against 17.4 eager in fp32 (weights frozen and packed by Inductor: each process compiles again, 17.6 s) and
# 11.9 against 14.6 ms in bf16 (23 s the first compile on a machine, 4.2 s later ones from torch's caches): 1,500 to
# 3,700 tokens repay a warm compile. At batch 8 the compiled fp32 step was slower (35.7 against 31.6 ms: it attends
# the whole cache), so on a CPU auto compiles batch-1 runs only. On a GPU the eager step is host-bound and a compile
# (CUDA graphs) takes tens of seconds.
AUTO_MIN_TOKENS = {"cpu": 20_000, "cuda": 2_000}
AUTO_MAX_ROWS = {"cpu": 1}


def batch_bucket(n: int) -> int:
    """The batch a compiled step runs for ``n`` rows: the next power of two."""
    return 1 << max(n - 1, 0).bit_length()


def cache_size(n: int, context: int) -> int:
    """Positions of a cache holding ``n``, rounded up to a whole number of blocks (within the context)."""
    return min(-(-n // CACHE_BLOCK) * CACHE_BLOCK, context)


def worth_compiling(mode: str, device: torch.device | str, new_tokens: float, rows: int = 1) -> bool:
    """Whether a run expected to sample ``new_tokens`` (an estimate) ``rows`` sequences at a time compiles."""
    assert mode in MODES, mode
    if mode != "auto":
        return mode == "always"
    kind = torch.device(device).type
    if rows > AUTO_MAX_ROWS.get(kind, rows):
        return False
    return new_tokens >= AUTO_MIN_TOKENS.get(kind, AUTO_MIN_TOKENS["cuda"])


def _warn(message: str) -> None:
    import sys

    print(f"llamactl: {message}", file=sys.stderr, flush=True)


class CompiledDecode:
    """``model.decode`` compiled (the model's ``compiled_decode``); after a failed compile, the eager step."""

    def __init__(self, model: Transformer, fixed_weights: bool, say: Callable[[str], None] = _warn):
        import torch._dynamo

        from llamactl.swap import PackedLinear

        self.model, self.say, self.failed, self.freeze = model, say, False, False
        # each batch bucket, cache size and (with LoRA) adapter state is one entry: room for the shapes of a run
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        if model.tok_embeddings.weight.device.type == "cuda":
            self.fn = torch.compile(model.decode, dynamic=False, fullgraph=True, mode="reduce-overhead")
            return
        # NOTE: where the eager loader packs weights for oneDNN (``swap.cpu_packing``: fp32 on an AVX2 CPU), Inductor
        # packs them too if it may treat them as constants ("freezing"): a 60M fp32 step took 11.6 ms so, 19.0 ms
        # compiled without freezing and 16.8 ms eager with the packed weights (2-core AVX2 VM, 2026-12-08). A frozen
        # graph holds its own packed copy of the weights and is not kept in the on-disk cache (each process
        # compiles it again), and weights that change (ppo's policy) must not be frozen.
        # (Inductor reads "freezing" outside torch.compile's options: it is patched around each call, when a
        # compile of a new shape may happen)
        self.freeze = fixed_weights and any(isinstance(m, PackedLinear) for m in model.modules())
        self.fn = torch.compile(model.decode, dynamic=False, fullgraph=True)

    def __call__(self, token: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        if not self.failed:
            try:
                if self.freeze:
                    import torch._inductor.config

                    with torch._inductor.config.patch(freezing=True):
                        return self.fn(token, pos, cache)
                return self.fn(token, pos, cache)
            except Exception as e:  # noqa: BLE001 - the compiler's errors have no common type; eager is the reference
                if not _compile_error(e):
                    raise
                self.failed = True
                first = (str(e).strip().splitlines() or [""])[0][:200]
                self.say(f"the compiled decode step failed ({type(e).__name__}: {first}); decoding eagerly")
        return self.model.decode(token, pos, cache)


def _compile_error(e: Exception) -> bool:
    """Whether ``e`` came from the compiler (tracing, lowering, a C++ or Triton build), not from the step's inputs."""
    import torch._dynamo.exc

    if isinstance(e, torch._dynamo.exc.TorchDynamoException):
        return True
    mod = type(e).__module__ or ""
    return mod.startswith(("torch._dynamo", "torch._inductor", "torch._subclasses", "triton")) or isinstance(
        e, (OSError, ImportError, NotImplementedError)
    )


def enable(
    model: Transformer,
    mode: str,
    new_tokens: float,
    rows: int = 1,
    fixed_weights: bool = True,
    say: Callable[[str], None] = _warn,
) -> bool:
    """Give ``model`` a compiled decode step when ``mode`` (and, for ``auto``, the expected ``new_tokens`` decoded
    ``rows`` at a time) says so; ``fixed_weights`` False where the weights change between calls (a policy in
    training). ``auto`` says once on stderr that it compiles. ``LLAMACTL_COMPILE`` (``always`` or ``never``) decides
    what ``auto`` does (the test suite sets ``never``)."""
    if mode == "auto" and (env := os.environ.get("LLAMACTL_COMPILE")):
        if env not in MODES:
            raise UserError(f"LLAMACTL_COMPILE={env!r}: use one of {', '.join(MODES)}")
        mode = env
    from llamactl.swap import PackedLinear

    device = model.tok_embeddings.weight.device
    if not worth_compiling(mode, device, new_tokens, rows):
        model.compiled_decode = None
        return False
    if any(isinstance(m, PackedLinear) and not hasattr(m, "weight") for m in model.modules()):
        if mode == "always":
            say("the decode step is not compiled: its weights were converted at load and packed in place of the "
                "checkpoint's (--dtype as stored compiles); decoding eagerly")  # fmt: skip
        return False
    if model.compiled_decode is None:
        if mode == "auto":
            say("compiling the decode step for this run (--compile never to skip)")
        model.compiled_decode = CompiledDecode(model, fixed_weights, say)
    return True


def compiled(model: Transformer) -> bool:
    """Whether ``model`` decodes with a compiled step (the engine then keeps shapes to buckets)."""
    return model.compiled_decode is not None and not model.compiled_decode.failed
