"""The one training loop (llamactl.training.loop.fit): normalisation over micro-steps and ranks, and the schedule."""

import math
import os
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp

from llamactl.checkpoint import CheckpointMeta, read_safetensors
from llamactl.model import ModelArgs, Transformer
from llamactl.training import checkpoints, distributed, lifecycle, loop

ARGS = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16, max_seq_len=16)
SAMPLES, SEQ, BATCH = 16, 12, 2


def _data():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 64, (SAMPLES, SEQ + 1), generator=g)
    # Very unequal masks, as answer-only sft gives: sample i counts i % 5 * 2 + 1 of its 12 targets.
    mask = torch.zeros(SAMPLES, SEQ, dtype=torch.bool)
    for i in range(SAMPLES):
        mask[i, : i % 5 * 2 + 1] = True
    return tokens, mask


class MaskedTask(loop.Task):
    """Micro-batch m of step s on rank r holds samples of global micro index s * 4 + m * world + r: the same four
    micro-batches per step whatever the split between micro-steps and ranks."""

    def __init__(self, accum: int):
        self.tokens, self.mask = _data()
        self.accum = accum

    def batch(self, step, micro, rank, world):
        i = (step * self.accum * world + micro * world + rank) * BATCH
        return {"tokens": self.tokens[i : i + BATCH, :-1], "targets": self.tokens[i : i + BATCH, 1:],
                "mask": self.mask[i : i + BATCH]}  # fmt: skip

    def count(self, batch):
        return int(batch["mask"].sum())

    def loss(self, model, batch):
        return model(batch["tokens"], batch["targets"], batch["mask"], output="loss_sum")


def _fit(run_dir: str, accum: int, optimizer: str, steps: int) -> None:
    d, device = distributed.init_distributed(torch.device("cpu"))
    torch.manual_seed(0)
    model = lifecycle.meta_model(ARGS, None, "test")
    wrapped = distributed.build_wrapped(model, {"": None}, 0, d, device, "ddp", bf16=False)
    if optimizer == "sgd":
        optim = torch.optim.SGD(model.parameters(), lr=0.5)
    else:
        optim = loop.make_optimizer(model, 1e-2, 0.1, fused=False)
    loop_cfg = loop.LoopConfig(steps=steps, accum=accum, lr=optim.param_groups[0]["lr"], warmup=0, min_lr_ratio=1.0)
    loop.fit(
        MaskedTask(accum),
        model,
        wrapped,
        optim,
        loop_cfg,
        run_dir,
        {"model_args": ARGS.to_dict(), "settings": {}, "parts": checkpoints.part_headers(CheckpointMeta(ARGS))},
        d,
        device,
    )
    if d.main:
        checkpoints.export_parts(checkpoints.latest_checkpoint(run_dir), run_dir)


def _worker(rank: int, world: int, port: int, run_dir: str, accum: int, optimizer: str, steps: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ["LOCAL_RANK"] = str(rank)
    sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - the progress bar
    try:
        _fit(run_dir, accum, optimizer, steps)
    finally:
        torch.distributed.destroy_process_group()


def _final_weights(run_dir: str, steps: int) -> dict[str, torch.Tensor]:
    assert checkpoints.latest_checkpoint(run_dir).endswith(f"step-{steps:07d}")
    return read_safetensors(os.path.join(run_dir, "model.safetensors"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_step_of_sgd_is_the_gradient_of_the_token_mean(tmp_path):
    """4 micro-batches with 1 to 9 counted tokens each: the step must follow the gradient of (sum of every counted
    token's loss) / (their number), computed here in one batch, not a mean of the four micro-batch means."""
    _fit(str(tmp_path / "run"), accum=4, optimizer="sgd", steps=1)
    torch.manual_seed(0)
    model = Transformer(ARGS)
    model.init_weights(0)
    tokens, mask = _data()
    x, y, m = tokens[: 4 * BATCH, :-1], tokens[: 4 * BATCH, 1:], mask[: 4 * BATCH]
    logp = torch.log_softmax(model(x, output="logits"), -1).gather(-1, y[..., None]).squeeze(-1)
    (-(logp * m).sum() / m.sum()).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # the loop's default clip
    expected = {k: (p - 0.5 * p.grad).detach() for k, p in model.named_parameters()}
    got = _final_weights(str(tmp_path / "run"), 1)
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("optimizer", [pytest.param("sgd", marks=pytest.mark.slow), "adamw"])
def test_one_process_four_micro_steps_equals_two_processes_two(tmp_path, optimizer):
    _fit(str(tmp_path / "one"), accum=4, optimizer=optimizer, steps=2)
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "two"), 2, optimizer, 2), nprocs=2, join=True)
    one, two = _final_weights(str(tmp_path / "one"), 2), _final_weights(str(tmp_path / "two"), 2)
    for k in one:
        # fp32 sums in another order (gloo's all-reduce, then DDP's bucketed average): 1e-6 apart, not bitwise
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-6)


def test_cosine_lr_against_the_formula():
    """Linear warm-up to the peak, then cosine to final_ratio x peak at the last step (Llama 2, section 2.2)."""
    peak, warmup, total = 3e-4, 10, 110
    assert loop.cosine_lr(0, peak, warmup, total) == pytest.approx(peak / warmup)
    assert loop.cosine_lr(9, peak, warmup, total) == pytest.approx(peak)
    mid = warmup + (total - warmup) // 2
    assert loop.cosine_lr(mid, peak, warmup, total) == pytest.approx(peak * (0.1 + 0.9 * 0.5))
    assert loop.cosine_lr(total, peak, warmup, total) == pytest.approx(0.1 * peak)
    t = 37
    progress = (t - warmup) / (total - warmup)
    assert loop.cosine_lr(t, peak, warmup, total) == pytest.approx(
        0.1 * peak + 0.9 * peak * 0.5 * (1 + math.cos(math.pi * progress))
    )


def test_weight_decay_only_on_matrices():
    """Llama 2's AdamW: decay 0.1 on weight matrices and embeddings, none on the norms' gains."""
    model = Transformer(ARGS)
    groups = loop.make_optimizer(model, 1e-3, 0.1, fused=False).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in groups if g["weight_decay"] == 0.1 for p in g["params"]}
    plain = {names[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert plain == {n for n in names.values() if n.endswith("norm.weight")}
    assert decayed == set(names.values()) - plain
    assert "tok_embeddings.weight" in decayed and "layers.0.attention.wq.weight" in decayed


@pytest.mark.parametrize("tie", [False, True])
def test_flops_per_token_counts_the_matrix_products(tie):
    """torch's FLOP counter over a forward and backward with full logits counts every matrix product (aten.mm);
    SDPA's CPU kernel is not counted by it, so its 12 x layers x dim x seq is added by hand."""
    from torch.utils.flop_counter import FlopCounterMode

    a = ModelArgs(**{**ARGS.to_dict(), "tie_embeddings": tie})
    model = Transformer(a)
    model.init_weights(0)
    tokens = torch.randint(0, a.vocab_size, (2, SEQ + 1))
    with FlopCounterMode(display=False) as counter:
        logits = model(tokens[:, :-1], output="logits")
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    counted = counter.get_total_flops() / tokens[:, 1:].numel()
    assert counted + 12 * a.n_layers * a.dim * SEQ == loop.flops_per_token(a, SEQ)
