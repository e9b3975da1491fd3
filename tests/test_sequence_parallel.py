"""Sequence parallelism (DeepSpeed Ulysses through accelerate, gloo on 2 CPU processes) against one
process: loss, every gradient, per-document losses, clipped steps, and the uptrain command with a
checkpoint and --resume. Needs the [sp] extra (deepspeed); skipped without it.

The first DeepSpeed start on a machine compiles its CPU communication extension (about 3 minutes on
2 cores; .ci/run builds it before the tests); the times below are with it built.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, VAL_TEXT, need

from gqa_convert.errors import ConfigError

HAVE_DS = importlib.util.find_spec("deepspeed") is not None
needs_ds = pytest.mark.skipif(not HAVE_DS, reason="deepspeed not installed (pip install 'gqa-convert[sp]')")


def _torchrun() -> str:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun not installed beside this Python")
    return torchrun


def _port() -> str:
    return str(29700 + os.getpid() % 200)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from tiny import make_tiny_llama

    from gqa_convert.train.data import split_text

    need(VAL_TEXT)
    # 4 query / 2 KV heads: sp = 2 splits both
    return make_tiny_llama(tmp_path_factory.mktemp("sp") / "tiny", split_text(VAL_TEXT.read_text())[1000:1100])


# ----------------------------------------------------------------------------- fast: the rules


def test_ulysses_degree_rule():
    from gqa_convert.train.sequence_parallel import ulysses_degree_ok

    # DeepSpeed's UlyssesSPAttentionHF: query heads split; KV heads split or are replicated
    assert ulysses_degree_ok(32, 8, 8) and ulysses_degree_ok(32, 8, 4)
    assert ulysses_degree_ok(32, 2, 8)  # 2 KV heads at sp = 8: each KV head on 4 ranks
    assert not ulysses_degree_ok(24, 3, 8)  # 3 KV heads neither split over 8 nor replicate to 8
    assert not ulysses_degree_ok(12, 4, 8)  # 12 query heads do not split over 8


def test_shard_shifts_on_the_whole_row_and_pads():
    from gqa_convert.train.data import IGNORE
    from gqa_convert.train.sequence_parallel import shard

    ids = torch.tensor([[10, 11, 12, 20, 21, 22, 23]])
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3]])
    labels = ids.clone()
    labels[pos == 0] = IGNORE
    batch = {"input_ids": ids, "position_ids": pos, "labels": labels}
    a, b = shard(batch, 2, 0), shard(batch, 2, 1)
    # 7 tokens -> 8: the padding is a document of its own with no targets
    assert a["input_ids"].tolist() == [[10, 11, 12, 20]] and b["input_ids"].tolist() == [[21, 22, 23, 23]]
    assert a["position_ids"].tolist() == [[0, 1, 2, 0]] and b["position_ids"].tolist() == [[1, 2, 3, 0]]
    # rank 0's last token (20) predicts rank 1's first (21); 12 predicts nothing (a new document)
    assert a["shift_labels"].tolist() == [[11, 12, IGNORE, 21]]
    assert b["shift_labels"].tolist() == [[22, 23, IGNORE, IGNORE]]


def test_missing_deepspeed_is_one_line(monkeypatch):
    from gqa_convert.train import sequence_parallel

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'gqa-convert\[sp\]'"):
        sequence_parallel.require_deepspeed()


@needs_ds
def test_refusals_before_any_work(tiny, tmp_path):
    from gqa_convert.train.uptrain import UptrainConfig, validate

    base = dict(model=str(tiny), data=str(VAL_TEXT), context=64, steps=1, heldout_docs=20, output=str(tmp_path / "o"))
    with pytest.raises(ConfigError, match="does not divide the 1 process"):
        validate(UptrainConfig(**base, sequence_parallel=2), world=1)
    with pytest.raises(ConfigError, match="stock SDPA gets no mask"):
        validate(UptrainConfig(**base, sequence_parallel=2, attn="sdpa"), world=2)
    with pytest.raises(ConfigError, match="cannot split 4 query / 2 KV heads"):
        validate(UptrainConfig(**base, sequence_parallel=3), world=3)
    assert not (tmp_path / "o").exists()


def test_recipe_refuses_sp_that_does_not_divide_the_processes():
    from gqa_convert.settings import RunSettings, validate_settings

    base = {"source": "x", "kv_heads": 2, "context": 256, "run_dir": "r"}
    up = {"data": "d.txt", "steps": 1, "sequence_parallel": 2}
    with pytest.raises(ConfigError, match="uptrain.sequence_parallel 2 does not divide uptrain.num_processes 1"):
        validate_settings(RunSettings, {**base, "uptrain": up})
    assert validate_settings(RunSettings, {**base, "uptrain": {**up, "num_processes": 4}}).uptrain.num_processes == 4


# ----------------------------------------------------------------------------- slow: 2 processes


@needs_ds
@pytest.mark.slow
def test_sp2_equals_one_process(tiny, tmp_path):
    """A row of 63 tokens (padded to 64, cut after 32, its documents crossing the cut; the last one cut
    mid-document): SP = 2 against the whole row in one process with stock SDPA."""
    out = tmp_path / "sp.json"
    r = subprocess.run(
        [_torchrun(), "--nproc_per_node", "2", "--master_port", _port(), str(ROOT / "tests" / "sp_worker.py"),
         str(tiny), str(VAL_TEXT), str(out), "63"],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(out.read_text())
    # The test that fails if the gradients are scaled by the SP degree (accelerate's loss recipe gives 2.0).
    assert abs(m["grad_norm_ratio"] - 1) < 1e-6, f"SP gradients are {m['grad_norm_ratio']:.6f} x the single process's"
    assert abs(m["sp_loss"] - m["ref_loss"]) < 1e-6
    assert m["grad_diff"] < 1e-6, m["grad_diff"]
    assert len(m["doc_sp"]) >= 2 and m["starts"][1] < 32 < m["starts"][2]  # a document crosses the cut
    for alone, sp in zip(m["doc_alone"], m["doc_sp"], strict=True):
        assert abs(alone - sp) < 1e-6, (m["doc_alone"], m["doc_sp"])
    assert m["clip"] == 0.05  # the configured clip, not accelerate's default 1.0
    assert all(n > 0.05 for n in m["ref_norms"])  # so clipping acted at every step
    for a, b in zip(m["ref_norms"], m["sp_norms"], strict=True):
        assert abs(a - b) < 1e-5 * a
    assert m["weight_diff"] < 1e-5, m["weight_diff"]


def _losses(out: Path, key: str = "loss") -> list[float]:
    return [json.loads(x)[key] for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


@needs_ds
@pytest.mark.slow
def test_uptrain_sp2_with_resume_equals_one_process(tiny, tmp_path):
    """`uptrain --sequence-parallel 2` under torchrun, distilling (the teacher runs on the whole row),
    killed after step 3 (checkpoint at 2) and resumed, ends where one process ends: every step's loss
    and KL, the final weights."""
    from safetensors.torch import load_file
    from tiny import make_tiny_llama

    from gqa_convert.train.data import split_text
    from gqa_convert.train.uptrain import KILL_ENV, UptrainConfig, uptrain

    # a teacher of the same vocabulary (the same tokenizer training) with 4 KV heads
    teacher = make_tiny_llama(tmp_path / "teacher", split_text(VAL_TEXT.read_text())[1000:1100], kv_heads=4, seed=1)

    steps = 4
    common = dict(data=str(VAL_TEXT), context=63, steps=steps, lr=3e-3, clip=0.05, grad_accum=2, batch_size=2,
                  heldout_docs=20, train_start=1000, eval_docs=0, distill_from=str(teacher), distill_weight=0.5,
                  save_every=2)  # fmt: skip
    flags = [x for k, v in common.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    two = tmp_path / "two"
    cmd = [_torchrun(), "--nproc_per_node", "2", "--master_port", _port(), "-m", "gqa_convert", "uptrain", str(tiny),
           *flags, "--sequence-parallel", "2", "--no-progress", "--output", str(two)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=ROOT, env={**env, KILL_ENV: "3"}, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and (two / "checkpoint" / "state.json").is_file()
    assert json.loads((two / "checkpoint" / "state.json").read_text())["step"] == 2
    r = subprocess.run([*cmd, "--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "sequence parallel 2 (DeepSpeed Ulysses)" in r.stdout + r.stderr
    assert "resumed at step 2" in r.stdout + r.stderr

    one = tmp_path / "one"
    uptrain(UptrainConfig(model=str(tiny), **common, output=str(one), progress=False))
    a, b = _losses(one), _losses(two)
    assert len(a) == len(b) == steps
    for x, y in zip(a, b):
        assert abs(x - y) < 1e-5, (a, b)
    ka, kb = _losses(one, "kl"), _losses(two, "kl")
    assert len(ka) == steps and max(abs(x - y) for x, y in zip(ka, kb, strict=True)) < 1e-6, (ka, kb)
    wa, wb = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=0)
    record = json.loads((two / "uptrain.json").read_text())
    assert record["settings"]["sequence_parallel"] == 2
