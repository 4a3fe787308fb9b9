"""``llamactl ppo``: RLHF by Proximal Policy Optimization against Llama 2's hybrid safety/helpfulness reward.

Each iteration samples one answer per prompt from the policy (through the generation engine), scores it with the
reward models, and takes one gradient step per minibatch of the clipped PPO objective, all on the one training loop
(``llamactl.train.fit``): the loop's steps are the minibatches, and a ``PPOTask`` makes an iteration's rollouts when
the loop asks for the first minibatch of that iteration.

Reward, as the paper's section 3.2.3: R_c = R_s if the prompt is a safety prompt (``"is_safety": true``) or
sigmoid(R_s) < 0.15, else R_h; R~_c = WHITEN(LOGIT(R_c)) over the iteration's samples; and per token the penalty
-beta * (log pi(y_t) - log pi_0(y_t)) against the frozen reference policy, R~_c added at the answer's last token.
Advantages by GAE on a value model initialised from the helpfulness reward model (the paper does not say what its
value model starts from; the helpfulness model already reads answers as the reward does, so its first values are
on the reward's scale instead of noise). Checkpoints are taken at iteration boundaries only (``--save-every`` counts
iterations): the rollouts of an iteration are then regenerated on resume from the restored policy with the same
seeded generator, which is what makes a resumed run repeat the uninterrupted one.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch

from llamactl.errors import UserError
from llamactl.flags import TrainFlags
from llamactl.train import Task

# Llama 2, section 3.2.3: AdamW (0.9, 0.95, eps 1e-5), weight decay 0.1, gradient clipping 1.0, constant learning
# rate 1e-6; 512 prompts an iteration, minibatches of 64, one gradient step per minibatch; PPO clip 0.2; KL penalty
# 0.01 (0.005 for the 34B and 70B models).
DEFAULT_LR = 1e-6
DEFAULT_BETA, DEFAULT_BETA_LARGE = 0.01, 0.005


@dataclass(kw_only=True)
class PPOConfig(TrainFlags):
    model: str
    rm: str
    prompts: str
    output: str
    safety_rm: str | None = None
    rm_adapter: str | None = None  # an adapter on --rm (the value model starts from the merged reward model)
    safety_rm_adapter: str | None = None
    iterations: int = 1
    prompts_per_iteration: int = 512
    minibatch_size: int = 64
    batch_size: int = 8  # samples per micro-batch per process (a minibatch is reached by accumulation)
    max_new_tokens: int = 256
    temperature: float = 1.0  # on-policy: the ratio's old log-probs are the policy's own at temperature 1
    top_p: float = 1.0
    kl_beta: float | None = None  # None: the paper's for the model's size
    clip: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    value_coef: float = 0.5
    gen_batch_size: int = 16  # prompts generated (and scored) at once
    save_every: int = 1  # iterations between checkpoints
    eval_every: int = 0  # not a flag of ppo (its figures are logged every iteration)

    def validate(self) -> None:
        from llamactl.files import check_output, input_problem, overlaps
        from llamactl.flags import flag_problems

        problems = flag_problems(self)
        for name in ("iterations", "prompts_per_iteration", "minibatch_size", "max_new_tokens", "gen_batch_size"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.prompts_per_iteration % self.minibatch_size:
            problems.append(f"--prompts-per-iteration {self.prompts_per_iteration} is not a multiple of "
                            f"--minibatch-size {self.minibatch_size}")  # fmt: skip
        if self.kl_beta is not None and self.kl_beta < 0:
            problems.append(f"--kl-beta must be >= 0, got {self.kl_beta}")
        for name, lo, hi in (("clip", 0, 1), ("gamma", 0, 1), ("lam", 0, 1), ("top_p", 0, 1)):
            value = getattr(self, name)
            if not lo < value <= hi:
                problems.append(f"--{name.replace('_', '-')} must be in ({lo}, {hi}], got {value}")
        if self.temperature <= 0:
            problems.append(f"--temperature must be > 0 (PPO samples from the policy), got {self.temperature}")
        if self.value_coef < 0:
            problems.append(f"--value-coef must be >= 0, got {self.value_coef}")
        if self.distributed != "ddp":
            # each rank samples its own prompts, so ranks decode different numbers of steps: FSDP2's per-block
            # all-gathers in generation would pair up across ranks wrongly (or wait forever)
            problems.append("ppo runs data-parallel (--distributed ddp): sampling under FSDP2 would need every rank "
                            "to decode in lockstep")  # fmt: skip
        inputs = [("-m/--model", self.model, "checkpoint"), ("--rm", self.rm, "checkpoint"),
                  ("--prompts", self.prompts, "prompts JSONL file")]  # fmt: skip
        if self.safety_rm is not None:
            inputs.append(("--safety-rm", self.safety_rm, "checkpoint"))
        for flag, path in (("--adapter", self.adapter), ("--rm-adapter", self.rm_adapter),
                           ("--safety-rm-adapter", self.safety_rm_adapter)):  # fmt: skip
            if path is not None:
                inputs.append((flag, path, "adapter"))
        if self.safety_rm_adapter is not None and self.safety_rm is None:
            problems.append("--safety-rm-adapter goes with --safety-rm")
        if self.rm_adapter is not None and self.lora_rank:
            problems.append("--rm-adapter with --lora-rank: the value model's adapters need a base file; merge the "
                            "reward model's adapter first (convert --rm --merge-adapter)")  # fmt: skip
        for flag, path, what in inputs:
            if problem := input_problem(path, what):
                problems.append(f"{flag} {problem}")
        if problem := check_output(self.output, "-o/--output", directory=True):
            problems.append(problem)
        problems += overlaps([("-o/--output", self.output)], [(f, p) for f, p, _ in inputs])
        if problems:
            raise UserError("; ".join(problems))


def run_settings(cfg: PPOConfig, beta: float, lr: float) -> dict:
    keys = ("prompts_per_iteration", "minibatch_size", "max_new_tokens", "temperature", "top_p", "clip", "gamma",
            "lam", "value_coef", "weight_decay", "grad_clip", "iterations")  # fmt: skip
    return {**{k: getattr(cfg, k) for k in keys}, "seed": cfg.seed, "kl_beta": beta, "lr": lr}


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

    def __init__(self, cfg: PPOConfig, prompts, models, scorers, d, device, beta: float, bf16: bool):
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


# ------------------------------------------------------------------------------------------------ the command


def run(cfg: PPOConfig) -> dict:
    from llamactl import train as T
    from llamactl.checkpoint import CheckpointMeta, load_tensors, make_lineage, read_checked_meta
    from llamactl.config import check_memory, rope_bytes
    from llamactl.device import seed_everything
    from llamactl.reward import Scorer
    from llamactl.tokenizer import Tokenizer

    cfg.validate()
    base = read_checked_meta(cfg.model, "lm", "as the policy ppo trains", train=not cfg.lora_rank)
    # the value model starts from --rm's weights and is trained
    rm_meta = read_checked_meta(cfg.rm, None, "as the value model ppo starts from --rm", need_tokenizer=False,
                                train=not cfg.lora_rank)  # fmt: skip
    if cfg.dry_run:  # a step: the policy's log-probs, the value model's scores, the reference's (without LoRA)
        from dataclasses import replace

        value_args = rm_meta.args  # a scalar head (an --rm-adapter may give a language model one)
        if value_args.head == "lm":
            value_args = replace(value_args, head="scalar", tie_embeddings=False)
        parts = [T.memory_part(cfg, base.args, base.quant, "logprobs"), T.memory_part(cfg, value_args, rm_meta.quant)]
        if not cfg.lora_rank:
            parts.append(T.memory_part(cfg, base.args, None, "logprobs", frozen=True))
        seq = min(base.args.max_seq_len, rm_meta.args.max_seq_len)  # at most: the prompt and answer fill the context
        return T.dry_run(cfg, parts, micro_batch=cfg.batch_size, seq_len=seq, items_per_step=cfg.minibatch_size)
    policy_tensors, adapted, continued = T.base_weights(cfg, base, "lm", "as the policy ppo trains")
    d, device, say, use_bf16 = T.start(cfg, "ppo")
    if cfg.prompts_per_iteration % d.world or cfg.minibatch_size % (cfg.batch_size * d.world):
        raise UserError(f"--minibatch-size {cfg.minibatch_size} is not a multiple of --batch-size x processes = "
                        f"{cfg.batch_size * d.world}")  # fmt: skip
    infer_dtype = "bf16" if use_bf16 else "fp32"
    help_rm = Scorer(cfg.rm, device, infer_dtype, cfg.gen_batch_size, adapter=cfg.rm_adapter)
    help_rm.check_fits(base.tokenizer, cfg.model, "--rm")
    if help_rm.role == "safety":
        say(f"--rm {cfg.rm} is a safety reward model; it is used as the helpfulness one")
    safety_rm = None
    if cfg.safety_rm is not None:
        safety_rm = Scorer(cfg.safety_rm, device, infer_dtype, cfg.gen_batch_size, adapter=cfg.safety_rm_adapter)
        safety_rm.check_fits(base.tokenizer, cfg.model, "--safety-rm")
    tok = Tokenizer(base.tokenizer, cfg.model)
    context = min(base.args.max_seq_len, help_rm.context, safety_rm.context if safety_rm else help_rm.context)
    prompts = encode_prompts(cfg.prompts, tok, context, cfg.max_new_tokens)
    large = base.args.num_params() > 30e9  # the paper's 34B and 70B models
    beta = cfg.kl_beta if cfg.kl_beta is not None else DEFAULT_BETA_LARGE if large else DEFAULT_BETA
    lr = cfg.lr if cfg.lr is not None else DEFAULT_LR
    steps_per_iteration = cfg.prompts_per_iteration // cfg.minibatch_size
    steps = cfg.iterations * steps_per_iteration
    accum = cfg.minibatch_size // (cfg.batch_size * d.world)
    settings = run_settings(cfg, beta, lr)
    value_meta = help_rm.meta
    inputs = [cfg.model, cfg.rm, cfg.prompts] + ([cfg.adapter] if cfg.adapter else [])
    lineage = make_lineage("ppo", cfg.argv or sys.argv[1:], inputs, parent=adapted.lineage)
    value_tensors = load_tensors(cfg.rm)
    if cfg.rm_adapter is not None:  # the value model starts from the reward model the adapter makes
        from llamactl.lora import merged_tensors, read_adapter

        rm_adapter, rm_adapter_tensors = read_adapter(cfg.rm_adapter)
        value_tensors = merged_tensors(value_tensors, rm_meta, rm_adapter, rm_adapter_tensors, cfg.rm)
    policy, policy_out = T.trainee(cfg, cfg.model, CheckpointMeta(adapted.args, base.tokenizer, lineage), base,
                                   policy_tensors, use_bf16)  # fmt: skip
    value_out_meta = CheckpointMeta(value_meta.args, value_meta.tokenizer, dict(lineage), "value")
    value, value_out = T.trainee(cfg, cfg.rm, value_out_meta, rm_meta, value_tensors, use_bf16)
    if cfg.lora_rank:  # adapters of --model and --rm
        parts = {"adapter.safetensors": ("policy.", policy_out), "value-adapter.safetensors": ("value.", value_out)}
    else:
        parts = {"model.safetensors": ("policy.", policy_out), "value.safetensors": ("value.", value_out)}
    settings = {**settings, "lora": T.lora_spec(cfg).to_json() if cfg.lora_rank else None}
    ckpt, state = T.open_run(cfg.output, cfg.resume, base.args, settings)
    start_step = state["step"] if state else 0
    if ckpt and start_step >= steps:
        return T.finished_run(cfg.output, ckpt, start_step, steps, d, "ppo")

    model = ActorCritic(policy, value)
    need = T.training_bytes(model, d, d.world > 1 and cfg.distributed == "fsdp") + 2 * rope_bytes(base.args)
    check_memory(need, "training a policy and a value model", cfg.model, device)
    seed_everything(cfg.seed)
    policy_sources = {**policy_tensors, **(continued or {})}
    wrapped, optim, forward = T.prepare(
        model, {"policy.": policy_sources, "value.": value_tensors}, cfg.seed, ckpt, state, d, device,
        cfg.distributed, use_bf16, lr, cfg.weight_decay, cfg.compile, say,
    )  # fmt: skip
    T.ready_quantized(model, use_bf16)
    if cfg.lora_rank:  # the reference policy is the frozen base: the policy with its adapters off, no second copy
        reference = AdaptersOff(policy)
    else:  # the starting weights, frozen (fp32, run under the same autocast)
        reference = T.meta_model(adapted.args, None, cfg.model)
        T.materialize(reference, {"": policy_tensors}, cfg.seed, device)
        reference.eval().requires_grad_(False)
    T.start_run_dir(cfg.output, d)
    task = PPOTask(cfg, prompts, (policy, value, reference), (help_rm, safety_rm), d, device, beta, use_bf16)
    say(f"{len(prompts)} prompts; {cfg.iterations} iterations of {cfg.prompts_per_iteration} samples, "
           f"{steps_per_iteration} steps each; KL beta {beta}")  # fmt: skip
    loop = T.LoopConfig.from_flags(
        cfg, steps=steps, accum=accum, lr=lr, warmup=0, bf16=use_bf16, name="ppo", unit="samples",
        units_per_step=cfg.minibatch_size,
    )  # fmt: skip
    loop.min_lr_ratio = 1.0  # constant learning rate (Llama 2)
    loop.save_every = cfg.save_every * steps_per_iteration
    loop.eval_every = 0
    trainer_state = {"model_args": base.args.to_dict(), "settings": settings, "parts": T.part_headers(parts)}
    result = T.fit(task, model, wrapped, optim, loop, cfg.output, trainer_state, d, device, start_step, forward,
                   metrics_resume=ckpt is not None)  # fmt: skip
    final = T.conclude(cfg.output, result, d, "ppo")
    last = task.history[-1] if task.history else {}
    if last:
        say(f"iteration {last['iteration']}: reward {last['reward_raw']:.4f}, KL {last['kl']:.4f}; policy in "
               f"{cfg.output}/{T.output_name(cfg)}")  # fmt: skip
    return {"step": result["step"], "checkpoint": final, "iterations": result["step"] // steps_per_iteration, **last}
