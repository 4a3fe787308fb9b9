"""The --dry-run memory planner (llamactl.memory) against what training really holds.

Two independent checks. What one block saves for its backward is counted exactly: autograd's saved-tensor hooks
see every tensor a real block's forward keeps, and the planner's count must equal their bytes. And the planner's
peak must come within 15% of the peak memory measured while real training steps run on this CPU
(``bench/dry_run.py``'s ``measure``): each case's ranks run in fresh processes (two over gloo for DDP and FSDP2),
run the training commands' own lifecycle and loop (``lifecycle.train``, ``loop.fit``) on random tokens until the
steady state, and report their high-water resident set above the one just before the
model was built, after a warm-up on a tiny model (code pages and libraries' one-time buffers are in the baseline),
with glibc's mmap threshold fixed so that freed tensors leave the resident set (its default heap keeps them: that
retention, like a CUDA caching allocator's, is not planned). The measurement knows nothing of the planner.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from llamactl.errors import UserError
from llamactl.memory import Part, block_activations, parse_memory, plan
from llamactl.model import preset
from llamactl.quant import QuantSpec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("bench_dry_run", os.path.join(ROOT, "bench", "dry_run.py"))
bench = sys.modules.setdefault(_spec.name, importlib.util.module_from_spec(_spec))  # dataclasses look it up there
_spec.loader.exec_module(bench)

ALL = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
TOLERANCE = 0.15  # the acceptance bound: the planned peak within 15% of the measured one


def test_parse_memory():
    assert parse_memory("80GB") == 80 * 10**9
    assert parse_memory("24GiB") == 24 * 2**30
    assert parse_memory(" 512 MiB ") == 512 * 2**20
    for bad in ("lots", "80 TB", "-1GB", "0GB", ""):
        with pytest.raises(UserError, match="--device-memory"):
            parse_memory(bad)


def test_table_adds_up_and_says_whether_it_fits():
    p = plan([Part(preset("llama2-7b"))], micro_batch=1, seq_len=4096, world=8, strategy="fsdp", bf16=True,
             activation_checkpointing=True)  # fmt: skip
    assert p.total == sum(n for _, n in p.rows)
    fits, short = p.table(parse_memory("80GB")), p.table(p.total - 2**30)
    assert "fits in 74.51 GiB per device" in fits.splitlines()[-1] and "to spare" in fits
    assert short.splitlines()[-1].startswith("does not fit") and "1.00 GiB short" in short
    assert "total" in p.table() and "fits" not in p.table()


def _saved_bytes(args, bf16: bool, packed: bool, lora_rank: int = 0, targets: tuple[str, ...] = ALL) -> int:
    """Bytes a real block's forward keeps for its backward on this CPU: the distinct storages autograd saves, less
    the parameters and autocast's cached bf16 copies of them (a plan's weight copies, not its activations)."""
    from llamactl.training.distributed import materialize

    # the model the training commands train (adapters on a frozen base kept in bf16 under bf16), materialised
    model = bench.trainable(args, bench.Case("", 1, 1, bf16=bf16), lora_rank, targets)
    materialize(model, {"": None}, 0, torch.device("cpu"))
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    shapes = {s for p in model.parameters() if p.requires_grad for s in (tuple(p.shape), tuple(p.shape)[::-1])}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        cached_cast = t.dtype == torch.bfloat16 and tuple(t.shape) in shapes  # (or its transpose: mm saves W^T)
        if ptr not in params and not cached_cast:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    B, T = 3, 40
    dtype = torch.bfloat16 if lora_rank and bf16 else torch.float32  # a bf16 frozen base makes a bf16 stream
    x = torch.randn(B, T, args.dim, dtype=dtype, requires_grad=True)
    positions = torch.arange(T)[None].expand(B, T)
    segments = torch.tensor([0] * 25 + [1] * 15).expand(B, T) if packed else None
    with (
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16),
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
    ):
        model.layers[0](x, model.rope_cos, model.rope_sin, positions, segments)
    return sum(saved.values())


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "case", ["mha", "gqa", "packed", "lora", "lora-some"], ids=["mha", "gqa", "packed", "lora", "lora-some"]
)
def test_block_activations_are_what_autograd_saves(case, bf16):
    """The planner's per-block activations equal, byte for byte, what a block of the model saves on the CPU."""
    args = preset("llama2-15m", dim=96, n_layers=1, n_heads=4, n_kv_heads=2 if case == "gqa" else 4, multiple_of=32,
                  vocab_size=256)  # fmt: skip
    rank = 4 if case.startswith("lora") else 0
    targets = ALL if case == "lora" else ("wq", "wo", "w2")
    part = Part(args, "lora", lora_rank=rank, lora_targets=targets) if rank else Part(args)
    planned = block_activations(part, micro_batch=3, seq_len=40, bf16=bf16, device="cpu", packed=case == "packed")
    assert planned == _saved_bytes(args, bf16, case == "packed", rank, targets)


def test_checkpointing_and_sharding_shrink_what_they_should():
    a = preset("llama2-7b")
    kw = dict(micro_batch=1, seq_len=4096, bf16=True)
    one = dict(plan([Part(a)], world=1, strategy="ddp", activation_checkpointing=False, **kw).rows)
    sharded = plan([Part(a)], world=8, strategy="fsdp", activation_checkpointing=False, **kw)
    checkpointed = plan([Part(a)], world=8, strategy="fsdp", activation_checkpointing=True, **kw)
    n = a.num_params()
    assert one["parameters (fp32, trained)"] == 4 * n and one["optimizer state (AdamW)"] == 8 * n
    rows = dict(sharded.rows)
    # 1/8 of every parameter's rows (all of Llama 2 7B's dims divide by 8: no padding)
    assert rows["parameters (fp32, trained)"] == 4 * n // 8 and rows["optimizer state (AdamW)"] == 8 * n // 8
    assert dict(checkpointed.rows).get("activations", 0) < rows["activations"] / 10
    ddp = dict(plan([Part(a)], world=8, strategy="ddp", activation_checkpointing=True, **kw).rows)
    assert ddp["gradient buckets (DDP)"] == 4 * n


def test_accumulation_holds_whole_gradients_under_ddp_and_a_shard_under_fsdp():
    """From the second micro-step on the earlier ones' fp32 gradients are held: whole under DDP (no_sync until the
    last micro-step), this rank's shard under FSDP2, which reduce-scatters every micro-step (train.grad_sync); beside
    the shard, at most one block's and the head's unsharded bf16 gradients are on their way to a reduce-scatter."""
    a = preset("llama2-7b")
    n = a.num_params()
    kw = dict(micro_batch=1, seq_len=4096, world=8, bf16=True, activation_checkpointing=True, grad_accumulation=4)
    ddp = dict(plan([Part(a)], strategy="ddp", **kw).rows)
    assert ddp["gradients"] == 4 * n
    fsdp = dict(plan([Part(a)], strategy="fsdp", **kw).rows)
    block = 4 * a.dim * a.dim + 3 * a.dim * a.hidden_dim + 2 * a.dim
    assert 4 * n // 8 <= fsdp["gradients"] <= 4 * n // 8 + 2 * (block + a.vocab_size * a.dim)


def test_lora_and_qlora_hold_the_base_frozen():
    a = preset("llama2-7b")
    kw = dict(micro_batch=1, seq_len=4096, world=1, strategy="ddp", bf16=True, activation_checkpointing=True)
    adapters = 32 * 16 * sum(i + o for o, i in [(4096, 4096)] * 4 + [(11008, 4096), (4096, 11008), (11008, 4096)])
    lora = dict(plan([Part(a, "lora", lora_rank=16, lora_targets=ALL)], **kw).rows)
    assert lora["parameters (fp32, trained)"] == 4 * adapters and lora["optimizer state (AdamW)"] == 8 * adapters
    assert lora["frozen weights"] == 2 * a.num_params()  # the base in bf16
    qlora = dict(plan([Part(a, "lora", quant=QuantSpec("int4", 64), lora_rank=16, lora_targets=ALL)], **kw).rows)
    linears = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    groups = 32 * (4 * 4096 * 4096 // 64 + 2 * 11008 * 4096 // 64 + 4096 * 11008 // 64)
    floats = a.num_params() - linears  # embeddings, head, norms: bf16
    assert qlora["frozen weights"] == linears // 2 + 3 * groups + 2 * floats


def test_refuses_what_it_cannot_plan():
    a = preset("llama2-15m")
    with pytest.raises(ValueError, match="lora_rank"):
        Part(a, "lora")
    with pytest.raises(ValueError, match="LoRA adapters only"):
        Part(a, quant=QuantSpec("int8"))
    with pytest.raises(ValueError, match="head"):
        Part(a, output="scores")
    with pytest.raises(ValueError, match="trained part"):
        plan([Part(a, "frozen")], micro_batch=1, seq_len=8, world=1, strategy="ddp", bf16=False,
             activation_checkpointing=False)  # fmt: skip


@pytest.fixture(scope="module")
def quick_peaks() -> dict[str, list[int]]:
    """The quick cases measured at once (each process measures only itself)."""
    with ThreadPoolExecutor(len(bench.QUICK)) as pool:
        return dict(zip((c.name for c in bench.QUICK), pool.map(bench.measure, bench.QUICK), strict=True))


def _check(case, peaks: list[int]) -> None:
    p = bench.planned(case)
    for rank, peak in enumerate(peaks):
        ratio = p.total / peak
        assert abs(ratio - 1) <= TOLERANCE, (
            f"{case.name}, rank {rank}: planned {p.total / 2**20:.1f} MiB, measured {peak / 2**20:.1f} MiB "
            f"(x{ratio:.3f})\n{p.table()}"
        )


@pytest.mark.parametrize("case", bench.QUICK, ids=[c.name for c in bench.QUICK])
def test_plan_matches_measured_peak(case, quick_peaks):
    _check(case, quick_peaks[case.name])


@pytest.mark.slow
@pytest.mark.parametrize("case", bench.SLOW, ids=[c.name for c in bench.SLOW])
def test_plan_matches_measured_peak_slow(case):
    _check(case, bench.measure(case))


def test_ppo_activation_checkpointing_lowers_the_measured_peak_as_planned(tmp_path):
    """ppo once accepted --activation-checkpointing, planned with it, and never turned it on. The real command's
    second training step, with and without it, in fresh processes (``bench.ppo_worker``): the peak above what the
    step starts from must fall by what ``ppo --dry-run`` says it saves."""
    bench.ppo_models(str(tmp_path))
    with ThreadPoolExecutor(2) as pool:
        off, on = pool.map(lambda c: bench.measure_ppo(c, str(tmp_path)), (False, True))
    planned = bench.planned_ppo(str(tmp_path), False) - bench.planned_ppo(str(tmp_path), True)
    assert planned > 50 * 2**20  # the activations are a large share of this step: the comparison means something
    saved = off - on
    assert abs(saved / planned - 1) <= 0.2, (
        f"checkpointing saved {saved / 2**20:.1f} MiB measured, {planned / 2**20:.1f} MiB planned"
    )
