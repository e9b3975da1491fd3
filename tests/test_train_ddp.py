"""Two CPU processes (DDP over gloo, launched by torchrun) take the same steps as one process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, VAL_TEXT, need

STEPS = 4


def _losses(out: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_two_processes_equal_one_process(tmp_path):
    from safetensors.torch import load_file
    from tiny import make_tiny_llama

    from gqa_convert.train.data import split_text
    from gqa_convert.train.uptrain import UptrainConfig, uptrain

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun not installed beside this Python")
    need(VAL_TEXT)
    model = make_tiny_llama(tmp_path / "tiny", split_text(VAL_TEXT.read_text())[1000:1100], layers=2)
    common = [
        "--data",
        str(VAL_TEXT),
        "--context",
        "64",
        "--steps",
        str(STEPS),
        "--lr",
        "3e-3",
        "--grad-accum",
        "2",
        "--heldout-docs",
        "20",
        "--train-start",
        "1000",
        "--no-progress",
    ]

    # 2 processes x batch 2 x accumulation 2 = 8 rows per step ...
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [
            torchrun,
            "--nproc_per_node",
            "2",
            "--master_port",
            str(29500 + os.getpid() % 1000),
            "-m",
            "gqa_convert",
            "uptrain",
            str(model),
            *common,
            "--batch-size",
            "2",
            "--output",
            str(two),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es)" in r.stdout + r.stderr

    # ... the same 8 rows as 1 process x batch 4 x accumulation 2
    one = tmp_path / "one"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        uptrain(
            UptrainConfig(
                model=str(model),
                data=str(VAL_TEXT),
                context=64,
                steps=STEPS,
                lr=3e-3,
                grad_accum=2,
                batch_size=4,
                heldout_docs=20,
                train_start=1000,
                output=str(one),
                progress=False,
            )
        )
    finally:
        torch.set_num_threads(threads)

    a, b = _losses(one), _losses(two)
    assert len(a) == len(b) == STEPS and a[-1] < a[0]
    for x, y in zip(a, b):
        assert abs(x - y) < 1e-4, (a, b)
    wa, wb = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)
