"""The uptraining loop: bad input fails before any work, schedule, what trains, LoRA, distillation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gqa_convert.errors import ConfigError, DataError, OutputError, SourceNotFoundError
from gqa_convert.train.schedule import wsd_factor
from gqa_convert.train.uptrain import UptrainConfig, resolve_steps, uptrain

DOCS = [
    f"Story {i}: once upon a time a {w} went to the {p} and found a {o}."
    for i, (w, p, o) in enumerate(
        [
            (w, p, o)
            for w in ("cat", "dog", "girl", "boy")
            for p in ("park", "sea", "shop")
            for o in ("ball", "hat", "box")
        ]
    )
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from tiny import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "m", DOCS, layers=2, max_pos=128)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("data") / "docs.txt"
    f.write_text("\n\n".join(DOCS * 4))
    return f


def cfg(tiny, data, out, **kw) -> UptrainConfig:
    base = dict(
        model=str(tiny),
        data=str(data),
        context=32,
        output=str(out),
        steps=4,
        batch_size=2,
        lr=3e-3,
        heldout_docs=4,
        progress=False,
        save_every=1000,
    )
    base.update(kw)
    return UptrainConfig(**base)


def test_wsd_schedule_matches_the_paper():
    # 10% linear warmup, constant, last 20% cosine to 10% of max (law.md)
    f = [wsd_factor(s, 100) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0 and f[50] == 1.0 and f[79] == 1.0
    assert f[90] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + __import__("math").cos(__import__("math").pi * 11 / 20)))
    assert f[99] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[80:], f[81:]))


@pytest.mark.parametrize(
    "kw, err, words",
    [
        (dict(context=256), ConfigError, ["max_position_embeddings 128", "rope"]),
        (dict(steps=None, alpha=0.05), ConfigError, ["--pretraining-tokens"]),
        (dict(steps=None, tokens="50"), ConfigError, ["smaller than one step", "64"]),
        (dict(steps=None, tokens="1K", alpha=0.1), ConfigError, ["exactly one budget"]),
        (dict(attn="flash"), ConfigError, ["flash"]),
        (dict(train="mlp"), ConfigError, ["--train"]),
        (dict(distill_from="/nonexistent/teacher"), SourceNotFoundError, ["teacher", "/nonexistent/teacher"]),
        (dict(heldout_docs=10_000), DataError, ["no training documents"]),
    ],
)
def test_bad_input_fails_before_any_work(tiny, data, tmp_path, kw, err, words):
    if kw.get("attn") == "flash" and torch.cuda.is_available():
        pytest.skip("flash may run here")
    out = tmp_path / "out"
    with pytest.raises(err) as info:
        uptrain(cfg(tiny, data, out, **kw))
    msg = str(info.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    assert not out.exists()  # nothing was written


def test_empty_and_unreadable_data(tiny, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError):
        uptrain(cfg(tiny, empty, tmp_path / "o1", heldout_docs=0))
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 10)
    with pytest.raises(DataError, match="UTF-8"):
        uptrain(cfg(tiny, binary, tmp_path / "o2", heldout_docs=0))
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_budgets(tmp_path):
    c = UptrainConfig(model="m", data="d", context=1000, output="o", tokens="50M", batch_size=5, grad_accum=2)
    assert resolve_steps(c, world=1) == 5000 and resolve_steps(c, world=2) == 2500
    c = UptrainConfig(model="m", data="d", context=1000, output="o", alpha=0.05, pretraining_tokens="2M", batch_size=1)
    assert resolve_steps(c, world=1) == 100
    c = UptrainConfig(model="meta-llama/Llama-2-7b-hf", data="d", context=4096, output="o", alpha=0.05, batch_size=8)
    assert resolve_steps(c, world=1) == int(0.05 * 2e12) // (4096 * 8)  # aliases.yaml: 2T pretraining tokens
    # a converted folder names its source in gqa_convert.json (written by convert)
    (tmp_path / "gqa_convert.json").write_text(
        json.dumps({"source": "llama-2-7b", "source_repo": "meta-llama/Llama-2-7b-hf"})
    )
    c = UptrainConfig(model=str(tmp_path), data="d", context=4096, output="o", alpha=0.05, batch_size=8)
    assert resolve_steps(c, world=1) == int(0.05 * 2e12) // (4096 * 8)


def test_train_kv_changes_only_k_and_v(tiny, data, tmp_path):
    out = tmp_path / "kv"
    r = uptrain(cfg(tiny, data, out, train="kv"))
    before, after = load_file(str(tiny / "model.safetensors")), load_file(str(out / "model.safetensors"))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".k_proj." in k or ".v_proj." in k for k in changed)
    assert len(changed) == 4  # k and v of both layers
    assert r.losses[-1] < r.losses[0]
    assert r.attn_implementation == "sdpa_packed"  # auto without flash-attn: SDPA per document, no T×T mask


def test_lora_is_merged_on_save(tiny, data, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    uptrain(cfg(tiny, data, out, lora=True, lora_rank=4, train="attention", lr=1e-2))
    saved = load_file(str(out / "model.safetensors"))
    assert not any("lora" in k for k in saved)
    before = load_file(str(tiny / "model.safetensors"))
    assert set(saved) == set(before)
    changed = {k for k in before if not torch.equal(before[k], saved[k])}
    assert changed and all(".self_attn." in k for k in changed)
    AutoModelForCausalLM.from_pretrained(out)  # a plain transformers checkpoint


def test_distillation_logs_kl_and_trains(tiny, data, tmp_path):
    out = tmp_path / "distil"
    r = uptrain(cfg(tiny, data, out, distill_from=str(tiny), distill_weight=1.0, train="kv", warmup=0.1, decay=0.2))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    # the teacher is the model's own starting point: KL starts at exactly 0 and training on it changes nothing much
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert {"loss", "lr", "tokens", "tokens_per_s", "grad_norm"} <= set(rows[0])
    assert r.steps == 4 and (out / "loss_curve.png").is_file() and (out / "uptrain.json").is_file()
    record = json.loads((out / "uptrain.json").read_text())
    assert record["steps"] == 4 and record["settings"]["distill_weight"] == 1.0
    # the LR logged for each step is the one that step used: WSD over 4 steps (no warmup step, last one decayed)
    assert [x["lr"] for x in rows] == pytest.approx([3e-3 * wsd_factor(i, 4) for i in range(4)])


def test_heldout_slice_is_saved_and_never_trained(tiny, data, tmp_path):
    from gqa_convert.train.data import DataSpec

    out = tmp_path / "held"
    uptrain(cfg(tiny, data, out, heldout_docs=5))
    held = [json.loads(x)["text"] for x in (out / "heldout.jsonl").read_text().splitlines()]
    assert held == (DOCS * 4)[:5]
    meta = json.loads((out / "uptrain.json").read_text())
    assert meta["heldout_docs"] == 5 and meta["train_start"] == 5
    assert list(DataSpec(str(data), heldout=5).training_documents())[0] == (DOCS * 4)[5]


def test_output_folder_is_never_the_model_or_a_used_folder(tiny, data, tmp_path):
    with pytest.raises(OutputError, match="model folder itself"):
        uptrain(cfg(tiny, data, tiny))
    used = tmp_path / "used"
    used.mkdir()
    (used / "something").write_text("x")
    with pytest.raises(OutputError, match="--resume"):
        uptrain(cfg(tiny, data, used))
    with pytest.raises(OutputError, match="no checkpoint"):
        uptrain(cfg(tiny, data, used, resume=True))


def test_gradient_checkpointing_gives_the_same_steps(tiny, data, tmp_path):
    plain = uptrain(cfg(tiny, data, tmp_path / "plain", train="attention", steps=3))
    ckpt = uptrain(cfg(tiny, data, tmp_path / "ckpt", train="attention", steps=3, gradient_checkpointing=True))
    assert ckpt.losses == pytest.approx(plain.losses, abs=1e-5)
    a, b = (
        load_file(str(tmp_path / "plain" / "model.safetensors")),
        load_file(str(tmp_path / "ckpt" / "model.safetensors")),
    )
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_cli_reports_one_line_errors(tiny, data, tmp_path, capsys):
    from gqa_convert.commands import main

    rc = main(
        [
            "uptrain",
            str(tiny),
            "--data",
            str(data),
            "--context",
            "4096",
            "--steps",
            "2",
            "--output",
            str(tmp_path / "o"),
            "--heldout-docs",
            "0",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith(
        "gqa-convert: error: --context 4096 is above the model's max_position_embeddings"
    )
    rc = main(
        [
            "uptrain",
            str(tiny),
            "--data",
            str(data),
            "--context",
            "32",
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--output",
            str(tmp_path / "ok"),
            "--heldout-docs",
            "0",
            "--no-progress",
            "--train",
            "kv",
        ]
    )
    out = capsys.readouterr()
    assert rc == 0 and "attention = sdpa" in out.out and "uptrained 2 steps" in out.out


def test_cli_json_and_held_out_summary(tiny, data, tmp_path, capsys):
    """--json prints the result alone on stdout (the log on stderr); the plain summary reports the
    held-out loss with its slice, not the last noisy training batch."""
    from gqa_convert.commands import main

    common = ["uptrain", str(tiny), "--data", str(data), "--context", "32", "--steps", "2", "--batch-size", "2",
              "--heldout-docs", "6", "--eval-docs", "4", "--no-progress"]  # fmt: skip
    assert main([*common, "--output", str(tmp_path / "j"), "--json"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert "attention =" in err and result["steps"] == 2 and result["eval_slice"] == "documents[0:4]"
    evals = [json.loads(x) for x in (tmp_path / "j" / "metrics.jsonl").read_text().splitlines() if "eval_loss" in x]
    assert result["eval_loss"] == pytest.approx(evals[-1]["eval_loss"]) and evals[-1]["step"] == 2
    assert main([*common, "--output", str(tmp_path / "p")]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert f"held-out loss {result['eval_loss']:.4f} (documents[0:4] of heldout.jsonl)" in line
