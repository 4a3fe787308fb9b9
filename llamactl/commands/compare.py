"""``llamactl compare``: the win rate of model A against model B as a reward model judges it (Llama 2's Figure 11),
and with ``--safety-rm`` each model's violation rate (the measure behind Figure 3).

Both models answer every prompt once (the prompt records ``rejection-sample`` reads; each model samples with its
own generator seeded by ``--seed``, so a model compared with itself ties everywhere). Each answer gets the score
rejection-sample ranks by: the helpfulness reward model's, or with ``--safety-rm`` the hybrid R_c (the safety score
for ``"is_safety": true`` prompts and for answers whose safety probability is below 0.15, else the helpfulness
score). A wins a prompt when its score exceeds B's by more than ``--tie-margin``, loses when B's exceeds its by more,
and ties otherwise (the default margin 0 makes only equal scores a tie). An empty answer (nothing left once its EOS
is dropped and it is stripped) is not scored: it loses to any answer, and two empty answers tie.

The summary, one JSON object: ``n``, ``wins``/``ties``/``losses`` and ``win_rate``/``tie_rate``/``loss_rate`` (shares
of n), ``win_rate_ties_half`` = (wins + ties / 2) / n (0.5: as good as B) and ``ci95``, its Wilson score interval at
95%. Wilson rather than the normal approximation, which collapses to a zero-width interval at 0 or 1 and undercovers
at the small n of a per-category row; rather than a bootstrap, because it is deterministic and checkable by hand.
A per-prompt outcome of 0, 1/2 or 1 has a variance no larger than a 0/1 outcome of the same mean (x^2 <= x), so the
binomial interval is conservative with ties counted as half. The same rows per ``category`` (a prompt field) under
``categories``, and with ``--safety-rm`` ``violation_rate_a``/``_b``: the share of each model's scored answers whose
safety probability (sigmoid of the safety score) is below 0.15.

``--keep FILE`` writes every prompt with ``answer_a``, ``answer_b``, ``score_a``, ``score_b`` and ``outcome`` (A's:
win, tie or loss), and with ``--safety-rm`` ``unsafe_a``/``unsafe_b``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from llamactl.errors import UserError
from llamactl.flags import SamplingFlags

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
KEEP_WRITES = ("answer_a", "answer_b", "score_a", "score_b", "outcome", "unsafe_a", "unsafe_b")


@dataclass(kw_only=True)
class CompareConfig(SamplingFlags):
    model_a: str
    model_b: str
    rm: str
    safety_rm: str | None = None
    input: str = "-"
    output: str = "-"
    keep: str | None = None
    tie_margin: float = 0.0
    adapter_a: str | None = None  # LoRA adapters trained on model A, model B, the reward model, the safety one
    adapter_b: str | None = None
    rm_adapter: str | None = None
    safety_rm_adapter: str | None = None

    def validate(self) -> None:
        from llamactl.files import check_output, io_problems, overlaps, same_file
        from llamactl.flags import sampling_problems

        problems = sampling_problems(self)
        if self.tie_margin < 0:
            problems.append(f"--tie-margin must be >= 0, got {self.tie_margin}")
        if self.safety_rm_adapter is not None and self.safety_rm is None:
            problems.append("--safety-rm-adapter goes on a --safety-rm, and none is given")
        inputs = [
            ("-a/--model-a", self.model_a, "checkpoint", False),
            ("-b/--model-b", self.model_b, "checkpoint", False),
            ("--rm", self.rm, "checkpoint", False),
            ("--safety-rm", self.safety_rm, "checkpoint", False),
            ("--adapter-a", self.adapter_a, "adapter file", False),
            ("--adapter-b", self.adapter_b, "adapter file", False),
            ("--rm-adapter", self.rm_adapter, "adapter file", False),
            ("--safety-rm-adapter", self.safety_rm_adapter, "adapter file", False),
            ("-i/--input", self.input, "prompts JSONL file", True),
        ]
        problems += io_problems(inputs, self.output)
        if self.keep is not None:
            if problem := check_output(self.keep, "--keep"):
                problems.append(problem)
            problems += overlaps([("--keep", self.keep)], [(flag, path) for flag, path, *_ in inputs if path])
            if self.keep == self.output or same_file(self.keep, self.output):
                problems.append(f"--keep {self.keep} is the -o/--output too; give it another path")
        if problems:
            raise UserError("; ".join(problems))


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``successes / n`` (n >= 1)."""
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def outcome(score_a: float | None, score_b: float | None, margin: float) -> str:
    """A's outcome against B: "win", "tie" or "loss" (None: an empty answer, which loses to any scored one)."""
    if score_a is None or score_b is None:
        return "tie" if score_a is None and score_b is None else "loss" if score_a is None else "win"
    if score_a - score_b > margin:
        return "win"
    if score_b - score_a > margin:
        return "loss"
    return "tie"


def summarize(outcomes: list[str], unsafe_a: list[bool | None] | None, unsafe_b: list[bool | None] | None) -> dict:
    """Counts, rates and the interval of one set of outcomes; violation rates over the scored answers (None for an
    empty one) when a safety model judged."""
    n = len(outcomes)
    wins, ties, losses = (outcomes.count(o) for o in ("win", "tie", "loss"))
    half = (wins + ties / 2) / n
    row = {"n": n, "wins": wins, "ties": ties, "losses": losses, "win_rate": wins / n, "tie_rate": ties / n,
           "loss_rate": losses / n, "win_rate_ties_half": half, "ci95": list(wilson(wins + ties / 2, n))}  # fmt: skip
    for name, flags in (("violation_rate_a", unsafe_a), ("violation_rate_b", unsafe_b)):
        if flags is not None:
            scored = [f for f in flags if f is not None]
            row[name] = sum(scored) / len(scored) if scored else None
    return row


def run(cfg: CompareConfig) -> dict:
    """Answer, judge and summarise; returns the summary (also written to ``--output``)."""
    import torch

    from llamactl.device import resolve_device
    from llamactl.files import display_name
    from llamactl.jsonl import dumps, open_output
    from llamactl.jsonl import field as get_field
    from llamactl.policy import load_policy
    from llamactl.progress import progress
    from llamactl.records import read_prompts
    from llamactl.reward import SAFETY_THRESHOLD, Judge

    cfg.validate()
    device = resolve_device(cfg.device)
    pairs = ((cfg.model_a, cfg.adapter_a), (cfg.model_b, cfg.adapter_b))
    models = [load_policy(path, device, cfg.dtype, cfg, adapter) for path, adapter in pairs]
    judge = Judge(cfg.rm, cfg.safety_rm, device, cfg.dtype, 2 * cfg.batch_size, cfg.rm_adapter, cfg.safety_rm_adapter)
    for (_, meta), path in zip(models, (cfg.model_a, cfg.model_b), strict=True):
        judge.check_fits(meta.tokenizer, path)
    prompts = read_prompts(cfg.input, KEEP_WRITES if cfg.keep is not None else ())
    if not prompts:
        raise UserError(f"{display_name(cfg.input)}: no prompts to compare on")
    ids = []  # per prompt, its tokens for A and for B (their contexts may differ)
    categories = []
    for p in prompts:
        categories.append(get_field(p.rec, "category", str, p.where, required=False))
        pair = [chat.prompt_tokens(p.messages, p.where) for chat, _ in models]
        for (chat, _), toks in zip(models, pair, strict=True):
            judge.check_room(p, min(cfg.max_new_tokens, chat.context - len(toks)))
        ids.append(pair)

    for chat, _ in models:
        chat.compile(cfg.compile, len(prompts) * cfg.max_new_tokens, cfg.batch_size)
    answers: list[list[str]] = [[], []]
    with progress("compare", "answer", total=2 * len(prompts)) as bar:
        for m, (chat, _) in enumerate(models):  # continuous batching, --batch-size rows at a time
            answers[m] = chat.answer_all([pair[m] for pair in ids], rows=cfg.batch_size)
            bar.update(len(ids))
    if cfg.timings:
        for name, (chat, _) in zip("AB", models, strict=True):
            chat.report(name)
    scores: list[list[float | None]] = [[None] * len(prompts), [None] * len(prompts)]
    unsafe: list[list[bool | None]] | None = [[None] * len(prompts), [None] * len(prompts)] if cfg.safety_rm else None
    for s in range(0, len(prompts), cfg.batch_size):
        # both answers to a prompt in one call: equal answers are scored once, and tie
        part = [(m, i) for i in range(s, min(s + cfg.batch_size, len(prompts))) for m in range(2) if answers[m][i]]
        if not part:
            continue
        reward, _, safety = judge.judge([(prompts[i], answers[m][i]) for m, i in part])
        bad = (torch.sigmoid(safety) < SAFETY_THRESHOLD).tolist() if safety is not None else None
        for k, ((m, i), r) in enumerate(zip(part, reward.tolist(), strict=True)):
            scores[m][i] = r
            if unsafe is not None:
                unsafe[m][i] = bad[k]
    outcomes = [outcome(a, b, cfg.tie_margin) for a, b in zip(*scores, strict=True)]

    def rows(idx: list[int]) -> dict:
        flags = [[u[i] for i in idx] for u in unsafe] if unsafe is not None else [None, None]
        return summarize([outcomes[i] for i in idx], *flags)

    summary = {"model_a": cfg.model_a, "model_b": cfg.model_b, "rm": cfg.rm, "safety_rm": cfg.safety_rm,
               "tie_margin": cfg.tie_margin, "ci_method": "Wilson 95% on win_rate_ties_half",
               **rows(list(range(len(prompts))))}  # fmt: skip
    for key in ("adapter_a", "adapter_b", "rm_adapter", "safety_rm_adapter"):
        if getattr(cfg, key) is not None:
            summary[key] = getattr(cfg, key)
    named = sorted({c for c in categories if c is not None})
    summary["categories"] = {c: rows([i for i, ci in enumerate(categories) if ci == c]) for c in named}
    if cfg.keep is not None:
        with open_output(cfg.keep) as out:
            for i, p in enumerate(prompts):
                rec = {**p.rec, "messages": p.messages, "answer_a": answers[0][i], "answer_b": answers[1][i],
                       "score_a": scores[0][i], "score_b": scores[1][i], "outcome": outcomes[i]}  # fmt: skip
                if unsafe is not None:
                    rec["unsafe_a"], rec["unsafe_b"] = unsafe[0][i], unsafe[1][i]
                out.write(dumps(rec) + "\n")
    with open_output(cfg.output) as out:
        out.write(dumps(summary) + "\n")
    return summary
