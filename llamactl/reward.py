"""Reward models: a scalar head on the Llama trunk, scoring a dialog at the last token of its answer (the EOS), and
the reward rule Llama 2's RLHF stages share (section 3.2.3 and 3.2.2's safety/helpfulness hybrid).

``rejection-sample``, ``ppo`` and ``compare`` all score through ``Scorer`` and combine the two models' scores with
``hybrid_reward``; ``train-rm`` makes the models (``reward_init`` swaps the language-model head for the scalar one).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from llamactl.checkpoint import CheckpointMeta
from llamactl.errors import UserError

# Llama 2, section 3.4.2: a prompt whose safety score's sigmoid is below 0.15 is judged unsafe, and the safety
# reward decides; the same threshold gives the violation rate of Figure 3 (compare --safety-rm).
SAFETY_THRESHOLD = 0.15


def reward_init(meta: CheckpointMeta, tensors: dict[str, torch.Tensor]) -> tuple[CheckpointMeta, dict]:
    """A reward model's starting point from a chat or base checkpoint: the same trunk, the next-token head replaced by
    a scalar head (zeros: every pair starts at loss log 2 and the trunk learns from the second step on). A scalar-head
    checkpoint (a reward model trained further) is returned as it is."""
    if meta.args.head == "scalar":
        return meta, tensors
    args = replace(meta.args, head="scalar", tie_embeddings=False)
    out = {k: v for k, v in tensors.items() if k != "output.weight"}
    out["score.weight"] = torch.zeros(1, args.dim, dtype=tensors["tok_embeddings.weight"].dtype)
    return replace(meta, args=args), out


def same_tokenizer(a: bytes | None, b: bytes | None) -> bool:
    return a is not None and a == b


class Scorer:
    """A loaded reward model: ``score(token lists)`` gives one scalar per sequence, read at its last token, in
    batches of ``batch_size`` sequences packed into rows (attention kept inside each)."""

    def __init__(self, path: str, device: torch.device, dtype: str, batch_size: int = 8, adapter: str | None = None):
        from llamactl.loading import load_for_inference
        from llamactl.tokenizer import Tokenizer

        self.path, self.batch_size, self.device = path, batch_size, device
        self.model, self.meta = load_for_inference(path, device, dtype, "scalar", "to score with", adapter=adapter)
        self.tokenizer = Tokenizer(self.meta.tokenizer, path)
        self.role = self.meta.role

    @property
    def context(self) -> int:
        return self.model.args.max_seq_len

    @torch.inference_mode()
    def score(self, sequences: list[list[int]]) -> torch.Tensor:
        """Raw scores (N,) fp32 on the CPU; longest first within each batch so packing has little to fill."""
        from llamactl.data import pack_sequences, sequence_scores

        out = torch.empty(len(sequences))
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        for s in range(0, len(order), self.batch_size):
            idx = order[s : s + self.batch_size]
            batch = pack_sequences([torch.tensor(sequences[i]).numpy() for i in idx], pack=True)
            out[idx] = sequence_scores(self.model, batch, self.device).float().cpu()
        return out

    def check_fits(self, other_tokenizer: bytes | None, other: str, flag: str) -> None:
        """Refuse a reward model whose tokenizer is not the policy's: its scores would read other tokens."""
        if not same_tokenizer(self.meta.tokenizer, other_tokenizer):
            raise UserError(f"{flag} {self.path}: its tokenizer differs from {other}'s; a reward model must share it")


def hybrid_reward(helpful: torch.Tensor, safety: torch.Tensor | None, is_safety: torch.Tensor) -> torch.Tensor:
    """Llama 2's R_c (eq. in section 3.2.3): the safety score where the prompt is a safety prompt or the answer's
    safety probability is below 0.15, else the helpfulness score; the helpfulness score alone without a safety
    model."""
    if safety is None:
        return helpful
    return torch.where(uses_safety(safety, is_safety), safety, helpful)


def uses_safety(safety: torch.Tensor | None, is_safety: torch.Tensor) -> torch.Tensor:
    """Which samples the hybrid rule gives the safety score (all False without a safety model)."""
    if safety is None:
        return torch.zeros_like(is_safety)
    return is_safety | (torch.sigmoid(safety) < SAFETY_THRESHOLD)


def whiten(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the batch (the population std; a batch of one is only centred)."""
    if x.numel() < 2:
        return x - x.mean()
    return (x - x.mean()) / (x.std(unbiased=False) + eps)


def logit(p: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    p = p.clamp(eps, 1 - eps)
    return torch.log(p) - torch.log1p(-p)


def shaped_reward(helpful: torch.Tensor, safety: torch.Tensor | None, is_safety: torch.Tensor) -> torch.Tensor:
    """R~_c = WHITEN(LOGIT(R_c)) as the paper writes it, over the batch. The reward models' outputs are logits
    already (the ranking loss is a logistic one), so LOGIT(sigmoid(R_c)) is R_c itself, up to the clamp that keeps
    saturated scores finite: what is whitened is the raw score."""
    return whiten(logit(torch.sigmoid(hybrid_reward(helpful, safety, is_safety))))


def answer_tokens(scorer: Scorer, rec: dict, field: str | None, where: str) -> list[int]:
    """The record's dialog as the reward model reads it: chat format, ending with an answer and its EOS, its oldest
    exchanges dropped when it outgrows the model's context (as ``train-rm`` cuts them)."""
    from llamactl.chat_format import DialogError
    from llamactl.data import fit_dialog
    from llamactl.records import record_messages

    try:
        messages = record_messages(rec, field)
    except DialogError as e:
        raise UserError(f"{where}: {e}") from None
    if messages[-1]["role"] != "assistant":
        raise UserError(f"{where}: the dialog ends with the user's turn; a score needs the answer to score")
    enc, _ = fit_dialog(scorer.tokenizer, messages, scorer.context)
    if len(enc.tokens) > scorer.context:
        raise UserError(f"{where}: its last exchange alone takes {len(enc.tokens)} tokens; the context holds "
                        f"{scorer.context}")  # fmt: skip
    return enc.tokens


class Judge:
    """The helpfulness reward model and, optionally, the safety one: each answer's scores and the hybrid R_c. Each
    may come with a LoRA adapter file (``rm_adapter``, ``safety_adapter``)."""

    def __init__(self, rm: str, safety_rm: str | None, device, dtype: str, batch_size: int,
                 rm_adapter: str | None = None, safety_adapter: str | None = None):  # fmt: skip
        self.helpful = Scorer(rm, device, dtype, batch_size, rm_adapter)
        self.safety = Scorer(safety_rm, device, dtype, batch_size, safety_adapter) if safety_rm is not None else None

    @property
    def scorers(self) -> list[tuple[str, object]]:
        return [("--rm", self.helpful)] + ([("--safety-rm", self.safety)] if self.safety is not None else [])

    def check_fits(self, tokenizer_bytes: bytes | None, policy: str) -> None:
        for flag, scorer in self.scorers:
            scorer.check_fits(tokenizer_bytes, policy, flag)

    def check_room(self, prompt, answer_tokens: int) -> None:
        """Refuse a prompt whose last turn and an answer of ``answer_tokens`` tokens (and its EOS) would not fit a
        reward model's context, before anything is sampled (older exchanges are dropped as ``score`` drops them)."""
        from llamactl.data import fit_dialog

        for flag, scorer in self.scorers:
            room = scorer.context - answer_tokens - 1
            enc, _ = fit_dialog(scorer.tokenizer, prompt.messages, max(room, 0))
            if len(enc.tokens) > room:
                need = len(enc.tokens) + answer_tokens + 1
                raise UserError(f"{prompt.where}: its last turn ({len(enc.tokens)} tokens), an answer of up to "
                                f"{answer_tokens} tokens and its EOS need {need} tokens, more than the context of "
                                f"{flag} {scorer.path} ({scorer.context}); lower --max-new-tokens")  # fmt: skip

    def judge(self, items: list[tuple]):
        """(R_c, helpfulness, safety or None) tensors (N,) for (``data.Prompt``, non-empty answer) pairs. Equal pairs
        are scored once: the same answer gets the same score (packed into other rows, its score would move in the last
        bits, and compare's tie of two equal answers with it)."""
        unique: dict[tuple, int] = {}  # (prompt, answer) -> its place among the scored sequences
        pairs, slots = [], []
        for p, text in items:
            if (p.index, p.where, text) not in unique:
                unique[p.index, p.where, text] = len(pairs)
                pairs.append((p, text))
            slots.append(unique[p.index, p.where, text])

        def scores(scorer):
            seqs = [answer_tokens(scorer, {"messages": [*p.messages, {"role": "assistant", "content": text}]},
                                  None, p.where) for p, text in pairs]  # fmt: skip
            return scorer.score(seqs)[torch.tensor(slots, dtype=torch.long)]

        helpful = scores(self.helpful)
        safety = scores(self.safety) if self.safety is not None else None
        is_safety = torch.tensor([p.is_safety for p, _ in items], dtype=torch.bool)
        return hybrid_reward(helpful, safety, is_safety), helpful, safety
