"""SentencePiece tokenizer, loaded from a file or from the bytes embedded in a checkpoint."""

from __future__ import annotations

import os

import sentencepiece as spm

from llamactl.errors import UserError


class Tokenizer:
    def __init__(self, model_bytes: bytes, source: str = "<checkpoint>"):
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(model_bytes)
        except (RuntimeError, OSError, TypeError) as e:
            raise UserError(f"{source}: not a SentencePiece model ({str(e).splitlines()[0][:120]})") from None
        self.model_bytes = model_bytes
        self.vocab_size = self.sp.vocab_size()
        self.bos_id, self.eos_id, self.pad_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id()

    @classmethod
    def from_file(cls, path: str) -> Tokenizer:
        if not os.path.isfile(path):
            raise UserError(f"{path}: no such tokenizer file")
        with open(path, "rb") as f:
            return cls(f.read(), path)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)
