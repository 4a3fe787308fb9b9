"""The tasks the one training loop (``llamactl.training.loop.fit``) trains on, one per stage: what a stage brings is
its step-pure batches and its loss (``Task``). ``WindowsTask``: pretraining windows; ``RowsTask``: packed dialog rows
for sft; ``PairsTask``: preference pairs for reward models (Llama 2's margin ranking loss); ``PPOTask``: rollouts
and the clipped PPO objective."""

from __future__ import annotations

import math
import sys
import time

import torch

from llamactl.data import EpochOrder, PairSet, Rows, Windows, pack_sequences, sequence_scores
from llamactl.ppo import gae, kl_penalised_rewards, whiten_masked
from llamactl.training.distributed import all_gather_rows, all_reduce_sum, sum_over_ranks
from llamactl.training.loop import Task


class WindowsTask(Task):
    """Language-model pretraining on ``Windows``: every target token counts. Micro-batch m of step s on rank r holds
    samples (s * accum * world + m * world + r) * batch_size onward, so ranks read disjoint parts of one global order
    and the order does not depend on how a step is split into micro-steps."""

    def __init__(
        self,
        windows: Windows,
        batch_size: int,
        accum: int,
        device: torch.device,
        val: Windows | None = None,
        eval_batches: int = 0,
    ):
        self.windows, self.batch_size, self.accum, self.device = windows, batch_size, accum, device
        self.val, self.eval_batches = val, eval_batches
        self.rank, self.world = 0, 1

    def batch(self, step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        self.rank, self.world = rank, world
        first = step * self.accum * world * self.batch_size + (micro * world + rank) * self.batch_size
        x, y = self.windows.batch(first, self.batch_size)
        return {"tokens": x, "targets": y}

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["targets"].numel()

    def loss(self, model, batch):
        return model(batch["tokens"].to(self.device), batch["targets"].to(self.device), output="loss_sum")

    def evaluate(self, model) -> dict[str, float]:
        import torch.distributed as dist

        if self.val is None or not self.eval_batches:
            return {}
        n = min(self.eval_batches, self.val.n // self.batch_size // self.world)  # >= 1: checked before training
        total = torch.zeros(2, device=self.device)
        for b in range(n):
            x, y = self.val.batch((b * self.world + self.rank) * self.batch_size, self.batch_size)
            loss_sum, count = model(x.to(self.device), y.to(self.device), output="loss_sum")
            total += torch.stack([loss_sum.float(), count.float()])
        if self.world > 1:
            dist.all_reduce(total)
        val = float(total[0] / total[1])
        return {"val_loss": val, "val_ppl": math.exp(min(val, 50.0))}


class RowsTask(Task):
    """Supervised fine-tuning on ``Rows``: the loss counts the masked target tokens (the answers), rows in
    ``EpochOrder``."""

    def __init__(self, rows: Rows, batch_size: int, accum: int, device, seed: int, val: Rows | None = None):
        self.rows, self.batch_size, self.device = rows, batch_size, device
        self.order = EpochOrder(len(rows), batch_size, accum, seed)
        self.val = val
        self.packed = bool((rows.segments > 0).any())
        self.rank, self.world = 0, 1

    def batch(self, step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        self.rank, self.world = rank, world
        return _take(self.rows, self.order.items(step, micro, rank, world))

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["mask"].sum())

    def loss(self, model, batch):
        b = {k: v.to(self.device) for k, v in batch.items()}
        seg = b["segments"] if self.packed else None  # unpacked rows: causal attention alone keeps padding out
        return model(b["tokens"], b["targets"], b["mask"], positions=b["positions"], segment_ids=seg, output="loss_sum")

    def evaluate(self, model) -> dict[str, float]:
        import torch.distributed as dist

        if self.val is None or not len(self.val):
            return {}
        total = torch.zeros(2, device=self.device)
        mine = list(range(self.rank, len(self.val), self.world))
        for s in range(0, len(mine), self.batch_size):
            loss_sum, count = self.loss(model, _take(self.val, mine[s : s + self.batch_size]))
            total += torch.stack([loss_sum.float(), count.float()])
        if self.world > 1:
            dist.all_reduce(total)
        val = float(total[0] / total[1].clamp(min=1))
        return {"val_loss": val, "val_ppl": math.exp(min(val, 50.0))}


def _take(rows: Rows, idx: list[int]) -> dict[str, torch.Tensor]:
    return {
        "tokens": torch.from_numpy(rows.tokens[idx]),
        "targets": torch.from_numpy(rows.targets[idx]),
        "mask": torch.from_numpy(rows.mask[idx]),
        "positions": torch.from_numpy(rows.positions[idx]),
        "segments": torch.from_numpy(rows.segments[idx]),
    }


def ranking_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """Llama 2's reward model loss per pair (eq. 2): -log(sigmoid(r(x, y_c) - r(x, y_r) - m(r)))."""
    return -torch.nn.functional.logsigmoid(chosen - rejected - margin)


class PairsTask(Task):
    """Reward-model training on a ``PairSet``: a micro-batch of B pairs is one forward over their 2B sequences
    (packed into rows), the loss summed over pairs and counted in pairs; pairs in ``EpochOrder``."""

    def __init__(self, pairs: PairSet, batch_size: int, accum: int, device, seed: int, pack: bool = True,
                 val: PairSet | None = None):  # fmt: skip
        self.pairs, self.batch_size, self.device, self.pack, self.val = pairs, batch_size, device, pack, val
        self.order = EpochOrder(len(pairs), batch_size, accum, seed)
        self.rank, self.world = 0, 1

    def _batch(self, pairs: PairSet, idx: list[int]) -> dict[str, torch.Tensor]:
        seqs = [pairs.chosen[i] for i in idx] + [pairs.rejected[i] for i in idx]
        return {**pack_sequences(seqs, self.pack), "margin": torch.from_numpy(pairs.margins[idx])}

    def batch(self, step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        self.rank, self.world = rank, world
        return self._batch(self.pairs, self.order.items(step, micro, rank, world))

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return len(batch["margin"])

    def _scores(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        s = sequence_scores(model, batch, self.device)
        return s[: len(batch["margin"])], s[len(batch["margin"]) :]

    def loss(self, model, batch):
        chosen, rejected = self._scores(model, batch)
        losses = ranking_loss(chosen, rejected, batch["margin"].to(self.device))
        return losses.sum(), torch.tensor(len(losses), device=self.device)

    def evaluate(self, model) -> dict[str, float]:
        """Held-out loss and accuracy (chosen scored strictly above rejected), overall and per rating, as the
        paper's Table 8 reports them."""
        import torch.distributed as dist

        if self.val is None or not len(self.val):
            return {}
        labels = sorted(set(self.val.labels))
        # per label: [loss sum, correct, count]
        total = torch.zeros(len(labels), 3, device=self.device, dtype=torch.float64)
        mine = list(range(self.rank, len(self.val), self.world))
        for s in range(0, len(mine), self.batch_size):
            idx = mine[s : s + self.batch_size]
            b = self._batch(self.val, idx)
            chosen, rejected = self._scores(model, b)
            losses = ranking_loss(chosen, rejected, b["margin"].to(self.device))
            for k, i in enumerate(idx):
                j = labels.index(self.val.labels[i])
                total[j] += torch.stack([losses[k].double(), (chosen[k] > rejected[k]).double(), total.new_ones(())])
        if self.world > 1:
            dist.all_reduce(total)
        out = {
            "val_loss": float(total[:, 0].sum() / total[:, 2].sum()),
            "val_accuracy": float(total[:, 1].sum() / total[:, 2].sum()),
        }
        if len(labels) > 1 or labels != ["unrated"]:
            for j, label in enumerate(labels):
                out[f"val_accuracy_{label}"] = float(total[j, 1] / total[j, 2].clamp(min=1))
        return out


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
        prompts = [self.prompts[i].ids for i in picked]
        # continuous batching, --gen-batch-size rows at a time
        done = completions(self.policy, prompts, params, tok.eos_id, gen, rows=max(1, min(cfg.gen_batch_size,
                                                                                         len(prompts))))  # fmt: skip
        samples = [(ids, c.tokens) for ids, c in zip(prompts, done, strict=True)]  # (prompt ids, answer ids)
        t1 = time.perf_counter()
        # the reward models read the dialog closed by its EOS, as they were trained (an answer cut by the length
        # limit is scored as if it ended there)
        scored = [p + a + ([] if a[-1] == tok.eos_id else [tok.eos_id]) for p, a in samples]
        helpful = self.help_rm.score(scored)
        safety = self.safety_rm.score(scored) if self.safety_rm is not None else None
        is_safety = torch.tensor([self.prompts[i].is_safety for i in picked])
        raw = hybrid_reward(helpful, safety, is_safety)
        # whitened over the iteration's samples on every rank: gather them all
        everything = all_gather_rows(torch.stack([helpful, safety if safety is not None else helpful,
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
        adv = whiten_masked(adv, mask, self.d)
        self.buffer = dict(tokens=tokens, targets=targets, mask=mask, logp=logp, values=values, adv=adv,
                           returns=returns)  # fmt: skip
        gen_order = torch.Generator().manual_seed(cfg.seed + iteration)
        self.order = torch.randperm(B, generator=gen_order).tolist()
        self.policy.train()

        n_tokens = sum_over_ranks(mask.sum().double(), self.d)
        kl = sum_over_ranks(((logp - ref_logp) * mask).sum().double(), self.d) / (B * self.d.world)
        self.stats = {
            "iteration": iteration + 1,
            "reward_raw": float(sum_over_ranks(raw.double().sum(), self.d) / (B * self.d.world)),
            "reward_whitened": float(sum_over_ranks(shaped.double().sum(), self.d) / (B * self.d.world)),
            "helpful_raw": float(sum_over_ranks(helpful.double().sum(), self.d) / (B * self.d.world)),
            "safety_samples": int(sum_over_ranks(uses_safety(safety, is_safety).double().sum(), self.d)),
            "kl": float(kl),
            "entropy": float(
                -sum_over_ranks((logp * mask).sum().double(), self.d) / n_tokens
            ),  # estimate from the samples
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
        s = all_reduce_sum(self.loss_stats, self.d)
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
