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


def test_torchrun_two_processes_run_data_parallel(models, tmp_path):
    """Two gloo ranks run the whole loop (each samples half of an iteration's prompts; rewards are whitened and the
    figures reduced across both): the KL at the first iteration is 0, the whitened reward averages 0, every figure is
    finite, and rank 0 writes the policy and the value model."""
    policy, rm, prompts = models
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "llamactl.cli", "ppo", "-m", policy, "--rm", rm, "--prompts", prompts, "-o", str(tmp_path / "run"),
           "--iterations", "2", "--prompts-per-iteration", "16", "--minibatch-size", "8", "--batch-size", "4",
           "--max-new-tokens", "8", "--lr", "3e-2", "--dtype", "fp32"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    its = _iterations(tmp_path / "run")
    assert [r["iteration"] for r in its] == [1, 2]
    assert its[0]["kl"] == pytest.approx(0, abs=1e-6)
    assert all(r["reward_whitened"] == pytest.approx(0, abs=1e-5) for r in its)
    assert all(math.isfinite(r[k]) for r in its for k in ("reward_raw", "kl", "value_loss", "entropy"))
    assert read_meta(str(tmp_path / "run" / "value.safetensors")).role == "value"


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
