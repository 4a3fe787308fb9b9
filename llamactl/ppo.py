"""PPO's pieces (Llama 2, section 3.2.3): the actor-critic pair, the reference policy of a LoRA run, the prompts'
tokens, GAE over the answer tokens, the KL-penalised per-token rewards, and ``PPOTask``, what the one training loop
(``llamactl.training.loop.fit``) trains on: its steps are the minibatches, and it makes an iteration's rollouts when
the loop asks for the first minibatch of that iteration. ``llamactl.commands.ppo`` wires them to the command line."""

from __future__ import annotations

import sys
import time

import torch

from llamactl.errors import UserError
from llamactl.training.loop import Task

# ------------------------------------------------------------------------------------------------ the models


class ActorCritic(torch.nn.Module):
    """The trained pair: the policy and its value model, one module so that one optimizer, one DDP wrapper and one
    checkpoint hold both (``parts``: each part's gradient is clipped on its own)."""

    def __init__(self, policy, value):
        super().__init__()
        self.policy, self.value = policy, value

    @property
    def parts(self) -> dict:
        return {"policy": self.policy, "value": self.value}

    def forward(self, tokens, targets, mask):
        """(log pi(target) per position (B, T), V per position (B, T)), through both models' forward."""
        return self.policy(tokens, targets, mask, output="logprobs"), self.value(tokens, output="scores")


class AdaptersOff:
    """The reference policy of a LoRA run: the policy called with its adapters off (the frozen base it started
    from), so the reference costs no memory."""

    def __init__(self, policy: torch.nn.Module):
        self.policy = policy

    def __call__(self, *args, **kwargs):
        from llamactl.lora import adapters_disabled

        with adapters_disabled(self.policy):
            return self.policy(*args, **kwargs)


def encode_prompts(path: str, tokenizer, context: int, max_new_tokens: int) -> list:
    """The prompt records of ``path`` (``data.read_prompts``: a dialog ending with the user's turn, or ``prompt``
    text; ``is_safety`` optional) with their chat-format tokens, each checked to leave room for an answer."""
    from llamactl.chat_format import DialogError, encode_prompt
    from llamactl.data import read_prompts
    from llamactl.files import display_name

    prompts = read_prompts(path, ())
    if not prompts:
        raise UserError(f"{display_name(path)}: no prompts")
    for p in prompts:
        try:
            p.ids = encode_prompt(tokenizer, p.messages)
        except DialogError as e:
            raise UserError(f"{p.where}: {e}") from None
        if len(p.ids) + max_new_tokens + 1 > context:
            raise UserError(f"{p.where}: the prompt's {len(p.ids)} tokens and --max-new-tokens {max_new_tokens} "
                            f"exceed the context of {context}")  # fmt: skip
    return prompts


# ------------------------------------------------------------------------------------------------ advantages


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation over each row's answer positions (``mask``, one contiguous run per row):
    (advantages, returns), both (B, T), zero off the mask. The value after the last answer token is 0 (the episode
    ends there)."""
    adv = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype)
    next_value = torch.zeros(rewards.shape[0], dtype=rewards.dtype)
    for t in range(rewards.shape[1] - 1, -1, -1):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = torch.where(m, delta + gamma * lam * running, running)
        adv[:, t] = torch.where(m, running, 0.0)
        next_value = torch.where(m, values[:, t], next_value)
    return adv, (adv + values) * mask


def kl_penalised_rewards(score: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                         beta: float) -> torch.Tensor:  # fmt: skip
    """Per-token rewards (B, T): -beta * (log pi - log pi_0) on every answer token, plus the sample's shaped score
    at its last answer token."""
    rewards = -beta * (logp - ref_logp) * mask
    last = mask.long().cumsum(1).argmax(1)  # the last answer position of each row
    rewards[torch.arange(len(score)), last] += score
    return rewards


# ------------------------------------------------------------------------------------------------ the task


class PPOTask(Task):
    """What the loop trains on: step s is minibatch s % M of iteration s // M (M = prompts per iteration /
    minibatch size); the iteration's rollouts are made when its first minibatch is asked for."""

    def __init__(self, cfg, prompts, models, scorers, d, device, beta: float, bf16: bool):
        from llamactl.data import EpochOrder

        self.cfg, self.prompts = cfg, prompts
        self.policy, self.value_model, self.reference = models
        self.help_rm, self.safety_rm = scorers
        self.d, self.device, self.beta, self.bf16 = d, device, beta, bf16
        self.prompt_order = EpochOrder(len(prompts), 1, 1, cfg.seed)
        self.per_rank = cfg.prompts_per_iteration // d.world
        self.minibatches = cfg.prompts_per_iteration // cfg.minibatch_size
        self.iteration, self.buffer, self.order = -1, None, None
        self.stats: dict = {}
        self.history: list[dict] = []  # per iteration: reward, kl, length (for the warnings)
        self.warned: set[str] = set()

    # -- rollouts ---------------------------------------------------------------------------------------------

    def _prompt_ids(self, iteration: int) -> list[int]:
        """This rank's prompts of ``iteration``: a seeded permutation per pass over the prompts, rank-strided."""
        first = iteration * self.cfg.prompts_per_iteration
        step = range(first + self.d.rank, first + self.cfg.prompts_per_iteration, self.d.world)
        return [self.prompt_order.item(g) for g in step]

    @torch.no_grad()
    def rollout(self, iteration: int) -> None:
        from llamactl.generate import SamplingParams, completions
        from llamactl.reward import hybrid_reward, shaped_reward, uses_safety

        cfg, tok = self.cfg, self.help_rm.tokenizer
        self.policy.eval()
        t0 = time.perf_counter()
        picked = self._prompt_ids(iteration)
        params = SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_p, min_new_tokens=1)
        # the generator depends on (seed, iteration, rank) only: a resumed run regenerates the same rollouts
        gen = torch.Generator(device=self.device).manual_seed(cfg.seed * 1_000_003 + iteration * 101 + self.d.rank)
        samples = []  # (prompt ids, answer ids)
        for s in range(0, len(picked), cfg.gen_batch_size):
            chunk = [self.prompts[i].ids for i in picked[s : s + cfg.gen_batch_size]]
            for ids, c in zip(chunk, completions(self.policy, chunk, params, tok.eos_id, gen), strict=True):
                samples.append((ids, c.tokens))
        t1 = time.perf_counter()
        # the reward models read the dialog closed by its EOS, as they were trained (an answer cut by the length
        # limit is scored as if it ended there)
        scored = [p + a + ([] if a[-1] == tok.eos_id else [tok.eos_id]) for p, a in samples]
        helpful = self.help_rm.score(scored)
        safety = self.safety_rm.score(scored) if self.safety_rm is not None else None
        is_safety = torch.tensor([self.prompts[i].is_safety for i in picked])
        raw = hybrid_reward(helpful, safety, is_safety)
        # whitened over the iteration's samples on every rank: gather them all
        everything = _all_gather_cat(torch.stack([helpful, safety if safety is not None else helpful,
                                                  is_safety.float()], 1), self.d)  # fmt: skip
        all_shaped = shaped_reward(everything[:, 0], everything[:, 1] if safety is not None else None,
                                   everything[:, 2].bool())  # fmt: skip
        shaped = all_shaped[self.d.rank :: self.d.world] if self.d.world > 1 else all_shaped
        t2 = time.perf_counter()

        # teacher-forced log-probs (policy, reference) and values on the same padded rows
        T = max(len(p) + len(a) for p, a in samples) - 1
        B = len(samples)
        tokens = torch.zeros(B, T, dtype=torch.long)
        targets = torch.full((B, T), -100, dtype=torch.long)
        mask = torch.zeros(B, T, dtype=torch.bool)
        for b, (p, a) in enumerate(samples):
            seq = torch.tensor(p + a)
            tokens[b, : len(seq) - 1] = seq[:-1]
            targets[b, : len(seq) - 1] = seq[1:]
            mask[b, len(p) - 1 : len(seq) - 1] = True
        logp, ref_logp, values = (torch.zeros(B, T) for _ in range(3))
        # under the training step's autocast: the first minibatch's ratio is then 1, and the KL at the start is 0
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)
        for s in range(0, B, cfg.batch_size):
            sl = slice(s, s + cfg.batch_size)
            x, y, m = (t[sl].to(self.device) for t in (tokens, targets, mask))
            with autocast:
                lp = self.policy(x, y, m.float(), output="logprobs")
                ref = self.reference(x, y, m.float(), output="logprobs")
                v = self.value_model(x, output="scores")
            logp[sl], ref_logp[sl] = lp.float().cpu(), ref.float().cpu()
            values[sl] = v.float().cpu() * m.cpu()
        rewards = kl_penalised_rewards(shaped, logp, ref_logp, mask, self.beta)
        adv, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
        adv = _whiten_masked(adv, mask, self.d)
        self.buffer = dict(tokens=tokens, targets=targets, mask=mask, logp=logp, values=values, adv=adv,
                           returns=returns)  # fmt: skip
        gen_order = torch.Generator().manual_seed(cfg.seed + iteration)
        self.order = torch.randperm(B, generator=gen_order).tolist()
        self.policy.train()

        n_tokens = _sum(mask.sum().double(), self.d)
        kl = _sum(((logp - ref_logp) * mask).sum().double(), self.d) / (B * self.d.world)
        self.stats = {
            "iteration": iteration + 1,
            "reward_raw": float(_sum(raw.double().sum(), self.d) / (B * self.d.world)),
            "reward_whitened": float(_sum(shaped.double().sum(), self.d) / (B * self.d.world)),
            "helpful_raw": float(_sum(helpful.double().sum(), self.d) / (B * self.d.world)),
            "safety_samples": int(_sum(uses_safety(safety, is_safety).double().sum(), self.d)),
            "kl": float(kl),
            "entropy": float(-_sum((logp * mask).sum().double(), self.d) / n_tokens),  # estimate from the samples
            "response_length": float(n_tokens / (B * self.d.world)),
            "gen_s": round(t1 - t0, 3),
            "score_s": round(t2 - t1, 3),
        }
        self.loss_stats = torch.zeros(4, dtype=torch.float64)  # clipped tokens, value loss sum, tokens, approx kl
        self.t_train = time.perf_counter()

    # -- the loop's interface -----------------------------------------------------------------------------------

    def batch(self, step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        iteration, k = divmod(step, self.minibatches)
        if iteration != self.iteration:
            self.rollout(iteration)
            self.iteration = iteration
        per_mb = self.cfg.minibatch_size // world
        first = k * per_mb + micro * self.cfg.batch_size
        idx = self.order[first : first + self.cfg.batch_size]
        b = {key: t[idx] for key, t in self.buffer.items()}
        width = int(b["mask"].any(0).nonzero().max()) + 1  # drop the columns no row of this micro-batch uses
        return {key: t[:, :width] for key, t in b.items()}

    def count(self, batch) -> int:
        return int(batch["mask"].sum())

    def loss(self, model, batch):
        b = {k: v.to(self.device) for k, v in batch.items()}
        m = b["mask"].float()
        logp, values = model(b["tokens"], b["targets"], m)
        ratio = torch.exp(logp.float() - b["logp"])
        adv = b["adv"]
        clip = self.cfg.clip
        policy_loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip))
        # the value loss clipped around the rollout's values as the policy's ratio is (PPO's usual form)
        v_clipped = b["values"] + (values.float() - b["values"]).clamp(-clip, clip)
        value_loss = 0.5 * torch.maximum((values.float() - b["returns"]) ** 2, (v_clipped - b["returns"]) ** 2)
        with torch.no_grad():
            clipped = ((ratio - 1).abs() > clip).float()
            self.loss_stats += torch.stack([(clipped * m).sum(), (value_loss * m).sum(), m.sum(),
                                            ((ratio - 1 - torch.log(ratio)) * m).sum()]).double().cpu()  # fmt: skip
        total = ((policy_loss + self.cfg.value_coef * value_loss) * m).sum()
        return total, m.sum()

    def checkpoint_ok(self, step: int) -> bool:
        """Checkpoints only between iterations: a resumed run regenerates the iteration's rollouts from the policy
        the iteration started with."""
        return step % self.minibatches == 0

    def metrics(self, step: int) -> dict[str, float]:
        if (step % self.minibatches) != 0:  # the iteration's figures go on its last minibatch's row
            return {}
        s = _all_reduce(self.loss_stats, self.d)
        row = {**self.stats, "clip_fraction": float(s[0] / s[2]), "value_loss": float(s[1] / s[2]),
               "policy_kl_step": float(s[3] / s[2])}  # fmt: skip
        row["train_s"] = round(time.perf_counter() - self.t_train, 3)
        row = {k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()}
        self.history.append(row)
        self.warn(row)
        return row

    def warn(self, row: dict) -> None:
        """The signs of a run going wrong (each said once, on rank 0)."""
        h = self.history
        messages = {}
        if len(h) >= 3 and all(r["kl"] < 0 for r in h[-3:]):
            messages["kl"] = (f"the KL estimate has been negative for 3 iterations ({row['kl']:.4f}): the samples "
                              "do not come from the policy (check --temperature, --top-p) or it is noise")  # fmt: skip
        if len(h) >= 2 and row["response_length"] > 2 * h[0]["response_length"] and \
                row["response_length"] > 0.9 * self.cfg.max_new_tokens:  # fmt: skip
            messages["length"] = (f"answers run away in length ({h[0]['response_length']:.0f} -> "
                                  f"{row['response_length']:.0f} tokens, near --max-new-tokens)")  # fmt: skip
        if len(h) >= 2 and row["reward_raw"] > h[0]["reward_raw"] and row["kl"] > max(5.0, 10 * max(h[0]["kl"], 0.1)):
            messages["hacking"] = (f"reward rises ({h[0]['reward_raw']:.3f} -> {row['reward_raw']:.3f}) while the KL "
                                   f"explodes ({row['kl']:.2f} nats): reward hacking? raise --kl-beta")  # fmt: skip
        for key, text in messages.items():
            if key not in self.warned and self.d.main:
                print(f"llamactl ppo: warning: {text}", file=sys.stderr)
            self.warned.add(key)


def _sum(x: torch.Tensor, d) -> torch.Tensor:
    return _all_reduce(x.reshape(1), d)[0]


def _all_reduce(x: torch.Tensor, d) -> torch.Tensor:
    if d.world == 1:
        return x
    import torch.distributed as dist

    y = x.clone().to(_dist_device())
    dist.all_reduce(y)
    return y.cpu()


def _all_gather_cat(x: torch.Tensor, d) -> torch.Tensor:
    """Every rank's rows, interleaved as the ranks' prompts are (rank r holds rows r, r + world, ...)."""
    if d.world == 1:
        return x
    import torch.distributed as dist

    parts = [torch.empty_like(x, device=_dist_device()) for _ in range(d.world)]
    dist.all_gather(parts, x.to(_dist_device()))
    return torch.stack([p.cpu() for p in parts], 1).reshape(-1, *x.shape[1:])


def _dist_device() -> torch.device:
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _whiten_masked(x: torch.Tensor, mask: torch.Tensor, d) -> torch.Tensor:
    """Advantages whitened over every answer token of the iteration (all ranks)."""
    s = _all_reduce(torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum().float()]).double(), d)
    mean = s[0] / s[2]
    var = (s[1] / s[2] - mean**2).clamp(min=0)
    return ((x - mean) / (var.sqrt() + 1e-8) * mask).float()
