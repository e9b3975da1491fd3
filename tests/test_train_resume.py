"""A killed uptraining run, resumed, ends on the same loss curve and weights as an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, VAL_TEXT, need

STEPS, KILL_AT, SAVE_EVERY = 9, 5, 3


def _cli(model: Path, out: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "gqa_convert",
        "uptrain",
        str(model),
        "--data",
        str(VAL_TEXT),
        "--context",
        "64",
        "--steps",
        str(STEPS),
        "--batch-size",
        "2",
        "--lr",
        "3e-3",
        "--train",
        "all",  # a randomly initialised model: every weight has to learn for the loss to fall
        "--heldout-docs",
        "20",
        "--train-start",
        "1000",
        "--save-every",
        str(SAVE_EVERY),
        "--output",
        str(out),
        "--no-progress",
        *extra,
    ]
    e = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=240)


def _losses(out: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_kill_and_resume_matches_uninterrupted(tmp_path):
    from safetensors.torch import load_file
    from tiny import make_tiny_llama
    from transformers import AutoModelForCausalLM

    from gqa_convert.errors import OutputError
    from gqa_convert.train.data import split_text
    from gqa_convert.train.uptrain import UptrainConfig, uptrain

    need(VAL_TEXT)
    model = make_tiny_llama(tmp_path / "tiny", split_text(VAL_TEXT.read_text())[1000:1100], layers=2)

    full = tmp_path / "full"  # the uninterrupted run, in-process (same settings as _cli)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        uptrain(
            UptrainConfig(
                model=str(model),
                data=str(VAL_TEXT),
                context=64,
                steps=STEPS,
                batch_size=2,
                lr=3e-3,
                train="all",
                heldout_docs=20,
                train_start=1000,
                save_every=SAVE_EVERY,
                output=str(full),
                progress=False,
            )
        )
    finally:
        torch.set_num_threads(threads)

    killed = tmp_path / "killed"
    r = _cli(model, killed, env={"GQA_CONVERT_KILL_AFTER_STEP": str(KILL_AT)})
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]  # really killed, mid-run
    state = json.loads((killed / "checkpoint" / "state.json").read_text())
    assert state["step"] == SAVE_EVERY  # last complete checkpoint before the kill
    assert len(_losses(killed)) == KILL_AT  # steps 4-5 were logged but not checkpointed
    assert not (killed / "model.safetensors").exists()

    with pytest.raises(OutputError, match="--resume"):  # the same command without --resume refuses
        uptrain(UptrainConfig(model=str(model), data=str(VAL_TEXT), context=64, steps=STEPS, output=str(killed)))
    r = _cli(model, killed, "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed at step 3" in r.stdout + r.stderr

    a, b = _losses(full), _losses(killed)
    assert len(a) == len(b) == STEPS
    assert a[-1] < a[0] - 0.3  # it trained
    for x, y in zip(a, b):
        assert abs(x - y) < 1e-4, (a, b)
    wa, wb = load_file(str(full / "model.safetensors")), load_file(str(killed / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)
    # the final model is a plain transformers checkpoint (safetensors, no pickle) with its tokenizer
    assert not list(killed.glob("*.bin"))
    m = AutoModelForCausalLM.from_pretrained(killed)
    assert m.config.num_key_value_heads == 2
    assert (killed / "tokenizer.json").is_file() and (killed / "loss_curve.png").stat().st_size > 1000
    assert len((killed / "heldout.jsonl").read_text().splitlines()) == 20
