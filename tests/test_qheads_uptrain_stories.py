"""stories260K (8 query / 4 KV heads) -> 4 query heads, `prune` against `merge`, zero-shot AND after
the same uptraining budget (issue 16). docs/query-heads.md records the numbers.

Project convention (gqa_convert/evaluate.py): held-out loss over documents[:200] of
tinystories_val_head.txt; calibration (4096 tokens) and uptraining from documents[1000:].
Uptraining, identical for every start: gqa_convert.train.uptrain, 80 steps x 8 sequences x 256
tokens, AdamW lr 1e-3 (WSD), only the attention weights train, distilled from the source
(KL weight 0.5), seed 0.
"""

from __future__ import annotations

import pytest

from gqa_convert.convert import convert_checkpoint
from gqa_convert.evaluate import document_loss, heldout_documents, load_model, training_documents

CALIB_TOKENS = 4096
STEPS, BATCH, CONTEXT, LR, DISTILL = 80, 8, 256, 1e-3, 0.5
# What docs/query-heads.md reports (measured with this test's settings on CPU, torch 2.13, one
# thread): (zero-shot, after uptraining). Kept here so the two cannot drift apart unnoticed.
DOCUMENTED = {
    (4, "prune"): (1.898, 1.510),
    (4, "merge"): (1.607, 1.476),
    (2, "prune"): (2.714, 1.693),
    (2, "merge"): (2.369, 1.705),
}
DOCUMENTED_TOL = 0.03  # platform / BLAS differences in 80 steps of training


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GQA_CONVERT_CACHE", str(tmp_path / "cache"))


def _loss(folder, docs) -> float:
    model, tok = load_model(folder)
    return document_loss(model, tok, docs).mean_loss


def _uptrain(start, run, source, val_text):
    from gqa_convert.settings import UptrainConfig
    from gqa_convert.train.uptrain import uptrain

    uptrain(
        UptrainConfig(
            model=str(start), data=str(val_text), context=CONTEXT, output=str(run), steps=STEPS, batch_size=BATCH,
            lr=LR, train="attention", distill_from=str(source), distill_weight=DISTILL, heldout_docs=200,
            train_start=1000, seed=0, progress=False,
            warmup=0.1, decay=0.2,  # the schedule of the documented runs (the defaults before issue 15)
        )
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("kv, kv_method", [(4, "mean"), (2, "optimal")])
def test_prune_and_merge_before_and_after_the_same_uptraining(stories_hf, val_text, tmp_path, kv, kv_method):
    held, train = heldout_documents(val_text), training_documents(val_text)
    source = _loss(stories_hf, held)
    zero, after = {}, {}
    for q_method in ("prune", "merge"):
        start = tmp_path / q_method
        convert_checkpoint(stories_hf, start, kv, method=kv_method, q_heads=4, q_method=q_method, calib_data=train,
                           calib_tokens=CALIB_TOKENS, progress=False)  # fmt: skip
        zero[q_method] = _loss(start, held)
        _uptrain(start, tmp_path / f"{q_method}-up", stories_hf, val_text)
        after[q_method] = _loss(tmp_path / f"{q_method}-up", held)
    print(f"\nstories260K 8/4 -> 4/{kv} ({kv_method} KV): source {source:.4f}")
    for m in ("prune", "merge"):
        print(f"  {m}: zero-shot {zero[m]:.4f}, after uptraining {after[m]:.4f}")
    # zero-shot: merge beats prune (the requirement)
    assert source < zero["merge"] < zero["prune"], zero
    # uptraining recovers most of either method's zero-shot loss, and the same budget leaves the two
    # starts much closer than they began (merge's head start is worth less than its zero-shot gap)
    for m in ("prune", "merge"):
        assert after[m] < zero[m] and after[m] - source < 0.5 * (zero[m] - source), (m, zero, after)
    assert abs(after["merge"] - after["prune"]) < 0.25 * (zero["prune"] - zero["merge"]), (zero, after)
    # the recorded figures
    for m in ("prune", "merge"):
        z, u = DOCUMENTED[(kv, m)]
        assert zero[m] == pytest.approx(z, abs=0.005) and after[m] == pytest.approx(u, abs=DOCUMENTED_TOL), m
