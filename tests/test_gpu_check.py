"""benchmarks/gpu_check.py: its CPU smoke run writes every phase, and without CUDA it skips itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
PHASES = ("environment", "build", "convert", "uptrain", "memory_plan", "verify", "decode")


def _run(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    environ.pop("OUT", None)
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=tmp_path, env=environ, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_smoke_run_records_every_phase(tmp_path):
    out = tmp_path / "out"
    proc = _run(["--smoke", "--out", str(out), "--work", str(tmp_path / "work")], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "gpu_check.json").read_text())
    assert data["mode"] == "smoke"
    assert tuple(data["phases"]) == PHASES
    for name in PHASES:
        assert data["phases"][name]["status"] == "ok", (name, data["phases"][name])
        assert data["phases"][name]["seconds"] >= 0
    ph = data["phases"]
    assert ph["environment"]["attention_chosen"] == ph["uptrain"]["attn_implementation"]
    assert ph["uptrain"]["tokens_per_s"] > 0 and ph["uptrain"]["timed_steps"] >= 1
    assert ph["uptrain"]["flops"]["per_token_causal_row"] >= ph["uptrain"]["flops"]["per_token_documents"]
    plan = ph["memory_plan"]
    assert plan.get("estimate_bytes", 0) > 0 or "planner not available" in plan.get("note", "")
    assert ph["verify"]["costs"]["kv_cache_bytes"]["converted"]["rel_error"] == 0
    for b, row in ph["decode"]["converted_vs_source"].items():  # 2 -> 1 KV head: half the cache
        assert row["kv_ratio_measured"] == row["kv_ratio_cost_model"] == 0.5, b
        for model in ("source", "converted"):
            r = ph["decode"][model]["batches"][b]
            assert r["decode_tokens_per_s"] > 0
            assert r["cache_tokens"] == [data["summary"]["context"]]
    assert set(data["summary"]["statuses"]) == set(PHASES)
    assert "gpu_check (smoke)" in proc.stdout and str(out / "gpu_check.json") in proc.stdout


def test_without_cuda_it_skips(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the check would run")
    proc = _run([], tmp_path, CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "gpu_check: no CUDA device; skipped" in proc.stdout
    assert not (tmp_path / "gpu_check_out").exists()
