"""`gqa-convert plan`: options, costs, the law's delta, the recommendation rule, JSON, PNG."""

from __future__ import annotations

import json

import pytest

from gqa_convert.commands import main
from gqa_convert.law.cost import CostSettings, cost_report
from gqa_convert.law.loss import load_law
from gqa_convert.law.shapes import ModelShape
from gqa_convert.plan import plan_conversion, recommend_kv_heads

LLAMA_1B = {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
            "tie_word_embeddings": True}


def test_plan_options_and_costs():
    plan = plan_conversion(LLAMA_1B, 131072, max_loss_increase=0.05)
    paper = [o for o in plan.options if not o.outside_paper]
    assert [(o.q_heads, o.kv_heads) for o in paper] == [(32, 8), (32, 4), (32, 2), (32, 1)]
    assert all(o.q_heads < 32 and o.kv_heads <= o.q_heads and o.q_heads % o.kv_heads == 0
               for o in plan.options if o.outside_paper)
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
    assert recommend_kv_heads(LLAMA_1B, 131072, max_loss_increase=0.0) == 8
    assert recommend_kv_heads(LLAMA_1B, 131072, max_loss_increase=10.0) == 1
    one = plan_conversion(LLAMA_1B, 131072, max_loss_increase=10.0)
    assert any("tensor-parallel and Ulysses sequence-parallel degree at 1" in w for w in one.warnings)
    two = next(o for o in one.options if (o.q_heads, o.kv_heads) == (32, 2))
    assert any("degree at 2" in n for n in two.notes)


def test_plan_cli_json_and_png(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(LLAMA_1B))
    png = tmp_path / "plot" / "plan.png"
    assert main(["plan", str(src), "--context", "128K", "--json", "--plot", str(png)]) == 0
    out = json.loads(capsys.readouterr().out)
    for o in out["options"]:
        for key in ("q_heads", "kv_heads", "predicted_loss_delta", "kv_cache_bytes", "flops_per_token", "z"):
            assert key in o
    assert out["recommended"]["kv_heads"] in (1, 2, 4, 8)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert not list(png.parent.glob(".*tmp*"))
    assert main(["plan", str(src), "--context", "8K"]) == 0
    text = capsys.readouterr().out
    assert "Recommended:" in text and "outside the paper" in text


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


@pytest.mark.parametrize("args,match", [
    (["plan", "{src}", "--context", "12x"], "--context"),
    (["plan", "{src}", "--context", "0"], "--context"),
    (["plan", "{src}", "--context", "8K", "--dtype", "fp7"], "dtype"),
    (["plan", "{src}", "--context", "8K", "--max-loss-increase", "-1"], "max-loss-increase"),
    (["plan", "/nonexistent/model-xyz", "--context", "8K"], "model-xyz"),
])
def test_plan_bad_input(tmp_path, capsys, args, match):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(LLAMA_1B))
    assert main([a.replace("{src}", str(src)) for a in args]) != 0
    err = capsys.readouterr().err
    assert err.startswith("gqa-convert: error:") and match in err and err.count("\n") == 1
