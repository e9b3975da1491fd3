"""`gqa-convert convert` / `models` from the command line: the happy path, and every bad input
giving a one-line error, a non-zero exit, no output or temp folder left, the source untouched."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import IDS_DEFAULT, logits, save_tiny, tiny_model
from transformers import AutoModelForCausalLM

from gqa_convert.commands import main


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", n_kv=4)


@pytest.fixture
def src(tmp_path, model) -> Path:
    folder = save_tiny(model, tmp_path / "src")
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    (folder / "tokenizer_config.json").write_text("{}")
    (folder / "LICENSE").write_text("Apache-2.0")
    (folder / "README.md").write_text("# the source model's card")
    return folder


def hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what setup printed (transformers' save progress bars)
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean_failure(code: int, err: str, parent: Path, output: Path | None = None) -> str:
    assert code != 0
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("gqa-convert: error: "), err
    if output is not None:
        assert not output.exists()
    assert not [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    return lines[0]


def test_convert_cli_happy_path(src, tmp_path, capsys, model):
    before = hashes(src)
    out = tmp_path / "nested" / "gqa2"
    code, stdout, _ = run_cli(capsys, "convert", src, "--kv-heads", 2, "--output", out, "--no-progress")
    assert code == 0 and "KV heads 4 -> 2" in stdout
    assert hashes(src) == before
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "LICENSE"} <= names
    assert {"generation_config.json", "gqa_convert.json"} <= names
    assert "README.md" not in names
    record = json.loads((out / "gqa_convert.json").read_text())
    assert record["old"]["n_kv"] == 4 and record["new"]["n_kv"] == 2 and record["method"] == "mean"
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.config.num_key_value_heads == 2
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_convert_cli_json_and_overwrite(src, tmp_path, capsys, model):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    code, _, err = run_cli(capsys, "convert", src, "--kv-heads", 1, "--output", out)
    msg = assert_clean_failure(code, err, tmp_path)
    assert "already exists" in msg and "--overwrite" in msg and (out / "stale.txt").exists()
    code, stdout, _ = run_cli(capsys, "convert", src, "--kv-heads", 4, "--output", out, "--overwrite", "--json")
    assert code == 0
    result = json.loads(stdout)
    assert result["new_shape"]["n_kv"] == 4 and result["tensors_changed"] == 0
    assert not (out / "stale.txt").exists()
    assert torch.equal(logits(out, IDS_DEFAULT), logits(model, IDS_DEFAULT))
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_sharded_output_loads(src, tmp_path, capsys, model):
    out = tmp_path / "sharded"
    code, _, _ = run_cli(
        capsys, "convert", src, "--kv-heads", 4, "-o", out, "--max-shard-size", "30KB", "--no-progress"
    )
    assert code == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((out / s).is_file() for s in shards)
    assert index["metadata"]["total_size"] == sum(t.nbytes for s in shards for t in load_file(out / s).values())
    assert torch.equal(logits(out, IDS_DEFAULT), logits(model, IDS_DEFAULT))


def test_non_dividing_kv_count(src, tmp_path, capsys):
    before = hashes(src)
    code, _, err = run_cli(capsys, "convert", src, "--kv-heads", 3, "--output", tmp_path / "o")
    msg = assert_clean_failure(code, err, tmp_path, tmp_path / "o")
    assert "valid_kv_counts are [1, 2, 4]" in msg
    assert hashes(src) == before


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_damaged_shard(tmp_path, capsys, model, damage):
    src = tmp_path / "src"
    model.save_pretrained(src, max_shard_size="40KB")
    shards = sorted(src.glob("model-*.safetensors"))
    assert len(shards) > 1
    if damage == "missing":
        shards[1].unlink()
    else:
        shards[1].write_bytes(shards[1].read_bytes()[:1000])
    before = hashes(src)
    code, _, err = run_cli(capsys, "convert", src, "--kv-heads", 2, "--output", tmp_path / "o")
    msg = assert_clean_failure(code, err, tmp_path, tmp_path / "o")
    assert shards[1].name in msg and ("missing" if damage == "missing" else "truncated") in msg
    assert hashes(src) == before


def test_unknown_family_and_gpt2(tmp_path, capsys, src):
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "mystery", ["MysteryForCausalLM"]
    (src / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(capsys, "convert", src, "--kv-heads", 2, "--output", tmp_path / "o")
    assert "unknown model family 'mystery'" in assert_clean_failure(code, err, tmp_path, tmp_path / "o")

    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=50, n_positions=32))
    gpt2.save_pretrained(tmp_path / "gpt2")
    code, _, err = run_cli(capsys, "convert", tmp_path / "gpt2", "--kv-heads", 2, "--output", tmp_path / "o")
    msg = assert_clean_failure(code, err, tmp_path, tmp_path / "o")
    assert "gpt2 cannot be converted" in msg and "no KV-head setting" in msg and "llama, mistral" in msg


def test_output_equal_to_or_inside_source(src, tmp_path, capsys):
    before = hashes(src)
    for out in (src, src / "sub", Path(os.path.relpath(src))):
        code, _, err = run_cli(capsys, "convert", src, "--kv-heads", 2, "--output", out)
        assert "overlaps the source" in assert_clean_failure(code, err, src)
    link = tmp_path / "link"
    link.symlink_to(src)
    code, _, err = run_cli(capsys, "convert", src, "--kv-heads", 2, "--output", link)
    assert "overlaps the source" in assert_clean_failure(code, err, tmp_path)
    assert hashes(src) == before


def test_unwritable_output(src, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, _, err = run_cli(capsys, "convert", src, "--kv-heads", 2, "--output", blocker / "deeper" / "out")
    assert "is a file" in assert_clean_failure(code, err, tmp_path)
    assert blocker.read_text() == "not a folder"


def test_pickle_weights_need_opt_in(tmp_path, capsys, model):
    src = tmp_path / "pkl"
    save_tiny(model, tmp_path / "tmp_st")
    src.mkdir()
    shutil.copy(tmp_path / "tmp_st" / "config.json", src / "config.json")
    torch.save(load_file(tmp_path / "tmp_st" / "model.safetensors"), src / "pytorch_model.bin")
    before = hashes(src)
    code, _, err = run_cli(capsys, "convert", src, "--kv-heads", 2, "--output", tmp_path / "o")
    assert "--allow-pickle" in assert_clean_failure(code, err, tmp_path, tmp_path / "o")
    code, _, _ = run_cli(
        capsys, "convert", src, "--kv-heads", 4, "--output", tmp_path / "o", "--allow-pickle", "--no-progress"
    )
    assert code == 0 and (tmp_path / "o" / "model.safetensors").exists()
    assert torch.equal(logits(tmp_path / "o", IDS_DEFAULT), logits(model, IDS_DEFAULT))
    assert hashes(src) == before


def test_bad_kv_argument_and_unavailable_method(src, tmp_path, capsys):
    code, _, err = run_cli(capsys, "convert", src, "--kv-heads", "two", "--output", tmp_path / "o")
    assert "--kv-heads must be a whole number" in assert_clean_failure(code, err, tmp_path, tmp_path / "o")
    code, _, err = run_cli(capsys, "convert", src, "--kv-heads", "auto", "--output", tmp_path / "o")
    assert "--context" in assert_clean_failure(code, err, tmp_path, tmp_path / "o")
    code, _, err = run_cli(capsys, "convert", src, "--kv-heads", 2, "--output", tmp_path / "o", "--method", "bogus")
    assert "bogus" in assert_clean_failure(code, err, tmp_path, tmp_path / "o")


def test_method_callable_report_and_a_broken_method(src, tmp_path):
    """A LayerMethod's .report lands in gqa_convert.json; a method returning wrong shapes fails cleanly."""
    from gqa_convert.convert import convert_checkpoint
    from gqa_convert.errors import CheckpointError
    from gqa_convert.regroup import mean_pool

    def pooled(layer, block, shape, new_kv):
        pooled.report[layer] = {"seen": shape.n_kv}
        return mean_pool(layer, block, shape, new_kv)

    pooled.report = {}
    res = convert_checkpoint(src, tmp_path / "ok", 2, method=pooled, progress=False)
    record = json.loads((res.output / "gqa_convert.json").read_text())
    assert record["report"] == {"0": {"seen": 4}, "1": {"seen": 4}} and record["method"] == "pooled"
    assert record["source"] == "src"  # a local folder's name only: no local paths in published files

    before = hashes(src)
    with pytest.raises(CheckpointError, match="k_w has shape"):
        convert_checkpoint(src, tmp_path / "bad", 2, method=lambda i, b, s, k: b, progress=False)
    assert not (tmp_path / "bad").exists() and hashes(src) == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_missing_source(tmp_path, capsys):
    code, _, err = run_cli(capsys, "convert", tmp_path / "nope", "--kv-heads", 2, "--output", tmp_path / "o")
    assert "gqa-convert models" in assert_clean_failure(code, err, tmp_path, tmp_path / "o")


def test_models_command(capsys):
    code, out, _ = run_cli(capsys, "models")
    assert code == 0 and "llama-3-8b" in out and "meta-llama/Meta-Llama-3-8B" in out and "15T" in out
    code, out, _ = run_cli(capsys, "models", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["llama-2-7b"]["pretraining_tokens"] == 2e12


def test_console_entry_point(src, tmp_path):
    """The installed `gqa-convert` script, as a user runs it."""
    exe = Path(sys.executable).parent / "gqa-convert"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "gqa_convert"]
    r = subprocess.run(
        [*cmd, "convert", str(src), "--kv-heads", "3", "-o", str(tmp_path / "o")], capture_output=True, text=True
    )
    assert r.returncode == 2 and r.stderr.strip().startswith("gqa-convert: error:") and r.stderr.count("\n") == 1
