"""Uptraining without tuning flags (issue 15; docs/uptrain.md, "Defaults"): the learning rate by the
model's width, only the attention trains, and distillation from the source recorded in the
converted model's gqa_convert.json, said in the log, with --no-distill to turn it off."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gqa_convert.settings import UptrainSettings
from gqa_convert.train.schedule import default_lr, wsd_factor

DOCS = [f"Story {i}: a {w} went to the {p}." for i, (w, p) in enumerate((w, p) for w in "abcdef" for p in "xyz")]


def test_lr_rule_gives_the_measured_and_the_published_values():
    # stories260K (width 64): the best of 2.5e-3 / 5e-3 / 1e-2 in the Defaults table; the second
    # model (width 128): half of it, as the 1/width rule says.
    assert default_lr(64) == pytest.approx(5e-3) and default_lr(128) == pytest.approx(2.5e-3)
    # Llama-3-8B and Llama-2-70B widths: between the published continued-pretraining LRs of 8B
    # Llamas (1e-5 - 3e-5) and their pretraining peak (3e-4 for Llama-3-8B, 1.5e-4 for 70B).
    assert 3e-5 <= default_lr(4096) <= 1e-4 and 1e-5 <= default_lr(8192) <= 5e-5
    assert default_lr(16) == pytest.approx(5e-3) and default_lr(10**6) == pytest.approx(1e-5)  # the clamp
    s = UptrainSettings()
    assert s.lr is None and s.train == "attention" and s.distill and s.distill_weight == 1.0
    assert (s.warmup, s.decay) == (0.05, 0.5)


@pytest.fixture()
def converted(tmp_path) -> tuple[Path, Path, Path]:
    """(source, converted with a record naming the source's absolute path, text)."""
    from tiny import make_tiny_llama

    from gqa_convert.convert import convert_checkpoint

    src = make_tiny_llama(tmp_path / "src", DOCS, heads=4, kv_heads=2, max_pos=64)
    conv = tmp_path / "kv1"
    convert_checkpoint(src, conv, 1, progress=False)
    text = tmp_path / "docs.txt"
    text.write_text("\n\n".join(DOCS * 3))
    return src, conv, text


def run_cli(conv: Path, text: Path, out: Path, *extra: str) -> int:
    from gqa_convert.commands import main

    args = ["uptrain", str(conv), "--data", str(text), "--context", "32", "--steps", "3", "--batch-size", "2"]
    return main([*args, "--heldout-docs", "4", "--output", str(out), "--no-progress", "--eval-docs", "0", *extra])


def rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_distills_from_the_recorded_source_by_default(converted, tmp_path, capsys):
    src, conv, text = converted
    assert run_cli(conv, text, tmp_path / "default") == 0
    log = capsys.readouterr().out
    assert f"distilling from {src.resolve()} (the recorded source; --no-distill to turn off)" in log
    assert f"learning rate {default_lr(64):.3g}" in log
    # The oracle: the same run with the teacher named explicitly (the documented --distill-from).
    assert run_cli(conv, text, tmp_path / "explicit", "--distill-from", str(src)) == 0
    default, explicit = rows(tmp_path / "default"), rows(tmp_path / "explicit")
    assert all(r["kl"] > 0 for r in default)  # the converted model differs from its teacher
    assert [(r["loss"], r["kl"]) for r in default] == [(r["loss"], r["kl"]) for r in explicit]
    # the LR of each step is the rule's for this width (64) on the default WSD schedule
    assert [r["lr"] for r in default] == pytest.approx([default_lr(64) * wsd_factor(i, 3, 0.05, 0.5) for i in range(3)])
    settings = json.loads((tmp_path / "default" / "uptrain.json").read_text())["settings"]
    assert settings["distill_from"] == "src" and settings["lr"] == pytest.approx(5e-3)  # local paths by name


def test_no_distill_and_a_missing_source_train_on_next_token_loss(converted, tmp_path, capsys):
    src, conv, text = converted
    assert run_cli(conv, text, tmp_path / "off", "--no-distill") == 0
    assert "no distillation (--no-distill): next-token loss only" in capsys.readouterr().out
    assert not any("kl" in r for r in rows(tmp_path / "off"))

    shutil.move(str(src), str(tmp_path / "moved"))
    assert run_cli(conv, text, tmp_path / "gone") == 0
    log = capsys.readouterr().out
    assert f"no distillation: the recorded source {src.resolve()} is not there any more" in log
    assert "next-token loss only" in log and "--distill-from SRC" in log
    assert not any("kl" in r for r in rows(tmp_path / "gone"))
    # same start and data as the --no-distill run: the same training
    assert [r["loss"] for r in rows(tmp_path / "gone")] == [r["loss"] for r in rows(tmp_path / "off")]
