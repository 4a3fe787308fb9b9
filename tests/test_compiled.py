"""The compiled decode step (llamactl.compiled) against independent references: llama2.c's run.c on a real checkpoint
(greedy tokens, fp32) and transformers (logits); a compile that fails falls back to the eager step with one line."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import ENV, FIXTURES, assert_user_error, run_cli
from llama2c_ref import Llama2cRef

from llamactl import compiled
from llamactl.commands.convert import ConvertConfig, run
from llamactl.generate import SamplingParams, decode_one_token, prefill, run_requests
from llamactl.loading import load_for_inference
from llamactl.model import KVCache

STORIES = os.path.join(FIXTURES, "stories260K.bin")


def test_buckets():
    assert [compiled.batch_bucket(n) for n in (1, 2, 3, 4, 5, 8, 9)] == [1, 2, 4, 4, 8, 8, 16]
    assert [compiled.cache_size(n, 1000) for n in (1, 256, 257, 999)] == [256, 256, 512, 1000]
    assert compiled.worth_compiling("always", "cpu", 0) and not compiled.worth_compiling("never", "cuda", 1e9)
    cpu, cuda = compiled.AUTO_MIN_TOKENS["cpu"], compiled.AUTO_MIN_TOKENS["cuda"]
    assert not compiled.worth_compiling("auto", "cpu", cpu - 1) and compiled.worth_compiling("auto", "cpu", cpu)
    assert compiled.worth_compiling("auto", "cuda", cuda) and not compiled.worth_compiling("auto", "cuda", cuda - 1)
    assert not compiled.worth_compiling("auto", "cpu", 10 * cpu, rows=8) and compiled.worth_compiling(
        "auto", "cuda", cuda, 64
    )


def test_compiled_step_equals_llama2c_and_transformers_on_stories260k(stories, tmp_path):
    """Five prompts through three rows (a batch of 4 once bucketed, shrinking to 2 and 1 as rows finish), loaded as
    ``generate`` loads them, decoded by the compiled step: each greedy continuation is run.c's, one prompt at a time.
    Then one compiled step's logits against transformers' forward over the same tokens."""
    from transformers import LlamaForCausalLM

    from llamactl.convert import read_source, write_hf

    model, _ = load_for_inference(stories, torch.device("cpu"), "fp32", "lm", "to test", False, decode=True)
    assert compiled.enable(model, "always", 0) and compiled.compiled(model)
    prompts, n = [[1], [1, 400, 300], [1, 5, 6, 7, 8], [1, 9], [1, 33, 34, 35]], 40
    got = {i: c.tokens for i, _, c in run_requests(model, ((p, 1) for p in prompts), SamplingParams(n, temperature=0),
                                                   None, rows=3)}  # fmt: skip
    assert compiled.compiled(model)  # no fallback to eager on the way
    ref = Llama2cRef(STORIES)
    assert [p + got[i] for i, p in enumerate(prompts)] == [ref.greedy(p, n) for p in prompts]

    write_hf(str(tmp_path / "hf"), read_source(stories), None)
    hf = LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    seq = [1, 400, 300, 301, 17, 44]
    cache = KVCache(model.args, 1, compiled.cache_size(len(seq), model.args.max_seq_len), "cpu", torch.float32)
    prefill(model, cache, [seq[:-1]])
    with torch.inference_mode():
        ours = decode_one_token(model, torch.tensor([seq[-1]]), torch.tensor([len(seq) - 1]), cache)[0]
        theirs = hf(torch.tensor([seq])).logits[0, -1]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def _generate(model: str, out: str, compile_mode: str, env: dict) -> subprocess.CompletedProcess:
    records = "".join(json.dumps({"tokens": p}) + "\n" for p in ([1, 400], [1, 5, 6, 7]))
    return subprocess.run(
        [sys.executable, "-m", "llamactl.cli", "generate", "-m", model, "-o", out, "--temperature", "0",
         "--max-new-tokens", "12", "--compile", compile_mode],
        input=records, capture_output=True, text=True, env=env,
    )  # fmt: skip


def test_a_failed_compile_falls_back_to_eager_with_one_line(stories, tmp_path):
    """No working C++ compiler (and an empty Inductor cache, so that one is needed): ``--compile always`` says so in
    one line and writes what the eager step writes."""
    env = {**ENV, "CXX": "/bin/false", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    failed = _generate(stories, str(tmp_path / "a.jsonl"), "always", env)
    assert failed.returncode == 0, failed.stderr
    assert "Traceback" not in failed.stderr
    said = [line for line in failed.stderr.splitlines() if "compiled decode step failed" in line]
    assert len(said) == 1 and "decoding eagerly" in said[0], failed.stderr
    eager = _generate(stories, str(tmp_path / "b.jsonl"), "never", ENV)
    assert eager.returncode == 0, eager.stderr
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()


def test_a_bad_compile_flag_is_refused(stories):
    proc = run_cli("generate", "-m", stories, "--compile", "sometimes", stdin='{"tokens": [1]}\n')
    assert_user_error(proc, "--compile", "auto, always, never")


def test_packing_keeps_the_checkpoints_weight_and_drops_a_converted_one(stories, tmp_path):
    """A packed layer keeps the weight the file holds (what a compiled step multiplies by; memory-mapped, no copy)
    and drops one converted at load (no second copy of the model); such a model decodes eagerly, said once."""
    from llamactl.swap import PackedLinear, cpu_packing

    if not cpu_packing(torch.float32):
        pytest.skip("this CPU's rule packs no weights (swap.cpu_packing)")
    model, _ = load_for_inference(stories, torch.device("cpu"), "fp32", "lm", "to test", False, decode=True)
    assert isinstance(model.layers[0].attention.wo, PackedLinear) and hasattr(model.layers[0].attention.wo, "weight")
    half = str(tmp_path / "bf16.safetensors")
    run(ConvertConfig(src=stories, output=half, dtype="bf16"))
    model, _ = load_for_inference(half, torch.device("cpu"), "fp32", "lm", "to test", False, decode=True)
    assert not hasattr(model.layers[0].attention.wo, "weight")
    said = []
    assert not compiled.enable(model, "always", 0, say=said.append) and model.compiled_decode is None
    assert len(said) == 1 and "not compiled" in said[0]
