"""Calibrated merges on a real pretrained model: stories260K (4 KV heads, 8 query heads).

Project convention (gqa_convert/evaluate.py): held-out loss over documents[:200] of
tinystories_val_head.txt; calibration and uptraining from documents[1000:]. Gap closed =
(mean − method) / (mean − source), with the source's zero-shot held-out loss.
"""

from __future__ import annotations

import json

import pytest
import torch

from gqa_convert.architectures import get_family, head_shape, new_shape
from gqa_convert.convert import convert_checkpoint
from gqa_convert.evaluate import document_loss, heldout_documents, load_model, training_documents
from gqa_convert.merge import build_method
from gqa_convert.merge.heads import expanded_block, merged_block, transformed_block

CALIB_TOKENS = 4096
UP_STEPS, UP_BATCH = 40, 4


@pytest.fixture(scope="module")
def setup(stories_hf, val_text, tmp_path_factory):
    cache = tmp_path_factory.mktemp("calib")
    train = training_documents(val_text)
    methods = {
        name: build_method(name, source_dir=stories_hf, calib_data=train, calib_tokens=CALIB_TOKENS, cache_dir=cache)
        for name in ("mean", "align", "optimal")
    }
    model, tok = load_model(stories_hf)
    held = heldout_documents(val_text)
    return {"methods": methods, "held": held, "source": document_loss(model, tok, held).mean_loss, "cache": cache}


def _loss(folder, held) -> float:
    model, tok = load_model(folder)
    return document_loss(model, tok, held).mean_loss


def _swap_blocks(model, fam, blocks: dict, shape):
    """A model of `shape` whose attention tensors come from `blocks` (the rest from `model`)."""
    from transformers import AutoModelForCausalLM

    cfg = model.config.to_dict()
    out = AutoModelForCausalLM.from_config(type(model.config).from_dict(fam.updated_config(cfg, shape.n_kv))).eval()
    sd = dict(model.state_dict())
    for i, b in blocks.items():
        sd.update(fam.join(i, b, shape))
    out.load_state_dict(sd)
    return out


def test_alignment_and_absorption_preserve_stories_logits(stories_hf, setup):
    """With the real calibration: alignment alone leaves logits unchanged; the absorbed optimal
    merge equals its un-merged approximation."""
    model, tok = load_model(stories_hf)
    cfg = model.config.to_dict()
    fam = get_family(cfg)
    shape = head_shape(fam, cfg)
    sd = model.state_dict()
    ids = tok(setup["held"][0], return_tensors="pt")["input_ids"][:, :128]
    with torch.no_grad():
        ref = model(ids).logits
    aligned, expanded, merged = {}, {}, {}
    for i in range(fam.n_layers(cfg)):
        block = fam.split(i, sd, shape)
        groups, _, planes, _ = setup["methods"]["align"].factors(i, block, shape, 2)
        maps = torch.cat([f.v_maps for f in groups])
        scalars = torch.cat([f.k_scalars for f in groups])
        aligned[i] = transformed_block(block, shape, maps, scalars, planes)
        opt, _, planes, _ = setup["methods"]["optimal"].factors(i, block, shape, 1)
        expanded[i] = expanded_block(block, shape, opt, planes)
        merged[i] = merged_block(block, shape, 1, opt, planes)
    with torch.no_grad():
        a = _swap_blocks(model, fam, aligned, shape)(ids).logits
        e = _swap_blocks(model, fam, expanded, shape)(ids).logits
        m = _swap_blocks(model, fam, merged, new_shape(shape, 1))(ids).logits
    assert (a - ref).abs().max() < 1e-4 * ref.abs().max()
    assert (m - e).abs().max() < 1e-4 * e.abs().max()
    assert (e - ref).abs().max() > 1e-2  # the merge itself is lossy


@pytest.mark.slow
def test_optimal_closes_most_of_the_mean_pooling_gap_zero_shot(stories_hf, setup, tmp_path):
    losses = {}
    for kv in (2, 1):
        for name in ("mean", "optimal"):
            out = tmp_path / f"{name}-{kv}"
            convert_checkpoint(stories_hf, out, kv, method=setup["methods"][name], progress=False)
            losses[name, kv] = _loss(out, setup["held"])
        record = json.loads((out / "gqa_convert.json").read_text())
        rep = record["report"]
        assert rep["summary"]["method"] == "optimal" and len([k for k in rep if k.isdigit()]) == 5
        for layer in range(5):
            r = rep[str(layer)]
            assert r["k"]["optimal"] < r["k"]["mean"] and r["v"]["optimal"] < r["v"]["mean"]
    src = setup["source"]
    print({f"{n}@{kv}": round(v, 3) for (n, kv), v in losses.items()}, "source", round(src, 3))
    assert 1.35 < src < 1.5  # fixtures README: 1.38-1.44
    for kv in (2, 1):
        closed = (losses["mean", kv] - losses["optimal", kv]) / (losses["mean", kv] - src)
        assert closed >= 0.60, (kv, closed, losses)


@pytest.mark.slow
def test_optimal_keeps_its_lead_after_identical_uptraining(stories_hf, val_text, setup, tmp_path):
    """Same uptraining run (gqa_convert.train.uptrain, UP_STEPS x UP_BATCH x 256 tokens, AdamW 1e-3,
    documents[1000:]) from the mean-pooled and the optimal 4->1 starts. docs/merging.md has the
    longer runs (50 x 8 and 100 x 16, both ratios); this one is sized for CI."""
    from gqa_convert.train.uptrain import UptrainConfig, uptrain

    after = {}
    for name in ("mean", "optimal"):
        start = tmp_path / f"{name}-1"
        convert_checkpoint(stories_hf, start, 1, method=setup["methods"][name], progress=False)
        run = tmp_path / f"{name}-1-up"
        uptrain(UptrainConfig(model=str(start), data=str(val_text), context=256, output=str(run), steps=UP_STEPS,
                              batch_size=UP_BATCH, lr=1e-3, heldout_docs=200, train_start=1000, seed=0,
                              # the settings of docs/merging.md's run (the defaults before issue 15)
                              train="all", distill=False, warmup=0.1, decay=0.2))  # fmt: skip
        after[name] = _loss(run, setup["held"])
    closed = (after["mean"] - after["optimal"]) / (after["mean"] - setup["source"])
    print(after, "source", setup["source"], "closed", closed)
    assert closed >= 0.50, (after, closed)
