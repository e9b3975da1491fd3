"""`gqa-convert verify`: measured costs against hand-counted oracles, the loss against the fixture's
documented values, the verdict and exit codes, and bad input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from gqa_convert.commands import main
from gqa_convert.errors import ConfigError, DataError, SourceNotFoundError
from gqa_convert.verify import DEFAULT_TOLERANCE, measure_costs, verify_model

# stories260K: 5 layers, dim 64, 8 query heads of size 8, 4 KV heads, FFN 172, vocab 512, float32.
L, D, NH, DH, FF, V = 5, 64, 8, 8, 172, 512


def test_measure_costs_match_hand_count(stories_hf):
    """KV bytes and decode FLOPs of stories260K at T=100, counted by hand from the architecture."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(stories_hf).eval()
    T = 100
    got = measure_costs(model, T)
    assert got["kv_cache_bytes"] == 2 * L * 4 * DH * T * 4  # K and V, 4 KV heads, fp32
    # Every Linear weight once (2 FLOPs per multiply-add) + QK^T and AV over T keys for 8 heads.
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert linear == L * (D * NH * DH * 2 + D * 4 * DH * 2 + 3 * D * FF) + D * V
    assert got["flops_per_token"] == 2 * linear + 4 * L * T * NH * DH


def test_unuptrained_conversion_fails(stories_kv2):
    """Mean-pooled 4 -> 2 without uptraining: costs match the cost model, loss ~4.4 fails the law."""
    report = json.loads((stories_kv2 / "verification.json").read_text())
    assert report["passed"] is False
    assert len(report["reasons"]) == 1 and "not uptrained" in report["reasons"][0]
    kv = report["costs"]["kv_cache_bytes"]["converted"]
    assert kv["measured"] == 2 * L * 2 * DH * 512 * 4 == kv["predicted"]
    fl = report["costs"]["flops_per_token"]["converted"]
    assert abs(fl["rel_error"]) < 1e-9
    lo = report["loss"]
    # Fixtures README: source 1.38-1.44 on the first paragraphs; mean-pooled to 2 heads ~4.4.
    assert 1.30 < lo["source"] < 1.50
    assert 3.8 < lo["converted"] < 5.0
    assert math.isclose(lo["converted_perplexity"], math.exp(lo["converted"]), rel_tol=1e-9)
    assert lo["limit"] == pytest.approx(lo["source"] + lo["delta"] + DEFAULT_TOLERANCE)
    assert lo["delta"] > 0  # the test law predicts a higher loss with fewer KV heads
    assert report["heads"]["converted"] == {"n_heads": 8, "n_kv": 2, "head_dim": 8}
    assert report["versions"]["gqa-convert"]
    assert (stories_kv2 / "README.md").is_file()


def test_identity_conversion_passes(stories_kv4_verified):
    report = json.loads((stories_kv4_verified / "verification.json").read_text())
    assert report["passed"] is True and report["reasons"] == []
    assert report["loss"]["delta"] == 0.0
    assert report["loss"]["converted"] == pytest.approx(report["loss"]["source"], abs=1e-6)
    assert all(c["passed"] for c in report["checks"])


def test_cli_exit_codes_and_table(stories_hf, stories_kv2, val_text, law_file, capsys, tmp_path):
    folder = tmp_path / "kv2"
    shutil.copytree(stories_kv2, folder)  # the shared fixture stays as verified
    base = [
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
        "8",
        "--no-card",
        "--no-retrieval",
    ]
    assert main(base) == 1
    out, err = capsys.readouterr()
    assert "FAILED" in out and "KV-cache bytes" in out and "verification failed" in err
    # A tolerance wide enough to cover the un-uptrained gap passes (exit 0), and --json is JSON.
    assert main(base + ["--tolerance", "10", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["context"] == 256 and report["data"]["documents"] == 8


def test_bad_input(stories_hf, stories_kv2, val_text, law_file, tmp_path):
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        verify_model(stories_kv2, str(stories_hf), val_text, 4096, law_path=law_file, write=False)
    with pytest.raises(ConfigError, match="tolerance"):
        verify_model(stories_kv2, str(stories_hf), val_text, 128, tolerance=-1, write=False)
    with pytest.raises(DataError):
        verify_model(stories_kv2, str(stories_hf), tmp_path / "missing.txt", 128, write=False)
    with pytest.raises(SourceNotFoundError):
        verify_model(stories_kv2, str(tmp_path / "nope"), val_text, 128, write=False)
    with pytest.raises(ConfigError, match="model itself"):
        verify_model(stories_kv2, str(stories_kv2), val_text, 128, write=False)
    assert main(["verify", str(tmp_path), "--data", str(val_text), "--context", "128"]) == 2


def test_default_source_from_convert_record(stories_hf, val_text, law_file, tmp_path, monkeypatch):
    """Without --source, verify finds a local source by the absolute path convert recorded, from
    any directory (the folder was converted by a relative path); a source moved away since gives
    one line naming where it was and the flag to pass."""
    from gqa_convert.convert import convert_checkpoint

    src = tmp_path / "models" / "stories"
    shutil.copytree(stories_hf, src)
    monkeypatch.chdir(tmp_path / "models")
    convert_checkpoint(Path("stories"), Path("converted"), 2, progress=False)  # relative paths
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    folder = tmp_path / "models" / "converted"
    explicit = verify_model(folder, str(src), val_text, 64, law_path=law_file, documents=4, card=False, write=False)
    found = verify_model(folder, None, val_text, 64, law_path=law_file, documents=4, card=False, write=False)
    assert found.loss.source == explicit.loss.source  # the same source model was scored
    assert found.loss.converted == explicit.loss.converted
    src.rename(tmp_path / "models" / "moved")
    with pytest.raises(ConfigError, match=f"converted from {src}, which is no longer there.*--source"):
        verify_model(folder, None, val_text, 64, law_path=law_file, documents=4, card=False, write=False)


def test_published_record_has_no_local_paths(stories_kv2):
    text = (stories_kv2 / "verification.json").read_text() + (stories_kv2 / "README.md").read_text()
    assert str(stories_kv2.parent) not in text and "/tmp/" not in text
