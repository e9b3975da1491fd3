"""The sentencepiece `tokenizer.model` written beside tokenizer.json by the llama2.c export.

llama.cpp's `convert_hf_to_gguf.py` reads a Llama folder's vocabulary from `tokenizer.model`
(pieces, scores, piece types through `SentencePieceProcessor`); without it, it falls back to a
vocabulary with placeholder scores and tokenises differently. Held here to the pure-Python copy of
run.c's `encode` in tests/test_llama2c.py (an oracle independent of the package's code), through
sentencepiece's own C++ implementation.
"""

from __future__ import annotations

import pytest
from conftest import STORIES_TOK, need
from test_llama2c import read_llama2c_tokenizer, runc_encode

from gqa_convert.errors import CheckpointError
from gqa_convert.llama2c import read_tokenizer, spm_model_proto

spm = pytest.importorskip("sentencepiece", reason="sentencepiece is not installed (pip install -e '.[test]')")

ODD = [
    "  two leading spaces, tabs\tand\nnewlines  ",
    "a  b   c    d",
    " leading space",
    "trailing space ",
    "\n\nstarts with newlines\n",
    "café naïve – “quotes” 😀 ☃ 日本語",
    "<0x41> looks like a byte token but is plain text, as are <s and /s>",
    "x",
    "",
]


def documents(val_text, n: int) -> list[str]:
    return [d.strip() for d in val_text.read_text(encoding="utf-8").split("\n\n") if d.strip()][:n]


@pytest.fixture(scope="module")
def sp(stories_hf):
    return spm.SentencePieceProcessor(model_file=str(stories_hf / "tokenizer.model"))


@pytest.fixture(scope="module")
def runc():
    pieces, scores = read_llama2c_tokenizer(need(STORIES_TOK))
    return lambda text: runc_encode(text, pieces, scores)


def test_export_writes_tokenizer_model(stories_hf):
    assert (stories_hf / "tokenizer.json").is_file() and (stories_hf / "tokenizer.model").is_file()


def test_sentencepiece_gives_runc_ids_on_100_documents(sp, runc, val_text):
    docs = documents(val_text, 100)
    assert len(docs) == 100
    mismatched = [d[:60] for d in docs if sp.encode(d) != runc(d)]
    assert not mismatched, f"{len(mismatched)}/100 documents differ from run.c, first: {mismatched[0]!r}"
    assert sum(len(sp.encode(d)) for d in docs) > 9_000  # real text (9,618 ids), not trivially short


def test_sentencepiece_gives_runc_ids_on_odd_text(sp, runc):
    # run.c keeps every space (no whitespace collapsing), prepends one to non-empty text, and
    # spells a character outside the vocabulary as its UTF-8 byte pieces.
    for text in ODD:
        assert sp.encode(text) == runc(text), repr(text)


def test_sentencepiece_decode_round_trips(sp, val_text):
    for text in documents(val_text, 100) + ODD:
        assert sp.decode(sp.encode(text)) == text, repr(text)


def test_vocabulary_as_llama_cpp_reads_it(sp):
    """What convert_hf_to_gguf.py's `_create_vocab_sentencepiece` takes from the file: pieces,
    scores and types (unknown, control, byte, normal) exactly as tok512.bin has them."""
    pieces, scores = read_llama2c_tokenizer(need(STORIES_TOK))
    assert sp.vocab_size() == 512
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert sp.is_unknown(0) and sp.is_control(1) and sp.is_control(2)
    for i in range(3, 259):
        assert sp.is_byte(i) and sp.id_to_piece(i) == f"<0x{i - 3:02X}>"
    for i in range(259, 512):
        assert not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i))
        assert sp.id_to_piece(i) == pieces[i].replace(" ", "▁")
    assert [sp.get_score(i) for i in range(512)] == scores  # float32 both sides: exact


def test_hf_tokenizer_beside_it_is_unchanged(stories_hf, sp, runc, val_text):
    """tokenizer.model in the folder does not change what AutoTokenizer loads (tokenizer.json)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(stories_hf)
    for text in documents(val_text, 100) + ODD:
        assert tok(text, add_special_tokens=False).input_ids == sp.encode(text) == runc(text), repr(text)
        assert tok(text).input_ids == [1, *runc(text)]


def test_model_proto_parses_with_the_official_schema():
    pb2 = pytest.importorskip("sentencepiece.sentencepiece_model_pb2", reason="protobuf is not installed")
    m = pb2.ModelProto()
    m.ParseFromString(spm_model_proto(read_tokenizer(need(STORIES_TOK), 512)))
    assert m.trainer_spec.model_type == pb2.TrainerSpec.BPE and m.trainer_spec.byte_fallback
    assert m.trainer_spec.vocab_size == len(m.pieces) == 512 and m.trainer_spec.pad_id == -1
    n = m.normalizer_spec
    assert (n.name, n.add_dummy_prefix, n.remove_extra_whitespaces, n.escape_whitespaces) == (
        "identity",
        True,
        False,
        True,
    )
    assert not n.precompiled_charsmap


def test_gguf_sentencepiece_vocab_reads_it(stories_hf):
    """gguf-py's SentencePieceVocab (llama.cpp's Python package), when installed."""
    vocab_mod = pytest.importorskip("gguf.vocab", reason="gguf is not installed (optional)")
    import gguf

    pieces, scores = read_llama2c_tokenizer(need(STORIES_TOK))
    got = list(vocab_mod.SentencePieceVocab(stories_hf).all_tokens())
    assert len(got) == 512
    assert [t for t, _, _ in got[259:]] == [p.replace(" ", "▁").encode() for p in pieces[259:]]
    assert [s for _, s, _ in got] == scores
    T = gguf.TokenType
    assert [k for _, _, k in got[:3]] == [T.UNKNOWN, T.CONTROL, T.CONTROL]
    assert {k for _, _, k in got[3:259]} == {T.BYTE} and {k for _, _, k in got[259:]} == {T.NORMAL}


def test_conversion_carries_tokenizer_model(stories_hf, tmp_path, val_text):
    from gqa_convert.convert import convert_checkpoint

    out = convert_checkpoint(stories_hf, tmp_path / "kv2", 2, progress=False).output
    assert (out / "tokenizer.model").read_bytes() == (stories_hf / "tokenizer.model").read_bytes()
    sp2 = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert sp2.encode(documents(val_text, 1)[0])


def test_non_llama2c_vocabulary_is_refused():
    pieces = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)] + [(f"p{i}", -float(i)) for i in range(300)]
    with pytest.raises(CheckpointError, match="byte-fallback piece"):
        spm_model_proto(pieces)
