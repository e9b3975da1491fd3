"""Peak memory of the training loss, chunked (train/loss.py) against unchunked, at long context.

A tiny Llama with Llama-3's vocabulary (V = 128,256; hidden 64, 2 layers, 4 query / 2 KV heads,
untied head, float32, SDPA attention) takes one forward + backward of the loss on one packed row
of T tokens (random documents of 500-3,000 tokens, positions restarting at each). Routes:

  unchunked  packed_forward -> whole [T, V] logits -> the loop's original token_losses formula
  chunked    packed_losses (final hidden states, head applied chunk_tokens at a time, recomputed
             in the backward)
  model      the floor: the same forward + backward with no head at all (the loss is a function
             of the final hidden states only), so route - model = what the loss itself holds

each with and without a distillation teacher (a second model of the same shape). Every (route,
T) runs in a fresh subprocess, which reports
  - peak RSS of the step: /proc/self/status VmHWM after resetting it (clear_refs 5) just before
    the step, minus VmRSS at that moment (so weights, imports and the batch are not counted);
  - peak bytes of live tensors and the largest tensor created (gqa_convert.train.memtrace, a
    deterministic count of every op's outputs in forward and backward);
  - the step's wall time.

    python benchmarks/loss_memory.py            # T = 4,096, both routes: ~2 min on 2 busy cores
    python benchmarks/loss_memory.py --both 2048 --chunked 8192 16384 --distill 2048 16384 \
        --json benchmarks/results/loss_memory_extra.json          # ~10 min
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

VOCAB, HIDDEN, LAYERS, HEADS, KV = 128_256, 64, 2, 4, 2
RESULTS = Path(__file__).resolve().parent / "results"


def status(field: str) -> int:
    """A /proc/self/status memory field in bytes."""
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def child(route: str, T: int, distill: bool) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    from gqa_convert.train.data import IGNORE, collate, pack_rows, packed_forward
    from gqa_convert.train.loss import chunk_size, packed_hidden, packed_losses
    from gqa_convert.train.memtrace import TensorMemory

    torch.set_num_threads(2)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=HIDDEN * 3, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=KV, max_position_embeddings=T,
                      tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").train()
    teacher = None
    if distill:
        teacher = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    docs, n = [], 0
    while n < T:
        docs.append(torch.randint(3, VOCAB, (int(torch.randint(500, 3000, (1,), generator=g)),), generator=g).tolist())
        n += len(docs[-1])
    batch = collate(list(pack_rows(docs, T))[:1])

    def unchunked():  # the loop's original path: packed_forward + token_losses, whole logits
        logits = packed_forward(model, batch)[:, :-1].float()
        target = batch["labels"][:, 1:]
        keep = target != IGNORE
        ce = F.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1), ignore_index=IGNORE, reduction="sum")
        kl = logits.new_zeros(())
        if teacher is not None:
            with torch.no_grad():
                t_logits = packed_forward(teacher, batch)
            logp = F.log_softmax(logits[keep], dim=-1)
            logq = F.log_softmax(t_logits[:, :-1].float()[keep], dim=-1)
            kl = (logq.exp() * (logq - logp)).sum()
        return ce, kl, int(keep.sum())

    def chunked():
        return packed_losses(model, batch, teacher)

    def floor():  # everything but the head: the model (and teacher) forward, the backward through the model
        hidden = packed_hidden(model, batch)
        if teacher is not None:
            with torch.no_grad():
                packed_hidden(teacher, batch)
        return hidden.square().mean(), torch.zeros(()), 1

    step = {"chunked": chunked, "unchunked": unchunked, "model": floor}[route]
    rss0 = status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak from here on is the step's
    t0 = time.perf_counter()
    with TensorMemory() as mem:
        ce, kl, n = step()
        (0.5 * ce + 0.5 * kl if distill else ce).backward()
    seconds = time.perf_counter() - t0
    peak = status("VmHWM")
    return {"route": route, "T": T, "distill": distill, "vocab": VOCAB,
            "chunk_tokens": chunk_size(None, VOCAB) if route == "chunked" else None,
            "loss": round(ce.item() / n, 6) if route != "model" else None,
            "peak_rss_step_mb": round((peak - rss0) / 2**20, 1),
            "peak_tensor_mb": round(mem.peak_bytes / 2**20, 1), "largest_tensor_elements": mem.largest_numel,
            "largest_tensor_op": mem.largest_op, "seconds": round(seconds, 2),
            "logits_TxV_float32_mb": round(T * VOCAB * 4 / 2**20, 1)}  # fmt: skip


def run_child(route: str, T: int, distill: bool) -> dict:
    """A fresh process per point, so one route's freed memory or allocator state cannot lower another's peak."""
    cmd = [sys.executable, __file__, "--child", route, str(T), str(int(distill))]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{route} T={T} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--both", type=int, nargs="*", default=[4096], help="T for chunked and unchunked")
    ap.add_argument("--chunked", type=int, nargs="*", default=[], help="T for the chunked route only")
    ap.add_argument(
        "--distill", type=int, nargs="*", default=[], help="T with a teacher (chunked; unchunked too if in --both)"
    )
    ap.add_argument("--json", type=Path, default=RESULTS / "loss_memory.json")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), bool(int(args.child[2])))))
        return
    points = [(r, T, False) for T in args.both for r in ("unchunked", "chunked", "model")]
    points += [(r, T, False) for T in args.chunked for r in ("chunked", "model")]
    for T in args.distill:
        points += [(r, T, True) for r in (("unchunked",) if T in args.both else ()) + ("chunked", "model")]
    print(
        f"{'route':>9} {'T':>6} {'teacher':>7} {'step RSS MB':>11} {'tensors MB':>10} {'largest tensor':>14} "
        f"{'s':>6}  loss"
    )
    rows = []
    for route, T, distill in points:
        r = run_child(route, T, distill)
        rows.append(r)
        loss = "-" if r["loss"] is None else r["loss"]
        print(
            f"{route:>9} {T:>6} {'yes' if distill else 'no':>7} {r['peak_rss_step_mb']:>11.0f} "
            f"{r['peak_tensor_mb']:>10.0f} {r['largest_tensor_elements']:>14,} {r['seconds']:>6.1f}  {loss}",
            flush=True,
        )
    ratios = []
    for T in sorted({r["T"] for r in rows}):
        for distill in (False, True):
            by = {r["route"]: r for r in rows if r["T"] == T and r["distill"] == distill}
            if "chunked" not in by or "model" not in by:
                continue
            m, c = by["model"], by["chunked"]
            # what the loss itself adds: the step's peak of live tensors minus the model-only step's
            rec = {
                "T": T,
                "distill": distill,
                "chunked_loss_tensor_mb": round(c["peak_tensor_mb"] - m["peak_tensor_mb"], 1),
            }
            line = (
                f"T={T}{' +teacher' if distill else ''}: the chunked loss raises the peak of live tensors by "
                f"{rec['chunked_loss_tensor_mb']:.0f} MB"
            )
            if "unchunked" in by:
                u = by["unchunked"]
                rec.update(
                    unchunked_loss_tensor_mb=round(u["peak_tensor_mb"] - m["peak_tensor_mb"], 1),
                    rss_ratio=round(u["peak_rss_step_mb"] / c["peak_rss_step_mb"], 2),
                    tensor_ratio=round(u["peak_tensor_mb"] / c["peak_tensor_mb"], 2),
                    loss_diff=abs(u["loss"] - c["loss"]),
                )
                line += (
                    f", the unchunked {rec['unchunked_loss_tensor_mb']:.0f} MB; whole step unchunked / chunked = "
                    f"{rec['rss_ratio']}x (RSS), {rec['tensor_ratio']}x (tensors); "
                    f"|loss difference| = {rec['loss_diff']:.1e}"
                )
            ratios.append(rec)
            print(line)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    model = {"vocab": VOCAB, "hidden": HIDDEN, "layers": LAYERS, "heads": HEADS, "kv_heads": KV}
    args.json.write_text(json.dumps({"model": model, "points": rows, "ratios": ratios}, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
