"""ppo: the hybrid reward and its whitening, GAE and the per-token KL against hand computations; a controlled reward
rises over a few iterations with the KL bounded; kill -9 then --resume repeats the uninterrupted curve."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from helpers import save_chatty_model

from llamactl.checkpoint import load_tensors, plan_from_tensors, read_meta, save_plans
from llamactl.commands.ppo import PPOConfig, run
from llamactl.ppo import gae, kl_penalised_rewards
from llamactl.reward import hybrid_reward, reward_init, shaped_reward, uses_safety, whiten


def test_hybrid_reward_and_whitening_by_hand():
    helpful = torch.tensor([1.0, 2.0, -1.0, 0.5])
    safety = torch.tensor([3.0, -2.0, 0.0, -1.5])  # sigmoid: 0.95, 0.119, 0.5, 0.182
    is_safety = torch.tensor([True, False, False, False])
    # sample 0: a safety prompt -> R_s; 1: sigmoid(-2) = 0.119 < 0.15 -> R_s; 2, 3: safe enough -> R_h
    assert hybrid_reward(helpful, safety, is_safety).tolist() == [3.0, -2.0, -1.0, 0.5]
    assert uses_safety(safety, is_safety).tolist() == [True, True, False, False]
    assert hybrid_reward(helpful, None, is_safety).tolist() == helpful.tolist()
    r = [3.0, -2.0, -1.0, 0.5]
    mean = sum(r) / 4
    std = math.sqrt(sum((x - mean) ** 2 for x in r) / 4)
    want = [(x - mean) / std for x in r]  # logit(sigmoid(x)) = x
    assert shaped_reward(helpful, safety, is_safety).tolist() == pytest.approx(want, rel=1e-5)
    assert whiten(torch.tensor([2.0])).tolist() == [0.0]


def test_gae_and_kl_penalty_by_hand():
    # one row: 2 prompt positions, answer of 3 tokens at positions 2..4, then padding
    mask = torch.tensor([[False, False, True, True, True, False]])
    logp = torch.tensor([[0, 0, -1.0, -2.0, -0.5, 0]])
    ref = torch.tensor([[0, 0, -1.5, -1.0, -0.5, 0]])
    beta, score = 0.1, torch.tensor([2.0])
    r = kl_penalised_rewards(score, logp, ref, mask, beta)
    assert r[0].tolist() == pytest.approx([0, 0, -0.05, 0.1, 2.0, 0])
    values = torch.tensor([[9.0, 9.0, 0.5, 1.0, 1.5, 9.0]])
    gamma, lam = 0.9, 0.8
    d4 = 2.0 - 1.5  # last: no next value
    d3 = 0.1 + gamma * 1.5 - 1.0
    d2 = -0.05 + gamma * 1.0 - 0.5
    a4, a3 = d4, d3 + gamma * lam * d4
    a2 = d2 + gamma * lam * a3
    adv, ret = gae(r, values, mask, gamma, lam)
    assert adv[0].tolist() == pytest.approx([0, 0, a2, a3, a4, 0])
    assert ret[0].tolist() == pytest.approx([0, 0, a2 + 0.5, a3 + 1.0, a4 + 1.5, 0])


def test_clipped_ppo_loss_by_hand():
    """PPOTask.loss on six hand-made tokens (five answer tokens, one masked out), from a stub model that returns
    fixed (log pi, V), against the objective written out here: per token max(-A r, -A clip(r, 1-eps, 1+eps)) +
    value_coef * 0.5 max((V-R)^2, (V_clip-R)^2), V_clip = V_old + clip(V - V_old, -eps, eps), summed over the mask.
    The tokens take each side of both clips: the ratio inside the band, above it with A > 0 (clipped) and A < 0 (not),
    below it with A < 0 (clipped) and A > 0 (not); the value inside its band, and outside it on either side, with
    the clipped and the unclipped error each the larger in turn."""
    from types import SimpleNamespace

    from llamactl.training.tasks import PPOTask

    eps, coef = 0.2, 0.5
    # per token: (new log pi, old log pi, advantage, new V, old V, return, in the mask)
    rows = [
        [(-1.0, -1.1, 1.0, 0.1, 0.0, 1.0, True),  # r = e^0.1 in the band; V in its band
         (-0.5, -1.0, 2.0, 1.0, 0.0, 0.0, True),  # r = e^0.5 > 1.2, A > 0: clipped; V clipped, unclipped error larger
         (-0.5, -1.0, -1.0, 1.0, 0.0, 2.0, True)],  # r > 1.2, A < 0: unclipped; V clipped, clipped error larger
        [(-2.0, -1.5, -1.5, 0.5, 1.0, 0.0, True),  # r = e^-0.5 < 0.8, A < 0: clipped; V below its band
         (-2.0, -1.5, 1.0, -0.1, 0.0, 0.5, True),  # r < 0.8, A > 0: unclipped
         (3.0, -3.0, 100.0, 50.0, 0.0, -50.0, False)],  # padding: must count for nothing
    ]  # fmt: skip
    want_total, want_clipped, want_value, want_kl = 0.0, 0, 0.0, 0.0
    for new_lp, old_lp, a, v, v_old, ret, on in (t for row in rows for t in row):
        if not on:
            continue
        r = math.exp(new_lp - old_lp)
        policy = max(-a * r, -a * min(max(r, 1 - eps), 1 + eps))
        v_clip = v_old + min(max(v - v_old, -eps), eps)
        value = 0.5 * max((v - ret) ** 2, (v_clip - ret) ** 2)
        want_total += policy + coef * value
        want_clipped += abs(r - 1) > eps
        want_value += value
        want_kl += r - 1 - math.log(r)

    def col(i, dtype=torch.float32):
        return torch.tensor([[t[i] for t in row] for row in rows], dtype=dtype)

    none = torch.zeros(2, 3, dtype=torch.long)  # the stub reads no tokens
    batch = {"tokens": none, "targets": none, "mask": col(6, torch.bool), "logp": col(1), "adv": col(2),
             "values": col(4), "returns": col(5)}  # fmt: skip

    def stub(tokens, targets, mask):  # what ActorCritic returns: (log pi of the targets, V) per position
        assert mask.tolist() == col(6).tolist()
        return col(0), col(3)

    cfg = SimpleNamespace(seed=0, prompts_per_iteration=2, minibatch_size=2, clip=eps, value_coef=coef)
    d = SimpleNamespace(world=1, rank=0, main=True)
    task = PPOTask(cfg, [object()] * 2, (None, None, None), (None, None), d, torch.device("cpu"), 0.1, False)
    task.loss_stats = torch.zeros(4, dtype=torch.float64)  # what the rollout starts each iteration with
    total, count = task.loss(stub, batch)
    assert float(count) == 5
    assert float(total) == pytest.approx(want_total, rel=1e-6)
    assert task.loss_stats.tolist() == pytest.approx([want_clipped, want_value, 5, want_kl], rel=1e-6)
    assert want_clipped == 4  # the test's own premise: every token but the first has its ratio outside the band


CHOICES = list(range(1000, 1008))  # the policy's eight tokens
TARGET = 1003  # the one the controlled reward prefers


@pytest.fixture
def models(tmp_path):
    """A policy that samples (nearly) uniformly among eight tokens whatever the context: the final norm keeps one
    channel only, which every embedding sets to the same large value, so the logits are that channel's output
    weights (+1 for the eight, -2 for the rest: the eight hold all but 1e-7 of the mass). PPO moves those weights."""
    policy = str(tmp_path / "policy.safetensors")
    save_chatty_model(policy, max_seq_len=64)
    meta, tensors = read_meta(policy), dict(load_tensors(policy))
    tensors["tok_embeddings.weight"] = tensors["tok_embeddings.weight"].clone()
    tensors["tok_embeddings.weight"][:, 0] = 50.0
    tensors["norm.weight"] = torch.zeros_like(tensors["norm.weight"])
    tensors["norm.weight"][0] = 1.0
    out = torch.zeros_like(tensors["output.weight"])
    out[:, 0] = -2.0
    out[CHOICES, 0] = 1.0
    tensors["output.weight"] = out
    save_plans(policy, plan_from_tensors(tensors), meta)
    meta, tensors = reward_init(read_meta(policy), load_tensors(policy))
    meta.role = "helpfulness"
    rm = str(tmp_path / "rm.safetensors")
    save_plans(rm, plan_from_tensors(tensors), meta)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about number {i}."}) + "\n" for i in range(8)))
    return policy, rm, str(prompts)


def target_share_scorer(monkeypatch, prompt_len: dict):
    """The controlled reward: 4 x the share of the answer's tokens that are TARGET (1/8 at the start)."""
    from llamactl.reward import Scorer

    def score(self, sequences):
        out = []
        for s in sequences:
            answer = s[prompt_len[tuple(s[:8])] :]
            out.append(sum(t == TARGET for t in answer) / len(answer) * 4)
        return torch.tensor(out)

    monkeypatch.setattr(Scorer, "score", score)


def _cfg(models, out, **kw):
    policy, rm, prompts = models
    base = dict(model=policy, rm=rm, prompts=prompts, output=str(out), iterations=6, prompts_per_iteration=16,
                minibatch_size=8, batch_size=8, max_new_tokens=8, lr=3e-2, kl_beta=0.1, dtype="fp32", seed=0,
                gen_batch_size=16)  # fmt: skip
    return PPOConfig(**{**base, **kw})


def _prompt_lengths(models):
    from llamactl.chat_format import encode_prompt
    from llamactl.tokenizer import Tokenizer

    policy, _, prompts = models
    tok = Tokenizer(read_meta(policy).tokenizer, policy)
    lens = {}
    for line in open(prompts):
        ids = encode_prompt(tok, [{"role": "user", "content": json.loads(line)["prompt"]}])
        lens[tuple(ids[:8])] = len(ids)
    return lens


def _iterations(run_dir):
    rows = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [r for r in rows if "iteration" in r]


def test_a_controlled_reward_rises_with_the_kl_bounded(models, tmp_path, monkeypatch):
    """The share of the target token rises over six iterations; the KL penalty holds the policy near the reference:
    with beta 1 the KL stays small, without it the same run drifts several times further."""
    target_share_scorer(monkeypatch, _prompt_lengths(models))
    run(_cfg(models, tmp_path / "run", kl_beta=1.0))
    its = _iterations(tmp_path / "run")
    assert [r["iteration"] for r in its] == [1, 2, 3, 4, 5, 6]
    assert its[0]["kl"] == pytest.approx(0, abs=1e-6)  # the policy is the reference before its first step
    first, last = its[0]["reward_raw"], sum(r["reward_raw"] for r in its[-2:]) / 2
    assert last > first + 0.3, [r["reward_raw"] for r in its]  # the share of the target token grows
    for key in ("entropy", "clip_fraction", "value_loss", "response_length", "gen_s", "score_s", "train_s"):
        assert key in its[-1]
    meta = read_meta(str(tmp_path / "run" / "model.safetensors"))
    assert meta.args.head == "lm" and meta.lineage["command"] == "ppo"
    assert read_meta(str(tmp_path / "run" / "value.safetensors")).role == "value"

    run(_cfg(models, tmp_path / "free", kl_beta=0.0))
    free = _iterations(tmp_path / "free")
    bounded = max(r["kl"] for r in its)
    assert bounded < 2.0 and free[-1]["kl"] > 3 * bounded, ([r["kl"] for r in its], [r["kl"] for r in free])


def test_rollout_kl_is_the_direct_per_token_kl(models, tmp_path, monkeypatch):
    """After training, the KL the rollout reports equals sum over answer tokens of log pi - log pi_0 computed
    directly from full forwards of the trained policy and the original one, per sample."""
    from llamactl.loading import load_model
    from llamactl.training import tasks as P

    target_share_scorer(monkeypatch, _prompt_lengths(models))
    cfg = _cfg(models, tmp_path / "run", iterations=2)
    seen = {}
    original = P.PPOTask.rollout

    def spy(self, iteration):
        original(self, iteration)
        b = self.buffer
        state = {k: v.detach().clone() for k, v in self.policy.state_dict().items()}
        seen[iteration] = (b["tokens"].clone(), b["targets"].clone(), b["mask"].clone(), self.stats["kl"], state)

    monkeypatch.setattr(P.PPOTask, "rollout", spy)
    run(cfg)
    tokens, targets, mask, kl, state = seen[1]
    policy, _ = load_model(models[0])
    reference, _ = load_model(models[0])
    policy.load_state_dict(state)
    with torch.no_grad():
        lp = torch.log_softmax(policy(tokens, output="logits").double(), -1)
        lr = torch.log_softmax(reference(tokens, output="logits").double(), -1)
    safe = targets.clamp(min=0)[..., None]
    diff = (lp.gather(-1, safe) - lr.gather(-1, safe))[..., 0] * mask
    assert kl == pytest.approx(float(diff.sum() / len(tokens)), rel=1e-4, abs=1e-6)
    assert kl > 0


def test_kill_9_then_resume_gives_the_uninterrupted_curve(models, tmp_path):
    """Killed in the middle of iteration 3 (after its first minibatch): the resume starts again from the checkpoint
    after iteration 2 and regenerates the same rollouts."""
    cfg = _cfg(models, tmp_path / "straight", iterations=3)
    code = "from llamactl.commands.ppo import PPOConfig, run; import sys; run(PPOConfig(**eval(sys.argv[1])))"
    straight = subprocess.run([sys.executable, "-c", code, repr(cfg.__dict__)], capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr
    broken = _cfg(models, tmp_path / "broken", iterations=3)
    env = {**os.environ, "LLAMACTL_FAULT": "step-done@5"}
    killed = subprocess.run([sys.executable, "-c", code, repr(broken.__dict__)], env=env, capture_output=True)
    assert killed.returncode == -9
    broken.resume = True
    done = subprocess.run([sys.executable, "-c", code, repr(broken.__dict__)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr

    def curve(d):
        rows = [json.loads(x) for x in open(os.path.join(d, "metrics.jsonl"))]
        return [{k: v for k, v in r.items() if not k.endswith(("_s", "_per_s"))} for r in rows]

    assert curve(tmp_path / "broken") == curve(tmp_path / "straight")


def pin_rollouts(patch, record: str) -> None:
    """Rollouts that depend on the iteration and the prompt only, not on which rank samples the prompt or what it is
    batched with (the run's own generator is seeded per (seed, iteration, rank), and a row's draws depend on its
    batch): each prompt is sampled alone, from the policy, with a generator seeded by (iteration, prompt tokens).
    Every [iteration, prompt, answer] is appended to ``record``.RANK. ``patch`` has ``setattr(obj, name, value)``
    (pytest's monkeypatch, or ``Setattr`` in a torchrun child)."""
    import zlib

    import torch.distributed as dist

    from llamactl import generate
    from llamactl.training import tasks

    real_rollout, real_completions, now = tasks.PPOTask.rollout, generate.completions, {}

    def rollout(self, iteration):
        now["iteration"] = iteration
        return real_rollout(self, iteration)

    def completions(model, prompts, params, eos_id, generator=None, **engine):
        rank = dist.get_rank() if dist.is_initialized() else 0
        for p in prompts:
            g = torch.Generator(device=generator.device)
            g.manual_seed(zlib.crc32(repr((now["iteration"], list(p))).encode()))
            (c,) = real_completions(model, [p], params, eos_id, g)
            with open(f"{record}.{rank}", "a") as f:
                f.write(json.dumps([now["iteration"], list(p), c.tokens]) + "\n")
            yield c

    patch.setattr(tasks.PPOTask, "rollout", rollout)
    patch.setattr(generate, "completions", completions)


class Setattr:
    setattr = staticmethod(setattr)


def record_gradients(path: str):
    """Save, on rank 0, the gradient every optimizer step takes (after the loop's normalisation, DDP's all-reduce
    and the clip: what AdamW is given), one list of tensors per step in parameter order; returns the hook's handle."""
    import torch.distributed as dist
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    steps = []

    def hook(optimizer, args, kwargs):
        steps.append([p.grad.detach().clone() for g in optimizer.param_groups for p in g["params"]])
        if not dist.is_initialized() or dist.get_rank() == 0:
            torch.save(steps, path)

    return register_optimizer_step_pre_hook(hook)


# A torchrun child: the rollouts pinned and the gradients recorded as in the one-process run, then the command line.
TORCHRUN_CHILD = """
import json, sys
paths, argv, record, grads = (json.loads(a) for a in sys.argv[1:5])
sys.path[:0] = paths
import test_ppo
from llamactl.cli import main
test_ppo.pin_rollouts(test_ppo.Setattr(), record)
test_ppo.record_gradients(grads)
main(argv)
"""


def _records(path) -> list:
    return sorted(json.loads(x) for x in open(path))


def test_torchrun_two_processes_equal_one_process(models, tmp_path, monkeypatch):
    """Two gloo ranks (each samples half of an iteration's prompts; rewards are whitened over both, gradients and
    figures reduced across them) train as one process does on the same global batch: with the rollouts pinned to
    depend on (iteration, prompt) alone, both runs sample the same answers, and take the same gradient at each step,
    log the same figures and end with the same policy and value model. An iteration is one minibatch (prompts per
    iteration = minibatch size), so each takes one step over all its samples: a minibatch is a shuffle of each
    rank's own samples, so with several minibatches per iteration two world sizes split them differently by design.

    The models are a random chat model and a reward model with a random head (not the fixture's: with every
    position's features the same, the value head's first gradient is 0 by construction, and AdamW's eps-sized
    denominator turns the fp32 noise around 0 into steps of lr x noise / eps: 5e-4 apart after one step)."""
    from helpers import save_reward_model

    policy = str(tmp_path / "chatty.safetensors")
    save_chatty_model(policy, max_seq_len=64)
    rm = save_reward_model(policy, str(tmp_path / "rm.safetensors"), 0, "helpfulness")
    prompts = models[2]
    common = dict(iterations=2, prompts_per_iteration=8, minibatch_size=8, batch_size=4, device="cpu")
    hook = record_gradients(str(tmp_path / "one.grads"))
    try:
        with monkeypatch.context() as m:
            pin_rollouts(m, str(tmp_path / "one.rollouts"))
            run(_cfg((policy, rm, prompts), tmp_path / "one", **common))
    finally:
        hook.remove()
    child = tmp_path / "child.py"
    child.write_text(TORCHRUN_CHILD)
    here = os.path.dirname(os.path.abspath(__file__))
    # the flags of _cfg(..., **common)
    argv = ["ppo", "-m", policy, "--rm", rm, "--prompts", prompts, "-o", str(tmp_path / "two"),
            "--iterations", "2", "--prompts-per-iteration", "8", "--minibatch-size", "8", "--batch-size", "4",
            "--max-new-tokens", "8", "--lr", "3e-2", "--kl-beta", "0.1", "--gen-batch-size", "16", "--seed", "0",
            "--dtype", "fp32", "--device", "cpu"]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(child),
           *(json.dumps(a) for a in ([here, os.path.dirname(here)], argv, str(tmp_path / "two.rollouts"),
                                     str(tmp_path / "two.grads")))]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # the same samples: every prompt once an iteration, half of them on each rank (the first iteration's first:
    # they come from the same weights; the second's from the weights after the step compared below)
    one = _records(tmp_path / "one.rollouts.0")
    ranks = [_records(tmp_path / f"two.rollouts.{r}") for r in (0, 1)]
    assert [len(r) for r in ranks] == [8, 8]
    two = sorted(ranks[0] + ranks[1])
    assert [r for r in two if r[0] == 0] == [r for r in one if r[0] == 0]
    assert sorted((i, tuple(p)) for i, p, _ in one) == sorted((i, tuple(p)) for i in (0, 1) for p in
                                                               {tuple(p) for _, p, _ in one})  # fmt: skip
    # the same gradient at each step, to fp32 sums taken in another order (gloo's all-reduce, DDP's averaging, one
    # micro-batch a rank instead of two accumulated, other padding widths): ~1e-7 of the gradient's scale
    g1, g2 = torch.load(tmp_path / "one.grads"), torch.load(tmp_path / "two.grads")
    assert len(g1) == len(g2) == 2
    for step, (a, b) in enumerate(zip(g1, g2, strict=True)):
        scale = max(float(x.abs().max()) for x in a)
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            where = f"step {step}, parameter {i}"
            torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5 * scale, msg=lambda m, w=where: f"{w}: {m}")
    assert two == one
    # the same figures (metrics.jsonl rounds them to 6 decimals)
    its1, its2 = _iterations(tmp_path / "one"), _iterations(tmp_path / "two")
    assert [r["iteration"] for r in its2] == [1, 2] and its2[0]["kl"] == pytest.approx(0, abs=1e-6)
    assert its2[1]["kl"] != pytest.approx(0, abs=1e-4)  # the first step moved the policy: the second is compared
    for key in ("loss", "grad_norm", "reward_raw", "reward_whitened", "helpful_raw", "kl", "entropy",
                "response_length", "value_loss", "clip_fraction", "policy_kl_step", "safety_samples"):  # fmt: skip
        assert [r[key] for r in its2] == pytest.approx([r[key] for r in its1], rel=1e-4, abs=2e-6), key
    # and the same weights after two AdamW steps of lr 3e-2 (each moves a weight by up to 3e-2)
    for name in ("model.safetensors", "value.safetensors"):
        a, b = (dict(load_tensors(str(tmp_path / run / name))) for run in ("one", "two"))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=lambda m, n=name, k=k: f"{n}: {k}: {m}")
    assert read_meta(str(tmp_path / "two" / "value.safetensors")).role == "value"


def test_lora_ppo_writes_adapters_of_policy_and_value(models, tmp_path, monkeypatch):
    """With --lora-rank the policy and the value model train adapters (the value head in full); the reference is the
    policy with its adapters off: the KL starts at 0 and grows as the adapters move."""
    import hashlib

    from helpers import save_reward_model

    from llamactl.lora import read_adapter

    # a plain small chat model: the fixture's policy takes its logits from the head alone, which LoRA leaves frozen
    policy = str(tmp_path / "chatty.safetensors")
    save_chatty_model(policy, max_seq_len=64)
    models = (policy, save_reward_model(policy, str(tmp_path / "rm.safetensors"), 0, "helpfulness"), models[2])
    target_share_scorer(monkeypatch, _prompt_lengths(models))
    run(_cfg(models, tmp_path / "run", iterations=3, lora_rank=4, lr=5e-2))
    its = _iterations(tmp_path / "run")
    assert its[0]["kl"] == pytest.approx(0, abs=1e-6) and its[-1]["kl"] > 1e-4
    assert sorted(f for f in os.listdir(tmp_path / "run") if f.endswith(".safetensors")) == [
        "adapter.safetensors", "value-adapter.safetensors"]  # fmt: skip
    policy, rm, _ = models
    sha = {p: hashlib.sha256(open(p, "rb").read()).hexdigest() for p in (policy, rm)}
    meta, _ = read_adapter(str(tmp_path / "run" / "adapter.safetensors"))
    assert meta.base_sha256 == sha[policy] and meta.extra == () and meta.args.head == "lm"
    meta, tensors = read_adapter(str(tmp_path / "run" / "value-adapter.safetensors"))
    assert meta.base_sha256 == sha[rm] and meta.role == "value" and "score.weight" in tensors


def test_adapters_off_is_the_base_model(models):
    """The reference of a LoRA run: the policy with non-zero adapters, called through AdaptersOff, gives the log-probs
    of the base checkpoint loaded on its own."""
    from llamactl.loading import load_model
    from llamactl.lora import LoraSpec, add_lora
    from llamactl.ppo import AdaptersOff

    policy_path = models[0]
    base, _ = load_model(policy_path)
    policy, _ = load_model(policy_path)
    add_lora(policy, LoraSpec(4, 8.0, 0.0, ("wq", "wv", "w2")))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    x = torch.randint(0, 32000, (2, 12), generator=g)
    y = torch.randint(0, 32000, (2, 12), generator=g)
    with torch.no_grad():
        want = base(x, y, output="logprobs")
        assert torch.equal(AdaptersOff(policy)(x, y, output="logprobs"), want)
        assert not torch.allclose(policy(x, y, output="logprobs"), want)


def test_rm_adapter_scores_and_starts_the_value_model(models, tmp_path):
    """--rm-adapter: the reward model is --rm with the adapter (here a reward model made from the policy by an adapter
    with its own scalar head), and the value model starts from it: its saved head after a run with lr 0 is the
    adapter's head."""
    from lora_helpers import random_adapter

    from llamactl.checkpoint import load_tensors
    from llamactl.lora import LoraSpec

    policy, _, prompts = models
    adapter = str(tmp_path / "rm-adapter.safetensors")
    _, tensors = random_adapter(policy, adapter, LoraSpec(2, 4.0, 0.0, ("wq", "wv")), 0, head=True, role="helpfulness")
    cfg = _cfg(models, tmp_path / "run", iterations=1, rm=policy, rm_adapter=adapter, lr=1e-30, grad_clip=0.0)
    run(cfg)
    value = load_tensors(str(tmp_path / "run" / "value.safetensors"))
    torch.testing.assert_close(value["score.weight"], tensors["score.weight"], rtol=1e-6, atol=1e-6)
