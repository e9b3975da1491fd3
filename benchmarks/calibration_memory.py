"""Peak memory of calibration vs the number of layers (it should not grow with depth).

For each depth, a synthetic Llama checkpoint (hidden 512, 8 heads / 4 KV heads, FFN 1024,
float32, random weights) is saved to a temporary folder; then, each in a fresh subprocess, we
measure the peak resident memory (ru_maxrss) of
  - `calibrate`: layer-by-layer Σ for 2,048 tokens (4 x 512), written to a cache folder, and
  - `load`: plain AutoModelForCausalLM.from_pretrained + one forward pass over the same tokens,
the second being what calibration would cost if it held the whole model.

    python benchmarks/calibration_memory.py [--layers 4 8 16 32] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HIDDEN, HEADS, KV, FFN, VOCAB, TOKENS, SEQ = 512, 8, 4, 1024, 512, 2048, 512


def make_model(folder: Path, layers: int) -> float:
    """Save the synthetic checkpoint; returns its weight size in MB."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=layers,
                      num_attention_heads=HEADS, num_key_value_heads=KV, max_position_embeddings=SEQ,
                      tie_word_embeddings=True)  # fmt: skip
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters()) * 4 / 1e6


def child(mode: str, folder: str, cache: str) -> None:
    import torch

    if mode == "make":
        print(json.dumps({"weights_mb": make_model(Path(folder), int(cache))}))
        return
    torch.set_num_threads(1)
    chunks = [
        torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(i)) for i in range(TOKENS // SEQ)
    ]
    t = time.time()
    if mode == "calibrate":
        from gqa_convert.merge.calibrate import calibrate

        calibrate(folder, chunks, cache, hidden=HIDDEN)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            for c in chunks:
                model(c)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps({"peak_mb": peak_mb, "seconds": time.time() - t}))


def run_child(*args: str) -> dict:
    """Run this script as a fresh process. The parent never imports torch: a child's ru_maxrss
    starts from its parent's resident size at fork, so a big parent would inflate every peak."""
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    rows = []
    print(f"{'layers':>6} {'weights MB':>10} {'calibrate peak MB':>18} {'full load peak MB':>18} {'calib s':>8}")
    for n in args.layers:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "model"
            size = run_child("make", str(folder), str(n))["weights_mb"]
            cal = run_child("calibrate", str(folder), str(Path(tmp) / "cache"))
            full = run_child("load", str(folder), str(Path(tmp) / "cache"))
        rows.append({"layers": n, "weights_mb": size, "calibrate_peak_mb": cal["peak_mb"],
                     "full_model_peak_mb": full["peak_mb"], "calibrate_seconds": cal["seconds"]})  # fmt: skip
        print(
            f"{n:>6} {size:>10.0f} {cal['peak_mb']:>18.0f} {full['peak_mb']:>18.0f} {cal['seconds']:>8.1f}", flush=True
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
