"""Query-head reduction on a real pretrained model: stories260K (8 query heads, 4 KV heads) -> 4 query heads.

Project convention (gqa_convert/evaluate.py): held-out loss over documents[:200] of
tinystories_val_head.txt; calibration from documents[1000:]. docs/query-heads.md has the numbers.
"""

from __future__ import annotations

import json

import pytest

from gqa_convert.convert import convert_checkpoint
from gqa_convert.evaluate import document_loss, heldout_documents, load_model, training_documents

CALIB_TOKENS = 4096


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GQA_CONVERT_CACHE", str(tmp_path / "cache"))


def _loss(folder, docs) -> float:
    model, tok = load_model(folder)
    return document_loss(model, tok, docs).mean_loss


@pytest.mark.slow
@pytest.mark.parametrize("kv, kv_method", [(4, "mean"), (2, "optimal")])
def test_merge_beats_prune_zero_shot_on_stories(stories_hf, val_text, tmp_path, kv, kv_method):
    """8 -> 4 query heads, KV heads kept (4) or merged 4 -> 2 by the activation-optimal merge."""
    held, train = heldout_documents(val_text), training_documents(val_text)
    losses, records = {}, {}
    for q_method in ("prune", "merge"):
        out = tmp_path / q_method
        convert_checkpoint(stories_hf, out, kv, method=kv_method, q_heads=4, q_method=q_method, calib_data=train,
                           calib_tokens=CALIB_TOKENS, progress=False)  # fmt: skip
        cfg = json.loads((out / "config.json").read_text())
        assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, kv, 8)
        losses[q_method] = _loss(out, held)
        records[q_method] = json.loads((out / "gqa_convert.json").read_text())["query_heads"]
    source = _loss(stories_hf, held)
    print(f"kv {kv} ({kv_method}): source {source:.4f}", {k: round(v, 4) for k, v in losses.items()})
    assert source < losses["merge"] < losses["prune"], (source, losses)
    merge, prune = records["merge"], records["prune"]
    assert merge["calibration_tokens"] == CALIB_TOKENS and len(merge["layers"]) == 5
    for i, layer in merge["layers"].items():
        assert layer["rel_error_merge"] <= layer["rel_error_prune"] == prune["layers"][i]["rel_error_prune"]
