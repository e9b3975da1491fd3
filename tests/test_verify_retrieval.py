"""Retrieval in verification: source and converted scored on identical prompts, recorded in
verification.json, drawn as a heat map, shown on the card, and gated by verify.min_retrieval_ratio."""

from __future__ import annotations

import json
import shutil

import pytest

from gqa_convert.commands import main
from gqa_convert.records import RetrievalReport, RetrievalTask
from gqa_convert.settings import EvalSettings


def test_verify_records_retrieval_for_both(stories_hf, stories_kv2, val_text, law_file, tmp_path, capsys):
    folder = tmp_path / "kv2"
    shutil.copytree(stories_kv2, folder)
    rc = main(
        [
            "verify",
            str(folder),
            "--source",
            str(stories_hf),
            "--data",
            str(val_text),
            "--context",
            "256",
            "--law",
            str(law_file),
            "--documents",
            "4",
            "--tolerance",
            "10",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "retrieval at" in out and "passkey" in out
    ver = json.loads((folder / "verification.json").read_text())
    r = ver["retrieval"]
    assert r["lengths"] == [32, 64, 128, 256] and r["prompts_sha256"]
    passkey = next(t for t in r["tasks"] if t["task"] == "passkey")
    assert set(passkey["scores"]) == {"source", "converted"}
    assert set(passkey["scores"]["source"]) == set(passkey["scores"]["converted"])  # same lengths, same prompts
    assert (folder / "retrieval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (folder / "README.md").read_text()
    assert "## Long-context retrieval" in card and "passkey accuracy at" in card  # model-index entry


def _report(source: float, converted: float) -> RetrievalReport:
    return RetrievalReport(
        context=256,
        lengths=[256],
        depths=[0.5],
        samples=1,
        seed=0,
        tasks=[RetrievalTask(task="passkey", scores={"source": {256: source}, "converted": {256: converted}})],
        ratio=converted / source if source else None,
    )


@pytest.mark.parametrize(
    "source, converted, gate, passed",
    [
        (0.8, 0.4, 0.9, False),  # retained half: below the gate, verification fails
        (0.8, 0.8, 0.9, True),
        (0.8, 0.4, None, True),  # no gate: reported only
        (0.0, 0.0, 0.9, True),  # the source retrieves nothing: not measurable, not a failure
    ],
)
def test_min_retrieval_ratio_gates(
    stories_hf, stories_kv2, val_text, law_file, tmp_path, monkeypatch, source, converted, gate, passed
):
    import gqa_convert.evals.report as report_module
    from gqa_convert.verify import verify_model

    monkeypatch.setattr(report_module, "retrieval_report", lambda *a, **k: _report(source, converted))
    extra = {} if gate is None else {"min_retrieval_ratio": gate}
    rep = verify_model(
        stories_kv2, str(stories_hf), val_text, 256, law_path=law_file, documents=4, tolerance=10, write=False, **extra
    )
    assert rep.passed is passed
    assert any(c.name == "retrieval" for c in rep.checks)
    if not passed:
        assert any("min_retrieval_ratio" in why for why in rep.reasons)


def test_eval_command_refuses_bad_input_before_work(stories_hf, tmp_path, capsys):
    for argv, words in (
        (["--context", "256", "--lengths", "1024"], "above the max_position_embeddings"),
        (["--context", "256", "--tasks", "passkey,needle"], "unknown task 'needle'"),
        (["--context", "256", "--samples", "0"], "--samples"),
        (["--context", "256", "--depths", "0.5,2"], "--depths"),
    ):
        rc = main(["eval", str(stories_hf), *argv, "--no-write"])
        err = capsys.readouterr().err
        assert rc == 2 and words in err and err.count("\n") == 1, err


def test_eval_command_writes_the_record(stories_hf, tmp_path, capsys):
    folder = tmp_path / "m"
    shutil.copytree(stories_hf, folder)
    rc = main(
        [
            "eval",
            str(folder),
            "--source",
            str(stories_hf),
            "--context",
            "256",
            "--tasks",
            "passkey",
            "--lengths",
            "128,256",
            "--samples",
            "2",
            "--depths",
            "0,1",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    rec = json.loads((folder / "retrieval.json").read_text())
    scores = rec["report"]["tasks"][0]["scores"]
    # the same model as its own source: identical prompts give identical answers
    assert scores["source"] == scores["converted"] and rec["report"]["ratio"] in (None, 1.0)
    assert EvalSettings().lengths_for(256) == [32, 64, 128, 256]
