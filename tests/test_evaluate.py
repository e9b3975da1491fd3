"""Held-out loss of stories260K against the fixtures README's documented range and an
independent NumPy computation; padding and batching must not change the number."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import STORIES_BIN, STORIES_TOK, need
from test_llama2c import numpy_forward, read_llama2c_tokenizer, runc_encode

from gqa_convert.errors import DataError
from gqa_convert.evaluate import (
    HELDOUT,
    TRAINING,
    document_loss,
    heldout_documents,
    load_model,
    split_paragraphs,
    training_documents,
)

# Fixtures README: "mean token loss ≈ 1.38–1.44 on the first paragraphs (BOS-prefixed, ≤512 tokens)".
DOCUMENTED_LOSS = (1.38, 1.44)


@pytest.fixture(scope="module")
def stories(stories_hf):
    return load_model(stories_hf)


def test_heldout_loss_in_documented_range(stories, val_text):
    model, tok = stories
    docs = heldout_documents(val_text)
    assert len(docs) == 200
    result = document_loss(model, tok, docs)
    assert DOCUMENTED_LOSS[0] <= result.mean_loss <= DOCUMENTED_LOSS[1], result
    assert result.documents == 200 and result.tokens > 15_000
    assert result.perplexity == pytest.approx(np.exp(result.mean_loss))


def test_batching_and_padding_do_not_change_the_loss(stories, val_text):
    model, tok = stories
    docs = heldout_documents(val_text)[:48]
    one = document_loss(model, tok, docs, batch_size=1)
    eight = document_loss(model, tok, docs, batch_size=8)
    odd = document_loss(model, tok, docs[::-1], batch_size=5)
    assert one.tokens == eight.tokens == odd.tokens
    assert abs(one.mean_loss - eight.mean_loss) < 1e-5
    assert abs(one.mean_loss - odd.mean_loss) < 1e-5


def test_loss_matches_independent_numpy_llama2c(stories, val_text):
    """run.c tokenisation + llama2.c's own forward pass (NumPy, float64) give the same loss."""
    model, tok = stories
    docs = heldout_documents(val_text)[:4]
    pieces, scores = read_llama2c_tokenizer(need(STORIES_TOK))
    nll, n = 0.0, 0
    for doc in docs:
        ids = ([1] + runc_encode(doc, pieces, scores))[:128]
        logits = numpy_forward(need(STORIES_BIN), ids)[:-1]
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        nll -= logp[np.arange(len(ids) - 1), ids[1:]].sum()
        n += len(ids) - 1
    got = document_loss(model, tok, docs, max_tokens=128, batch_size=3)
    assert got.tokens == n
    assert got.mean_loss == pytest.approx(nll / n, abs=1e-5)


def test_truncation_counts_bos_within_max_tokens(stories, val_text):
    model, tok = stories
    docs = [d for d in heldout_documents(val_text) if len(d) > 200][:5]
    assert document_loss(model, tok, docs, max_tokens=16).tokens == 5 * 15


def test_split_and_slices(tmp_path, val_text):
    f = tmp_path / "docs.txt"
    f.write_text("first doc\nline two\n\n\n  second  \n \nthird\n", encoding="utf-8")
    assert split_paragraphs(f) == ["first doc\nline two", "second", "third"]
    docs = split_paragraphs(val_text)
    assert docs[0].startswith("Spot. Spot saw the shiny car")
    assert heldout_documents(val_text) == docs[HELDOUT] == docs[:200]
    train = training_documents(val_text)
    assert train == docs[TRAINING] == docs[1000:] and len(train) > 3000
    assert HELDOUT.stop <= TRAINING.start  # disjoint slices, by position in the file


def test_bad_input_is_data_error(stories, tmp_path):
    model, tok = stories
    with pytest.raises(DataError):
        document_loss(model, tok, [])
    with pytest.raises(DataError, match="no token to predict"):
        document_loss(model, tok, ["", ""])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n\n")
    with pytest.raises(DataError, match="no documents"):
        split_paragraphs(empty)
    with pytest.raises(DataError, match="cannot read"):
        split_paragraphs(tmp_path / "missing.txt")
