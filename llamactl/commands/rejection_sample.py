"""``llamactl rejection-sample``: Llama 2's rejection sampling (section 3.2.3): K answers per prompt, the best under
the reward models kept, written as dialogs ready for ``sft``.

Each prompt (``{"messages": [...]}`` ending with a user turn, or ``{"prompt": "..."}`` as one user turn, with an
optional ``"system"``; other fields pass through) is prefilled once and its KV cache forked to its K samples
(``generate.sample_k``). Every answer is scored by the helpfulness reward model (and the safety one, with
``--safety-rm``) on the dialog as it is written out (the answer appended, encoded in the chat format and closed by its
EOS, as ``score`` reads it), and the two scores are combined per sample by the hybrid rule ppo uses
(``reward.hybrid_reward``): the safety score where the prompt carries ``"is_safety": true`` or the answer's safety
probability is below 0.15, else the helpfulness score.

Best: the sample with the highest combined score R_c; a tie goes to the earlier sample. R_c is computed per sample
from that sample's scores alone, so no whitening is involved (it would not change an argmax over one prompt's
samples). An answer that is empty once its EOS is dropped and it is stripped (the chat format strips answers) is
not scored (``null`` in ``scores``) and never chosen nor kept: it could not be trained on. A prompt whose K answers
are all empty is left out of the output, and the count is said on stderr.

Out, in input order: the record with the chosen answer appended to ``messages`` (a ``prompt`` record becomes a
dialog), ``score`` (its R_c), ``scores`` (the R_c of all K samples, ``null`` for an empty one), ``sampled_by`` (the
policy that sampled it) and ``pooled_from`` (null, or the ``--pool`` record it was taken from as ``file:line``).
``--keep all`` writes every non-empty sample instead, each with its ``score``, ``sample`` (its index among the K)
and ``best``.

``--pool PREVIOUS.jsonl`` (earlier outputs of this command, several concatenated if wished) keeps, per prompt, the
better of this run's best answer and the best pool record for the same prompt dialog (the same roles and contents in
the same order); a pool record wins only with a strictly higher score. A pool record whose prompt is not one of
this run's is an error: it comes from another prompt set. The pool's scores are compared as they are, so they must
come from the same reward models.

Under torchrun each rank samples the prompts r, r + world, ...; rank 0 gathers each round and writes in input
order. The samples depend on the world size (each rank draws from its own seeded generator).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from llamactl.errors import UserError
from llamactl.flags import SamplingFlags

if TYPE_CHECKING:
    from llamactl.records import Prompt
    from llamactl.reward import Judge

WRITES = {"best": ("score", "scores", "sampled_by", "pooled_from"), "all": ("score", "sample", "best", "sampled_by")}
KEEPS = tuple(WRITES)  # --keep


@dataclass(kw_only=True)
class RejectionSampleConfig(SamplingFlags):
    model: str
    rm: str
    safety_rm: str | None = None
    input: str = "-"
    output: str = "-"
    k: int = 4
    keep: str = "best"
    pool: str | None = None
    # NOTE: pure sampling at 1.0: the paper finds the best temperature for rejection sampling at or above 1 and
    # rising over iterations (Figure 8); the chat defaults (0.6, top-p 0.9) make the K samples much alike.
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 4  # prompts at once: batch_size * k rows decode together
    adapter: str | None = None  # LoRA adapters trained on the policy, the reward model, the safety reward model
    rm_adapter: str | None = None
    safety_rm_adapter: str | None = None

    def validate(self) -> None:
        from llamactl.files import io_problems
        from llamactl.flags import sampling_problems

        problems = sampling_problems(self)
        if self.k < 1:
            problems.append(f"-k must be at least 1, got {self.k}")
        if self.keep not in KEEPS:
            problems.append(f"--keep {self.keep!r} is not one of {', '.join(KEEPS)}")
        if self.pool is not None and self.keep == "all":
            problems.append("--pool keeps one answer per prompt; --keep all writes every sample: give one of them")
        if self.safety_rm_adapter is not None and self.safety_rm is None:
            problems.append("--safety-rm-adapter goes on a --safety-rm, and none is given")
        problems += io_problems(
            [
                ("-m/--model", self.model, "checkpoint", False),
                ("--rm", self.rm, "checkpoint", False),
                ("--safety-rm", self.safety_rm, "checkpoint", False),
                ("--adapter", self.adapter, "adapter file", False),
                ("--rm-adapter", self.rm_adapter, "adapter file", False),
                ("--safety-rm-adapter", self.safety_rm_adapter, "adapter file", False),
                ("-i/--input", self.input, "prompts JSONL file", True),
                ("--pool", self.pool, "JSONL file", True),
            ],
            self.output,
        )
        if problems:
            raise UserError("; ".join(problems))


# -------------------------------------------------------------------------------------------------- the judge


def best(scores: list[float | None]) -> int | None:
    """The index of the highest score (the first of equal ones), None when no sample was scored."""
    top = None
    for i, s in enumerate(scores):
        if s is not None and (top is None or s > scores[top]):
            top = i
    return top


# ---------------------------------------------------------------------------------------------------- the pool


def dialog_key(messages: list[dict]) -> tuple:
    return tuple((m["role"], m["content"]) for m in messages)


def read_pool(path: str, prompts: list[Prompt]) -> dict[tuple, tuple[float, dict, str]]:
    """Per prompt dialog, the best record of the pool file (score, record, "file:line"); the first of equal scores."""
    import math

    from llamactl.chat_format import DialogError, check_dialog
    from llamactl.jsonl import display_name, read_jsonl
    from llamactl.jsonl import field as get_field

    wanted = {dialog_key(p.messages) for p in prompts}
    name = display_name(path)
    pool: dict[tuple, tuple[float, dict, str]] = {}
    for lineno, rec in read_jsonl(path):
        where = f"{name}:{lineno}"
        try:
            messages = check_dialog(rec.get("messages"))
        except DialogError as e:
            raise UserError(f"{where}: --pool: {e}") from None
        if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
            raise UserError(f"{where}: --pool: the dialog does not end with an answer; a pool holds this command's "
                            f"output")  # fmt: skip
        score = get_field(rec, "score", (int, float), where)
        if not math.isfinite(score):
            raise UserError(f"{where}: --pool: field 'score' must be a finite number, got {score!r}")
        key = dialog_key(messages[:-1])
        if key not in wanted:
            raise UserError(f"{where}: --pool: its prompt is not one of this run's prompts (a pool from another "
                            f"prompt set?)")  # fmt: skip
        if key not in pool or score > pool[key][0]:
            pool[key] = (float(score), rec, where)
    return pool


# ------------------------------------------------------------------------------------------------------ the run


def sample_and_judge(chat, judge: Judge, chunk: list[Prompt], k: int, bar) -> list[tuple[int, list, list]]:
    """(prompt index, K answers, K scores or None) for each prompt of ``chunk``."""
    from llamactl.generate import sample_k

    texts = [[""] * k for _ in chunk]
    for i, j, completion in sample_k(chat.model, [p.ids for p in chunk], k, chat.params, chat.tokenizer.eos_id,
                                     chat.generator, timings=chat.timings):  # fmt: skip
        texts[i][j] = chat.text([], completion.tokens)  # EOS dropped, stripped
        bar.update(1)
    items = [(i, j) for i in range(len(chunk)) for j in range(k) if texts[i][j]]
    scores: list[list[float | None]] = [[None] * k for _ in chunk]
    if items:
        reward, _, _ = judge.judge([(chunk[i], texts[i][j]) for i, j in items])
        for (i, j), r in zip(items, reward.tolist(), strict=True):
            scores[i][j] = r
    return [(p.index, texts[i], scores[i]) for i, p in enumerate(chunk)]


def records(prompt: Prompt, texts: list[str], scores: list, cfg: RejectionSampleConfig, pool: dict) -> list[dict]:
    """The output records of one prompt (none when all its answers were empty)."""
    from llamactl.policy import policy_name

    chosen = best(scores)
    if cfg.keep == "all":
        return [
            {**prompt.rec, "messages": [*prompt.messages, {"role": "assistant", "content": text}], "score": s,
             "sample": j, "best": j == chosen, "sampled_by": policy_name(cfg.model, cfg.adapter)}
            for j, (text, s) in enumerate(zip(texts, scores, strict=True)) if s is not None
        ]  # fmt: skip
    pooled = pool.get(dialog_key(prompt.messages))
    if pooled is not None and (chosen is None or pooled[0] > scores[chosen]):
        score, rec, where = pooled
        answer = rec["messages"][-1]
        by = rec.get("sampled_by")
        return [{**prompt.rec, "messages": [*prompt.messages, answer], "score": score, "scores": scores,
                 "sampled_by": by, "pooled_from": where}]  # fmt: skip
    if chosen is None:
        return []
    answer = {"role": "assistant", "content": texts[chosen]}
    return [{**prompt.rec, "messages": [*prompt.messages, answer], "score": scores[chosen], "scores": scores,
             "sampled_by": policy_name(cfg.model, cfg.adapter), "pooled_from": None}]  # fmt: skip


def run(cfg: RejectionSampleConfig) -> int:
    """Sample, judge and write; returns the number of records written (on rank 0; 0 on the others)."""
    import contextlib
    import sys

    import torch.distributed as dist

    from llamactl.config import check_memory, kv_cache_bytes
    from llamactl.device import resolve_device
    from llamactl.jsonl import display_name, dumps, open_output, streams
    from llamactl.policy import load_policy
    from llamactl.progress import progress
    from llamactl.records import read_prompts
    from llamactl.reward import Judge
    from llamactl.training.distributed import init_distributed

    cfg.validate()
    d, device = init_distributed(resolve_device(cfg.device))
    if d.world > 1 and streams(cfg.input):
        raise UserError(f"-i/--input {display_name(cfg.input)}: under torchrun every rank reads the prompts; give a "
                        "file")  # fmt: skip
    chat, meta = load_policy(cfg.model, device, cfg.dtype, cfg, cfg.adapter)
    chat.generator.manual_seed(cfg.seed + d.rank)  # each rank its own draws
    judge = Judge(cfg.rm, cfg.safety_rm, device, cfg.dtype, cfg.batch_size * cfg.k, cfg.rm_adapter,
                  cfg.safety_rm_adapter)  # fmt: skip
    judge.check_fits(meta.tokenizer, cfg.model)
    prompts = read_prompts(cfg.input, WRITES[cfg.keep])
    for p in prompts:
        p.ids = chat.prompt_tokens(p.messages, p.where)
        judge.check_room(p, min(cfg.max_new_tokens, chat.context - len(p.ids)))
    pool = read_pool(cfg.pool, prompts) if cfg.pool is not None else {}

    mine = prompts[d.rank :: d.world]
    chat.compile(cfg.compile, len(mine) * cfg.k * cfg.max_new_tokens, cfg.batch_size * cfg.k)
    B = cfg.batch_size
    rounds = -(-len(prompts) // (B * d.world))  # every rank takes part in every round's gather
    dtype = chat.model.tok_embeddings.weight.dtype
    n = left_out = 0
    with (
        open_output(cfg.output) if d.main else contextlib.nullcontext() as out,
        progress("rejection-sample", "sample", total=len(mine) * cfg.k, disable=not d.main) as bar,
    ):
        for r in range(rounds):
            chunk = mine[r * B : (r + 1) * B]
            results = []
            if chunk:
                longest = min(max(len(p.ids) for p in chunk) + cfg.max_new_tokens, chat.context)
                need = kv_cache_bytes(chat.model.args, len(chunk) * (cfg.k + 1), longest, dtype)
                check_memory(need, f"the KV cache of {len(chunk)} x {cfg.k} samples", cfg.model, device)
                results = sample_and_judge(chat, judge, chunk, cfg.k, bar)
            if d.world > 1:
                gathered = [None] * d.world if d.main else None
                dist.gather_object(results, gathered, dst=0)
                results = sorted((x for part in gathered or [] for x in part), key=lambda x: x[0])
            if not d.main:
                continue
            for index, texts, scores in results:
                recs = records(prompts[index], texts, scores, cfg, pool)
                left_out += not recs
                for rec in recs:
                    out.write(dumps(rec) + "\n")
                n += len(recs)
            out.flush()
    if left_out and d.main:
        print(f"rejection-sample: {left_out} prompt(s) left out: all {cfg.k} answers were empty", file=sys.stderr)
    if cfg.timings:
        chat.report(f"rank {d.rank}" if d.world > 1 else "")
    return n
