"""Peak memory of one training step on a packed row: stock SDPA (dense T×T mask) against sdpa_packed.

A tiny Llama (hidden 64, 2 layers, 4 query / 2 KV heads, head dim 16, vocab 256, float32, CPU) takes
one forward + backward of the next-token loss (packed_forward -> cross-entropy, IGNORE at document
starts) on one packed row of T tokens: random documents of 500-3,000 tokens, positions restarting at
each (data.pack_rows / collate), so every row holds several documents. The vocabulary is small on
purpose: the loss is not what is measured (see loss_memory.py), the attention is.

Each (attention, T) runs in a fresh subprocess and reports
  - peak RSS of the step: VmHWM after resetting it (clear_refs 5) just before the step, minus VmRSS then;
  - peak bytes of live tensors and the largest tensor created (gqa_convert.train.memtrace);
  - the step's wall time, and the loss (both attentions must agree).

    python benchmarks/attention_memory.py                       # T = 4K, 8K, 16K both; 32K packed
    python benchmarks/attention_memory.py --both 4096 --packed --json /tmp/a.json
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

VOCAB, HIDDEN, LAYERS, HEADS, KV, HEAD_DIM = 256, 64, 2, 4, 2, 16
RESULTS = Path(__file__).resolve().parent / "results"


def status(field: str) -> int:
    m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(m.group(1)) * 1024 if m else 0


def one(attn: str, T: int) -> dict:
    import random

    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, LlamaConfig

    from gqa_convert.train.attention import register
    from gqa_convert.train.data import IGNORE, collate, pack_rows, packed_forward
    from gqa_convert.train.memtrace import TensorMemory

    register()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=KV, head_dim=HEAD_DIM, max_position_embeddings=T,
                      tie_word_embeddings=False)  # fmt: skip
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).float().train()
    rng = random.Random(0)
    docs, total = [], 0
    while total < T:
        n = rng.randint(500, 3000)
        docs.append([rng.randrange(3, VOCAB) for _ in range(n)])
        total += n
    batch = collate([next(pack_rows(docs, T))])

    def step():
        logits = packed_forward(model, batch)
        labels = batch["labels"][:, 1:]
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
        loss.backward()
        return loss.item()

    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    rss0 = status("VmRSS")
    t0 = time.perf_counter()
    loss = step()
    wall = time.perf_counter() - t0
    rss_peak = status("VmHWM") - rss0
    model.zero_grad(set_to_none=True)
    with TensorMemory() as mem:
        loss2 = step()
    assert abs(loss - loss2) < 1e-6
    return dict(attn=attn, T=T, documents=int((batch["position_ids"] == 0).sum()), step_peak_rss=rss_peak,
                peak_tensor_bytes=mem.peak_bytes, largest_numel=mem.largest_numel, largest_op=mem.largest_op,
                wall_s=round(wall, 3), loss=loss)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--both", type=int, nargs="*", default=[4096, 8192, 16384], help="T for sdpa and sdpa_packed")
    ap.add_argument("--packed", type=int, nargs="*", default=[32768], help="T for sdpa_packed only")
    ap.add_argument("--json", type=Path, default=RESULTS / "attention_memory.json")
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]))))
        return
    runs = [(a, T) for T in args.both for a in ("sdpa", "sdpa_packed")] + [("sdpa_packed", T) for T in args.packed]
    rows = []
    for attn, T in runs:
        out = subprocess.run(
            [sys.executable, __file__, "--one", attn, str(T)], capture_output=True, text=True, check=True
        )
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{attn:12s} T={T:6d} docs={row['documents']:3d} rss={row['step_peak_rss'] / 2**20:8.0f} MiB "
              f"tensors={row['peak_tensor_bytes'] / 2**20:8.0f} MiB largest={row['largest_numel']:>12,d} "
              f"({row['largest_op']}) {row['wall_s']:.1f}s loss={row['loss']:.6f}", flush=True)  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
