"""The Tokenizer wrapper against sentencepiece itself, and train_bpe against the settings of Llama 2's own model."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import pytest
import sentencepiece as spm

from llamactl.errors import UserError
from llamactl.tokenizer import Tokenizer, train_bpe

FIXTURES = Path(__file__).parent / "fixtures"
LLAMA2 = FIXTURES / "llama2-tokenizer.model"
SHAKESPEARE = Path(__file__).parents[1] / "examples" / "tinyshakespeare.txt"

TEXTS = [
    "",
    "Hello world",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\nand  double  spaces",
    "digits 1234567890 and 3.14159",
    "unicode: naïve café, Straße, 日本語のテキスト, Ελληνικά, עברית, emoji 🦙🔥",
    "fullwidth ＡＢＣ and ligature ﬁ stay as they are (identity normalisation)",
    "\u2047 looks like the unk surface",
    "[INST] <<SYS>> special-looking text is just text to the tokenizer <</SYS>> [/INST]",
]


@pytest.fixture(scope="module")
def llama() -> tuple[Tokenizer, spm.SentencePieceProcessor]:
    return Tokenizer.from_file(str(LLAMA2)), spm.SentencePieceProcessor(model_file=str(LLAMA2))


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_agree_with_sentencepiece(llama, text):
    tok, sp = llama
    ids = sp.encode(text)
    assert tok.encode(text) == ids
    assert tok.encode(text, bos=True, eos=True) == [1, *ids, 2]
    assert tok.decode(ids) == sp.decode(ids)
    assert tok.decode(tok.encode(text, bos=True, eos=True)) == text  # byte fallback: every text comes back


def test_llama2_facts(llama):
    tok, _ = llama
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (32000, 1, 2, -1, 0)
    assert tok.encode("[INST] Hi [/INST]") == [518, 25580, 29962, 6324, 518, 29914, 25580, 29962]
    assert tok.sha256 == hashlib.sha256(LLAMA2.read_bytes()).hexdigest()


def test_encode_batch_and_pickle(llama):
    tok, _ = llama
    assert tok.encode_batch(TEXTS, bos=True) == [tok.encode(t, bos=True) for t in TEXTS]
    assert tok.encode_batch(TEXTS, eos=True) == [tok.encode(t, eos=True) for t in TEXTS]
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.model_bytes == tok.model_bytes and clone.encode(TEXTS[5]) == tok.encode(TEXTS[5])


@pytest.mark.parametrize("data", [b"", b"not a model", b"\x00" * 64, b'{"tokens": [1, 2]}'])
def test_not_a_model(tmp_path, data):
    path = tmp_path / "bad.model"
    path.write_bytes(data)
    with pytest.raises(UserError, match=r"bad\.model: not a SentencePiece model"):
        Tokenizer.from_file(str(path))
    with pytest.raises(UserError, match="no such tokenizer file"):
        Tokenizer.from_file(str(tmp_path / "missing.model"))


@pytest.fixture(scope="module")
def trained() -> Tokenizer:
    lines = [line for line in SHAKESPEARE.read_text(encoding="utf-8").split("\n")[:6000] if line]
    lines += ["In 1599 the Globe opened; 42 plays, 154 sonnets, 37 years."] * 20
    return train_bpe(lines, 600, num_threads=1)


def test_train_bpe_has_llama2_layout(trained, llama):
    llama_tok, _ = llama
    assert trained.vocab_size == 600
    assert (trained.unk_id, trained.bos_id, trained.eos_id, trained.pad_id) == (0, 1, 2, -1)
    # Byte fallback: the 3 special pieces, then the 256 byte pieces, exactly where Llama 2 has them.
    assert [trained.id_to_piece(i) for i in range(259)] == [llama_tok.id_to_piece(i) for i in range(259)]


def test_train_bpe_behaves_like_llama2(trained, llama):
    llama_tok, _ = llama
    sp = trained.sp
    digits = sp.encode("1599", out_type=str)
    assert digits == ["▁", "1", "5", "9", "9"] == llama_tok.sp.encode("1599", out_type=str)  # digits split
    for text in TEXTS:
        assert trained.decode(trained.encode(text)) == text  # identity, whitespace as is, byte fallback
    assert trained.unk_id not in trained.encode(TEXTS[5])  # unseen characters become bytes, never <unk>
    fullwidth = sp.encode("ＡＢＣ", out_type=str)
    assert fullwidth == ["▁"] + [f"<0x{b:02X}>" for b in "ＡＢＣ".encode()]  # not NFKC-folded to "ABC"
    assert sp.encode("a  b", out_type=str) == ["▁a", "▁", "▁b"]  # dummy prefix, runs of spaces kept


def test_train_bpe_vocab_too_large_names_the_limit():
    with pytest.raises(UserError, match=r"--vocab-size 5000 is more than this text supports: at most \d+"):
        train_bpe(["to be or not to be"] * 10, 5000, num_threads=1)
