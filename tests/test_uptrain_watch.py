"""Data order and watching a run.

- Training documents are shuffled with the seed (a seeded shuffle buffer, a new order each epoch):
  the same order for the same seed, another for another seed, not the file order; `--no-shuffle`
  keeps the file order; a killed and resumed run reads exactly the documents of an uninterrupted one.
- Held-out evaluation lands in metrics.jsonl at the expected steps, and its values equal an
  independent `evaluate.document_loss` of the model of that step (from the checkpoint) and of the
  final saved model, on the same held-out documents.
- The loss plot is written; `--report-to tensorboard` writes event files holding the train and
  eval scalars (parsed with tensorboard's EventAccumulator; skipped without the package); a
  tracker whose package is missing is a one-line error before any work.

The document ids come from the loop itself: the test hook GQA_CONVERT_TRACE_DOCS=FILE makes the
main process append, for each step, the ids (indices in the source) of the documents in each row.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, VAL_TEXT, need

from gqa_convert.errors import ConfigError
from gqa_convert.train.data import DataSpec, RowStream, shuffled, split_text
from gqa_convert.train.uptrain import (
    TRACE_ENV,
    UptrainConfig,
    eval_steps,
    plot_curve,
    run_differences,
    smoothed,
    uptrain,
)

STEPS, KILL_AT, SAVE_EVERY, EVAL_EVERY = 9, 5, 3, 3
HELDOUT, TRAIN_START, CONTEXT, BATCH = 20, 1000, 64, 2
HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return split_text(need(VAL_TEXT).read_text())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, docs) -> Path:
    from tiny import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "m", docs[1000:1100], layers=2)


def _cfg(model: Path, out: Path, **kw) -> UptrainConfig:
    base = dict(
        model=str(model),
        data=str(VAL_TEXT),
        context=CONTEXT,
        steps=STEPS,
        batch_size=BATCH,
        lr=3e-3,
        heldout_docs=HELDOUT,
        train_start=TRAIN_START,
        save_every=SAVE_EVERY,
        eval_every=EVAL_EVERY,
        output=str(out),
        progress=False,
    )
    base.update(kw)
    return UptrainConfig(**base)


def _cli(model: Path, out: Path, *extra: str, env: dict) -> subprocess.CompletedProcess:
    """The same run as `_cfg` through the command line, in a process of its own."""
    cmd = [sys.executable, "-m", "gqa_convert", "uptrain", str(model), "--data", str(VAL_TEXT)]
    cmd += ["--context", str(CONTEXT), "--steps", str(STEPS), "--batch-size", str(BATCH), "--lr", "3e-3"]
    cmd += ["--heldout-docs", str(HELDOUT), "--train-start", str(TRAIN_START), "--save-every", str(SAVE_EVERY)]
    cmd += ["--eval-every", str(EVAL_EVERY), "--output", str(out), "--no-progress", *extra]
    e = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=240)


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


def _trace(path: Path) -> dict[int, list[list[int]]]:
    return {r["step"]: r["docs"] for r in map(json.loads, path.read_text().splitlines())}


def _order(trace: dict[int, list[list[int]]]) -> list[int]:
    """The documents in the order the run read them (a document cut across rows counted once)."""
    seen: list[int] = []
    for step in sorted(trace):
        for row in trace[step]:
            for d in row:
                if not seen or seen[-1] != d:
                    seen.append(d)
    return seen


def _in_process(cfg: UptrainConfig, trace: Path, monkeypatch):
    monkeypatch.setenv(TRACE_ENV, str(trace))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return uptrain(cfg)
    finally:
        torch.set_num_threads(threads)
        monkeypatch.delenv(TRACE_ENV)


def _loss_of(model, docs: list[str]) -> float:
    """The oracle: evaluate.document_loss, one document per pass (no padding at all)."""
    from transformers import AutoTokenizer

    from gqa_convert.evaluate import document_loss

    tok = AutoTokenizer.from_pretrained(model.name_or_path)
    return document_loss(model, tok, docs, max_tokens=CONTEXT, batch_size=1).mean_loss


# ----------------------------------------------------------------------------- the order


def test_shuffle_buffer_is_a_seeded_permutation():
    items = list(range(500))
    a = list(shuffled(items, 1000, random.Random(1)))
    assert sorted(a) == items and a != items  # buffer >= items: a permutation of all of them
    assert a == list(shuffled(items, 1000, random.Random(1)))  # the same seed, the same order
    assert a != list(shuffled(items, 1000, random.Random(2)))
    b = list(shuffled(items, 50, random.Random(1)))  # a smaller buffer: still each item once ...
    assert sorted(b) == items and b != items
    # ... and an item leaves at most buffer-1 places before its place in the source
    assert all(x < j + 50 for j, x in enumerate(b))


def test_row_stream_order_is_seeded_per_epoch_and_feeds_the_rows(tiny, docs, tmp_path):
    from transformers import AutoTokenizer

    src = tmp_path / "docs.txt"
    src.write_text("\n\n".join(docs[:300]))
    tok = AutoTokenizer.from_pretrained(tiny)
    spec = DataSpec(str(src), heldout=20)

    def ids(stream: RowStream, epoch: int) -> list[int]:
        return [i for i, _ in stream.epoch_documents(epoch)]

    s0 = RowStream(spec, tok, CONTEXT, shuffle_buffer=10_000, seed=0)
    e0, e1 = ids(s0, 0), ids(s0, 1)
    assert sorted(e0) == list(range(20, 300)) and e0 != sorted(e0)  # every training doc once, not file order
    assert sorted(e1) == sorted(e0) and e1 != e0  # each epoch its own order
    assert e0 == ids(RowStream(spec, tok, CONTEXT, shuffle_buffer=10_000, seed=0), 0)  # deterministic
    assert e0 != ids(RowStream(spec, tok, CONTEXT, shuffle_buffer=10_000, seed=1), 0)
    assert ids(RowStream(spec, tok, CONTEXT), 0) == list(range(20, 300))  # shuffle_buffer 0: file order

    # the rows are packed from documents in that order, across the epoch boundary too
    rows, read = [], []
    while s0.epoch < 1 or len(read) < 40:
        rows.append(s0.next())
        read += [d for d in s0.last_docs if not read or read[-1] != d]
    boundary = read.index(e1[0], len(e0) - 2)
    assert read[:boundary] == e0[:boundary] and len(e0) - boundary <= 2  # the tail may end in a dropped partial row
    assert read[boundary:] == e1[: len(read) - boundary]
    again = RowStream(spec, tok, CONTEXT, shuffle_buffer=10_000, seed=0)
    again.skip(len(rows) - 5)  # how --resume fast-forwards
    assert [again.next() for _ in range(5)] == rows[-5:]


def test_resume_settings_include_the_order():
    now = {"shuffle": True, "shuffle_buffer": 10_000, "seed": 0, "eval_docs": 50, "sequence_parallel": 1}
    assert run_differences(dict(now), dict(now)) == []
    assert run_differences(dict(now), {**now, "shuffle": False}) == ["shuffle"]
    assert run_differences(dict(now), {**now, "shuffle_buffer": 5}) == ["shuffle_buffer"]
    assert run_differences(dict(now), {**now, "seed": 1}) == ["seed"]
    # a run started before shuffling existed read the file order: --no-shuffle resumes it, the default does not
    legacy = {"seed": 0}
    assert run_differences(legacy, {**now, "shuffle": False}) == []
    assert run_differences(legacy, now) == ["shuffle"]


def test_killed_and_resumed_run_reads_the_same_shuffled_documents(tiny, docs, tmp_path, monkeypatch):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    held = docs[: min(HELDOUT, 50)]  # eval_docs (default 50) of the 20 held out: all of them
    extra = ["--report-to", "tensorboard"] if HAS_TENSORBOARD else []

    full = tmp_path / "full"
    result = _in_process(_cfg(tiny, full), tmp_path / "full.trace", monkeypatch)
    trace_full = _trace(tmp_path / "full.trace")
    assert sorted(trace_full) == list(range(1, STEPS + 1))
    order = _order(trace_full)
    assert min(order) >= TRAIN_START and len(order) >= 5
    assert order != sorted(order)  # shuffled: not the file order (that would be 1000, 1001, ...)

    killed = tmp_path / "killed"
    r = _cli(tiny, killed, *extra, env={"GQA_CONVERT_KILL_AFTER_STEP": str(KILL_AT), TRACE_ENV: str(tmp_path / "a")})
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert "training documents shuffled (seed 0" in r.stdout + r.stderr
    # the model of step 3 (the checkpoint the kill left) scored by document_loss = the run's eval at step 3
    assert json.loads((killed / "checkpoint" / "state.json").read_text())["step"] == 3
    at3 = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    at3.load_state_dict(load_file(str(killed / "checkpoint" / "trainable.safetensors")), strict=False)
    eval3 = next(x for x in _rows(killed) if x["step"] == 3)
    assert eval3["eval_loss"] == pytest.approx(_loss_of(at3.eval(), held), abs=2e-5)
    assert eval3["eval_slice"] == f"documents[0:{len(held)}]" and eval3["eval_docs"] == len(held)

    r = _cli(tiny, killed, "--resume", *extra, env={TRACE_ENV: str(tmp_path / "b")})
    assert r.returncode == 0, r.stderr[-2000:]
    before, after = _trace(tmp_path / "a"), _trace(tmp_path / "b")
    assert sorted(before) == list(range(1, KILL_AT + 1)) and sorted(after) == list(range(SAVE_EVERY + 1, STEPS + 1))
    for step, row_docs in {**before, **after}.items():
        assert row_docs == trace_full[step], step  # the same documents in the same rows, before and after
    assert {**before, **after} == trace_full

    # held-out evaluation: at steps 3, 6, 9, the same in both runs
    a, b = _rows(full), _rows(killed)
    assert [x["step"] for x in a if "eval_loss" in x] == [x["step"] for x in b if "eval_loss" in x] == [3, 6, 9]
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-4)
        assert x.get("eval_loss", 0) == pytest.approx(y.get("eval_loss", 0), abs=1e-4)
    # the last eval_loss is document_loss of the final saved model on the same documents
    final = AutoModelForCausalLM.from_pretrained(killed, dtype=torch.float32).eval()
    assert b[-1]["eval_loss"] == pytest.approx(_loss_of(final, held), abs=2e-5)
    assert result.eval_loss == pytest.approx(a[-1]["eval_loss"], abs=1e-6) and len(result.evals) == 3
    assert result.eval_slice == f"documents[0:{len(held)}]"
    assert (killed / "loss_curve.png").stat().st_size > 1000 and (full / "loss_curve.png").stat().st_size > 1000

    if HAS_TENSORBOARD:  # the resumed run purged the steps the killed one logged after its checkpoint
        scalars = _tensorboard(killed)
        assert [e.step for e in scalars["train/loss"]] == list(range(1, STEPS + 1))
        assert [e.step for e in scalars["eval/loss"]] == [3, 6, 9]
        for e, row in zip(scalars["train/loss"], b):
            assert e.value == pytest.approx(row["loss"], abs=1e-5)


def test_no_shuffle_keeps_the_file_order_and_default_evals(tiny, tmp_path, monkeypatch, capsys):
    from gqa_convert.commands import main

    out, steps = tmp_path / "ordered", 4
    argv = ["uptrain", str(tiny), "--data", str(VAL_TEXT), "--context", str(CONTEXT), "--steps", str(steps)]
    argv += ["--batch-size", str(BATCH), "--heldout-docs", str(HELDOUT), "--train-start", str(TRAIN_START)]
    argv += ["--output", str(out), "--no-progress", "--no-shuffle", "--eval-docs", "5"]
    monkeypatch.setenv(TRACE_ENV, str(tmp_path / "t"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    assert "in the order of the source (--no-shuffle)" in capsys.readouterr().out
    order = _order(_trace(tmp_path / "t"))
    assert order == list(range(TRAIN_START, TRAIN_START + len(order)))  # 1000, 1001, ...: the file order
    rows = _rows(out)
    # no --eval-every: 5 evenly spaced evaluations ending at the last step (here every step of 4)
    assert [x["step"] for x in rows if "eval_loss" in x] == eval_steps(steps, None) == [1, 2, 3, 4]
    assert {x["eval_docs"] for x in rows if "eval_docs" in x} == {5}
    assert json.loads((out / "uptrain.json").read_text())["settings"]["shuffle"] is False


def test_eval_schedule():
    assert eval_steps(200, None) == [40, 80, 120, 160, 200]
    assert eval_steps(9, None) == [2, 4, 5, 7, 9]
    assert eval_steps(2, None) == [1, 2]
    assert eval_steps(10, 4) == [4, 8, 10]  # every 4 steps and the last
    assert eval_steps(3, 50) == [3]


# ----------------------------------------------------------------------------- plot and trackers


def test_plot_smooths_the_objective_and_draws_the_eval_curve(tmp_path):
    assert smoothed([2.0, 2.0, 2.0], 10) == pytest.approx([2.0, 2.0, 2.0])  # bias-corrected: no pull to 0
    noisy = [3.0 + (0.5 if i % 2 else -0.5) for i in range(200)]
    assert max(smoothed(noisy, 10)[20:]) - min(smoothed(noisy, 10)[20:]) < 0.15  # the noise of +-0.5 averaged out
    rows = [
        {"step": i, "tokens": 128 * i, "loss": 3 - i / 50 + (0.3 if i % 3 else 0), "kl": 1 - i / 100, "lr": 1e-3}
        | ({"eval_loss": 2.5 - i / 100, "eval_docs": 20, "eval_slice": "documents[0:20]"} if i % 20 == 0 else {})
        for i in range(1, 81)
    ]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 81, "tok')  # a line cut by a kill
    plot_curve(metrics, tmp_path / "loss_curve.png")
    assert (tmp_path / "loss_curve.png").stat().st_size > 5000


def _tensorboard(out: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    return {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard not installed (the [tensorboard] extra)")
def test_tensorboard_event_files_hold_train_and_eval_scalars(tiny, tmp_path):
    out = tmp_path / "tb"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        uptrain(
            _cfg(
                tiny, out, steps=4, eval_every=None, report_to="tensorboard", distill_from=str(tiny), distill_weight=0.5
            )
        )
    finally:
        torch.set_num_threads(threads)
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    scalars = _tensorboard(out)
    rows = _rows(out)
    for tag, key in (("train/loss", "loss"), ("train/kl", "kl"), ("train/lr", "lr"), ("eval/loss", "eval_loss")):
        logged = [(r["step"], r[key]) for r in rows if key in r]
        assert [e.step for e in scalars[tag]] == [s for s, _ in logged], tag
        assert [e.value for e in scalars[tag]] == pytest.approx([v for _, v in logged], rel=1e-5, abs=1e-6), tag
    assert [e.step for e in scalars["eval/loss"]] == [1, 2, 3, 4]
    assert {"train/grad_norm", "train/tokens_per_s", "train/tokens"} <= set(scalars)


@pytest.mark.parametrize("tracker", ["wandb", "trackio"])
def test_a_tracker_that_is_not_installed_is_refused_before_work(tiny, tmp_path, capsys, tracker):
    if importlib.util.find_spec(tracker) is not None:
        pytest.skip(f"{tracker} is installed here")
    out = tmp_path / "o"
    with pytest.raises(ConfigError) as info:
        uptrain(_cfg(tiny, out, report_to=tracker))
    msg = str(info.value)
    assert "\n" not in msg and f"--report-to {tracker}" in msg and f"gqa-convert[{tracker}]" in msg
    assert not out.exists()

    from gqa_convert.commands import main

    argv = ["uptrain", str(tiny), "--data", str(VAL_TEXT), "--context", "64", "--steps", "2", "--output", str(out)]
    assert main([*argv, "--report-to", tracker]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"gqa-convert: error: --report-to {tracker} needs the {tracker} package")
    assert not out.exists()
