"""The built-in passkey probe: exact prompt sizes, needle placement, determinism, and scores that
separate a model that can retrieve (an oracle) from ones that cannot (constant, windowed)."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from test_evals_oracles import byte_bpe_tokenizer, constant, oracle
from transformers import AutoTokenizer

from gqa_convert.errors import ConfigError
from gqa_convert.evals import (
    PasskeyResult,
    answer_budget,
    build_passkey_prompts,
    passkey_probe,
    plot_passkey_heatmap,
)
from gqa_convert.evals.common import encode_piece, greedy_generate, special_prefix
from gqa_convert.evals.passkey import NEEDLE, QUESTION, minimum_length, score_answer


@pytest.fixture(scope="module")
def bpe():
    return byte_bpe_tokenizer()


@pytest.fixture(scope="module")
def stories_tok(stories_hf):
    return AutoTokenizer.from_pretrained(stories_hf)


@pytest.fixture(scope="module")
def stories(stories_hf):
    from gqa_convert.evaluate import load_model

    return load_model(stories_hf)


def _tokenizers(bpe, stories_tok):
    return {"byte-level BPE": bpe, "stories260K": stories_tok}


# ---------------------------------------------------------------- prompts


def test_every_prompt_has_exactly_the_length_asked_for(bpe, stories_tok):
    lengths = [256, 301, 512, 777, 1024]
    for name, tok in _tokenizers(bpe, stories_tok).items():
        prompts = build_passkey_prompts(tok, lengths, samples=3)
        assert len(prompts) == len(lengths) * 5 * 3
        for p in prompts:
            assert len(p.input_ids) == p.length - answer_budget(5), name
            # the tokenizer itself, on the prompt's text, gives the same ids (independent check)
            k = len(special_prefix(tok))
            assert tok(tok.decode(p.input_ids[k:]))["input_ids"] == list(p.input_ids), (name, p.length, p.depth)


def test_the_needle_sits_at_the_depth_recorded(bpe, stories_tok):
    for tok in _tokenizers(bpe, stories_tok).values():
        prompts = build_passkey_prompts(tok, [1024], [0.0, 0.25, 0.5, 0.75, 1.0], samples=2)
        question = encode_piece(tok, QUESTION)
        for p in prompts:
            needle = encode_piece(tok, NEEDLE.format(key=p.passkey))
            assert list(p.input_ids[p.needle_start : p.needle_start + p.needle_tokens]) == needle
            assert abs(p.actual_depth - p.depth) < 0.05  # sentences are short next to 1024 tokens
            assert list(p.input_ids[-len(question) :]) == question
        first, last = prompts[0], prompts[-1]
        assert first.actual_depth == 0.0 and last.actual_depth == 1.0
        assert last.needle_start + last.needle_tokens == len(last.input_ids) - len(question)
        assert tok.decode(first.input_ids).count(first.passkey) == 2  # stated twice, nowhere else


def test_prompts_are_deterministic_per_cell(bpe):
    a = build_passkey_prompts(bpe, [256, 512], [0.5], samples=4, seed=3)
    b = build_passkey_prompts(bpe, [256, 512], [0.5], samples=4, seed=3)
    assert a == b
    alone = build_passkey_prompts(bpe, [512], [0.5], samples=4, seed=3)
    assert alone == [p for p in a if p.length == 512]  # a cell does not depend on the others
    other = build_passkey_prompts(bpe, [256, 512], [0.5], samples=4, seed=4)
    assert [p.passkey for p in other] != [p.passkey for p in a]
    assert all(len(p.passkey) == 5 and p.passkey[0] != "0" for p in a)


def test_bad_requests_fail_in_one_line_before_the_model_runs(bpe):
    model = oracle(bpe, max_positions=1024)
    cases = {
        "above the model's maximum of 1024": dict(lengths=[512, 2048]),
        "too short": dict(lengths=[minimum_length(bpe) - 1]),
        "depth must be a fraction": dict(lengths=[256], depths=[0.5, 1.5]),
        "samples per cell": dict(lengths=[256], samples=0),
        "positive whole number": dict(lengths=[256, -3]),
        "batch size": dict(lengths=[256], batch_size=0),
    }
    for message, kwargs in cases.items():
        with pytest.raises(ConfigError, match=message) as err:
            passkey_probe(model, bpe, **kwargs)
        assert "\n" not in str(err.value)
    assert model.calls == 0
    wrong = build_passkey_prompts(bpe, [256], samples=2, seed=1)
    with pytest.raises(ConfigError, match="built with other"):
        passkey_probe(model, bpe, [256], samples=2, seed=2, prompts=wrong)


def test_score_answer_takes_the_first_number_only():
    assert score_answer(" 40213. Remember", "40213")
    assert not score_answer(" 1 40213", "40213")
    assert not score_answer(" 402130", "40213")
    assert not score_answer(" no number", "40213")


# ---------------------------------------------------------------- scores that separate models


def test_oracle_scores_100_and_constant_scores_0(bpe, stories_tok):
    for tok in _tokenizers(bpe, stories_tok).values():
        good = passkey_probe(oracle(tok), tok, [256, 512], samples=3, batch_size=4)
        assert good.overall == 1.0 and all(c.accuracy == 1.0 for c in good.cells)
        bad = passkey_probe(oracle(tok, constant("12345")), tok, [256, 512], samples=3, batch_size=4)
        assert bad.overall == 0.0
        assert good.prompts_sha256 == bad.prompts_sha256  # both scored on the same prompts


def test_windowed_oracle_fails_exactly_where_the_needle_is_out_of_sight(bpe):
    """Attention broken beyond 200 tokens: found iff the needle lies in the last 200 tokens."""
    window = 200
    result = passkey_probe(oracle(bpe, window=window), bpe, [768], [0.0, 0.5, 0.9, 1.0], samples=3, batch_size=6)
    prompts = build_passkey_prompts(bpe, [768], [0.0, 0.5, 0.9, 1.0], samples=3)
    for p, s in zip(prompts, result.samples):
        visible = p.needle_start >= len(p.input_ids) - window
        assert s.correct == visible, (p.depth, p.needle_start)
    assert result.accuracy(768, 0.0) == 0.0 and result.accuracy(768, 1.0) == 1.0
    assert result.by_length()[768] == pytest.approx(sum(result.grid()[0]) / 4)


def test_result_serialises_with_every_sample(bpe):
    result = passkey_probe(oracle(bpe), bpe, [256], [0.0, 1.0], samples=2)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["overall"] == 1.0 and len(data["samples"]) == 4 and len(data["cells"]) == 2
    assert {"passkey", "needle_start", "actual_depth", "answer", "correct", "prompt_tokens"} <= set(data["samples"][0])


# ---------------------------------------------------------------- stories260K, a real model


def test_greedy_with_cache_equals_full_recompute(stories):
    model, tok = stories
    ids = torch.tensor([p.input_ids for p in build_passkey_prompts(tok, [384], [0.5], samples=2)])

    class NoCache(torch.nn.Module):  # the same model, re-run on the whole sequence each step
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids):
            return self.m(input_ids=input_ids)

    assert torch.equal(greedy_generate(model, ids, 8), greedy_generate(NoCache(model), ids, 8))


def test_stories_source_and_conversions_on_identical_prompts(stories_hf, stories, tmp_path):
    """stories260K scores what it scores (docs/eval.md); the invariants: same prompts for source
    and conversions, an identity conversion answers identically, batching changes nothing."""
    from gqa_convert.convert import convert_checkpoint
    from gqa_convert.evaluate import load_model

    model, tok = stories
    lengths, depths = [256, 512], [0.0, 0.5, 1.0]
    prompts = build_passkey_prompts(tok, lengths, depths, samples=2)
    src = passkey_probe(model, tok, lengths, depths, samples=2, prompts=prompts, batch_size=6)
    src_b1 = passkey_probe(model, tok, lengths, depths, samples=2, batch_size=1)
    assert [s.answer for s in src_b1.samples] == [s.answer for s in src.samples]
    for kv in (4, 2):
        out = convert_checkpoint(stories_hf, tmp_path / f"kv{kv}", kv, progress=False).output
        conv_model, conv_tok = load_model(out)
        conv = passkey_probe(conv_model, conv_tok, lengths, depths, samples=2, prompts=prompts, batch_size=6)
        assert conv.prompts_sha256 == src.prompts_sha256
        cells = lambda r: [(s.length, s.depth, s.passkey) for s in r.samples]
        assert cells(conv) == cells(src)
        if kv == 4:
            assert [s.answer for s in conv.samples] == [s.answer for s in src.samples]
        assert 0.0 <= conv.overall <= 1.0


# ---------------------------------------------------------------- heat map


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_heatmap_png_one_panel_per_model(bpe, tmp_path):
    good = passkey_probe(oracle(bpe), bpe, [256, 512], samples=1)
    bad = passkey_probe(oracle(bpe, constant("1")), bpe, [256, 512], samples=1)
    one = plot_passkey_heatmap(good, tmp_path / "one.png")
    two = plot_passkey_heatmap({"source": good, "converted": bad}, tmp_path / "two.png", title="passkey")
    w1, h1 = _png_size(one)
    w2, h2 = _png_size(two)
    assert w2 > w1 * 1.5 and h1 == h2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.png", "two.png"]  # no temp file left
    with pytest.raises(ConfigError):
        plot_passkey_heatmap({}, tmp_path / "none.png")
    assert isinstance(good, PasskeyResult)
