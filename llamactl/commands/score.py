"""``llamactl score``: a reward model's score for each answer of a JSONL stream of dialogs.

Records are dialogs ending with the assistant's answer (``{"messages": [...]}``, ``{"prompt", "response"}``, or HH
text in ``--field``); each goes out with ``score`` (the raw scalar, read at the answer's EOS as in training) and
``score_prob`` (its sigmoid) added, in order, batch by batch.
"""

from __future__ import annotations

from dataclasses import dataclass

from llamactl.errors import UserError


@dataclass(kw_only=True)
class ScoreConfig:
    model: str
    input: str = "-"
    output: str = "-"
    field: str | None = None  # a record field holding HH text (or a message list)
    batch_size: int = 16
    device: str = "auto"
    dtype: str = "auto"
    adapter: str | None = None  # a LoRA adapter trained on the model (making it a reward model, or trained further)

    def validate(self) -> None:
        from llamactl.files import io_problems

        problems = [] if self.batch_size >= 1 else [f"--batch-size must be at least 1, got {self.batch_size}"]
        problems += io_problems(
            [
                ("-m/--model", self.model, "checkpoint", False),
                ("--adapter", self.adapter, "adapter file", False),
                ("-i/--input", self.input, "JSONL file", True),
            ],
            self.output,
        )
        if problems:
            raise UserError("; ".join(problems))


def run(cfg: ScoreConfig) -> int:
    """Score every record; returns how many were written. A regular file is checked whole before anything is
    written; a pipe is scored as it arrives."""
    import torch

    from llamactl.device import resolve_device
    from llamactl.jsonl import BATCH_WAIT_S, batches, check_free, dumps, open_output, parsed_records
    from llamactl.progress import progress
    from llamactl.reward import Scorer, answer_tokens

    cfg.validate()
    scorer = Scorer(cfg.model, resolve_device(cfg.device), cfg.dtype, cfg.batch_size, cfg.adapter)

    def parse(where: str, rec: dict):
        check_free(rec, ("score", "score_prob"), where)
        return rec, answer_tokens(scorer, rec, cfg.field, where)

    items, total = parsed_records(cfg.input, parse, BATCH_WAIT_S)
    n = 0
    with open_output(cfg.output) as out, progress("score", "seq", total=total) as bar:
        for chunk in batches(items, cfg.batch_size):
            scores = scorer.score([ids for _, ids in chunk])
            for (rec, _), s in zip(chunk, scores.tolist(), strict=True):
                out.write(dumps({**rec, "score": s, "score_prob": float(torch.sigmoid(torch.tensor(s)))}) + "\n")
            out.flush()
            n += len(chunk)
            bar.update(len(chunk))
    return n
