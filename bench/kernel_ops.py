"""Time and peak memory of every Triton kernel against torch eager and torch.compile of its reference.

    python bench/kernel_ops.py [--quick] [--ops rms_norm,attention,...] [--impls eager,compile,triton] [--csv PATH]

On CUDA: Llama-2-7B shapes (hidden 4096, 32 heads, head dim 128, FFN 11008, vocab 32000, 8k tokens), bf16, timed
with CUDA events (median of repeats after warm-up), peak memory above the inputs from the allocator. Each row gives
the bytes moved or FLOPs of the op, the achieved GB/s or TFLOP/s, and that as a fraction of the device's own peak
measured in the same run (a large copy for bandwidth, a large bf16 matmul for compute).

--quick: small shapes. Without CUDA it is always on, in fp32, timed by the wall clock, with the kernels in Triton's
interpreter: those numbers measure the interpreter, not the kernels; the run shows that every path works end to end.

Prints a markdown table; writes one CSV row per measurement (with the device name) to --csv.
"""

from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the only way to run it on a CPU

import argparse
import csv
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from llamactl.kernels import attention as attn
from llamactl.kernels import decode_attention as dec
from llamactl.kernels import fused_linear_ce as ce
from llamactl.kernels import quant_matmul as qmm
from llamactl.kernels import rmsnorm, rotary, swiglu

IMPLS = ("eager", "compile", "triton")
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


# --------------------------------------------------------------------------------------------------------------------
# Timing and memory
# --------------------------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Median milliseconds of ``fn``. CUDA: events around each call, L2 flushed between calls, as many repeats as
    fit in ~0.3 s after ~0.1 s of warm-up (what triton.testing.do_bench does, which needs a GPU to import its
    timer). CPU: wall clock, median of three calls after two warm-ups (torch.compile may compile twice: the
    backward graph is built on the first backward)."""
    if device.type != "cuda":
        fn()
        fn()
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return 1e3 * statistics.median(times)
    flush = torch.empty(256 << 20, dtype=torch.int8, device=device)  # larger than any L2: every call starts cold
    fn()
    _sync(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        fn()
    end.record()
    _sync(device)
    estimate = max(start.elapsed_time(end) / 3, 1e-3)
    n_warm, n_rep = max(1, int(100 / estimate)), max(5, min(1000, int(300 / estimate)))
    for _ in range(n_warm):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    for s, e in zip(starts, ends, strict=True):
        flush.zero_()
        s.record()
        fn()
        e.record()
    _sync(device)
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))


def peak_mib(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory allocated during one call above what was allocated before it (MiB); NaN off CUDA."""
    if device.type != "cuda":
        return float("nan")
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def device_peaks(device: torch.device, dtype: torch.dtype, quick: bool) -> tuple[float, float]:
    """(copy bandwidth in bytes/s, read + write counted; dense matmul FLOP/s in the benchmark's dtype), measured
    now, on this device."""
    n = (64 if quick or device.type != "cuda" else 2048) << 20
    src = torch.empty(n // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    bw = 2 * n / (time_ms(lambda: dst.copy_(src), device) / 1e3)
    m = 8192 if device.type == "cuda" and not quick else 1024
    a, b = torch.randn(m, m, device=device, dtype=dtype), torch.randn(m, m, device=device, dtype=dtype)
    flops = 2 * m**3 / (time_ms(lambda: a @ b, device) / 1e3)
    return bw, flops


# --------------------------------------------------------------------------------------------------------------------
# The ops
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One op at one shape: inputs, the three implementations, and the work one call does."""

    op: str
    shape: str
    inputs: dict[str, torch.Tensor]
    ref: Callable  # the torch reference, run eagerly and under torch.compile
    triton: Callable
    work_fwd: float  # bytes (unit "GB/s") or FLOPs (unit "TFLOP/s") of the forward
    work_bwd: float | None  # of forward + backward; None: forward only (inference ops)
    unit: str
    consts: dict = field(default_factory=dict)  # non-tensor arguments


def _rand(*shape, device, dtype, scale=1.0, grad=False):
    return (torch.randn(*shape, device=device, dtype=torch.float32) * scale).to(dtype).requires_grad_(grad)


def make_cases(device: torch.device, dtype: torch.dtype, quick: bool) -> list[Case]:
    e = torch.finfo(dtype).bits // 8
    # Llama-2-7B: hidden 4096, 32 heads of 128, FFN 11008, vocab 32000; 8192 tokens = 2 sequences of 4096.
    if quick:
        N, D, F, V, B, T, H, KV, HD, S = 256, 256, 688, 1000, 1, 128, 4, 2, 64, 256
    else:
        N, D, F, V, B, T, H, KV, HD, S = 8192, 4096, 11008, 32000, 2, 4096, 32, 32, 128, 4096
    r = dict(device=device, dtype=dtype)
    cases = []

    x, w = _rand(N, D, **r, grad=True), (1 + _rand(D, **r, scale=0.1)).requires_grad_()
    cases.append(
        Case("rms_norm", f"{N}x{D}", dict(x=x, weight=w), rmsnorm.rms_norm_ref, rmsnorm.rms_norm_triton,
             2 * N * D * e, 5 * N * D * e, "GB/s", dict(eps=1e-5))
    )  # fmt: skip

    q = _rand(B, T, H, HD, **r, grad=True)
    cos, sin = rotary.rotary_tables(HD, T)
    pos = torch.arange(T, device=device)
    cases.append(
        Case("rotary", f"{B}x{T}x{H}x{HD}", dict(x=q, cos=cos.to(device), sin=sin.to(device), positions=pos),
             rotary.rotary_ref, rotary.rotary_triton, 2 * q.numel() * e, 4 * q.numel() * e, "GB/s")
    )  # fmt: skip

    a, b = _rand(N, F, **r, grad=True), _rand(N, F, **r, grad=True)
    cases.append(
        Case("swiglu", f"{N}x{F}", dict(a=a, b=b), swiglu.swiglu_ref, swiglu.swiglu_triton,
             3 * a.numel() * e, 8 * a.numel() * e, "GB/s")
    )  # fmt: skip

    h, wout = _rand(N, D, **r, grad=True), _rand(V, D, **r, scale=D**-0.5, grad=True)
    targets = torch.randint(0, V, (N,), device=device)
    cases.append(
        Case("linear_cross_entropy", f"{N}x{D}->{V}", dict(h=h, weight=wout, targets=targets),
             ce.linear_cross_entropy_ref, ce.linear_cross_entropy_triton, 2 * N * D * V, 6 * N * D * V, "TFLOP/s")
    )  # fmt: skip

    qa = _rand(B, H, T, HD, **r, grad=True)
    ka, va = _rand(B, KV, T, HD, **r, grad=True), _rand(B, KV, T, HD, **r, grad=True)
    fwd_flops = 4 * B * H * T * T * HD / 2  # causal: half of the (T x T) scores; QK^T and PV, 2 FLOPs per MAC
    cases.append(
        Case("attention", f"{B}x{H}x{T}x{HD} causal", dict(q=qa, k=ka, v=va), attn.attention_ref,
             attn.attention_triton, fwd_flops, 3.5 * fwd_flops, "TFLOP/s", dict(causal=True))
    )  # fmt: skip

    qd = _rand(B, H, HD, **r)
    kc, vc = _rand(B, KV, S, HD, **r), _rand(B, KV, S, HD, **r)
    seqlens = torch.full((B,), S, device=device)
    cases.append(
        Case("decode_attention", f"{B}x{H}x{HD} vs {S}", dict(q=qd, k_cache=kc, v_cache=vc, seqlens=seqlens),
             dec.decode_attention_ref, dec.decode_attention_triton, 2 * kc.numel() * e, None, "GB/s")
    )  # fmt: skip

    K, Nout = D, F  # the FFN's up projection at batch 1: the largest weight a decode step streams
    wq = torch.randn(Nout, K, device=device) * 0.02
    xq = _rand(1, K, **r)
    for scheme, group in (("int8", None), ("int4", 128), ("int4", 32)):
        qw, scales, zeros, _ = qmm.quantize(wq, scheme, group)
        nbytes = sum(t.numel() * t.element_size() for t in (qw, scales, zeros) if t is not None) + (K + Nout) * e
        name = scheme if group is None else f"{scheme}-g{group}"
        cases.append(
            Case(f"quant_matmul_{name}", f"1x{K} @ {Nout}x{K}", dict(x=xq, qweight=qw, scales=scales),
                 qmm.quant_matmul_ref, qmm.quant_matmul_triton, nbytes, None, "GB/s", dict(zeros=zeros, scheme=scheme))
        )  # fmt: skip
    return cases


def _backward_inputs(case: Case) -> list[torch.Tensor]:
    return [t for t in case.inputs.values() if t.requires_grad]


def _runner(case: Case, impl: Callable, backward: bool) -> Callable[[], object]:
    kwargs = {**case.inputs, **case.consts}
    if not backward:

        def fwd():
            with torch.no_grad():
                return impl(**kwargs)

        return fwd
    leaves = _backward_inputs(case)
    out0 = impl(**kwargs)
    grad_out = torch.randn_like(out0) if out0.dim() else None
    del out0

    def fwd_bwd():
        out = impl(**kwargs)
        return torch.autograd.grad(out, leaves, grad_out)

    return fwd_bwd


def _row(device, op, shape, dtype, impl, pass_, ms, peak_mib, work, unit, achieved, peak) -> dict:
    return {
        "device": device, "op": op, "shape": shape, "dtype": dtype, "impl": impl, "pass": pass_, "ms": ms,
        "peak_mib": peak_mib, "work": work, "unit": unit, "achieved": achieved, "device_peak": peak,
        "fraction_of_peak": achieved / peak,
    }  # fmt: skip


def bench(args) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quick = args.quick or device.type != "cuda"
    dtype = torch.bfloat16 if device.type == "cuda" and not args.fp32 else torch.float32
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        cpu = platform.processor() or platform.machine()
        device_name = f"{cpu} ({torch.get_num_threads()} threads, Triton interpreter)"
    bw, flops = device_peaks(device, dtype, quick)
    print(f"# {device_name}: copy {bw / 1e9:.1f} GB/s, matmul {flops / 1e12:.2f} TFLOP/s", file=sys.stderr)
    peak_dtype = DTYPE_NAMES[dtype]
    rows = [
        _row(device_name, "copy", "", "fp32", "torch", "fwd", float("nan"), float("nan"), float("nan"), "GB/s",
             bw / 1e9, bw / 1e9),
        _row(device_name, "matmul", "", peak_dtype, "torch", "fwd", float("nan"), float("nan"), float("nan"),
             "TFLOP/s", flops / 1e12, flops / 1e12),
    ]  # fmt: skip
    ops = set(args.ops.split(",")) if args.ops else None
    impls = args.impls.split(",")
    for case in make_cases(device, dtype, quick):
        if ops is not None and not any(case.op.startswith(o) for o in ops):
            continue
        passes = [("fwd", case.work_fwd, False)]
        if case.work_bwd is not None:
            passes.append(("fwd+bwd", case.work_bwd, True))
        for impl_name in impls:
            impl = {"eager": case.ref, "compile": torch.compile(case.ref), "triton": case.triton}[impl_name]
            for pass_name, work, backward in passes:
                print(f"{case.op} {impl_name} {pass_name} ...", file=sys.stderr, flush=True)
                try:
                    fn = _runner(case, impl, backward)
                    ms = time_ms(fn, device)
                    mem = peak_mib(fn, device)
                except Exception as e:  # one broken op or impl must not hide the others' numbers
                    print(f"{case.op} {impl_name} {pass_name} FAILED: {type(e).__name__}: {e}", file=sys.stderr)
                    ms = mem = float("nan")
                if case.unit == "GB/s":
                    achieved, peak = work / (ms / 1e3) / 1e9, bw / 1e9
                else:
                    achieved, peak = work / (ms / 1e3) / 1e12, flops / 1e12
                rows.append(
                    _row(device_name, case.op, case.shape, DTYPE_NAMES[dtype], impl_name, pass_name, ms, mem, work,
                         case.unit, achieved, peak)
                )  # fmt: skip
            torch.compiler.reset()  # drop this case's graphs: dynamo's recompile limit counts per code object
    return rows


def _fmt(v: float, digits: int = 2) -> str:
    return "" if isinstance(v, float) and math.isnan(v) else f"{v:.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (always on without CUDA)")
    ap.add_argument("--fp32", action="store_true", help="fp32 instead of bf16 on CUDA")
    ap.add_argument("--ops", default="", help="comma-separated op name prefixes (default: all)")
    ap.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {','.join(IMPLS)}")
    ap.add_argument("--csv", default=None, help="default bench/results/kernels-<cuda|cpu-quick>.csv")
    args = ap.parse_args()
    bad = [i for i in args.impls.split(",") if i not in IMPLS]
    if bad:
        ap.error(f"--impls: unknown {', '.join(bad)}; use a subset of {', '.join(IMPLS)}")
    rows = bench(args)
    print("| op | shape | dtype | impl | pass | ms | peak MiB | achieved | unit | of device peak |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['impl']} | {r['pass']} | {_fmt(r['ms'], 3)} | "
            f"{_fmt(r['peak_mib'], 1)} | {_fmt(r['achieved'])} | {r['unit']} | {r['fraction_of_peak']:.0%} |"
        )
    path = args.csv or f"bench/results/kernels-{'cuda' if torch.cuda.is_available() else 'cpu-quick'}.csv"
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)
    print(f"CSV: {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
