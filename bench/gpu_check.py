"""The GPU check: everything that only a GPU can show, in one call of at most 8 minutes on one H100.

    python -P bench/gpu_check.py [--out DIR] [--budget-s 470] [--sections env,compiled,tests,kernels,train,decode]

Sections, each in its own process so that a crash in one still leaves the others' results:

- ``env``      the device, the driver, torch and Triton versions, measured copy bandwidth and bf16 matmul rate.
- ``compiled`` the compiled decode step (CUDA graphs) of a 7B-shaped model per weight scheme (bf16, int8, int4) at
               batch 1 against the eager step, as a fraction of the copy bandwidth, and the compile's time.
- ``tests``    the kernel tests on CUDA (fp32, fp16 and bf16 against the torch references, the >2^31-element tests).
- ``kernels``  ``bench/kernel_ops.py`` at Llama-2-7B shapes, Triton against eager torch (``--compile`` adds
               torch.compile when the budget allows).
- ``train``    a few steps of ``llamactl pretrain`` on the 1.1B preset in bf16 autocast, with the Triton kernels and
               with the torch references (``LLAMACTL_KERNELS=ref``): tokens/s, MFU against the datasheet peak and
               against the matmul rate measured in ``env``, and the two loss curves side by side.
- ``decode``   batch-1 greedy decode of a randomly initialised 7B-shaped model in bf16 through ``llamactl``'s engine
               (Triton kernels, then references) and through transformers' ``generate`` on the same weights; the
               tokens the two agree on; and the linear layers of one decode step per weight scheme (bf16, int8,
               int4 by the weight-only Triton kernels).

Writes ``gpu-check.md`` (the tables), ``gpu-check.log`` and ``kernels.csv`` to --out, and replaces the GPU section of
docs/benchmarks.md (between its ``gpu-check`` markers) with the tables. A section that would start with less than
its minimum time left in the budget is skipped and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# NVIDIA's datasheet, dense bf16 tensor-core peak (without sparsity); matched on the device name.
DATASHEET_BF16_TFLOPS = {"H100 80GB HBM3": 989.4, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H200": 989.4, "A100": 312.0}
BEGIN, END = "<!-- gpu-check:begin -->", "<!-- gpu-check:end -->"


def datasheet_tflops(name: str) -> float | None:
    return next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in name), None)


# ---------------------------------------------------------------------------------------------------------------------
# Sections (each runs as `gpu_check.py --run-section NAME --out DIR` and prints markdown on stdout)
# ---------------------------------------------------------------------------------------------------------------------


def section_env(out: str) -> None:
    import torch
    import triton

    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from kernel_ops import device_peaks

    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    props = torch.cuda.get_device_properties(dev)
    bw, flops = device_peaks(dev, torch.bfloat16, quick=False)
    smi = subprocess.run(
        ["nvidia-smi", "--query-gpu=driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    info = {
        "device": name,
        "sms": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "nvidia_smi": smi,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "copy_gb_s": round(bw / 1e9, 1),
        "matmul_bf16_tflops": round(flops / 1e12, 1),
        "datasheet_bf16_tflops": datasheet_tflops(name),
    }
    with open(os.path.join(out, "env.json"), "w") as f:
        json.dump(info, f)
    print(
        f"Device: **{name}** ({info['sms']} SMs, {info['memory_gib']} GiB; driver, memory, max SM clock: {smi}), "
        f"torch {torch.__version__}, Triton {triton.__version__}. Measured in this run: copy "
        f"{info['copy_gb_s']} GB/s (read + write), bf16 matmul 8192^3 {info['matmul_bf16_tflops']} TFLOP/s; "
        f"datasheet dense bf16 peak {info['datasheet_bf16_tflops']} TFLOP/s."
    )


def section_tests(out: str) -> None:
    junit = os.path.join(out, "kernel-tests.xml")
    cmd = [sys.executable, "-m", "pytest", "tests/kernels", "-m", "", "-q", "-p", "no:cacheprovider"]
    cmd += ["-rfE", f"--junitxml={junit}", "-p", "no:benchmark"]
    try:
        import xdist  # noqa: F401

        cmd += ["-n", "6"]  # Triton compiles on the host: workers compile in parallel, the GPU is shared
    except ImportError:
        pass
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    sys.stderr.write(proc.stdout[-20000:] + proc.stderr[-5000:])
    summary = [line for line in proc.stdout.splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
    failed = [line for line in proc.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    print(f"`pytest tests/kernels -m ''` on CUDA: {summary[-1] if summary else 'no output'} (exit {proc.returncode})")
    if failed:
        print()
        for line in failed[:40]:
            print(f"- {line[:300]}")


def section_kernels(out: str, compile_: bool) -> None:
    impls = "eager,compile,triton" if compile_ else "eager,triton"
    csv = os.path.join(out, "kernels.csv")
    proc = subprocess.run(
        [sys.executable, "-P", "bench/kernel_ops.py", "--impls", impls, "--csv", csv],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    sys.stderr.write(proc.stderr[-8000:])
    print(proc.stdout)
    if proc.returncode:
        print(f"bench/kernel_ops.py exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")


def _write_random_shards(directory: str, n_tokens: int, vocab: int) -> None:
    import numpy as np

    from llamactl.shards import ShardWriter
    from llamactl.tokenizer import Tokenizer

    tok = Tokenizer.from_file(os.path.join(ROOT, "tests", "fixtures", "llama2-tokenizer.model"))
    rng = np.random.default_rng(0)
    # Zipf-distributed ids: a loss that falls over a few steps shows the update works; uniform ids would not fall.
    ids = np.minimum(rng.zipf(1.2, n_tokens), vocab - 1).astype(np.int64)
    with ShardWriter(directory, tok) as w:
        for start in range(0, n_tokens, 4096):
            w.add(ids[start : start + 4096])


def section_train(out: str, steps: int, preset_name: str = "llama2-1b", seq: int = 2048, batch: int = 8) -> None:
    from llamactl.model import preset
    from llamactl.training.loop import flops_per_token

    env = json.load(open(os.path.join(out, "env.json"))) if os.path.exists(os.path.join(out, "env.json")) else {}
    args = preset(preset_name, vocab_size=32000)
    rows, curves = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        shards = os.path.join(tmp, "shards")
        _write_random_shards(shards, (steps + 2) * seq * batch + seq, 32000)
        for mode in ("triton", "ref"):
            run = os.path.join(tmp, f"run-{mode}")
            cmd = [sys.executable, "-m", "llamactl.cli", "pretrain", shards, "-o", run]
            cmd += ["--preset", preset_name, "--steps", str(steps), "--batch-size", str(batch), "--seq-len", str(seq)]
            cmd += ["--eval-every", "0", "--save-every", "0", "--lr", "3e-4"]
            t0 = time.perf_counter()
            proc = subprocess.run(
                cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "LLAMACTL_KERNELS": mode}
            )
            wall = time.perf_counter() - t0
            sys.stderr.write(f"--- pretrain {mode} ({wall:.0f} s)\n" + proc.stderr[-4000:])
            metrics = os.path.join(run, "metrics.jsonl")
            recs = [json.loads(x) for x in open(metrics)] if os.path.exists(metrics) else []
            recs = [r for r in recs if "step" in r and "loss" in r]
            if proc.returncode or not recs:
                why = " ".join(proc.stderr.split())[-300:]
                rows.append(f"| {mode} | failed (exit {proc.returncode}): {why} | | | | {wall:.0f} |")
                continue
            curves[mode] = [r["loss"] for r in recs]
            tok_s = (
                statistics.median(r["tokens_per_s"] for r in recs[2:]) if len(recs) > 2 else recs[-1]["tokens_per_s"]
            )
            achieved = tok_s * flops_per_token(args, seq) / 1e12
            sheet = env.get("datasheet_bf16_tflops")
            measured = env.get("matmul_bf16_tflops")
            mfu_sheet = f"{achieved / sheet:.1%}" if sheet else ""
            mfu_measured = f"{achieved / measured:.1%}" if measured else ""
            rows.append(f"| {mode} | {tok_s:,.0f} | {achieved:.0f} | {mfu_sheet} | {mfu_measured} | {wall:.0f} |")
    print(
        f"`llamactl pretrain --preset {preset_name}` ({args.num_params() / 1e9:.2f}B parameters), `--dtype auto` "
        f"(bf16 autocast over fp32 master weights on a GPU), fused AdamW, {batch} x {seq} tokens a step, {steps} steps "
        "on Zipf-distributed random "
        "tokens; tokens/s is the median of the steps after the first two; model FLOPs per token by "
        "`llamactl.training.loop.flops_per_token` (6N plus attention)."
    )
    print()
    print("| kernels | tokens/s | model TFLOP/s | MFU (datasheet) | MFU (measured matmul) | wall s (with init, save) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(r)
    if curves:
        print()
        print("Loss per step: " + "; ".join(f"{k}: " + ", ".join(f"{x:.3f}" for x in v) for k, v in curves.items()))


def _random_model(device: str, name: str = "llama2-7b", dtype=None):
    import torch

    from llamactl.model import Transformer, preset

    args = preset(name, vocab_size=32000, max_seq_len=4096)
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to(dtype or torch.bfloat16).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    model.reset_rope(device)
    return model.eval()


def _hf_from(model, device: str = "cuda"):
    """transformers' LlamaForCausalLM holding the same weights (the converter's names and rotary permutation)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llamactl.convert import hf_config, llamactl_to_hf_name, permute_to_hf

    cfg = hf_config(model.args, torch.bfloat16)
    cfg.pop("torch_dtype", None)
    cfg.pop("architectures", None)
    with torch.device("meta"):
        hf = LlamaForCausalLM(LlamaConfig(**cfg))
    a = model.args
    state = {}
    for name, t in model.state_dict().items():
        if name.startswith("rope_"):
            continue
        heads = a.n_heads if name.endswith("wq.weight") else a.n_kv_heads if name.endswith("wk.weight") else 0
        state[llamactl_to_hf_name(name)] = permute_to_hf(t, heads) if heads else t
    if a.tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    hf.load_state_dict(state, assign=True, strict=False)  # strict=False: the rotary buffer is built below
    with torch.device("cpu"):  # its inv_freq buffer is not in the state dict: build it for real, then move it
        hf.model.rotary_emb = type(hf.model.rotary_emb)(hf.config)
    return hf.to(device).eval()


def _cuda_time(fn, repeats: int = 3) -> float:
    import torch

    fn()
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def section_decode(out: str, new_tokens: int) -> None:
    import torch
    from llamactl.kernels import quant_matmul as qmm

    from llamactl.generate import SamplingParams, generate

    env = json.load(open(os.path.join(out, "env.json"))) if os.path.exists(os.path.join(out, "env.json")) else {}
    bw = env.get("copy_gb_s")
    torch.manual_seed(0)
    model = _random_model("cuda")
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    prompt = torch.randint(3, 32000, (128,)).tolist()
    rows, tokens, logits = [], {}, {}

    def ours(n):
        return lambda: generate(model, [prompt], SamplingParams(max_new_tokens=n, temperature=0), eos_id=None)

    def prompt_logits():
        with torch.inference_mode():
            return model.logits(model.hidden(torch.tensor([prompt], device="cuda"))).float()

    for mode in ("triton", "ref"):
        os.environ["LLAMACTL_KERNELS"] = mode
        one, many = _cuda_time(ours(1), repeats=2), _cuda_time(ours(new_tokens + 1), repeats=2)
        tokens[f"llamactl-{mode}"] = ours(new_tokens)()[0].tokens
        logits[f"llamactl-{mode}"] = prompt_logits()
        rows.append((f"llamactl ({mode} kernels)", len(prompt) / one, new_tokens / (many - one)))
        print(f"llamactl {mode}: prefill {rows[-1][1]:,.0f} tok/s, decode {rows[-1][2]:.1f} tok/s", file=sys.stderr)
        sys.stderr.flush()
    os.environ["LLAMACTL_KERNELS"] = "auto"
    try:
        hf = _hf_from(model)
        ids = torch.tensor([prompt], device="cuda")

        def theirs(n):
            return lambda: hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

        with torch.inference_mode():
            one, many = _cuda_time(theirs(1), repeats=2), _cuda_time(theirs(new_tokens + 1), repeats=2)
            tokens["transformers"] = theirs(new_tokens)()[0, len(prompt) :].tolist()
            logits["transformers"] = hf(ids).logits.float()
        rows.append(("transformers generate (eager, dynamic cache)", len(prompt) / one, new_tokens / (many - one)))
        hf = None  # frees its copy of the weights
    except Exception as e:  # the comparison is optional: the rest of the section still reports
        rows.append((f"transformers: {type(e).__name__}: {str(e)[:150]}", float("nan"), float("nan")))
    print(
        f"Batch-1 greedy decode, random Llama-2-7B-shaped model in bf16 ({weight_bytes / 1e9:.1f} GB of weights), "
        f"a {len(prompt)}-token prompt, {new_tokens} new tokens; decode tok/s = {new_tokens} / (time of "
        f"{new_tokens + 1} tokens - time of 1), best of 2 after a warm-up. Bandwidth fraction: weight bytes x "
        "tok/s over the copy bandwidth measured in `env`."
    )
    print()
    print("| engine | prefill tok/s | decode tok/s | of copy bandwidth |")
    print("|---|---|---|---|")
    for name, pre, dec in rows:
        frac = f"{weight_bytes * dec / (bw * 1e9):.0%}" if bw and dec == dec else ""
        print(f"| {name} | {pre:,.0f} | {dec:,.1f} | {frac} |")
    if "transformers" in tokens:
        ref = tokens["transformers"]
        agree = {
            k: next((i for i, (a, b) in enumerate(zip(v, ref, strict=False)) if a != b), min(len(v), len(ref)))
            for k, v in tokens.items()
            if k != "transformers"
        }
        print()
        print(
            "Greedy tokens equal to transformers' before the first difference (bf16 rounding differs between "
            "implementations, so random-weight greedy paths part after a while): "
            + ", ".join(f"{k} {v}/{len(ref)}" for k, v in agree.items())
        )
        ref_logits = logits["transformers"]
        print()
        print(
            "Prompt logits against transformers' (relative Frobenius error ||ours - theirs|| / ||theirs||; both bf16): "
            + ", ".join(
                f"{k} {float((v - ref_logits).norm() / ref_logits.norm()):.2e}"
                for k, v in logits.items()
                if k != "transformers"
            )
        )
    model = logits = None  # frees the 13.5 GB of weights before the next part
    torch.cuda.empty_cache()

    # The same comparison in fp32 on the 1.1B shape, where rounding cannot hide a real difference.
    try:
        small = _random_model("cuda", "llama2-1b", torch.float32)
        hf = _hf_from(small)
        ids = torch.tensor([prompt], device="cuda")
        with torch.inference_mode():
            theirs = hf(ids).logits.float()
            errs = {}
            for mode in ("triton", "ref"):
                os.environ["LLAMACTL_KERNELS"] = mode
                ours_l = small.logits(small.hidden(ids)).float()
                errs[mode] = float((ours_l - theirs).norm() / theirs.norm())
        os.environ["LLAMACTL_KERNELS"] = "auto"
        print()
        print(
            "Prompt logits of a random 1.1B-shaped model in fp32 against transformers' on the same weights (relative "
            "Frobenius error): " + ", ".join(f"llamactl-{k} {v:.2e}" for k, v in errs.items())
        )
        small = hf = None
        torch.cuda.empty_cache()
    except Exception as e:
        print(f"\nfp32 logits comparison failed: {type(e).__name__}: {str(e)[:200]}")

    # The linear layers of one decode step per scheme: 32 blocks (wq, wk, wv, wo 4096x4096; w1, w3 11008x4096;
    # w2 4096x11008) and the bf16 output head, at batch 1. One block's weights are reused 32 times (each block's
    # ~200 MB of int8 weights is 4x the L2, so the reuse hits HBM like 32 distinct blocks would).
    shapes = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]
    g = torch.Generator(device="cuda").manual_seed(1)
    ws = [torch.randn(n, k, device="cuda", generator=g) * 0.02 for n, k in shapes]
    head = torch.randn(32000, 4096, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    x_ffn = torch.randn(1, 11008, device="cuda", dtype=torch.bfloat16)
    schemes = {"bf16": None, "int8": ("int8", None), "int4-g128": ("int4", 128), "int4-g32": ("int4", 32)}
    lines = []
    for name, spec in schemes.items():
        if spec is None:
            packed = [w.bfloat16() for w in ws]

            def step(packed=packed):
                for _ in range(32):
                    for w in packed:
                        torch.nn.functional.linear(x_ffn if w.shape[1] == 11008 else x, w)
                torch.nn.functional.linear(x, head)

            nbytes = sum(w.numel() * 2 for w in packed) * 32 + head.numel() * 2
        else:
            scheme, group = spec
            packed = [qmm.quantize(w, scheme, group)[:3] for w in ws]

            def step(packed=packed, scheme=scheme):
                for _ in range(32):
                    for (qw, sc, zs), (_, k) in zip(packed, shapes, strict=True):
                        qmm.quant_matmul_triton(x_ffn if k == 11008 else x, qw, sc, zs, scheme)
                torch.nn.functional.linear(x, head)

            nbytes = sum(t.numel() * t.element_size() for p in packed for t in p if t is not None) * 32
            nbytes += head.numel() * 2
        try:
            dt = _cuda_time(step, repeats=5)
            frac = f"{nbytes / dt / (bw * 1e9):.0%}" if bw else ""
            lines.append(f"| {name} | {nbytes / 1e9:.2f} | {dt * 1e3:.2f} | {1 / dt:,.0f} | {frac} |")
        except Exception as e:
            lines.append(f"| {name} | failed: {type(e).__name__}: {str(e)[:150]} | | | |")
    print()
    print(
        "Linear layers of one 7B decode step at batch 1 per weight scheme (weight-only Triton kernels for int8/int4, "
        "cuBLAS for bf16; output head bf16 in all), launched eagerly one after another: the ceiling a decode step "
        "with these weights cannot beat."
    )
    print()
    print("| scheme | weight GB read | ms per step | tok/s ceiling | of copy bandwidth |")
    print("|---|---|---|---|---|")
    for line in lines:
        print(line)


def section_compiled(out: str, new_tokens: int) -> None:
    """The compiled decode step (``--compile always``: CUDA graphs) of a 7B-shaped model per weight scheme at batch 1,
    against the eager step, as a fraction of the copy bandwidth measured in ``env`` (issue 18's targets: bf16 70%,
    int8 55%, int4 45%), with the compile's time and whether the greedy tokens agree with the eager step's."""
    import torch

    from llamactl import compiled
    from llamactl.generate import SamplingParams, generate
    from llamactl.loading import build_model
    from llamactl.quant import QuantSpec, linear_names, quantize_rtn

    env = json.load(open(os.path.join(out, "env.json"))) if os.path.exists(os.path.join(out, "env.json")) else {}
    bw = env.get("copy_gb_s")
    torch.manual_seed(0)
    base = _random_model("cuda")
    prompt = torch.randint(3, 32000, (128,)).tolist()
    lines = []
    for scheme in ("bf16", "int8", "int4-g128", "int4-g32"):
        model = base
        if scheme != "bf16":
            name, group = (scheme, None) if scheme == "int8" else ("int4", int(scheme.split("-g")[1]))
            spec = QuantSpec(name, group)
            tensors = {k: v for k, v in base.state_dict().items() if not k.startswith("rope_")}
            for n in linear_names(base.args, spec):
                q = quantize_rtn(tensors.pop(f"{n}.weight"), spec)
                tensors.update({f"{n}.{k}": t for k, t in q.tensors.items()})
            model = build_model(base.args, tensors, "bench", "cuda", torch.bfloat16, spec).eval()
        nbytes = sum(t.numel() * t.element_size() for k, t in model.state_dict().items()
                     if not k.startswith(("rope_", "tok_embeddings")))  # fmt: skip

        def run(n, model=model):
            return generate(model, [prompt], SamplingParams(max_new_tokens=n, temperature=0), eos_id=None)

        got = {}
        for mode in ("never", "always"):
            compiled.enable(model, mode, 0)
            t = time.perf_counter()
            toks = run(new_tokens + 1)[0].tokens  # the compile (and CUDA graph capture) happens here
            first = time.perf_counter() - t
            one, many = _cuda_time(lambda: run(1), repeats=2), _cuda_time(lambda: run(new_tokens + 1), repeats=3)
            rate = new_tokens / (many - one)
            got[mode] = toks
            frac = f"{nbytes * rate / (bw * 1e9):.0%}" if bw else ""
            ok = "" if mode == "never" else ("compiled" if compiled.compiled(model) else "fell back to eager")
            lines.append(f"| {scheme} | {mode} | {nbytes / 1e9:.2f} | {rate:.1f} | {frac} | {first:.1f} | {ok} |")
            print(lines[-1], file=sys.stderr, flush=True)
        same = sum(a == b for a, b in zip(got["never"], got["always"], strict=True))
        lines[-1] = lines[-1][:-2] + f", {same}/{len(got['never'])} greedy tokens as eager |"
        compiled.enable(model, "never", 0)
        del model
        torch.cuda.empty_cache()
    print(f"Batch-1 greedy decode of a random 7B-shaped model per weight scheme, a {len(prompt)}-token prompt, "
          f"{new_tokens} new tokens: the eager step and the compiled one (`--compile always`: torch.compile with CUDA "
          "graphs). Fraction = weight bytes read per token x tokens/s over the copy bandwidth of `env`.")  # fmt: skip
    print()
    print("| scheme | --compile | weight GB | decode tok/s | of copy bandwidth | first run s (compile) | note |")
    print("|---|---|---|---|---|---|---|")
    for line in lines:
        print(line)


# ---------------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------------

SECTIONS = {  # name -> (title, timeout s, least time left to start it)
    "env": ("Device", 60, 10),
    "compiled": ("Compiled decode step, 7B-shaped model, batch 1, per scheme", 200, 90),
    "tests": ("Kernel tests on CUDA", 170, 60),
    "kernels": ("Kernels at Llama-2-7B shapes (bf16)", 120, 45),
    "train": ("Training steps, 1.1B preset", 150, 60),
    "decode": ("Decode, 7B-shaped model, batch 1", 150, 45),
}


def update_docs(md: str) -> None:
    path = os.path.join(ROOT, "docs", "benchmarks.md")
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    block = f"{BEGIN}\n{md.strip()}\n{END}"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip() + "\n\n## GPU (`make gpu-check`)\n\n" + block + "\n"
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "bench", "results", "gpu-check"))
    ap.add_argument("--budget-s", type=float, default=470.0, help="stop starting sections after this many seconds")
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--compile", action="store_true", help="also time torch.compile in the kernel benchmark")
    ap.add_argument("--train-steps", type=int, default=8)
    ap.add_argument("--train-preset", default="llama2-1b")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--run-section", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.run_section:
        fn = {
            "env": lambda: section_env(args.out),
            "tests": lambda: section_tests(args.out),
            "kernels": lambda: section_kernels(args.out, args.compile),
            "train": lambda: section_train(
                args.out, args.train_steps, args.train_preset, args.seq_len, args.batch_size
            ),
            "decode": lambda: section_decode(args.out, args.new_tokens),
            "compiled": lambda: section_compiled(args.out, args.new_tokens),
        }[args.run_section]
        fn()
        return

    t_start = time.perf_counter()
    log = open(os.path.join(args.out, "gpu-check.log"), "w")
    parts = [f"Run on {time.strftime('%Y-%m-%d')} by `make gpu-check` (`bench/gpu_check.py`)."]
    for name in args.sections.split(","):
        title, timeout, least = SECTIONS[name]
        left = args.budget_s - (time.perf_counter() - t_start)
        if left < least:
            parts.append(f"### {title}\n\nSkipped: {left:.0f} s of the budget left, the section needs {least} s.")
            continue
        cmd = [sys.executable, "-P", os.path.abspath(__file__), "--run-section", name, "--out", args.out]
        cmd += ["--train-steps", str(args.train_steps), "--new-tokens", str(args.new_tokens)]
        cmd += [
            "--train-preset",
            args.train_preset,
            "--seq-len",
            str(args.seq_len),
            "--batch-size",
            str(args.batch_size),
        ]
        cmd += ["--compile"] if args.compile else []
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=min(timeout, left))
            body, err, rc = proc.stdout, proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as e:
            body = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            err = (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
            rc = "timeout"
        dt = time.perf_counter() - t0
        log.write(f"===== {name} ({dt:.0f} s, exit {rc})\n{err}\n{body}\n")
        log.flush()
        status = "" if rc == 0 else f"\n\n**Section ended with {rc}**: {err.strip().splitlines()[-1:] if err else ''}"
        parts.append(f"### {title} ({dt:.0f} s)\n\n{body.strip()}{status}")
        print(f"[gpu-check] {name}: {dt:.0f} s, exit {rc}", file=sys.stderr, flush=True)
    md = "\n\n".join(parts) + "\n"
    with open(os.path.join(args.out, "gpu-check.md"), "w") as f:
        f.write(md)
    update_docs(md)
    shutil.copy(os.path.join(ROOT, "docs", "benchmarks.md"), os.path.join(args.out, "benchmarks.md"))
    print(md)


if __name__ == "__main__":
    main()
