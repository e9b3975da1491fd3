"""How long `gqa-convert --help` takes, against `python -c pass` in the same run (issue #10: < 0.5 s).

    python benchmarks/cli_startup.py [--runs 15] [--compare-ref fddb4ec]

Each command line is started as a fresh process `--runs` times (after one warm-up run, so the
file cache is warm); the median wall time is reported, and the CLI's time minus the bare
interpreter's. With --compare-ref, the same is measured for that git commit's package (checked
out with `git worktree` into a temporary folder), e.g. 0.1, whose commands imported torch.
Results go to benchmarks/results/cli_startup.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], runs: int, cwd: Path) -> float:
    subprocess.run(cmd, cwd=cwd, capture_output=True, check=True)  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=cwd, capture_output=True, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--compare-ref", help="git commit whose CLI to time as well (e.g. the 0.1 release)")
    args = ap.parse_args()
    py = sys.executable
    rows = {"python -c pass": timed([py, "-c", "pass"], args.runs, ROOT)}
    for argv in (["--help"], ["uptrain", "--help"], ["convert", "--help"], ["run", "--help"]):
        rows["gqa-convert " + " ".join(argv)] = timed([py, "-m", "gqa_convert", *argv], args.runs, ROOT)
    if args.compare_ref:
        with tempfile.TemporaryDirectory() as tmp:
            old = Path(tmp) / "old"
            subprocess.run(
                ["git", "worktree", "add", "--detach", str(old), args.compare_ref],
                cwd=ROOT,
                check=True,
                capture_output=True,
            )
            try:
                rows[f"gqa-convert --help @ {args.compare_ref}"] = timed(
                    [py, "-m", "gqa_convert", "--help"], args.runs, old
                )
            finally:
                subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=ROOT, capture_output=True)
    base = rows["python -c pass"]
    print(f"{'command':<40} {'median s':>9} {'minus python':>13}")
    for name, t in rows.items():
        print(f"{name:<40} {t:>9.3f} {t - base:>13.3f}")
    out = ROOT / "benchmarks" / "results" / "cli_startup.json"
    out.write_text(
        json.dumps(
            {
                "runs": args.runs,
                "python": sys.version.split()[0],
                "median_s": rows,
                "minus_python_s": {k: v - base for k, v in rows.items()},
            },
            indent=2,
        )
        + "\n"
    )
    print(f"written to {out}")


if __name__ == "__main__":
    main()
