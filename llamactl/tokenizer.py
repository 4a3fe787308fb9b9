"""SentencePiece tokenizer, loaded from a file or from the bytes embedded in a checkpoint, and trained with Llama 2's
settings."""

from __future__ import annotations

import functools
import hashlib
import io
import os
import re
from collections.abc import Iterable, Sequence

import sentencepiece as spm

from llamactl.errors import UserError
from llamactl.files import require_input

# Llama 2's trainer settings, as stored in the trainer_spec of Meta's tokenizer.model: BPE, byte fallback instead
# of <unk>, digits split one per piece, identity normalisation with whitespace kept as is (a dummy prefix space
# in front, runs of spaces not collapsed), UNK 0 / BOS 1 / EOS 2 and no PAD.
LLAMA2_TRAINER_SPEC: dict[str, object] = {
    "model_type": "bpe",
    "byte_fallback": True,
    "split_digits": True,
    "normalization_rule_name": "identity",
    "remove_extra_whitespaces": False,
    "add_dummy_prefix": True,
    "allow_whitespace_only_pieces": True,
    "split_by_whitespace": True,
    "split_by_unicode_script": True,
    "split_by_number": True,
    "treat_whitespace_as_suffix": False,
    "max_sentencepiece_length": 16,
    "vocabulary_output_piece_score": True,
    "hard_vocab_limit": True,
    "unk_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "pad_id": -1,
    "unk_surface": " \u2047 ",
}
LLAMA2_VOCAB_SIZE = 32000
LLAMA2_CHARACTER_COVERAGE = 0.99995
LLAMA2_MAX_SENTENCE_LENGTH = 4192


class Tokenizer:
    def __init__(self, model_bytes: bytes, source: str = "<checkpoint>"):
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(model_bytes)
        except (RuntimeError, OSError, TypeError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            if "ParseFromArray" in reason:
                reason = "it does not parse as a model file"
            reason = reason.removeprefix("INTERNAL: ")[:120]
            raise UserError(f"{source}: not a SentencePiece model ({reason})") from None
        self.model_bytes = model_bytes
        self.source = source
        self.vocab_size = self.sp.vocab_size()
        self.bos_id, self.eos_id, self.pad_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id()
        self.unk_id = self.sp.unk_id()

    @classmethod
    def from_file(cls, path: str) -> Tokenizer:
        require_input(path, "tokenizer file", stream_ok=True)
        with open(path, "rb") as f:
            return cls(f.read(), path)

    def __reduce__(self):
        # Pickles as its model bytes: worker processes rebuild the processor instead of sharing one.
        return (Tokenizer, (self.model_bytes, self.source))

    @functools.cached_property
    def sha256(self) -> str:
        """Hex digest of the model file: what token shards and checkpoints record to tell tokenizers apart."""
        return hashlib.sha256(self.model_bytes).hexdigest()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        """``encode`` for each text, in one call on this thread (callers parallelise over processes)."""
        assert not (bos and self.bos_id < 0) and not (eos and self.eos_id < 0), "this model has no BOS/EOS piece"
        return self.sp.encode(list(texts), add_bos=bos, add_eos=eos, num_threads=1)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(i)


def train_bpe(
    sentences: Iterable[str],
    vocab_size: int = LLAMA2_VOCAB_SIZE,
    *,
    character_coverage: float = LLAMA2_CHARACTER_COVERAGE,
    max_sentence_length: int = LLAMA2_MAX_SENTENCE_LENGTH,
    num_threads: int | None = None,
    **overrides: object,
) -> Tokenizer:
    """Train a SentencePiece BPE model with Llama 2's settings on ``sentences`` (lines of text, no newlines).

    ``overrides`` replace entries of ``LLAMA2_TRAINER_SPEC`` (tests use this to build tokenizers with other rules).
    A vocabulary the text cannot fill raises UserError naming the largest size that works.
    """
    unknown = set(overrides) - set(LLAMA2_TRAINER_SPEC)
    assert not unknown, f"not Llama 2 trainer settings: {sorted(unknown)}"
    spec = {**LLAMA2_TRAINER_SPEC, **overrides}
    out = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=out,
            vocab_size=vocab_size,
            character_coverage=character_coverage,
            max_sentence_length=max_sentence_length,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2,  # sentencepiece logs every step to stderr; keep stderr for our bar and errors
            **spec,
        )
    except RuntimeError as e:
        raise UserError(f"tokenizer training failed: {_trainer_message(str(e))}") from None
    return Tokenizer(out.getvalue(), "<trained>")


# The trainer's options as llamactl's flags name them, for SentencePiece's own messages.
TRAINER_FLAGS = {
    "vocab_size": "--vocab-size",
    "character_coverage": "--character-coverage",
    "max_sentence_length": "--max-sentence-length",
    "num_threads": "--threads",
}


def _trainer_message(message: str) -> str:
    """SentencePiece's error (``INTERNAL: src/trainer_interface.cc(638) [condition] text``) in the CLI's words."""
    too_high = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", message)
    if too_high:
        return f"--vocab-size {too_high.group(1)} is more than this text supports: at most {too_high.group(2)}"
    too_low = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", message)
    if too_low:
        return (
            f"--vocab-size {too_low.group(1)} is too small for this text: its characters, 256 byte pieces and 3 "
            f"special pieces need {too_low.group(2)} (or lower --character-coverage)"
        )
    first = (message.splitlines() or [""])[0].removeprefix("INTERNAL: ")
    m = re.fullmatch(r"\s*(?:\S+\.cc\(\d+\)\s*)?(?:\[(.*)\])?\s*(.*)", first)
    condition, text = (m.group(1) or "", m.group(2)) if m else ("", first)

    def flag(match: re.Match) -> str:
        return TRAINER_FLAGS.get(match.group(1), match.group(1))

    condition = re.sub(r"\(?trainer_spec_?\.(\w+)\(\)\)?", flag, condition)
    text = re.sub(r"--(\w+)(?: option)?", lambda m: TRAINER_FLAGS.get(m.group(1), m.group(0)), text)
    if text:
        return text
    return f"needs {condition}" if condition else "SentencePiece gave no reason"
