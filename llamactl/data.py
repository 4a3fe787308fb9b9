"""Records (``llamactl.records``) made into what the training stages batch: pretraining windows, dialogs encoded in
the chat format with answer masks and packed into rows, preference pairs encoded with their margins and packed for
one forward, the scalar head's score at each sequence's end; and the seeded orders (``EpochOrder``, the validation
split) that turn a step number into that step's items as a pure function, so a checkpoint's data position is its
step and a resumed run repeats the uninterrupted one. The tasks that batch them are ``llamactl.training.tasks``."""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from llamactl.chat_format import EncodedDialog, encode_dialog
from llamactl.errors import UserError
from llamactl.records import RATINGS, Pair, rating_label
from llamactl.tokenizer import Tokenizer


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


# ---------------------------------------------------------------------------------------------------------------------
# Dialogs for supervised fine-tuning: records -> chat-format token sequences with answer masks -> packed rows.
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class EncodedSet:
    examples: list[tuple[np.ndarray, np.ndarray]]  # (tokens, mask) per dialog, each within the context
    cut_dialogs: int = 0  # dialogs that lost their oldest turns to fit
    cut_turns: int = 0
    dropped: int = 0  # dialogs whose last exchange alone does not fit


def fit_dialog(tokenizer: Tokenizer, messages: list[dict], max_tokens: int) -> tuple[EncodedDialog, int]:
    """The dialog encoded, cut at a turn boundary to at most ``max_tokens`` by dropping its oldest exchanges (the
    system prompt and the last exchange stay), and how many were dropped; the result is still longer when its last
    exchange alone does not fit."""
    enc = encode_dialog(tokenizer, messages)
    first = 1 if messages[0]["role"] == "system" else 0
    dropped = 0
    while len(enc.tokens) > max_tokens and len(messages) - first > 2:
        messages = messages[:first] + messages[first + 2 :]
        dropped += 1
        enc = encode_dialog(tokenizer, messages)
    return enc, dropped


def encode_for_sft(tokenizer: Tokenizer, dialogs: Iterable[tuple[str, list[dict]]], max_tokens: int) -> EncodedSet:
    """Encode (where, messages) dialogs, cutting any longer than ``max_tokens`` at a turn boundary by dropping its
    oldest exchanges (the system prompt stays); a dialog with nothing to train on is an error naming ``where``."""
    out = EncodedSet([])
    for where, messages in dialogs:
        if not any(encode_dialog(tokenizer, messages).mask[1:]):
            raise UserError(f"{where}: nothing to train on (no assistant answer that counts toward the loss)")
        enc, dropped = fit_dialog(tokenizer, messages, max_tokens)
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


class EpochOrder:
    """Which item sample g of a run is: item perm_{g // n}[g % n], a seeded permutation per epoch, so the items of
    (step, micro-step, rank) are a pure function of those numbers (what makes a resumed run exact)."""

    def __init__(self, n: int, batch_size: int, accum: int, seed: int):
        self.n, self.batch_size, self.accum, self.seed = n, batch_size, accum, seed
        self._epoch, self._perm = -1, None

    def item(self, g: int) -> int:
        epoch, i = divmod(g, self.n)
        if epoch != self._epoch:
            self._perm = np.random.default_rng(self.seed + 1000 + epoch).permutation(self.n)
            self._epoch = epoch
        return int(self._perm[i])

    def items(self, step: int, micro: int, rank: int, world: int) -> list[int]:
        first = step * self.accum * world * self.batch_size + (micro * world + rank) * self.batch_size
        return [self.item(g) for g in range(first, first + self.batch_size)]


def split_val(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """A seeded held-out share of ``items`` (at least one when asked for), and the rest."""
    if fraction <= 0 or len(items) < 2:
        return items, []
    order = np.random.default_rng(seed).permutation(len(items))
    n_val = max(1, round(fraction * len(items)))
    val = set(order[:n_val].tolist())
    return [x for i, x in enumerate(items) if i not in val], [x for i, x in enumerate(items) if i in val]


# ---------------------------------------------------------------------------------------------------------------------
# Preference pairs for reward models: records -> (chosen, rejected) dialogs with a rating -> token sequences, the two
# of a pair in one forward batch (packed with the other pairs' sequences) -> the margin ranking loss.
# ---------------------------------------------------------------------------------------------------------------------

# Llama 2, Table 27: the margin m(r) per rating level, small and large.
MARGINS = {"small": (1.0, 2 / 3, 1 / 3, 0.0), "large": (3.0, 2.0, 1.0, 0.0)}


@dataclass
class PairSet:
    chosen: list[np.ndarray]  # token ids of each whole dialog (BOS ... answer EOS)
    rejected: list[np.ndarray]
    margins: np.ndarray  # (N,) float32, m(r) of each pair under the run's --margin
    labels: list[str]  # rating_label of each pair, for accuracy per rating
    cut: int = 0  # pairs whose dialogs lost their oldest exchanges to fit
    dropped: int = 0  # pairs whose last exchange alone does not fit

    def __len__(self) -> int:
        return len(self.chosen)


def pair_margin(rating: str | float | None, margin: str) -> float:
    if rating is None or margin == "none":
        return 0.0
    return float(rating) if isinstance(rating, float) else MARGINS[margin][RATINGS.index(rating)]


def encode_pairs(tokenizer: Tokenizer, pairs: Iterable[Pair], max_tokens: int, margin: str) -> PairSet:
    """Encode pairs with the chat format (the score is read at the answer's EOS); dialogs longer than ``max_tokens``
    lose their oldest exchanges (``fit_dialog``, as ``score`` cuts them; the same number from both sides, so both
    answers are judged after the same context), and a pair whose last exchange alone does not fit is left out
    (counted)."""
    out = PairSet([], [], np.zeros(0, np.float32), [])
    margins = []
    for pair in pairs:
        (c, c_cut), (r, r_cut) = (fit_dialog(tokenizer, m, max_tokens) for m in (pair.chosen, pair.rejected))
        if c_cut != r_cut:  # both answers are judged after the same context: cut both as the longer needs
            first = 1 if pair.chosen[0]["role"] == "system" else 0
            cut = max(c_cut, r_cut)
            c, r = (encode_dialog(tokenizer, m[:first] + m[first + 2 * cut :]) for m in (pair.chosen, pair.rejected))
        ct, rt = c.tokens, r.tokens
        if max(len(ct), len(rt)) > max_tokens:
            out.dropped += 1
            continue
        out.cut += bool(c_cut or r_cut)
        out.chosen.append(np.asarray(ct, np.int64))
        out.rejected.append(np.asarray(rt, np.int64))
        margins.append(pair_margin(pair.rating, margin))
        out.labels.append(rating_label(pair.rating))
    out.margins = np.asarray(margins, np.float32)
    return out


def pack_sequences(seqs: list[np.ndarray], pack: bool) -> dict[str, torch.Tensor]:
    """Whole sequences in rows as wide as the longest: first-fit decreasing (a sequence never straddles rows;
    attention kept inside each by segment ids, positions restarting at 0) or one a row with ``pack=False``.
    ``last`` (N,) is the flat index (row * width + column) of each sequence's last token, in input order."""
    width = max(len(s) for s in seqs)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i])) if pack else list(range(len(seqs)))
    rows: list[list[int]] = []
    used: list[int] = []
    for i in order:
        n = len(seqs[i])
        k = next((k for k in range(len(rows)) if used[k] + n <= width), None) if pack else None
        if k is None:
            rows.append([])
            used.append(0)
            k = len(rows) - 1
        rows[k].append(i)
        used[k] += n
    tokens = np.zeros((len(rows), width), np.int64)
    positions = np.zeros((len(rows), width), np.int64)
    segments = np.full((len(rows), width), -1, np.int64)
    last = np.zeros(len(seqs), np.int64)
    for r, members in enumerate(rows):
        at = 0
        for seg, i in enumerate(members):
            n = len(seqs[i])
            tokens[r, at : at + n] = seqs[i]
            positions[r, at : at + n] = np.arange(n)
            segments[r, at : at + n] = seg
            last[i] = r * width + at + n - 1
            at += n
    out = {"tokens": torch.from_numpy(tokens), "last": torch.from_numpy(last)}
    if pack and any(len(m) > 1 for m in rows):
        out.update(positions=torch.from_numpy(positions), segments=torch.from_numpy(segments))
    return out


def sequence_scores(model, batch: dict[str, torch.Tensor], device) -> torch.Tensor:
    """The scalar head's output at each sequence's last token (N,) fp32, for a batch made by ``pack_sequences``."""
    pos, seg = batch.get("positions"), batch.get("segments")
    scores = model(
        batch["tokens"].to(device),
        positions=pos.to(device) if pos is not None else None,
        segment_ids=seg.to(device) if seg is not None else None,
        output="scores",
    )  # (rows, width)
    return scores.reshape(-1).index_select(0, batch["last"].to(device))


# ---------------------------------------------------------------------------------------------------------------------
# Documents for eval and quantize's calibration: text or token ids.
# ---------------------------------------------------------------------------------------------------------------------


def document_ids(docs: list[tuple[str, str | list]], tokenizer, vocab_size: int) -> list[list[int]]:
    """Each document as token ids: text encoded with a BOS in front, ids checked against the vocabulary."""
    from llamactl.jsonl import check_token_ids

    out = []
    for where, doc in docs:
        if isinstance(doc, str):
            out.append(tokenizer.encode(doc, bos=True))
            continue
        out.append(check_token_ids(doc, vocab_size, where))
    return out
