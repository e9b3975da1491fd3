"""The whole pipeline on the offline demo recipe (the real stories260K model): end to end with
push to the loopback hub, killed during uptraining and resumed, a re-run that does no work, and a
changed setting that re-runs only the stages after it."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FIXTURES, ROOT, need
from hubserver import hub  # noqa: F401

from gqa_convert.commands import main

RECIPE = ROOT / "recipes" / "demo-stories260k.yaml"
HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


def _overrides(run_dir: Path) -> list[str]:
    # The recipe's paths are relative to the repository root; tests may run from anywhere.
    return [
        f"run_dir={run_dir}",
        f"source={need(FIXTURES / 'stories260K' / 'stories260K.bin')}",
        f"uptrain.data={need(FIXTURES / 'text' / 'tinystories_val_head.txt')}",
        f"verify.data={FIXTURES / 'text' / 'tinystories_val_head.txt'}",
        *([] if HAS_TENSORBOARD else ["uptrain.report_to=none"]),  # the recipe's tracker is an optional extra
    ]


def _stages(run_dir: Path) -> dict:
    return json.loads((run_dir / "state.json").read_text())["stages"]


@pytest.mark.slow
def test_demo_recipe_end_to_end(hub, tmp_path, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setenv("GQA_CONVERT_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    args = ["run", str(RECIPE), *_overrides(run_dir), "push.repo=alice/stories260K-gqa2"]

    # 1. Killed (SIGKILL) in the middle of uptraining.
    env = {**os.environ, "GQA_CONVERT_KILL_AFTER_STEP": "50", "GQA_CONVERT_CACHE": str(tmp_path / "cache")}
    killed = subprocess.run(
        [sys.executable, "-m", "gqa_convert", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert killed.returncode != 0, killed.stdout + killed.stderr
    stages = _stages(run_dir)
    assert stages["convert"]["status"] == "done" and stages["uptrain"]["status"] == "running"
    assert "alice/stories260K-gqa2" not in hub.state.repos

    # 2. The same command finishes the run: uptraining resumes, verification passes, push happens.
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "[plan] up to date" in out and "[convert] up to date" in out and "[uptrain] resuming" in out
    stages = _stages(run_dir)
    assert all(stages[s]["status"] == "done" for s in ("plan", "convert", "uptrain", "verify", "card", "push"))
    metrics = [json.loads(line) for line in (run_dir / "uptrain" / "metrics.jsonl").read_text().splitlines()]
    steps = [m["step"] for m in metrics if "step" in m]
    assert steps and steps[-1] == 120 and min(steps) <= 60  # continued, not restarted
    # A run people can watch: held-out evaluations during training, the plot, the tracker's events.
    evals = [m for m in metrics if "eval_loss" in m]
    assert len(evals) >= 3 and evals[-1]["step"] == 120 and evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert (run_dir / "uptrain" / "loss_curve.png").stat().st_size > 0
    if HAS_TENSORBOARD:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(run_dir / "uptrain" / "tensorboard"))
        acc.Reload()
        tags = acc.Tags()["scalars"]
        assert {"train/loss", "train/kl", "eval/loss"} <= set(tags), tags

    verification = json.loads((run_dir / "model" / "verification.json").read_text())
    assert verification["passed"] is True
    files = hub.files("alice/stories260K-gqa2")
    assert "README.md" in files and any(f.endswith(".safetensors") for f in files)
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    commits = (
        len(hub.state.repos["alice/stories260K-gqa2"].commits)
        if hasattr(hub.state.repos["alice/stories260K-gqa2"], "commits")
        else None
    )

    # 3. Re-running does no work.
    assert main(args) == 0
    out = capsys.readouterr().out
    for stage in ("plan", "convert", "uptrain", "verify", "card", "push"):
        assert f"[{stage}] up to date" in out
    if commits is not None:
        assert len(hub.state.repos["alice/stories260K-gqa2"].commits) == commits

    # 4. A changed verification setting re-runs verify and what follows, never what came before.
    assert main([*args, "verify.heldout_docs=100"]) == 0
    out = capsys.readouterr().out
    assert "[uptrain] up to date" in out and "[verify] running" in out and "[push] running" in out


def test_pipeline_default_command_validates_before_work(tmp_path, capsys):
    rc = main(["some/model", "--kv-heads", "two", "--context", "8K", "--run-dir", str(tmp_path / "r")])
    assert rc == 2 and "--kv-heads must be a whole number or 'auto'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    rc = main(["run", str(RECIPE), "uptrain.stepz=3", f"run_dir={tmp_path / 'r2'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown key 'uptrain.stepz'" in err and not (tmp_path / "r2").exists()


def test_missing_model_is_one_line_and_rerunnable(hub, tmp_path, capsys):  # noqa: F811
    run_dir = tmp_path / "run"
    args = ["alice/no-such-model", "--kv-heads", "2", "--context", "8K", "--run-dir", str(run_dir)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gqa-convert: error:") and "alice/no-such-model" in err and "\n" not in err
    stages = json.loads((run_dir / "state.json").read_text())["stages"]
    assert stages["plan"]["status"] == "running"  # not marked done: a re-run starts it again


def test_disk_full_is_reported_and_the_stage_reruns(tmp_path, capsys, monkeypatch):
    import errno

    from gqa_convert.pipeline.stages import ConvertStage

    def full(self, ctx, **_):
        raise OSError(errno.ENOSPC, "No space left on device", str(ctx.run_dir / "converted"))

    monkeypatch.setattr(ConvertStage, "run", full)
    run_dir = tmp_path / "run"
    args = ["run", str(RECIPE), *_overrides(run_dir), "uptrain.enabled=false"]
    assert main(args) == 2  # like every other OSError: exit 2 (1 is a failed verification)
    err = capsys.readouterr().err
    assert "No space left on device" in err and "re-run the same command" in err
    assert _stages(run_dir)["plan"]["status"] == "done" and _stages(run_dir)["convert"]["status"] == "running"


def test_summary_says_what_did_not_run_and_why(tmp_path, capsys):
    """The summary names each stage that did nothing and why (no uptrain section, no push.repo:
    never "push done" when nothing was pushed); --json prints only the summary on stdout."""
    run_dir = tmp_path / "run"
    args = ["run", str(RECIPE), *_overrides(run_dir), "kv_heads=4", "uptrain.enabled=false",
            "verify.heldout_docs=20", "verify.retrieval=false", "convert.method=mean"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert lines["convert"].split()[1] == "done" and lines["verify"].split()[1] == "done"
    assert "not run: the recipe has no uptrain section" in lines["uptrain"]
    assert "not run: no push.repo" in lines["push"] and "--push-to" in lines["push"]

    assert main([*args, "--json"]) == 0  # nothing changed: every stage is up to date
    out, err = capsys.readouterr()
    summary = json.loads(out)  # stdout is the JSON alone; the stage logs went to stderr
    assert "[convert] up to date, skipped" in err
    stages = summary["stages"]
    assert [stages[s]["status"] for s in ("plan", "convert", "verify", "card")] == ["up to date"] * 4
    assert stages["push"]["reason"].startswith("no push.repo") and stages["uptrain"]["reason"]
    assert Path(summary["run_dir"]) == run_dir
