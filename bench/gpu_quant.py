"""Weight-only quantized decode on a GPU, in one short call: the tile sweep behind ``quant_matmul.DECODE`` and the
batch-1 decode of a 7B-shaped model through the engine, as a fraction of the measured memory bandwidth.

    python -P bench/gpu_quant.py [--out DIR] [--budget-s 140]

1. ``sweep``: the linear layers of one Llama-2-7B block (wq, wk, wv, wo 4096x4096; w1, w3 11008x4096; w2
   4096x11008, ~200 MB in int8: 4x the L2, so every call reads HBM) at batch 1, per scheme (int8, int4 g128, int4
   g32) and per tile configuration, each checked against the torch reference first; weight bytes / time against the
   copy bandwidth.
2. ``decode``: a randomly initialised 7B-shaped model (bf16 activations), its linear layers quantized in place by the
   same swap step the loader uses, greedy decode of 64 tokens after a 128-token prompt through ``llamactl``'s engine,
   eagerly and with one decode step replayed as a CUDA graph (what a compiled decode would save of the host's
   launch overhead); bytes read per token / time against the copy bandwidth.
3. ``tests``: the quantized-matmul kernel tests in bf16 on CUDA, if the budget allows.

Writes ``gpu-quant.md`` to --out and prints it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]
SWEEP = [
    dict(BLOCK_N=32, SPLIT_K=1, BLOCK_K=128),
    dict(BLOCK_N=64, SPLIT_K=1, BLOCK_K=256),
    dict(BLOCK_N=64, SPLIT_K=4, BLOCK_K=256),
    dict(BLOCK_N=32, SPLIT_K=4, BLOCK_K=256),
    dict(BLOCK_N=128, SPLIT_K=4, BLOCK_K=128),
    dict(BLOCK_N=64, SPLIT_K=8, BLOCK_K=128, num_warps=8),
    dict(BLOCK_N=32, SPLIT_K=8, BLOCK_K=512, num_stages=4),
    dict(BLOCK_N=16, SPLIT_K=4, BLOCK_K=512),
]


def copy_bandwidth() -> float:
    src = torch.empty(1 << 28, dtype=torch.float32, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / cuda_time(lambda: dst.copy_(src), 10)


def cuda_time(fn, repeats: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


def quantized(w: torch.Tensor, scheme: str, group: int | None):
    from llamactl.kernels import quant_matmul as qmm

    return qmm.quantize(w, scheme, group)[:3]


def section_sweep(bw: float, lines: list[str]) -> None:
    from llamactl.kernels import quant_matmul as qmm

    g = torch.Generator(device="cuda").manual_seed(1)
    ws = [torch.randn(n, k, device="cuda", generator=g) * 0.02 for n, k in SHAPES]
    xs = {k: torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for k in (4096, 11008)}
    lines += ["| scheme | tiles | GB/s | of copy bandwidth | max error vs reference |", "|---|---|---|---|---|"]
    for scheme, group in (("int8", None), ("int4", 128), ("int4", 32)):
        packed = [quantized(w, scheme, group) for w in ws]
        nbytes = sum(t.numel() * t.element_size() for p in packed for t in p if t is not None)
        for cfg in [None] + SWEEP:
            c = None if cfg is None else {k: v for k, v in cfg.items() if scheme == "int8" or k != "BLOCK_K"}
            name = "default " + str(qmm.DECODE[scheme]) if c is None else str(c)
            try:
                err = 0.0
                for (qw, sc, zs), (_, k) in zip(packed, SHAPES, strict=True):
                    got = qmm.quant_matmul_triton(xs[k], qw, sc, zs, scheme, c).float()
                    ref = qmm.quant_matmul_ref(xs[k], qw, sc, zs, scheme).float()
                    err = max(err, ((got - ref).abs().max() / ref.abs().max()).item())

                def step(packed=packed, c=c, scheme=scheme):
                    for (qw, sc, zs), (_, k) in zip(packed, SHAPES, strict=True):
                        qmm.quant_matmul_triton(xs[k], qw, sc, zs, scheme, c)

                dt = cuda_time(step)
                label = scheme if group is None else f"{scheme}-g{group}"
                lines.append(f"| {label} | {name} | {nbytes / dt / 1e9:,.0f} | {nbytes / dt / bw:.0%} | {err:.1e} |")
            except Exception as e:
                lines.append(f"| {scheme}-{group} | {name} | failed: {type(e).__name__}: {str(e)[:120]} | | |")
            print(lines[-1], flush=True)


def random_model():
    from llamactl.model import Transformer, preset

    args = preset("llama2-7b", vocab_size=32000, max_seq_len=4096)
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to(torch.bfloat16).to_empty(device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02, generator=gen)
    model.reset_rope("cuda")
    return model.eval()


def quantize_in_place(model, scheme: str, group: int | None) -> None:
    """The loader's swap (llamactl.quant.quantize_linears) on the live model, filled by round to nearest."""
    from llamactl.quant import QuantSpec, quantize_linears

    weights = {n: m.weight.data for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    quantize_linears(model, QuantSpec(scheme, group))
    with torch.no_grad():
        for name, m in model.named_modules():
            if name in weights and hasattr(m, "qweight"):
                for key, t in zip(("qweight", "scales", "zeros"), quantized(weights[name], scheme, group), strict=True):
                    if t is not None:
                        setattr(m, key, t)
                del weights[name]


def decode_rates(model, prompt: list[int], new: int) -> tuple[float, float | None, list[int]]:
    """(eager tok/s, CUDA-graph tok/s or None, greedy tokens) of batch-1 decode."""
    from llamactl.generate import SamplingParams, decode_one_token, generate, prefill
    from llamactl.model import KVCache

    params = SamplingParams(max_new_tokens=new, temperature=0)
    tokens = generate(model, [prompt], params, None)[0].tokens  # warm-up (and compiles)
    torch.cuda.synchronize()
    t = time.perf_counter()
    generate(model, [prompt], params, None)
    torch.cuda.synchronize()
    eager = new / (time.perf_counter() - t)
    graph = None
    try:
        cache = KVCache(model.args, 1, len(prompt) + new + 1, "cuda", torch.bfloat16)
        prefill(model, cache, [prompt])
        tok = torch.tensor([tokens[0]], device="cuda")
        pos = torch.tensor([len(prompt)], device="cuda")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                decode_one_token(model, tok, pos, cache)
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            decode_one_token(model, tok, pos, cache)
        graph = 1 / cuda_time(g.replay, new)
    except Exception as e:
        print(f"CUDA graph capture failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
    return eager, graph, tokens


def section_decode(bw: float, lines: list[str], budget_end: float) -> None:
    from llamactl.quant import QuantLinear

    prompt = torch.randint(3, 32000, (128,), generator=torch.Generator().manual_seed(0)).tolist()
    lines += ["| weights | GB read per token | eager tok/s | of copy bandwidth | CUDA graph tok/s | of copy bandwidth |"
              " greedy tokens equal to bf16 |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    reference = None
    for scheme, group in ((None, None), ("int8", None), ("int4", 128), ("int4", 32)):
        if time.monotonic() > budget_end:
            lines.append(f"| {scheme}-{group} | skipped: budget spent | | | | | |")
            continue
        model = random_model()
        if scheme is not None:
            quantize_in_place(model, scheme, group)
        per_token = sum(t.numel() * t.element_size() for n, t in model.state_dict().items() if "tok_emb" not in n)
        eager, graph, tokens = decode_rates(model, prompt, 64)
        reference = tokens if scheme is None else reference
        same = sum(a == b for a, b in zip(tokens, reference, strict=True))
        label = "bf16" if scheme is None else scheme if group is None else f"{scheme}-g{group}"
        assert scheme is None or any(isinstance(m, QuantLinear) for m in model.modules())
        g_cols = f"{graph:,.0f} | {per_token * graph / bw:.0%}" if graph else "failed | "
        lines.append(f"| {label} | {per_token / 1e9:.2f} | {eager:,.0f} | {per_token * eager / bw:.0%} | {g_cols} | "
                     f"{same}/64 |")  # fmt: skip
        print(lines[-1], flush=True)
        del model
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--budget-s", type=float, default=140.0)
    args = ap.parse_args()
    start = time.monotonic()
    os.makedirs(args.out, exist_ok=True)
    bw = copy_bandwidth()
    lines = [f"# {torch.cuda.get_device_name()}: copy bandwidth {bw / 1e9:,.0f} GB/s (read + write of 1 GiB)", ""]
    print(lines[0], flush=True)
    sections = {"sweep": (section_sweep, (bw,)), "decode": (section_decode, (bw,))}
    for name, (fn, fn_args) in sections.items():
        lines += ["", f"## {name}", ""]
        try:
            fn(*fn_args, lines) if name == "sweep" else fn(*fn_args, lines, start + args.budget_s - 15)
        except Exception as e:
            lines.append(f"{name} failed: {type(e).__name__}: {str(e)[:300]}")
            print(lines[-1], flush=True)
    if time.monotonic() - start < args.budget_s - 20:
        test = [sys.executable, "-m", "pytest", "-q", "-x", "tests/kernels/test_quant_matmul.py", "-k", "bf16"]
        proc = subprocess.run(test, cwd=ROOT, capture_output=True, text=True)
        last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]
        lines += ["", "## tests", "", "```", last, "```"]
    with open(os.path.join(args.out, "gpu-quant.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
