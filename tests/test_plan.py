"""`gqa-convert plan`: options, costs, the law's delta, the recommendation rule, JSON, PNG."""

from __future__ import annotations

import json

import pytest

from gqa_convert.commands import main
from gqa_convert.law.loss import load_law
from gqa_convert.plan import format_plan, plan_conversion, recommend_heads, recommend_kv_heads, write_plot

LLAMA_1B = {
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "vocab_size": 128256,
    "tie_word_embeddings": True,
}


def test_plan_options_and_costs():
    plan = plan_conversion(LLAMA_1B, 131072, max_loss_increase=0.05)
    paper = [o for o in plan.options if not o.outside_paper]
    assert [(o.q_heads, o.kv_heads) for o in paper] == [(32, 8), (32, 4), (32, 2), (32, 1)]
    assert all(
        o.q_heads < 32 and o.kv_heads <= o.q_heads and o.q_heads % o.kv_heads == 0
        for o in plan.options
        if o.outside_paper
    )
    src = paper[0]
    assert src.is_source and src.predicted_loss_delta == 0
    # KV-cache bytes at T (bf16): 2 · L · n_kv · d_h · T · 2
    for o in paper:
        assert o.kv_cache_bytes == 2 * 16 * o.kv_heads * 64 * 131072 * 2
    assert paper[-1].kv_cache_saved_pct == pytest.approx(87.5)
    # fewer KV heads: fewer parameters, higher predicted loss, lower Z
    deltas = [o.predicted_loss_delta for o in paper]
    assert deltas == sorted(deltas) and deltas[-1] > 0
    assert [o.z for o in paper] == sorted([o.z for o in paper], reverse=True)
    # the delta is the law's L(N';H') − L(N;H) with non-embedding N
    law = load_law()
    n_src = 16 * (2 * 2048 * 64 * 40 + 3 * 2048 * 8192)
    n_new = 16 * (2 * 2048 * 64 * 33 + 3 * 2048 * 8192)
    assert paper[-1].predicted_loss_delta == pytest.approx(law.loss(n_new, 32, 1) - law.loss(n_src, 32, 8))


def test_recommendation_rule():
    plan = plan_conversion(LLAMA_1B, 131072, max_loss_increase=0.05)
    allowed = [o for o in plan.options if not o.outside_paper and o.predicted_loss_delta <= 0.05]
    assert plan.recommended is min(allowed, key=lambda o: o.z)
    # both counts: the lowest Z of every listed option within the allowed increase
    both = [o for o in plan.options if 0 <= o.predicted_loss_delta <= 0.05]
    assert plan.recommended_joint is min(both, key=lambda o: o.z)
    assert plan.recommended_joint.z <= plan.recommended.z
    assert recommend_kv_heads(LLAMA_1B, 131072, max_loss_increase=0.0) == 8
    assert recommend_kv_heads(LLAMA_1B, 131072, max_loss_increase=10.0) == 1
    one = plan_conversion(LLAMA_1B, 131072, max_loss_increase=10.0)
    assert any(
        "1 KV head: serving with tensor parallelism over more than 1 GPU(s) replicates" in w for w in one.warnings
    )
    two = next(o for o in one.options if (o.q_heads, o.kv_heads) == (32, 2))
    # TP 8 over 2 KV heads: each head on 4 GPUs, the KV cache held 4 times
    assert any("at TP 8 every GPU holds one head's cache" in n and "4x the model's KV cache" in n for n in two.notes)


def test_plan_cli_json_and_png(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(LLAMA_1B))
    png = tmp_path / "plot" / "plan.png"
    assert main(["plan", str(src), "--context", "128K", "--json", "--plot", str(png)]) == 0
    out = json.loads(capsys.readouterr().out)
    for o in out["options"]:
        for key in (
            "q_heads",
            "kv_heads",
            "predicted_loss_delta",
            "kv_cache_bytes",
            "flops_per_token",
            "attention_flops_per_token",
            "z",
            "outside_paper",
        ):
            assert key in o
    assert out["recommended"]["kv_heads"] in (1, 2, 4, 8) and out["recommended"]["q_heads"] == 32
    joint = out["recommended_joint"]
    assert (joint["q_heads"], joint["kv_heads"]) in {(o["q_heads"], o["kv_heads"]) for o in out["options"]}
    assert out["kv_only"] is False and out["q_heads_refused"] == "" and "rule_joint" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert not list(png.parent.glob(".*tmp*"))
    assert main(["plan", str(src), "--context", "8K"]) == 0
    text = capsys.readouterr().out
    assert "Recommended:" in text and "outside the paper" in text and "query heads kept" in text


def test_plan_stories260k(stories_hf):
    plan = plan_conversion(str(stories_hf), 512, dtype="fp32")
    assert plan.shape.n_kv == 4 and {o.kv_heads for o in plan.options if not o.outside_paper} == {4, 2, 1}
    src = next(o for o in plan.options if o.is_source)
    assert src.kv_cache_bytes == 2 * 5 * 4 * 8 * 512 * 4
    # 226K parameters, far below the law's range: the shipped law is monotone in the heads (issue 3),
    # so fewer KV heads always predict a higher loss; none is flagged as predicting a lower one.
    paper = sorted((o for o in plan.options if not o.outside_paper), key=lambda o: -o.kv_heads)
    assert [o.predicted_loss_delta > 0 for o in paper[1:]] == [True, True]
    assert paper[1].predicted_loss_delta < paper[2].predicted_loss_delta
    assert not any("LOWER loss" in n for o in plan.options for n in o.notes)
    assert not any("unreliable" in w for w in plan.warnings)
    assert recommend_kv_heads(stories_hf, 512, max_loss_increase=0.0) == 4
    assert recommend_kv_heads(stories_hf, 512, max_loss_increase=10.0) == 1


def test_plan_flags_negative_deltas_of_a_non_monotone_law(stories_hf):
    """The guard stays for law files: the earlier unconstrained reconstruction inverts at this size."""
    plan = plan_conversion(str(stories_hf), 512, dtype="fp32", law=load_law("shipped:table4"))
    assert any("LOWER loss" in n for o in plan.options if not o.is_source for n in o.notes)
    assert any("unreliable" in w for w in plan.warnings)
    assert plan.recommended.kv_heads == 4


@pytest.mark.parametrize(
    "args,match",
    [
        (["plan", "{src}", "--context", "12x"], "--context"),
        (["plan", "{src}", "--context", "0"], "--context"),
        (["plan", "{src}", "--context", "8K", "--dtype", "fp7"], "dtype"),
        (["plan", "{src}", "--context", "8K", "--max-loss-increase", "-1"], "max-loss-increase"),
        (["plan", "/nonexistent/model-xyz", "--context", "8K"], "model-xyz"),
    ],
)
def test_plan_bad_input(tmp_path, capsys, args, match):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(LLAMA_1B))
    assert main([a.replace("{src}", str(src)) for a in args]) != 0
    err = capsys.readouterr().err
    assert err.startswith("gqa-convert: error:") and match in err and err.count("\n") == 1


# --------------------------------------------------------------------------- both counts (issue 16)
LLAMA3_8B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
}
T = 131072


def _hand_costs(q: int, k: int) -> tuple[int, int, int]:
    """Independent of law/cost.py: (KV-cache bytes in bf16, attention FLOPs, forward FLOPs) of one
    token with T keys for Llama-3-8B's shape with q query and k KV heads of d_h = 128."""
    L, d, dh, ff, V = 32, 4096, 128, 14336, 128256
    kv_bytes = 2 * L * k * dh * T * 2  # keys and values, every layer and KV head, 2 bytes each
    attention = 4 * T * L * dh * q  # QKᵀ and AV: 2 multiply-adds per key per head dimension
    n = L * (2 * d * dh * (q + k) + 3 * d * ff) + V * d  # weights that cost FLOPs (output head in, input lookup out)
    return kv_bytes, attention, 2 * n + attention  # eq. 3: C = 2N + 4·T·L·d_h·n_h


def test_plan_lists_every_joint_option_with_exact_costs():
    plan = plan_conversion(LLAMA3_8B, "128K", max_loss_increase=0.05)
    heads = [o.heads for o in plan.options]
    want = {(q, k) for k in (1, 2, 4, 8) for q in (1, 2, 4, 8, 16, 32) if q % k == 0}
    assert len(heads) == len(set(heads)) == 18 and set(heads) == want
    assert heads[:4] == [(32, 8), (32, 4), (32, 2), (32, 1)]  # KV-only first, as before
    for o in plan.options:
        kv_bytes, attention, total = _hand_costs(o.q_heads, o.kv_heads)
        assert (o.kv_cache_bytes, o.attention_flops_per_token, o.flops_per_token) == (kv_bytes, attention, total)
        assert o.outside_paper == (o.q_heads != 32)
        assert o.predicted_loss_delta is not None and o.predicted_loss_delta >= 0
    src = plan.options[0]
    assert src.is_source and src.kv_cache_bytes == 16 * 2**30 and src.attention_flops_per_token == 68_719_476_736
    # the figures: ~69 GFLOPs of attention per token at 128K, four fifths of the compute
    assert src.attention_flops_per_token / src.flops_per_token == pytest.approx(0.82, abs=0.01)
    half = next(o for o in plan.options if o.heads == (16, 8))
    assert src.flops_per_token - half.flops_per_token == 4 * T * 32 * 128 * 16 + 2 * 32 * 2 * 4096 * 128 * 16
    assert half.kv_cache_bytes == src.kv_cache_bytes
    # removing heads never lowers the predicted loss (the shipped law is monotone in both counts)
    by = {o.heads: o.predicted_loss_delta for o in plan.options}
    for (q, k), delta in by.items():
        for fewer in ((q // 2, k), (q, k // 2)):
            if fewer in by:
                assert by[fewer] > delta, ((q, k), fewer)


def test_joint_recommendation_and_recommend_heads():
    for limit in (0.0, 0.02, 0.05, 0.1, 10.0):
        plan = plan_conversion(LLAMA3_8B, T, max_loss_increase=limit)
        allowed = [o for o in plan.options if o.is_source or 0 <= o.predicted_loss_delta <= limit]
        best = min(allowed, key=lambda o: o.z)
        assert plan.recommended_joint is best
        kv_only = min((o for o in allowed if not o.outside_paper), key=lambda o: o.z)
        assert plan.recommended is kv_only
        assert recommend_heads(LLAMA3_8B, T, max_loss_increase=limit) == best.heads
        assert recommend_kv_heads(LLAMA3_8B, T, max_loss_increase=limit) == kv_only.kv_heads
    assert recommend_heads(LLAMA3_8B, T, max_loss_increase=0.0) == (32, 8)
    assert recommend_heads(LLAMA3_8B, T, max_loss_increase=10.0) == (1, 1)
    plan = plan_conversion(LLAMA3_8B, T, max_loss_increase=0.05)
    j, r = plan.recommended_joint, plan.recommended
    print(
        f"\nLlama-3-8B at 128K, +0.05 nats: both counts {j.heads} (Z -{j.z_saved_pct:.1f}%, FLOPs "
        f"-{j.flops_saved_pct:.1f}%, KV -{j.kv_cache_saved_pct:.1f}%); query heads kept {r.heads}"
    )
    assert j.outside_paper and j.z < r.z  # at 128K the query heads are worth reducing
    text = format_plan(plan)
    assert f"Recommended: {j.q_heads} query heads, {j.kv_heads} KV head" in text
    assert f"query heads kept: {r.q_heads} query heads, {r.kv_heads} KV head" in text


def test_kv_only_flag():
    plan = plan_conversion(LLAMA3_8B, T, kv_only=True)
    assert [o.heads for o in plan.options] == [(32, 8), (32, 4), (32, 2), (32, 1)]
    assert plan.kv_only and plan.recommended_joint is plan.recommended
    assert plan.to_dict()["recommended_joint"] == plan.to_dict()["recommended"]
    old = plan_conversion(LLAMA3_8B, T, query_options=False)  # the earlier spelling
    assert [o.heads for o in old.options] == [o.heads for o in plan.options]


@pytest.mark.parametrize("family, why", [("falcon", "head_dim"), ("stablelm", "head_dim"), ("olmo2", "q_norm")])
def test_families_that_cannot_decouple_head_dim_get_kv_only_options(family, why, tmp_path, capsys):
    from tests.tiny_models import tiny_config

    config = tiny_config(family).to_dict()
    plan = plan_conversion(config, 8192, max_loss_increase=10.0)
    assert plan.kv_only and why in plan.q_heads_refused
    assert {o.q_heads for o in plan.options} == {8} and {o.kv_heads for o in plan.options} == {4, 2, 1}
    assert any("KV-head options only" in w and why in w for w in plan.warnings)
    assert plan.recommended_joint is plan.recommended
    assert recommend_heads(config, 8192, max_loss_increase=10.0) == (
        8,
        recommend_kv_heads(config, 8192, max_loss_increase=10.0),
    )
    text = format_plan(plan)
    assert "KV-only options" in text and why in text
    # the CLI reads the same (its ModelShape carries the model type)
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(config))
    assert main(["plan", str(src), "--context", "8K", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kv_only"] is True and why in out["q_heads_refused"]
    assert {o["q_heads"] for o in out["options"]} == {8}


def test_plot_marks_both_recommendations(tmp_path):
    plan = plan_conversion(LLAMA3_8B, T, max_loss_increase=0.05)
    assert plan.recommended_joint is not plan.recommended
    png = write_plot(plan, tmp_path / "joint.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    json.dumps(plan.to_dict())  # serialisable
