"""RULER through lm-evaluation-harness: offline, no remote code, lm-eval's own samples and scores.

Needs the `[eval]` extra (skipped without it). lm-eval's first import builds a 6M-entry word list
(~10 s on a CI core), so the tests that run tasks are marked slow; the checks that must fail
before any work are fast.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_evals_oracles import constant, niah_answer, oracle
from transformers import AutoTokenizer

from gqa_convert.errors import ConfigError
from gqa_convert.evals import LEFT_OUT, OFFLINE_TASKS, EvalExtraMissing, ruler_scores

pytest.importorskip("lm_eval")
pytest.importorskip("wonderwords")

NIAH = ["niah_single_1", "niah_multikey_2"]  # the NIAH tasks whose smallest sample fits stories260K's 512


@pytest.fixture(scope="module")
def stories_tok(stories_hf):
    return AutoTokenizer.from_pretrained(stories_hf)


@pytest.fixture(scope="module")
def stories(stories_hf):
    from gqa_convert.evaluate import load_model

    return load_model(stories_hf)


def _forbid_tokenizer_loads(monkeypatch):
    """From here on, any tokenizer load (lm-eval's RULER loads with trust_remote_code=True)
    fails the test."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError(f"a tokenizer was loaded: {args} {kwargs}")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)


@pytest.fixture
def no_hub_tokenizer(monkeypatch):
    _forbid_tokenizer_loads(monkeypatch)


def test_during_a_run_only_our_tokenizer_is_served(stories_tok):
    from transformers import AutoTokenizer

    from gqa_convert.evals.ruler import _tokenizer_served

    before = AutoTokenizer.from_pretrained
    with _tokenizer_served(stories_tok) as name:
        assert AutoTokenizer.from_pretrained(name, trust_remote_code=True) is stories_tok
        with pytest.raises(ConfigError, match="refused"):
            AutoTokenizer.from_pretrained("some/hub-model", trust_remote_code=True)
    assert AutoTokenizer.from_pretrained == before


# ---------------------------------------------------------------- one line, before any work


def test_task_names_are_checked_first(stories_tok):
    model = oracle(stories_tok, niah_answer, max_positions=512)
    with pytest.raises(ConfigError, match="unknown RULER task 'niah_single_9'"):
        ruler_scores(model, stories_tok, [512], ["niah_single_1", "niah_single_9"])
    for name, reason in LEFT_OUT.items():
        with pytest.raises(ConfigError, match="is not offered") as err:
            ruler_scores(model, stories_tok, [512], [name])
        assert reason in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="above the model's maximum of 512"):
        ruler_scores(model, stories_tok, [512, 1024], NIAH)
    with pytest.raises(ConfigError, match="limit"):
        ruler_scores(model, stories_tok, [512], NIAH, limit=0)
    assert model.calls == 0


def test_missing_extra_is_one_line(stories_tok, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    with pytest.raises(EvalExtraMissing, match=r"pip install 'gqa-convert\[eval\]'"):
        ruler_scores(oracle(stories_tok, niah_answer, max_positions=512), stories_tok, [512], NIAH)


@pytest.mark.slow
def test_too_short_for_a_task_is_one_line(stories_tok):
    """Where lm-eval's samplers would divide by zero (cwe) or loop forever (vt), we refuse."""
    model = oracle(stories_tok, niah_answer, max_positions=4096)
    cases = {
        "ruler_cwe": "too short for ruler_cwe",
        "ruler_vt": "ruler_vt cannot run with this tokenizer",
        "niah_multikey_3": "too short for niah_multikey_3",
    }
    for task, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            ruler_scores(model, stories_tok, [512], [task])
    with pytest.raises(ConfigError, match="up to 50 tokens past the length"):
        ruler_scores(model, stories_tok, [4096], ["ruler_fwe"])
    assert model.calls == 0


# ---------------------------------------------------------------- scores separate the models


@pytest.mark.slow
def test_oracle_scores_1_constant_scores_0_on_the_same_samples(stories_tok, no_hub_tokenizer):
    good = ruler_scores(
        oracle(stories_tok, niah_answer, max_positions=512), stories_tok, [400, 512], NIAH, limit=4, batch_size=2
    )
    bad = ruler_scores(
        oracle(stories_tok, constant("1234567"), max_positions=512),
        stories_tok,
        [400, 512],
        NIAH,
        limit=4,
        batch_size=2,
    )
    assert {(s.task, s.length): s.score for s in good.scores} == {(t, L): 1.0 for t in NIAH for L in (400, 512)}
    assert all(s.score == 0.0 for s in bad.scores)
    assert good.sample_hashes() == bad.sample_hashes() and len(good.samples) == 16
    assert all(s.doc_length <= s.length for s in good.samples)  # lm-eval sized them to fit
    assert all(s.targets[0] in s.response for s in good.samples)
    json.dumps(good.to_dict())


@pytest.mark.slow
def test_stories_source_and_converted_on_identical_samples(stories_hf, stories, tmp_path, monkeypatch):
    from gqa_convert.convert import convert_checkpoint
    from gqa_convert.evaluate import load_model

    model, tok = stories
    out = convert_checkpoint(stories_hf, tmp_path / "kv2", 2, progress=False).output
    conv_model, conv_tok = load_model(out)
    _forbid_tokenizer_loads(monkeypatch)
    src = ruler_scores(model, tok, [512], NIAH, limit=3, batch_size=3)
    conv = ruler_scores(conv_model, conv_tok, [512], NIAH, limit=3, batch_size=3)
    assert src.sample_hashes() == conv.sample_hashes()
    assert [s.targets for s in src.samples] == [s.targets for s in conv.samples]
    for result in (src, conv):
        assert all(0.0 <= s.score <= 1.0 for s in result.scores)
    assert tok.pad_token is None  # lm-eval gave a pad token to a copy, not to ours


@pytest.mark.slow
def test_matches_lm_evals_own_cli(stories_hf, stories, tmp_path):
    """The same model through `lm_eval` (its CLI: it loads the folder itself) gives the same
    samples, the same responses and the same score."""
    model, tok = stories
    ours = ruler_scores(model, tok, [512], ["niah_single_1"], limit=3, batch_size=1)
    cmd = [
        sys.executable,
        "-m",
        "lm_eval",
        "--model",
        "hf",
        "--model_args",
        f"pretrained={stories_hf},dtype=float32",
        "--tasks",
        "niah_single_1",
        "--device",
        "cpu",
        "--batch_size",
        "1",
        "--limit",
        "3",
        "--log_samples",
        "--metadata",
        json.dumps({"max_seq_lengths": [512]}),
        "--output_path",
        str(tmp_path / "cli"),
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(next((tmp_path / "cli").rglob("results_*.json")).read_text())
    logged = [json.loads(line) for line in next((tmp_path / "cli").rglob("samples_niah_single_1_*.jsonl")).open()]
    assert results["results"]["niah_single_1"]["512,none"] == ours.score("niah_single_1", 512)
    assert [s["doc_hash"] for s in logged] == list(ours.sample_hashes())
    assert [s["filtered_resps"][0] for s in logged] == [s.response for s in ours.samples]


@pytest.mark.slow
def test_every_offline_task_runs_offline_at_4096(no_hub_tokenizer):
    """All of OFFLINE_TASKS build their samples and score, with nothing downloaded, on a tiny
    random Llama and a byte-level BPE tokenizer (4096: RULER's shortest standard length)."""
    import torch
    from test_evals_oracles import byte_bpe_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = byte_bpe_tokenizer(vocab_size=12000, word_lists=True)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=8192,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    model = LlamaForCausalLM(config).eval()
    result = ruler_scores(model, tok, [4096], OFFLINE_TASKS, limit=1)
    assert {s.task for s in result.scores} == set(OFFLINE_TASKS)
    assert all(0.0 <= s.score <= 1.0 and s.samples == 1 for s in result.scores)
    assert all(s.targets and s.doc_length <= 4096 + 50 for s in result.samples)
