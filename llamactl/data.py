"""Data samplers shared by the training stages: each turns a step number into that step's batch, as a pure function,
so that a checkpoint's data position is its step and a resumed run repeats the uninterrupted one."""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from llamactl.chat_format import DialogError, check_dialog, encode_dialog
from llamactl.errors import UserError
from llamactl.tokenizer import Tokenizer
from llamactl.train import Task


class Windows:
    """Training sequences: windows of seq_len + 1 tokens at a stride of seq_len (a window's last token starts the
    next one), in a seeded random order per epoch.

    Sample g of the run is window perm_{g // n}[g % n]: a pure function of g, so the data position is one integer
    that a checkpoint restores exactly, and ranks read disjoint samples of the same global order.
    """

    def __init__(self, split, seq_len: int, seed: int, shuffle: bool = True):
        self.split, self.seq_len, self.seed, self.shuffle = split, seq_len, seed, shuffle
        self.n = (len(split) - 1) // seq_len
        self._epoch, self._perm = -1, None

    def batch(self, first: int, count: int):
        import numpy as np
        import torch

        rows = []
        for g in range(first, first + count):
            epoch, i = divmod(g, self.n)
            if self.shuffle and epoch != self._epoch:
                self._perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
                self._epoch = epoch
            w = int(self._perm[i]) if self.shuffle else i
            rows.append(self.split.tokens(w * self.seq_len, w * self.seq_len + self.seq_len + 1))
        t = torch.from_numpy(np.stack(rows))
        return t[:, :-1], t[:, 1:]


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


# ---------------------------------------------------------------------------------------------------------------------
# Dialogs for supervised fine-tuning: records -> chat-format token sequences with answer masks -> packed rows.
# ---------------------------------------------------------------------------------------------------------------------

HH_TURN = re.compile(r"\n\nHuman: |\n\nAssistant: ")


def hh_messages(text: str) -> list[dict]:
    """Anthropic HH text ("\\n\\nHuman: ...\\n\\nAssistant: ...") as chat messages; the roles are checked later by
    the chat format like any other dialog's."""
    marks = list(HH_TURN.finditer(text))
    if not marks or text[: marks[0].start()].strip():
        raise DialogError('HH text must start with "\\n\\nHuman: "')
    messages = []
    for k, m in enumerate(marks):
        end = marks[k + 1].start() if k + 1 < len(marks) else len(text)
        role = "user" if "Human" in m.group() else "assistant"
        messages.append({"role": role, "content": text[m.end() : end]})
    return messages


def record_messages(rec: dict, field: str | None) -> list[dict]:
    """The dialog of one JSONL record: ``{"messages": [...]}``, ``{"prompt", "response"}`` (with an optional
    ``"system"``), or HH text (or a message list) in ``field``. Raises DialogError naming what is wrong."""
    if field is not None:
        if field not in rec:
            raise DialogError(f"no {field!r} field (--field)")
        value = rec[field]
        messages = hh_messages(value) if isinstance(value, str) else value
    elif "messages" in rec:
        messages = rec["messages"]
    elif "prompt" in rec or "response" in rec:
        for key in ("prompt", "response"):
            if not isinstance(rec.get(key), str):
                raise DialogError(f"a prompt/response record needs a string {key!r}")
        messages = [{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": rec["response"]}]
        if isinstance(rec.get("system"), str):
            messages.insert(0, {"role": "system", "content": rec["system"]})
    else:
        raise DialogError("no 'messages', no 'prompt'/'response', and no --field naming HH text")
    check_dialog(messages)
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"].strip():
            raise DialogError(f"messages[{i}] is an empty answer")
    return messages


@dataclass
class EncodedSet:
    examples: list[tuple[np.ndarray, np.ndarray]]  # (tokens, mask) per dialog, each within the context
    cut_dialogs: int = 0  # dialogs that lost their oldest turns to fit
    cut_turns: int = 0
    dropped: int = 0  # dialogs whose last exchange alone does not fit


def encode_for_sft(tokenizer: Tokenizer, dialogs: Iterable[tuple[str, list[dict]]], max_tokens: int) -> EncodedSet:
    """Encode (where, messages) dialogs, cutting any longer than ``max_tokens`` at a turn boundary by dropping its
    oldest exchanges (the system prompt stays); a dialog with nothing to train on is an error naming ``where``."""
    out = EncodedSet([])
    for where, messages in dialogs:
        enc = encode_dialog(tokenizer, messages)
        if not any(enc.mask[1:]):
            raise UserError(f"{where}: nothing to train on (no assistant answer that counts toward the loss)")
        first = 1 if messages[0]["role"] == "system" else 0
        dropped = 0
        while len(enc.tokens) > max_tokens and len(messages) - first > 2:
            messages = messages[:first] + messages[first + 2 :]
            dropped += 1
            enc = encode_dialog(tokenizer, messages)
        if len(enc.tokens) > max_tokens or not any(enc.mask[1:]):
            out.dropped += 1
            continue
        if dropped:
            out.cut_dialogs, out.cut_turns = out.cut_dialogs + 1, out.cut_turns + dropped
        out.examples.append((np.asarray(enc.tokens, dtype=np.int64), np.asarray(enc.mask, dtype=bool)))
    return out


@dataclass
class Rows:
    """Training rows of ``seq_len`` positions: inputs, targets (-100 where nothing is predicted), the loss mask,
    per-dialog positions and segment ids (-1 on padding)."""

    tokens: np.ndarray
    targets: np.ndarray
    mask: np.ndarray
    positions: np.ndarray
    segments: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def padding_fraction(self) -> float:
        return float((self.segments < 0).mean()) if len(self) else 0.0


def pack_rows(examples: list[tuple[np.ndarray, np.ndarray]], seq_len: int, pack: bool, seed: int) -> Rows:
    """Dialogs as (input, target) positions in rows of ``seq_len``: packed by best-fit decreasing (longest dialog
    first, each into the fullest row it still fits; a dialog never straddles two rows), or one dialog a row with
    ``pack=False``. The row order is then seeded-shuffled per epoch by ``RowsTask``."""
    order = np.random.default_rng(seed).permutation(len(examples))  # ties between equal lengths: seeded
    if not pack:
        groups = [[int(i)] for i in order]
    else:
        order = sorted(order.tolist(), key=lambda i: -len(examples[i][0]))
        groups: list[list[int]] = []
        free: list[tuple[int, int]] = []  # (free positions, row), sorted
        for i in order:
            n = len(examples[i][0]) - 1
            k = bisect.bisect_left(free, (n, -1))
            if k == len(free):
                groups.append([])
                row, room = len(groups) - 1, seq_len
            else:
                room, row = free.pop(k)
            groups[row].append(i)
            if room - n > 0:
                bisect.insort(free, (room - n, row))
    R = len(groups)
    rows = Rows(
        tokens=np.zeros((R, seq_len), np.int64),
        targets=np.full((R, seq_len), -100, np.int64),
        mask=np.zeros((R, seq_len), bool),
        positions=np.zeros((R, seq_len), np.int64),
        segments=np.full((R, seq_len), -1, np.int64),
    )
    for r, group in enumerate(groups):
        at = 0
        for seg, i in enumerate(group):
            toks, mask = examples[i]
            n = len(toks) - 1
            rows.tokens[r, at : at + n] = toks[:-1]
            rows.targets[r, at : at + n] = toks[1:]
            rows.mask[r, at : at + n] = mask[1:]
            rows.positions[r, at : at + n] = np.arange(n)
            rows.segments[r, at : at + n] = seg
            at += n
    return rows


class RowsTask(Task):
    """Supervised fine-tuning on ``Rows``: the loss counts the masked target tokens (the answers). Sample g of the
    run is row perm_{g // R}[g % R], a seeded permutation per epoch: a pure function of g, as ``Windows``."""

    def __init__(self, rows: Rows, batch_size: int, accum: int, device, seed: int, val: Rows | None = None):
        self.rows, self.batch_size, self.accum, self.device, self.seed = rows, batch_size, accum, device, seed
        self.val = val
        self.packed = bool((rows.segments > 0).any())
        self._epoch, self._perm = -1, None
        self.rank, self.world = 0, 1

    def _row(self, g: int) -> int:
        epoch, i = divmod(g, len(self.rows))
        if epoch != self._epoch:
            self._perm = np.random.default_rng(self.seed + 1000 + epoch).permutation(len(self.rows))
            self._epoch = epoch
        return int(self._perm[i])

    def batch(self, step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        self.rank, self.world = rank, world
        first = step * self.accum * world * self.batch_size + (micro * world + rank) * self.batch_size
        return _take(self.rows, [self._row(g) for g in range(first, first + self.batch_size)])

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
