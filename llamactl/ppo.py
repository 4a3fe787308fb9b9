"""PPO's pieces (Llama 2, section 3.2.3): the actor-critic pair, the reference policy of a LoRA run, the prompts'
tokens, GAE over the answer tokens, the KL-penalised per-token rewards and the reductions over ranks of an
iteration's samples. ``llamactl.training.tasks.PPOTask`` makes the rollouts and the loss from them;
``llamactl.commands.ppo`` wires them to the command line."""

from __future__ import annotations

import torch

from llamactl.errors import UserError
from llamactl.training.distributed import all_reduce_sum

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
    from llamactl.files import display_name
    from llamactl.records import read_prompts

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


def whiten_masked(x: torch.Tensor, mask: torch.Tensor, d) -> torch.Tensor:
    """Advantages whitened over every answer token of the iteration (all ranks)."""
    s = all_reduce_sum(torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum().float()]).double(), d)
    mean = s[0] / s[2]
    var = (s[1] / s[2] - mean**2).clamp(min=0)
    return ((x - mean) / (var.sqrt() + 1e-8) * mask).float()
