"""The model card: metadata that the hub client parses, numbers copied from verification.json, a
licence inherited from the source, and nothing invented."""

from __future__ import annotations

import json
import shutil

import pytest
from huggingface_hub import ModelCard, metadata_load

from gqa_convert.card import BASE_MODEL_RELATION, render_card, source_licence, source_repo_id, write_model_card
from gqa_convert.errors import CheckpointError


def test_card_of_failed_conversion(stories_kv2):
    card_path = stories_kv2 / "README.md"
    report = json.loads((stories_kv2 / "verification.json").read_text())
    meta = metadata_load(card_path)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"gqa", "gqa-convert"} <= set(meta["tags"])
    assert "base_model" not in meta  # the source is a local folder: the hub accepts repo ids only
    card = ModelCard.load(card_path)
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results["loss"] == pytest.approx(report["loss"]["converted"], abs=1e-4)
    assert results["perplexity"] == pytest.approx(report["loss"]["converted_perplexity"], abs=1e-3)
    text = card_path.read_text()
    assert "**Verification: FAILED.**" in text and "**not uptrained**" in text
    assert "8 query / 4 KV heads" in text and "8 query / 2 KV heads" in text
    assert f"{report['loss']['source']:.4f}" in text and f"{report['loss']['predicted']:.4f}" in text
    assert "50.0%" in text  # KV cache halved: measured 4 -> 2 heads
    assert str(stories_kv2.parent) not in text  # no local absolute paths in a published card


def test_card_base_model_licence_and_uptraining(stories_kv4_verified, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(stories_kv4_verified, folder)
    (folder / "uptrain.json").write_text(
        json.dumps({"steps": 150, "tokens": 614400, "lr": 1e-3, "dataset_id": "roneneldan/TinyStories"})
    )
    (folder / "loss.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    ver = json.loads((folder / "verification.json").read_text())
    ver.update(source_id=None, source_licence=None)
    (folder / "verification.json").write_text(json.dumps(ver))
    # The source as a huggingface_hub cache path: its repo id becomes base_model; its README licence is inherited.
    src = tmp_path / "hub" / "models--karpathy--tinyllamas" / "snapshots" / "abc"
    src.mkdir(parents=True)
    (src / "README.md").write_text("---\nlicense: mit\n---\n# tinyllamas\n")
    record = json.loads((folder / "gqa_convert.json").read_text())
    record.update(source=str(src), source_path=str(src))
    (folder / "gqa_convert.json").write_text(json.dumps(record))
    ver.update(source=str(src), source_path=str(src))
    (folder / "verification.json").write_text(json.dumps(ver))

    path = write_model_card(folder, repo_id="alice/stories-gqa")
    meta = metadata_load(path)
    assert meta["base_model"] == "karpathy/tinyllamas"
    assert meta["base_model_relation"] == BASE_MODEL_RELATION == "finetune"
    assert meta["license"] == "mit"
    assert meta["datasets"] == ["roneneldan/TinyStories"]
    text = path.read_text()
    assert "**Verification: PASSED.**" in text and "uptrained on 614K tokens" in text
    assert "| steps | 150 |" in text and "![loss.png](loss.png)" in text
    assert 'from_pretrained("alice/stories-gqa")' in text


def test_helpers(tmp_path):
    assert source_repo_id("meta-llama/Llama-3.2-1B") == "meta-llama/Llama-3.2-1B"
    assert source_repo_id(None, "/x/models--Qwen--Qwen2.5-0.5B/snapshots/1234/") == "Qwen/Qwen2.5-0.5B"
    assert source_repo_id("llama-3.2-1b") == "meta-llama/Llama-3.2-1B"  # alias table
    assert source_repo_id(str(tmp_path)) is None
    assert source_licence(None, "meta-llama/Llama-3.2-1B") == {"license": "llama3.2"}
    assert source_licence(tmp_path, None) == {"license": "unknown"}
    with pytest.raises(CheckpointError):
        render_card(tmp_path)


def test_unverified_folder_says_so(stories_hf, tmp_path):
    folder = tmp_path / "plain"
    shutil.copytree(stories_hf, folder)
    text = render_card(folder)
    assert "**Verification: NOT RUN.**" in text and "gqa-convert verify" in text
    assert ModelCard(text).data.to_dict()["library_name"] == "transformers"
