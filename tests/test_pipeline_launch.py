"""The pipeline with `uptrain.num_processes: 2`: the uptraining stage launched as a torchrun job from
inside the run (here sequence-parallel, DeepSpeed Ulysses on 2 CPU processes), killed mid-way and
resumed by re-running the command, then verify and the card in the parent; it ends where the
single-process pipeline ends. Needs the [sp] extra."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FIXTURES, ROOT, need

RECIPE = ROOT / "recipes" / "demo-stories260k.yaml"
STEPS = 8


def _args(run_dir: Path, *extra: str) -> list[str]:
    text = need(FIXTURES / "text" / "tinystories_val_head.txt")
    return [
        "run", str(RECIPE), f"run_dir={run_dir}", f"source={need(FIXTURES / 'stories260K' / 'stories260K.bin')}",
        f"uptrain.data={text}", f"verify.data={text}", f"uptrain.steps={STEPS}", "uptrain.save_every=4",
        "uptrain.eval_docs=0", "uptrain.report_to=none", "verify.heldout_docs=50", "verify.retrieval=false",
        "verify.tolerance=5", *extra,
    ]  # fmt: skip


def _run(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gqa_convert", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)  # fmt: skip


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed (the [sp] extra)")
def test_launched_uptraining_resumes_and_ends_where_one_process_ends(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GQA_CONVERT_CACHE": str(tmp_path / "cache")}
    two = tmp_path / "two"
    launched = _args(two, "uptrain.num_processes=2", "uptrain.sequence_parallel=2")

    killed = _run(launched, {**env, "GQA_CONVERT_KILL_AFTER_STEP": "5"})
    assert killed.returncode != 0
    assert "the launched uptraining (2 processes, torchrun) exited with code" in killed.stderr
    state = json.loads((two / "state.json").read_text())["stages"]
    assert state["convert"]["status"] == "done" and state["uptrain"]["status"] == "running"

    done = _run(launched, env)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout + done.stderr
    assert "[uptrain] resuming" in out and "resumed at step 4" in out and "sequence parallel 2" in out
    state = json.loads((two / "state.json").read_text())["stages"]
    assert all(state[s]["status"] == "done" for s in ("plan", "convert", "uptrain", "verify", "card"))
    assert (two / "model" / "README.md").is_file()

    one = tmp_path / "one"
    single = _run(_args(one), env)
    assert single.returncode == 0, single.stderr[-3000:]

    def metrics(run: Path) -> list[dict]:
        return [json.loads(x) for x in (run / "uptrain" / "metrics.jsonl").read_text().splitlines() if x.strip()]

    a, b = metrics(one), metrics(two)
    assert [m["step"] for m in a] == [m["step"] for m in b] == list(range(1, STEPS + 1))
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) < 1e-4 and abs(x["kl"] - y["kl"]) < 1e-4, (x, y)
    va = json.loads((one / "model" / "verification.json").read_text())
    vb = json.loads((two / "model" / "verification.json").read_text())
    la, lb = va["loss"]["converted"], vb["loss"]["converted"]
    assert abs(la - lb) < 1e-4, (la, lb)
