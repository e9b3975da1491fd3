"""Disk full (issue #14): convert, uptrain and the pipeline writing onto a tmpfs too small for
their output. Each fails with exit 2 and one bounded line that says the disk is full and how to
continue, no traceback, nothing half-written at a final path, the source byte-identical; after the
tmpfs is grown (space freed), the same command completes. Needs root (mount); skipped otherwise."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess

import pytest
from conftest import SAMPLE_TEXT, VAL_TEXT, need

from gqa_convert.commands import main


def _hashes(folder):
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size) -> a folder on a fresh tmpfs of that size; grow(size) frees space (remount)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounts = []

    class Tmpfs:
        def mount(self, size: str):
            path = tmp_path / f"tmpfs{len(mounts)}"
            path.mkdir()
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
            if r.returncode != 0:
                pytest.skip(f"mount -t tmpfs failed: {r.stderr.decode(errors='replace').strip()[:100]}")
            mounts.append(path)
            return path

        def grow(self, path, size: str):
            subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)

    try:
        yield Tmpfs()
    finally:
        for path in reversed(mounts):
            subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny Llama of ~3.3 MB of weights: more than the tmpfs holds."""
    from tiny import make_tiny_llama

    return make_tiny_llama(
        tmp_path_factory.mktemp("src") / "m", [need(SAMPLE_TEXT).read_text()], hidden=128, layers=4, heads=4,
        kv_heads=4, max_pos=256,
    )  # fmt: skip


def _disk_full_line(capsys, argv) -> str:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("gqa-convert:")]
    assert rc == 2, err[-2000:]
    assert len(lines) == 1 and "Traceback" not in err and len(lines[0]) < 400, err[-2000:]
    assert "disk is full" in lines[0] and "re-run" in lines[0], lines[0]
    return lines[0]


def test_convert_onto_a_full_disk(model, tmpfs, tmp_path, capsys):
    source = _hashes(model)
    disk = tmpfs.mount("1M")
    out = disk / "out"
    argv = ["convert", model, "--kv-heads", "2", "-o", out, "--no-progress"]
    _disk_full_line(capsys, argv)
    assert not out.exists() and os.listdir(disk) == []  # no partial shards, no lock file
    assert _hashes(model) == source
    tmpfs.grow(disk, "32M")
    assert main([str(a) for a in argv]) == 0
    ref = tmp_path / "ref"
    assert main(["convert", str(model), "--kv-heads", "2", "-o", str(ref), "--no-progress"]) == 0
    assert _hashes(out) == _hashes(ref) and os.listdir(disk) == ["out"]
    assert _hashes(model) == source


def test_uptrain_onto_a_full_disk(model, tmpfs, capsys):
    from safetensors.torch import load_file

    source = _hashes(model)
    disk = tmpfs.mount("2M")  # the run's settings and held-out slice fit; its first checkpoint does not
    out = disk / "up"
    argv = ["uptrain", model, "--data", need(VAL_TEXT), "--context", "32", "--steps", "4", "--save-every", "2",
            "--batch-size", "2", "--heldout-docs", "5", "--no-distill", "--output", out, "--no-progress"]  # fmt: skip
    line = _disk_full_line(capsys, argv)
    assert "--resume" in line  # how an uptraining run continues
    assert not (out / "model.safetensors").exists()
    if (out / "checkpoint").exists():  # only ever a whole one
        load_file(str(out / "checkpoint" / "trainable.safetensors"))
    json.loads((out / "uptrain_config.json").read_text())
    assert _hashes(model) == source
    tmpfs.grow(disk, "64M")
    assert main([str(a) for a in [*argv, "--resume"]]) == 0
    assert json.loads((out / "uptrain.json").read_text())["steps"] == 4
    load_file(str(out / "model.safetensors"))
    assert not (out / "checkpoint.tmp").exists() and not (out / ".final.tmp").exists()
    assert _hashes(model) == source


def test_pipeline_run_folder_on_a_full_disk(model, tmpfs, tmp_path, capsys):
    source = _hashes(model)
    disk = tmpfs.mount("1M")
    run_dir = disk / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"source: {model}\nkv_heads: 4\ncontext: 64\nrun_dir: {run_dir}\n"
        f"verify: {{data: {need(VAL_TEXT)}, heldout_docs: 10, retrieval: false}}\n"
    )
    _disk_full_line(capsys, ["run", recipe])
    stages = json.loads((run_dir / "state.json").read_text())["stages"]  # whole: written atomically
    assert stages["convert"]["status"] == "running" and not (run_dir / "converted").exists()
    assert _hashes(model) == source
    tmpfs.grow(disk, "32M")
    assert main(["run", str(recipe)]) == 0
    stages = json.loads((run_dir / "state.json").read_text())["stages"]
    assert all(stages[s]["status"] == "done" for s in ("plan", "convert", "verify", "card"))
    assert not [p.name for p in run_dir.iterdir() if ".tmp-" in p.name]
    assert _hashes(model) == source
