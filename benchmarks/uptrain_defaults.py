"""Which uptraining settings recover a converted model without tuning: the measurements behind
the defaults of `gqa-convert uptrain` (docs/uptrain.md, "Defaults").

For each model: the source is converted with `gqa-convert convert SRC --kv-heads 2 --method mean`
(mean pooling, what `convert` does without calibration text), the held-out loss of source and
converted is measured, and then `gqa-convert uptrain CONVERTED --data TEXT --context 256 --steps
200` runs under each candidate's extra flags. Recovery = (converted - uptrained) / (converted -
source), all three losses measured by gqa_convert.evaluate.document_loss on documents[:200] of
text/tinystories_val_head.txt (the default --heldout-docs 200; uptraining reads documents[200:],
so the scored slice is never trained on; the second model was pretrained on documents[200:] too).

Models:
    stories260K        the fixture (llama2.c; d_model 64, 8 query / 4 KV heads) 4 -> 2 KV heads
    tiny-stories-mha   scripts/pretrain_tiny_stories.py (d_model 128, 8 query / 8 KV heads) 8 -> 2

    python scripts/pretrain_tiny_stories.py --output /tmp/tiny-stories-mha
    python benchmarks/uptrain_defaults.py --second /tmp/tiny-stories-mha --workers 2
    python benchmarks/uptrain_defaults.py --second /tmp/tiny-stories-mha --only stories260K --candidates defaults

Each run is a separate CLI process with OMP_NUM_THREADS=1 (these models' matrices are too small
for a second thread to pay); `--workers` runs that many at once. Results are merged into
benchmarks/results/uptrain_defaults.json (one entry per model and candidate; a re-run replaces it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("GQA_CONVERT_FIXTURES", ROOT.parent / "shared" / "fixtures"))
TEXT = FIXTURES / "text" / "tinystories_val_head.txt"
RESULTS = ROOT / "benchmarks" / "results" / "uptrain_defaults.json"
BASE = ["--context", "256", "--steps", "200"]  # the check's command; every candidate adds to it

# name -> extra flags ({src}: the unconverted source folder). "defaults" and "old_defaults" are
# the point of the benchmark: no tuning flag with today's defaults, and the defaults before issue 15.
CANDIDATES: dict[str, list[str]] = {
    "defaults": [],
    "old_defaults": "--lr 1e-4 --train all --no-distill --warmup 0.1 --decay 0.2".split(),
    "docs_flags": "--lr 5e-3 --train attention --distill-from {src} --distill-weight 1 --warmup 0.05 --decay 0.5".split(),
    # around the docs' flags: one change each
    "attn_kl_lr1.25e-3": "--lr 1.25e-3 --train attention --distill-from {src} --distill-weight 1 --warmup 0.05 --decay 0.5".split(),
    "attn_kl_lr2.5e-3": "--lr 2.5e-3 --train attention --distill-from {src} --distill-weight 1 --warmup 0.05 --decay 0.5".split(),
    "attn_kl_lr1e-2": "--lr 1e-2 --train attention --distill-from {src} --distill-weight 1 --warmup 0.05 --decay 0.5".split(),
    "all_kl_lr5e-3": "--lr 5e-3 --train all --distill-from {src} --distill-weight 1 --warmup 0.05 --decay 0.5".split(),
    "all_kl_lr1.25e-3": "--lr 1.25e-3 --train all --distill-from {src} --distill-weight 1 --warmup 0.05 --decay 0.5".split(),
    "attn_ce_lr5e-3": "--lr 5e-3 --train attention --no-distill --warmup 0.05 --decay 0.5".split(),
    # the second model (width 128) at the rule's LR 2.5e-3: what trains, and distillation off
    "all_kl_lr2.5e-3": "--lr 2.5e-3 --train all --distill-from {src} --distill-weight 1 --warmup 0.05 --decay 0.5".split(),
    "attn_ce_lr2.5e-3": "--lr 2.5e-3 --train attention --no-distill --warmup 0.05 --decay 0.5".split(),
    "attn_kl0.5_lr5e-3": "--lr 5e-3 --train attention --distill-from {src} --distill-weight 0.5 --warmup 0.05 --decay 0.5".split(),
    "attn_kl_lr5e-3_wsd0.1-0.2": "--lr 5e-3 --train attention --distill-from {src} --distill-weight 1 --warmup 0.1 --decay 0.2".split(),
}


def cli(*args: str, log: Path | None = None, threads: int = 1) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", "gqa_convert", *args], env=env, capture_output=True, text=True, cwd=ROOT
    )
    if log is not None:
        log.write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        raise RuntimeError(f"gqa-convert {' '.join(args[:2])} failed: {(proc.stderr or proc.stdout)[-600:]}")
    return proc.stdout + proc.stderr


def heldout_loss(folder: Path) -> float:
    import torch

    from gqa_convert.evaluate import document_loss, heldout_documents, load_model

    torch.set_num_threads(1)
    model, tok = load_model(folder)
    return document_loss(model, tok, heldout_documents(TEXT)).mean_loss


def prepare(name: str, work: Path, second: Path | None) -> tuple[Path, Path, int]:
    """(source folder, converted folder, KV heads of the source)."""
    if name == "stories260K":
        from gqa_convert.llama2c import export_llama2c

        src = work / "stories260K"
        if not src.exists():
            export_llama2c(FIXTURES / "stories260K" / "stories260K.bin", FIXTURES / "stories260K" / "tok512.bin", src)
    else:
        assert second is not None, "--second FOLDER (scripts/pretrain_tiny_stories.py) for the second model"
        src = second.resolve()
    kv = json.loads((src / "config.json").read_text())["num_key_value_heads"]
    conv = work / f"{name}-kv2"
    if not conv.exists():
        cli("convert", str(src), "--kv-heads", "2", "--method", "mean", "-o", str(conv), "--no-progress")
    return src, conv, kv


def run_candidate(name: str, flags: list[str], src: Path, conv: Path, work: Path) -> dict:
    out = work / f"{conv.name}-{name}"
    extra = [f.format(src=src) for f in flags]
    t0 = time.perf_counter()
    log = cli(
        "uptrain",
        str(conv),
        "--data",
        str(TEXT),
        *BASE,
        "--output",
        str(out),
        "--no-progress",
        *extra,
        log=work / f"{out.name}.log",
    )
    wall = time.perf_counter() - t0
    record = json.loads((out / "uptrain.json").read_text())
    loss = heldout_loss(out)
    return {
        "flags": " ".join(flags),
        "settings": {
            k: record["settings"].get(k) for k in ("lr", "train", "distill", "distill_weight", "warmup", "decay")
        },
        "distilled": any("kl" in json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()),
        "log": [line for line in log.splitlines() if line.startswith("uptrain:")],
        "heldout_loss": loss,
        "wall_s": round(wall, 1),
        "tokens": record["tokens"],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--second", type=Path, help="the second model's folder (scripts/pretrain_tiny_stories.py)")
    p.add_argument("--only", nargs="*", default=None, help="models: stories260K, tiny-stories-mha")
    p.add_argument("--candidates", nargs="*", default=None, help=f"of {', '.join(CANDIDATES)}")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a new temp folder)")
    args = p.parse_args(argv)
    models = args.only or (["stories260K"] + (["tiny-stories-mha"] if args.second else []))
    names = args.candidates or list(CANDIDATES)
    work = args.work or Path(tempfile.mkdtemp(prefix="uptrain-defaults-"))
    work.mkdir(parents=True, exist_ok=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    results.setdefault(
        "setup",
        {
            "command": "gqa-convert uptrain CONVERTED --data tinystories_val_head.txt " + " ".join(BASE),
            "conversion": "gqa-convert convert SRC --kv-heads 2 --method mean",
            "heldout": "documents[0:200] of tinystories_val_head.txt (uptraining reads documents[200:])",
            "recovery": "(converted - uptrained) / (converted - source), document_loss, max 512 tokens",
            "threads": "one per run (OMP_NUM_THREADS=1)",
        },
    )
    jobs = []
    for m in models:
        src, conv, kv = prepare(m, work, args.second)
        entry = results.setdefault("models", {}).setdefault(m, {})
        if "source_loss" not in entry:
            entry.update(
                source=m,
                kv_heads=f"{kv} -> 2",
                d_model=json.loads((src / "config.json").read_text())["hidden_size"],
                source_loss=heldout_loss(src),
                converted_loss=heldout_loss(conv),
            )
        jobs += [(m, n, src, conv) for n in names]

    def one(job):
        m, n, src, conv = job
        try:
            r = run_candidate(n, CANDIDATES[n], src, conv, work)
        except RuntimeError as err:
            print(f"{m} {n}: FAILED {err}", flush=True)
            return m, n, None
        e = results["models"][m]
        r["recovery"] = (e["converted_loss"] - r["heldout_loss"]) / (e["converted_loss"] - e["source_loss"])
        print(f"{m:18s} {n:28s} loss {r['heldout_loss']:.4f} recovery {r['recovery']:.1%} ({r['wall_s']:.0f} s)")
        return m, n, r

    with ThreadPoolExecutor(args.workers) as pool:
        for m, n, r in pool.map(one, jobs):
            if r is not None:
                fresh = json.loads(RESULTS.read_text()) if RESULTS.is_file() else results
                fresh.setdefault("setup", results["setup"])
                fresh.setdefault("models", {}).setdefault(m, {}).update(
                    {k: v for k, v in results["models"][m].items() if k != "runs"}
                )
                fresh["models"][m].setdefault("runs", {})[n] = r
                results = fresh
                RESULTS.parent.mkdir(parents=True, exist_ok=True)
                RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print(f"-> {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
