"""Hostile and clumsy input (issue #14's examples): one bounded line, a non-zero exit, no
traceback, nothing half-written, the source byte-identical."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import stat
import time

import pytest
from conftest import SAMPLE_TEXT, need

from gqa_convert.commands import main
from gqa_convert.fileio import FolderLock


def _hashes(folder):
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tiny import make_tiny_llama

    return make_tiny_llama(
        tmp_path_factory.mktemp("src") / "m",
        [need(SAMPLE_TEXT).read_text()],
        hidden=32,
        layers=1,
        heads=4,
        kv_heads=4,
        max_pos=128,
    )


def _one_line_failure(capsys, argv, code=None):
    capsys.readouterr()  # what earlier steps of the test printed
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc != 0 and (code is None or rc == code), (rc, err)
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("convert:", "[eval]"))]
    assert len(lines) == 1 and lines[0].startswith("gqa-convert: error:"), err
    assert "Traceback" not in err and len(lines[0]) < 600
    return lines[0]


def test_yaml_alias_bomb_is_one_short_line(tmp_path, capsys):
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi")
    )
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(bomb + "source: x\nkv_heads: *i\ncontext: 8K\nrun_dir: r\n")
    t0 = time.perf_counter()
    line = _one_line_failure(capsys, ["run", recipe], 2)
    assert "kv_heads" in line and time.perf_counter() - t0 < 10


@pytest.mark.parametrize(
    "content, words",
    [
        (None, "not found (or not a file)"),  # a folder
        (b"\xff\xfe not utf-8: \x81", "not UTF-8"),
        (("a: " + "[" * 5000 + "]" * 5000).encode(), "nested too deeply"),
        (b"- a list\n- not a mapping\n", "must be a YAML mapping"),
    ],
)
def test_bad_recipe_files(tmp_path, capsys, content, words):
    path = tmp_path / "r.yaml"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    assert words in _one_line_failure(capsys, ["run", path], 2)


def test_run_dir_inside_the_source_is_refused_before_writing(tiny, capsys):
    before = _hashes(tiny)
    for run_dir in (tiny, tiny / "run"):
        line = _one_line_failure(capsys, [tiny, "--kv-heads", "2", "--context", "64", "--run-dir", run_dir])
        assert "overlaps the source" in line
    assert _hashes(tiny) == before and not (tiny / "run").exists()


def test_second_writer_of_an_output_fails_at_once(tiny, tmp_path, capsys):
    out = tmp_path / "o"
    with FolderLock(out):
        line = _one_line_failure(capsys, ["convert", tiny, "--kv-heads", "2", "-o", out, "--no-progress"])
    assert f"pid {os.getpid()}" in line and not out.exists()
    assert main(["convert", str(tiny), "--kv-heads", "2", "-o", str(out), "--no-progress"]) == 0  # lock released
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no lock file left


def test_stale_partial_output_of_a_killed_run_is_removed(tiny, tmp_path, capsys):
    out = tmp_path / "o"
    stale = tmp_path / ".o.tmp-dead1"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1000)
    assert main(["convert", str(tiny), "--kv-heads", "2", "-o", str(out), "--no-progress"]) == 0
    assert not stale.exists() and "partial output of an interrupted run" in capsys.readouterr().err


def test_output_spellings(tiny, tmp_path, capsys, monkeypatch):
    here = tmp_path / "here"
    here.mkdir()
    (here / "keep.txt").write_text("mine")
    monkeypatch.chdir(here)
    assert "current folder" in _one_line_failure(capsys, ["convert", tiny, "--kv-heads", "2", "-o", ".", "--overwrite"])
    assert (here / "keep.txt").read_text() == "mine" and not list(tmp_path.glob(".*"))
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    assert "symbolic link" in _one_line_failure(capsys, ["convert", tiny, "--kv-heads", "2", "-o", dangling])
    if os.path.isdir("/proc/self"):
        _one_line_failure(capsys, ["convert", tiny, "--kv-heads", "2", "-o", "/proc/self/gqa-out"])


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda c: c.pop("num_attention_heads"), "lacks num_attention_heads"),
        (lambda c: [1, 2, 3], "holds a JSON list"),
    ],
)
def test_damaged_source_configs(tiny, tmp_path, capsys, edit, words):
    src = tmp_path / "src"
    shutil.copytree(tiny, src)
    config = json.loads((src / "config.json").read_text())
    new = edit(config)
    (src / "config.json").write_text(json.dumps(new if isinstance(new, list) else config))
    assert words in _one_line_failure(capsys, ["convert", src, "--kv-heads", "2", "-o", tmp_path / "o"])
    assert not (tmp_path / "o").exists()


def test_config_without_model_type_gives_a_loadable_output(tiny, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    src = tmp_path / "src"
    shutil.copytree(tiny, src)
    config = json.loads((src / "config.json").read_text())
    del config["model_type"]
    (src / "config.json").write_text(json.dumps(config))
    assert main(["convert", str(src), "--kv-heads", "2", "-o", str(tmp_path / "o"), "--no-progress"]) == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "o").config.num_key_value_heads == 2


def test_custom_code_is_dropped_and_never_run(tiny, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(tiny, src)
    config = json.loads((src / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (src / "config.json").write_text(json.dumps(config))
    (src / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
    out = tmp_path / "o"
    assert main(["convert", str(src), "--kv-heads", "2", "-o", str(out), "--no-progress"]) == 0
    assert "auto_map" in capsys.readouterr().err
    assert "auto_map" not in json.loads((out / "config.json").read_text()) and not list(out.glob("*.py"))
    line = _one_line_failure(
        capsys, ["verify", src, "--source", tiny, "--data", SAMPLE_TEXT, "--context", "64", "--no-retrieval"]
    )
    assert "custom modelling code" in line and "trust_remote_code=True" not in line


def test_modes_of_outputs_are_for_sharing(tiny, tmp_path, capsys):
    old = os.umask(0o022)
    try:
        out = tmp_path / "o"
        assert main(["convert", str(tiny), "--kv-heads", "2", "-o", str(out), "--no-progress"]) == 0
        data = tmp_path / "d.txt"
        data.write_text("\n\n".join(f"document {i} " * 20 for i in range(60)))
        up = tmp_path / "up"
        assert (
            main(
                [
                    "uptrain",
                    str(out),
                    "--data",
                    str(data),
                    "--context",
                    "32",
                    "--steps",
                    "2",
                    "--batch-size",
                    "2",
                    "--heldout-docs",
                    "5",
                    "--output",
                    str(up),
                    "--no-progress",
                ]
            )
            == 0
        )
    finally:
        os.umask(old)
    for folder in (out, up, up / "checkpoint"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755, folder
        for f in folder.iterdir():
            if f.is_file():
                assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


@pytest.mark.parametrize(
    "damage, words",
    [
        ("uptrain_config.json", "missing or damaged"),
        ("checkpoint/trainable.safetensors", "damaged"),
        ("checkpoint/optimizer.rank0.pt", "damaged"),
    ],
)
def test_resume_with_damaged_files(tiny, tmp_path, capsys, damage, words):
    data = tmp_path / "d.txt"
    data.write_text("\n\n".join(f"document {i} " * 20 for i in range(60)))
    up = tmp_path / "up"
    args = [
        "uptrain",
        tiny,
        "--data",
        data,
        "--context",
        "32",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--heldout-docs",
        "5",
        "--output",
        up,
        "--no-progress",
    ]
    assert main([str(a) for a in args]) == 0
    target = up / damage
    target.write_bytes(target.read_bytes()[: max(1, target.stat().st_size // 3)])
    assert words in _one_line_failure(capsys, [*args, "--resume"])


@pytest.fixture
def holder():
    """Another process holding a FolderLock on a folder (a second, concurrent gqa-convert run)."""
    import subprocess
    import sys

    procs = []

    def hold(folder):
        code = (
            "import sys, time\nfrom gqa_convert.fileio import FolderLock\n"
            "lock = FolderLock(sys.argv[1]).__enter__()\nprint('held', flush=True)\ntime.sleep(120)\n"
        )
        p = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
        procs.append(p)
        assert p.stdout is not None and p.stdout.readline().strip() == "held"
        return p.pid

    yield hold
    for p in procs:
        p.kill()
        p.wait()


def _uptrain_args(model, data, out):
    return ["uptrain", model, "--data", data, "--context", "32", "--steps", "2", "--batch-size", "2",
            "--heldout-docs", "5", "--output", out, "--no-progress"]  # fmt: skip


def test_second_run_on_a_run_folder_fails_at_once_and_changes_nothing(tiny, tmp_path, capsys, holder):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "state.json").write_text('{"stages": {}}\n')  # what the first run keeps there
    (run_dir / "recipe.yaml").write_text("source: first-run\n")
    before = _hashes(run_dir)
    pid = holder(run_dir)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"source: {tiny}\nkv_heads: 2\ncontext: 64\nrun_dir: {run_dir}\n")
    for argv in (["run", recipe], [tiny, "--kv-heads", "2", "--context", "64", "--run-dir", run_dir]):
        t0 = time.perf_counter()
        line = _one_line_failure(capsys, argv, 2)
        assert "run folder" in line and f"pid {pid} on " in line and time.perf_counter() - t0 < 10
    assert _hashes(run_dir) == before and sorted(p.name for p in run_dir.iterdir()) == ["recipe.yaml", "state.json"]


def test_second_uptrain_into_an_output_fails_at_once(tiny, tmp_path, capsys, holder):
    data = tmp_path / "d.txt"
    data.write_text("\n\n".join(f"document {i} " * 20 for i in range(60)))
    out = tmp_path / "up"
    pid = holder(out)
    line = _one_line_failure(capsys, _uptrain_args(tiny, data, out), 2)
    assert "uptraining output" in line and f"pid {pid} on " in line and not out.exists()
    line = _one_line_failure(capsys, [*_uptrain_args(tiny, data, out), "--resume"], 2)
    assert f"pid {pid} on " in line and not out.exists()


def test_second_verify_of_a_model_folder_fails_at_once(tiny, tmp_path, capsys, holder):
    model = tmp_path / "m"
    shutil.copytree(tiny, model)
    before = _hashes(model)
    pid = holder(model)
    line = _one_line_failure(
        capsys, ["verify", model, "--source", tiny, "--data", SAMPLE_TEXT, "--context", "64", "--no-retrieval"], 2
    )
    assert "model folder" in line and f"pid {pid} on " in line and _hashes(model) == before


def test_refused_output_leaves_no_parent_folders(tiny, tmp_path, capsys):
    out = tmp_path / "a" / "b" / "up"
    _one_line_failure(capsys, _uptrain_args(tiny, tmp_path / "no-such-data.txt", out), 2)
    assert not (tmp_path / "a").exists()


# Cases found by trying the CLI as an attacker would (issue #14, step 4); each was broken before.
def _good_data(tmp_path):
    data = tmp_path / "d.txt"
    data.write_text("\n\n".join(f"document {i} " * 20 for i in range(60)))
    return data


@pytest.mark.parametrize(
    "argv, words",
    [
        (["law", "show"], "invalid choice"),  # argparse: usage block + error were two lines
        (["--bogus"], "unrecognized arguments"),
        (["convert"], "the following arguments are required"),
        (["convert", "SRC", "--kv-heads", "2", "-o", "out\x00x"], "NUL byte"),  # ValueError: embedded null byte
        (["convert", "SRC", "--kv-heads", "auto", "--context", "1e9", "-o", "OUT"], "at most 16M tokens"),  # exit 0
        (["convert", "SRC", "--kv-heads", "auto", "--context", "1T", "-o", "OUT"], "at most 16M tokens"),
        (["convert", "SRC", "--kv-heads", "9" * 400, "-o", "OUT"], "at most 65536"),  # a 400-digit line
    ],
)
def test_bad_command_lines(tiny, tmp_path, capsys, argv, words):
    argv = [str(tiny) if a == "SRC" else str(tmp_path / "o") if a == "OUT" else a for a in argv]
    line = _one_line_failure(capsys, argv, 2)
    assert words in line and len(line) < 300 and not (tmp_path / "o").exists()


def test_huge_config_is_refused_before_reading(tiny, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(tiny, src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "junk": "x" * (17 << 20)}))
    assert "not a model config" in _one_line_failure(capsys, ["convert", src, "--kv-heads", "2", "-o", tmp_path / "o"])
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--lr", "inf"], "finite"),  # trained to NaN weights, exit 0
        (["--lr", "1e308"], "less than or equal to 1"),  # internal error: float overflow in torch
        (["--seed", "-1"], "greater than or equal to 0"),
    ],
)
def test_uptrain_bad_numbers(tiny, tmp_path, capsys, extra, words):
    out = tmp_path / "up"
    assert words in _one_line_failure(capsys, [*_uptrain_args(tiny, _good_data(tmp_path), out), *extra], 2)
    assert not out.exists()


def test_uptrain_output_inside_the_model_is_refused(tiny, tmp_path, capsys):
    model = tmp_path / "m"
    shutil.copytree(tiny, model)
    before = _hashes(model)
    for out in (model / "up", model / "a" / "b"):  # it used to train into the model folder
        line = _one_line_failure(capsys, _uptrain_args(model, _good_data(tmp_path), out), 2)
        assert "inside the model folder" in line
    assert _hashes(model) == before and sorted(p.name for p in model.iterdir()) == sorted(before)


def test_uptrain_path_problems_say_what_to_do(tiny, tmp_path, capsys):
    line = _one_line_failure(capsys, _uptrain_args(tmp_path / "nope", _good_data(tmp_path), tmp_path / "up"), 2)
    assert "does not exist" in line and "Repo id" not in line
    blocker = tmp_path / "file"
    blocker.write_text("x")
    line = _one_line_failure(capsys, _uptrain_args(tiny, _good_data(tmp_path), blocker / "up"), 2)
    assert "a file is in the way" in line and "--resume" not in line  # nothing started: nothing to resume


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed (the [sp] extra) not installed")
def test_an_installed_deepspeed_adds_nothing_to_stderr(tiny, tmp_path):
    """accelerate imports DeepSpeed whenever a model is saved, and DeepSpeed warns on a CPU-only
    machine that it found no accelerator: a bad-input run must still print exactly its one line."""
    import subprocess
    import sys

    data = tmp_path / "d.txt"
    data.write_text(need(SAMPLE_TEXT).read_text())
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    argv = [sys.executable, "-m", "gqa_convert", "uptrain", str(tiny), "--data", str(data), "--context", "32",
            "--steps", "1", "--batch-size", "1", "--heldout-docs", "2", "--eval-docs", "0", "--no-progress",
            "--output", str(tmp_path / "o")]  # fmt: skip
    ok = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "real_accelerator" not in ok.stderr and "Setting accelerator" not in ok.stderr, ok.stderr


# Second sweep (damaged run records, eval / plan / law / run edge cases); each was broken before.
def _damage_record(folder, name, how):
    path = folder / name
    path.unlink()
    if how == "devzero":
        path.symlink_to("/dev/zero")
    elif how == "huge":
        path.write_text('{"a": "' + "x" * (17 << 20) + '"}')
    elif how == "passed-yes":
        shutil.copy(folder.parent / "good" / name, path)
        path.write_text(json.dumps({**json.loads(path.read_text()), "passed": "yes"}))
    elif how == "reasons-str":
        shutil.copy(folder.parent / "good" / name, path)
        path.write_text(json.dumps({**json.loads(path.read_text()), "passed": False, "reasons": "str"}))
    else:
        path.write_text(how)


@pytest.fixture(scope="module")
def verified(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("verified") / "good"
    assert main(["convert", str(tiny), "--kv-heads", "2", "-o", str(out), "--no-progress"]) == 0
    argv = ["verify", str(out), "--source", str(tiny), "--data", str(SAMPLE_TEXT), "--context", "64", "--no-retrieval"]
    assert main(argv) == 0
    return out


@pytest.mark.parametrize(
    "name, how, words",
    [
        ("verification.json", "[1, 2]", "damaged"),  # push: AttributeError 'list' object has no attribute 'get'
        ("verification.json", "5", "damaged"),
        ("verification.json", "", "damaged"),  # push: exit 1, as if verification had failed
        ("verification.json", "devzero", "not a regular file"),  # card: exit 0, as if there were none
        ("verification.json", "passed-yes", "damaged"),  # card: read "yes" as a pass; push: as a failure
        ("verification.json", "reasons-str", "damaged"),  # push: "verification failed (s; t; r)"
        ("gqa_convert.json", "huge", "not a run record"),  # card and push --dry-run: exit 0
        ("gqa_convert.json", "devzero", "not a regular file"),
        ("gqa_convert.json", "[1, 2]", "damaged"),  # push --dry-run: exit 0, the record listed for upload
    ],
)
@pytest.mark.parametrize("command", ["card", "push-dry", "push"])
def test_damaged_records_for_card_and_push(verified, tmp_path, capsys, monkeypatch, name, how, words, command):
    folder = tmp_path / "m"
    shutil.copytree(verified, folder, symlinks=True)
    (tmp_path / "good").symlink_to(verified)
    _damage_record(folder, name, how)
    before = _hashes(folder)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing may reach a hub
    argv = {"card": ["card", folder], "push-dry": ["push", folder, "--repo", "u/n", "--dry-run"],
            "push": ["push", folder, "--repo", "u/n", "--token", "hf_x"]}[command]  # fmt: skip
    assert words in _one_line_failure(capsys, argv, 2)
    assert _hashes(folder) == before


def _law_text(edit):
    from importlib import resources

    return edit(resources.files("gqa_convert.law").joinpath("coefficients.yaml").read_text())


@pytest.mark.parametrize(
    "text, words",
    [
        (b"\xff\xfe\x00 not utf-8", "not UTF-8"),  # internal error: UnicodeDecodeError
        (lambda t: t.replace("\nE: ", "\nE: .nan #"), "finite numbers"),  # plan: exit 0; optimize: int(NaN)
        (lambda t: t.replace("reference_params: ", "reference_params: .inf #"), "finite numbers"),
        (lambda t: t.replace("reference_params: ", "reference_params: 0 #"), "reference_params > 0"),  # exit 0
    ],
)
@pytest.mark.parametrize("command", ["plan", "optimize"])
def test_bad_law_files(tiny, tmp_path, capsys, text, words, command):
    law = tmp_path / "law.yaml"
    law.write_bytes(text if isinstance(text, bytes) else _law_text(text).encode())
    argv = {
        "plan": ["plan", tiny, "--context", "64"],
        "optimize": ["law", "optimize", "--loss", "3", "--context", "8K"],
    }
    assert words in _one_line_failure(capsys, [*argv[command], "--law", law], 2)


@pytest.mark.parametrize("top", ["0", "-1", "99999999999"])  # exit 0: nothing / all but the last listed
def test_law_optimize_top_is_bounded(capsys, top):
    assert "from 1 to 1000" in _one_line_failure(
        capsys, ["law", "optimize", "--loss", "3", "--context", "8K", "--top", top], 2
    )


@pytest.mark.parametrize(
    "override, words",
    [
        ("a" * 5000 + "=1", "unknown key 'aaaa"),  # the whole 5000-character key was quoted
        ("uptrain.stepz=1", "allowed here: steps,"),  # uptrain's 40 allowed keys made a 538-character line
    ],
)
def test_unknown_recipe_keys_are_short(tiny, tmp_path, capsys, override, words):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"source: {tiny}\nkv_heads: 2\ncontext: 64\nrun_dir: {tmp_path / 'run'}\n")
    line = _one_line_failure(capsys, ["run", recipe, override], 2)
    assert words in line and len(line) < 300 and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--tasks", ","], "at least 1 item"),  # exit 0: the defaults ran instead
        (["--depths", ""], "at least 1 item"),
        (["--lengths", ""], "at least 1 item"),
        (["--device", "bogus"], "not a torch device"),  # internal error: RuntimeError from torch
        (["--source", "MODEL"], "is MODEL itself"),  # exit 0, a ratio of 1 that compares nothing
        (["--no-tokenizer"], "no usable tokenizer"),  # internal error: "Couldn't instantiate the backend tokenizer"
    ],
)
def test_eval_bad_requests(verified, tmp_path, capsys, extra, words):
    model = tmp_path / "m"
    shutil.copytree(verified, model)
    if extra == ["--no-tokenizer"]:
        extra = []
        for f in model.glob("tokenizer*"):
            f.unlink()
    before = _hashes(model)
    extra = [str(model) if a == "MODEL" else a for a in extra]
    argv = ["eval", model, "--context", "64", "--samples", "1", "--tasks", "passkey", "--no-progress", *extra]
    assert words in _one_line_failure(capsys, argv, 2)
    assert _hashes(model) == before


@pytest.fixture(scope="module")
def uptrained(tiny, tmp_path_factory):
    """A finished 2-step run: its files are what a --resume reads."""
    base = tmp_path_factory.mktemp("uptrained")
    data = _good_data(base)
    assert main([str(a) for a in _uptrain_args(tiny, data, base / "up")]) == 0
    return base / "up", data


@pytest.mark.parametrize(
    "name, how, words",
    [
        ("uptrain_config.json", "devzero", "missing or damaged"),  # read /dev/zero until the OOM killer came
        ("checkpoint/state.json", "devzero", "not a regular file"),  # FileNotFoundError of checkpoint.old
        ("checkpoint/state.json", "[1]", "lacks whole step"),
        ("checkpoint/state.json", '{"step": -5, "rows": 4, "tokens": 128, "processes": 1, "elapsed_s": 1}', "lacks"),
        ("checkpoint/state.json", '{"step": "two", "rows": 4, "tokens": 128, "processes": 1}', "lacks whole step"),
    ],
)
def test_resume_with_damaged_state(tiny, uptrained, tmp_path, capsys, name, how, words):
    up, data = uptrained
    out = tmp_path / "up"
    shutil.copytree(up, out)
    path = out / name
    path.unlink()
    if how == "devzero":
        path.symlink_to("/dev/zero")
    else:
        path.write_text(how)
    before = _hashes(out)
    t0 = time.perf_counter()
    assert words in _one_line_failure(capsys, [*_uptrain_args(tiny, data, out), "--resume"], 2)
    assert _hashes(out) == before and time.perf_counter() - t0 < 30


@pytest.mark.parametrize("xdg", ["", "relative/cache", "FILE"])
def test_internal_error_log_never_lands_in_the_current_folder(tmp_path, capsys, monkeypatch, xdg):
    import gqa_convert.law.loss as loss

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(loss, "load_law", boom)  # stands for any bug
    (tmp_path / "cwd").mkdir()
    (tmp_path / "file").write_text("x")
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file") if xdg == "FILE" else xdg)
    rc = main(["law", "optimize", "--loss", "3", "--context", "8K"])
    err = capsys.readouterr().err.strip()
    assert rc == 3 and len(err.splitlines()) == 1 and "internal error: RuntimeError: boom" in err
    log = err.split("traceback is in ")[1].split(" (or re-run")[0]
    assert os.path.isabs(log) and "boom" in open(log).read() and not list((tmp_path / "cwd").iterdir())


@pytest.mark.parametrize(
    "edit, extra, words",
    [
        ("no-weights", [], "no safetensors weights"),  # wrote a card for a folder with nothing to load
        ("renamed-weights", [], "measured other weights"),  # another model's verification.json, shown as this one's
        (None, ["--license", "x" * 10240], "licence id"),  # 10 KB into the card's YAML metadata
        (None, ["--license", "mit\n---\nfoo: bar"], "licence id"),
        (None, ["--title", "x" * 10240], "one line of at most 200"),
        (None, ["--base-model", "../../etc"], "hub repo id"),
    ],
)
def test_card_refusals(verified, tmp_path, capsys, edit, extra, words):
    folder = tmp_path / "m"
    shutil.copytree(verified, folder)
    if edit == "no-weights":
        (folder / "model.safetensors").unlink()
    elif edit == "renamed-weights":
        (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    before = _hashes(folder)
    line = _one_line_failure(capsys, ["card", folder, *extra], 2)
    assert words in line and len(line) < 300 and _hashes(folder) == before


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--context", "9999999"], "max_position_embeddings 128"),  # a 333+-character line
        (["--distill-from", "NOPE"], "does not exist"),  # transformers' "Repo id must be in the form ..."
        (["--distill-from", "./rel/nope"], "does not exist"),
    ],
)
def test_uptrain_refusals_are_short(tiny, tmp_path, capsys, extra, words):
    out = tmp_path / "up"
    extra = [str(tmp_path / "nope") if a == "NOPE" else a for a in extra]
    line = _one_line_failure(capsys, [*_uptrain_args(tiny, _good_data(tmp_path), out), *extra], 2)
    assert words in line and "Repo id" not in line and len(line) < 300 and not out.exists()


@pytest.mark.parametrize("how", ["devzero", "huge"])  # /dev/zero was read until memory ran out
def test_run_rerun_with_a_state_file_that_is_not_one(tiny, tmp_path, capsys, how):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    state = run_dir / "state.json"
    if how == "devzero":
        state.symlink_to("/dev/zero")
    else:
        state.write_text('{"stages": {}, "a": "' + "x" * (17 << 20) + '"}')
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"source: {tiny}\nkv_heads: 2\ncontext: 64\nrun_dir: {run_dir}\nuptrain:\n  enabled: false\n")
    t0 = time.perf_counter()
    assert "state.json is damaged" in _one_line_failure(capsys, ["run", recipe, f"verify.data={SAMPLE_TEXT}"], 2)
    assert time.perf_counter() - t0 < 20 and sorted(p.name for p in run_dir.iterdir()) == ["state.json"]


def test_eval_without_the_eval_extra_names_what_to_install(verified, tmp_path, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):  # the [eval] extra not installed (an import hook's ImportError)
        if name.split(".")[0] == "lm_eval":
            raise ImportError("lm_eval is not installed")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    argv = ["eval", verified, "--context", "64", "--tasks", "niah_single_1", "--no-write", "--no-progress"]
    line = _one_line_failure(capsys, argv, 2)
    assert "pip install 'gqa-convert[eval]'" in line and "None" not in line
