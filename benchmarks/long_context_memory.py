"""One uptraining step with distillation and one verification pass at T = 4K-32K, V = 128,256:
peak RSS and wall time, memory-bounded against unbounded, through the library's own entry points.

Model: a tiny Llama with Llama-3's vocabulary (V = 128,256; hidden 64 (--hidden), 2 layers,
4 query heads, untied head, float32, max_position_embeddings 32,768), source with 4 KV heads,
converted to 2 (convert.convert_checkpoint, "mean"). The tokenizer is a 320-entry byte-level BPE
trained on the TinyStories fixture; the model's vocabulary is still 128,256, so every logit row is
Llama-3-sized (token ids only use the first 320 entries, which changes neither memory nor time).

Kinds and routes (each point runs in a fresh subprocess):

  uptrain    `uptrain(UptrainConfig(steps=1, batch_size=1, distill_from=SOURCE, distill_weight=0.5,
             train="all", lr=1e-4, heldout_docs=0, eval_docs=0))` on packed rows of long documents
             (0.3-0.7 T tokens, so a row holds 2-3 documents and the position ids restart). train="all":
             the heaviest case, the [V, H] head and embeddings train too:
      bounded       the defaults: attn="auto" (sdpa_packed here: no flash-attn on CPU), the chunked
                    loss with its default chunk (256 tokens at V = 128,256)
      unbounded     attn="sdpa" (stock: dense [1, 1, T, T] block-diagonal mask, student and teacher)
                    and loss_chunk_tokens=T: one chunk = the whole [T, V] logits, in the forward and
                    again in the backward's recomputation, the teacher's too (the unchunked path's
                    tensors less its saved-for-backward copies: a lower bound on the old loss)
      dynamic_malloc  bounded, with glibc's dynamic mmap threshold left as it is (the library
                    before gqa_convert.hostmem: the child's return_large_frees_to_os is made a no-op)
                    — what the C allocator keeps of freed buffers, on top of what the tensors hold.
  verify     `verify_model(CONVERTED, SOURCE, heldout.jsonl, T, heldout_docs=2, retrieval=False,
             write=False)`: two held-out documents of >= 32K tokens, cut to T:
      bounded       the defaults (batch_size 1: no padding, no mask; chunked per-document loss;
                    the cost measurement's prefill keeps the last position's logits only)
      unbounded     batch_size=2 and loss_chunk_tokens=T: both documents in one forward, the whole
                    [T, V] logits per document (both are >= T tokens, so even batch 2 has no
                    padding and no mask)
      fullprefill   bounded, but with the cost prefill returning all T - 1 positions' logits (the
                    library before it passed logits_to_keep=1; forced by a forward pre-hook here)

Measured per point: peak RSS of the child (VmHWM, absolute, and over the baseline after imports,
reset with clear_refs just before the call), the call's wall time and, for uptrain, the step's own
time (from metrics.jsonl). A point whose estimated peak (`estimate_peak`) exceeds the cap
(--cap-gb, default 20 GB, lowered to MemAvailable - 3 GB when the machine is busier) is skipped
with the reason recorded; a watchdog kills any child whose RSS passes the cap. The routes of a
kind agree on the loss (reported).

    python benchmarks/long_context_memory.py           # T = 4K and 16K, bounded + unbounded: ~12 min
    python benchmarks/long_context_memory.py --T 4096 8192 16384 32768 \
        --routes bounded unbounded dynamic_malloc fullprefill   # everything: ~45 min on 2 busy cores
    python benchmarks/long_context_memory.py --hidden 128 --T 16384 --routes bounded \
        --json benchmarks/results/long_context_memory_h128.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VOCAB, HIDDEN, LAYERS, HEADS, KV_SOURCE, KV_CONVERTED, MAX_POS = 128_256, 64, 2, 4, 4, 2, 32_768
TS = (4096, 8192, 16384, 32768)
DEFAULT_TS = (4096, 16384)
KINDS = {"uptrain": ("bounded", "unbounded", "dynamic_malloc"), "verify": ("bounded", "unbounded", "fullprefill")}
ROUTES = ("bounded", "unbounded", "dynamic_malloc", "fullprefill")
DEFAULT_ROUTES = ("bounded", "unbounded")
VERIFY_DOCS = 2
CRITERION_T, CRITERION_GB = 16384, 3.0  # issue 11: peak RSS under 3 GB at T = 16,384
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # tests/tiny.py: tiny models built in-process
RESULTS = ROOT / "benchmarks" / "results"
FIXTURES = Path(os.environ.get("GQA_CONVERT_FIXTURES", ROOT.parent / "shared" / "fixtures"))
TEXT = FIXTURES / "text" / "tinystories_val_head.txt"
GB = 1e9


# ----------------------------------------------------------------------------- measuring


def status(field: str, pid: str = "self") -> int:
    """A /proc/<pid>/status memory field in bytes (0 when absent)."""
    m = re.search(rf"^{field}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    return int(m.group(1)) * 1024 if m else 0


def meminfo(field: str) -> int:
    """A /proc/meminfo field in bytes."""
    m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    return int(m.group(1)) * 1024


def estimate_peak(kind: str, route: str, T: int, hidden: int) -> float:
    """Bytes of tensors the point is expected to hold at its peak, plus ~0.7 GB of imports and weights.

    uptrain unbounded: 5 float32 [T, V] buffers alive at once in the one-chunk loss with a teacher
    (logits, log-softmax, its gradient, the teacher's log-probs and probabilities:
    train/loss.py loss_peak_bytes) plus stock SDPA's dense mask for student and teacher (~10 bytes
    per T^2 element each, benchmarks/attention_memory.py). uptrain bounded: 5 chunk buffers, the
    activations (~14 KB per token at hidden 64) and a few [V, H] gradients and optimizer states.
    verify unbounded: 2 [T, V] buffers (logits, cross_entropy's log-softmax); fullprefill: the
    prefill's [T - 1, V] logits. Not counted: memory the C allocator keeps after tensors are freed.
    """
    tv, chunks, vh = T * VOCAB * 4, 5 * 256 * VOCAB * 4, VOCAB * hidden * 4
    base = 0.7 * GB
    if kind == "uptrain":
        if route == "unbounded":
            return base + 5 * tv + 2 * 10 * T * T
        return base + chunks + 14_000 * hidden / 64 * T + 8 * vh
    if route == "unbounded":
        return base + 2 * tv
    if route == "fullprefill":
        return base + tv
    return base + chunks


def child_uptrain(route: str, T: int, work: Path) -> dict:
    from gqa_convert.settings import UptrainConfig
    from gqa_convert.train.uptrain import uptrain

    out = Path(tempfile.mkdtemp(prefix=f"up-{route}-{T}-", dir=work))
    shutil.rmtree(out)
    cfg = UptrainConfig(
        model=str(work / "converted"),
        data=str(work / f"train_{T}.jsonl"),
        context=T,
        output=str(out),
        steps=1,
        batch_size=1,
        distill_from=str(work / "source"),
        distill_weight=0.5,
        train="all",  # the heaviest case: the [V, H] head and embedding train too (their gradients per chunk)
        lr=1e-4,  # fixed, not the width rule: the step's memory does not depend on it
        heldout_docs=0,
        eval_docs=0,
        progress=False,
        attn="sdpa" if route == "unbounded" else "auto",  # bounded, dynamic_malloc: the defaults
        loss_chunk_tokens=T if route == "unbounded" else None,
    )
    measure = start_measuring()
    result = uptrain(cfg)
    row = measure()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(out, ignore_errors=True)
    from gqa_convert.train.loss import chunk_size

    return row | {
        "attn_implementation": result.attn_implementation,
        "loss_chunk_tokens": chunk_size(cfg.loss_chunk_tokens, VOCAB),
        "step_s": round(T / metrics[-1]["tokens_per_s"], 2),
        "loss": metrics[-1]["loss"],
        "kl": metrics[-1].get("kl"),
    }


def child_verify(route: str, T: int, work: Path) -> dict:
    import gqa_convert.verify as verify

    if route == "fullprefill":
        original = verify.measure_costs

        def measure_costs(model, context, **kw):  # as before logits_to_keep=1: the prefill's whole logits
            def all_logits(module, args, kwargs):
                if kwargs.get("use_cache"):
                    kwargs["logits_to_keep"] = 0
                return args, kwargs

            handle = model.register_forward_pre_hook(all_logits, with_kwargs=True)
            try:
                return original(model, context, **kw)
            finally:
                handle.remove()

        verify.measure_costs = measure_costs
    options = {"batch_size": VERIFY_DOCS, "loss_chunk_tokens": T} if route == "unbounded" else {}
    measure = start_measuring()
    rec = verify.verify_model(
        work / "converted",
        str(work / "source"),
        work / "heldout.jsonl",
        T,
        heldout_docs=VERIFY_DOCS,
        retrieval=False,
        write=False,
        card=False,
        progress=False,
        device="cpu",
        tolerance=100.0,
        **options,
    )
    row = measure()
    return row | {
        "batch_size": options.get("batch_size", 1),
        "loss_chunk_tokens": options.get("loss_chunk_tokens"),
        "tokens_scored": rec.data.tokens,
        "loss": round(rec.loss.converted, 6),
        "source_loss": round(rec.loss.source, 6),
        "kv_cache_bytes": rec.costs.kv_cache_bytes.converted.measured,
    }


def start_measuring():
    """Reset VmHWM now; the returned function gives the peak since then and the wall time."""
    base = status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    t0 = time.perf_counter()

    def done() -> dict:
        wall = time.perf_counter() - t0
        peak = status("VmHWM")
        return {
            "baseline_rss_mib": round(base / 2**20),
            "peak_rss_mib": round(peak / 2**20),
            "peak_over_baseline_mib": round((peak - base) / 2**20),
            "wall_s": round(wall, 2),
        }

    return done


def child(kind: str, route: str, T: int, work: Path, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    import transformers  # noqa: F401  (imports before the baseline)

    import gqa_convert.train.uptrain  # noqa: F401
    import gqa_convert.verify  # noqa: F401

    if route == "dynamic_malloc":
        import gqa_convert.hostmem

        gqa_convert.hostmem._applied = True  # as if already applied: glibc keeps its dynamic threshold
    run = child_uptrain if kind == "uptrain" else child_verify
    return {"kind": kind, "route": route, "T": T} | run(route, T, work)


# ----------------------------------------------------------------------------- set-up


def setup(work: Path, hidden: int, contexts) -> dict:
    """Source and converted models, the held-out file and a training file per T in `contexts`, in `work`."""
    import torch
    from tiny import make_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from gqa_convert.convert import convert_checkpoint

    if not TEXT.is_file():
        raise SystemExit(f"fixture missing: {TEXT} (set GQA_CONVERT_FIXTURES)")
    text = " ".join(TEXT.read_text().split())
    tok = make_tokenizer([text])
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                      num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_SOURCE,
                      max_position_embeddings=MAX_POS, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).float().save_pretrained(work / "source")
    tok.save_pretrained(work / "source")
    convert_checkpoint(work / "source", work / "converted", KV_CONVERTED, progress=False)

    with open(work / "heldout.jsonl", "w") as fh:
        for i in range(VERIFY_DOCS):
            fh.write(json.dumps({"text": document(tok, text, MAX_POS + 16, 7919 * i)}) + "\n")
    training_files(work, contexts)
    chars_per_token = len(text) / len(tok(text, add_special_tokens=False)["input_ids"])
    return {"hidden": hidden, "tokenizer_vocab": len(tok), "chars_per_token": round(chars_per_token, 3)}


def document(tok, text: str, tokens: int, offset: int) -> str:
    """At least `tokens` tokens of `text` (cycled), starting at `offset`."""
    need = tokens * 2 + 100  # characters: this BPE averages ~1.6 per token
    start = offset % len(text)
    doc = (text[start:] + " " + text * (need // len(text) + 1))[:need]
    while len(tok(doc, add_special_tokens=False)["input_ids"]) < tokens:
        doc += " " + text[: need // 10]
    return doc


def training_files(work: Path, contexts) -> None:
    """train_T.jsonl for each T not yet there: 2.6 T tokens in documents of 0.3-0.7 T, so a packed row
    holds 2-3 documents."""
    from transformers import AutoTokenizer

    missing = [T for T in contexts if not (work / f"train_{T}.jsonl").is_file()]
    if not missing:
        return
    tok = AutoTokenizer.from_pretrained(work / "source")
    text = " ".join(TEXT.read_text().split())
    for T in missing:
        with open(work / f"train_{T}.jsonl", "w") as fh:
            for i, frac in enumerate((0.55, 0.3, 0.7, 0.45, 0.6)):
                fh.write(json.dumps({"text": document(tok, text, int(frac * T), 104729 * (i + 1))}) + "\n")


# ----------------------------------------------------------------------------- driver


def run_point(kind: str, route: str, T: int, work: Path, cap: float, threads: int) -> dict:
    """A fresh child per point, killed if its RSS passes `cap` bytes."""
    cmd = [sys.executable, __file__, "--child", kind, route, str(T), str(work), str(threads)]
    env = dict(os.environ)
    env.pop("MALLOC_MMAP_THRESHOLD_", None)  # the library's own threshold (gqa_convert.hostmem) applies
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
        highest, killed = 0, False
        while proc.poll() is None:
            try:
                rss = status("VmRSS", str(proc.pid))
            except (FileNotFoundError, ProcessLookupError):
                rss = 0
            highest = max(highest, rss)
            if rss > cap:
                proc.kill()
                killed = True
            time.sleep(0.1)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if killed:
        return {
            "skipped": f"killed: RSS passed the cap of {cap / GB:.1f} GB (watchdog)",
            "watchdog_peak_mib": highest >> 20,
        }
    if proc.returncode != 0:
        return {"failed": f"exit {proc.returncode}: {stderr.strip().splitlines()[-1] if stderr.strip() else ''}"}
    return json.loads(stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, nargs="+", default=list(DEFAULT_TS), help="contexts (default: 4096 16384)")
    ap.add_argument("--kinds", nargs="+", choices=tuple(KINDS), default=list(KINDS))
    ap.add_argument("--routes", nargs="+", choices=ROUTES, default=list(DEFAULT_ROUTES),
                    help="default: bounded unbounded")  # fmt: skip
    ap.add_argument("--hidden", type=int, default=HIDDEN, help=f"hidden size of the tiny model (default {HIDDEN})")
    ap.add_argument("--cap-gb", type=float, default=20.0, help="most RSS a point may take (default 20 GB)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per child (default 2)")
    ap.add_argument("--work", type=Path, help="folder for the models and data (default: a temporary one, removed)")
    ap.add_argument("--json", type=Path, default=RESULTS / "long_context_memory.json")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, route, T, work, threads = args.child
        print(json.dumps(child(kind, route, int(T), Path(work), int(threads))))
        return
    if any(not 64 <= T <= MAX_POS for T in args.T):
        raise SystemExit(f"--T from 64 to {MAX_POS} (the tiny model's max_position_embeddings)")

    own_work = args.work is None
    root = Path(tempfile.mkdtemp(prefix="long-context-memory-")) if own_work else args.work
    work = root / f"hidden{args.hidden}"  # the models and data, reused by a later run with the same --work
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    try:
        if not (work / "setup.json").is_file():
            (work / "setup.json").write_text(json.dumps(setup(work, args.hidden, args.T)))
        training_files(work, args.T)
        info = json.loads((work / "setup.json").read_text())
        rows = []
        head = f"{'kind':>7} {'route':>12} {'T':>6} {'peak RSS MiB':>12} {'over base MiB':>13} {'wall s':>7} {'step s':>7}  loss"
        print(head, flush=True)
        for T in args.T:
            for kind in args.kinds:
                for route in KINDS[kind]:
                    if route not in args.routes:
                        continue
                    est = estimate_peak(kind, route, T, args.hidden)
                    avail = meminfo("MemAvailable")
                    cap = min(args.cap_gb * GB, avail - 3 * GB)
                    point = {"kind": kind, "route": route, "T": T, "estimated_peak_gb": round(est / GB, 2),
                             "mem_available_gb": round(avail / GB, 1), "cap_gb": round(cap / GB, 1)}  # fmt: skip
                    if est > cap:
                        point["skipped"] = (
                            f"estimated peak {est / GB:.1f} GB exceeds the cap {cap / GB:.1f} GB "
                            f"(--cap-gb {args.cap_gb:g}, MemAvailable {avail / GB:.1f} GB - 3 GB); not run"
                        )
                    else:
                        point.update(run_point(kind, route, T, work, cap, args.threads))
                    rows.append(point)
                    if "peak_rss_mib" in point:
                        step = f"{point['step_s']:>7.1f}" if "step_s" in point else f"{'-':>7}"
                        print(f"{kind:>7} {route:>12} {T:>6} {point['peak_rss_mib']:>12,} "
                              f"{point['peak_over_baseline_mib']:>13,} {point['wall_s']:>7.1f} {step}  {point['loss']}",
                              flush=True)  # fmt: skip
                    else:
                        print(
                            f"{kind:>7} {route:>12} {T:>6}  {point.get('skipped') or point.get('failed')}", flush=True
                        )
        summary = summarise(rows)
        for line in summary["lines"]:
            print(line)
        record = {
            "model": {
                "vocab": VOCAB,
                "layers": LAYERS,
                "heads": HEADS,
                "kv_source": KV_SOURCE,
                "kv_converted": KV_CONVERTED,
                "max_position_embeddings": MAX_POS,
                "tied": False,
                "dtype": "float32",
                **info,
            },
            "machine": machine(args.threads),
            "mmap_threshold": "gqa_convert.hostmem.MMAP_THRESHOLD (4 MiB) except dynamic_malloc",
            "points": rows,
            "ratios": summary["ratios"],
            "criterion": summary["criterion"],
            "total_s": round(time.perf_counter() - t_all, 1),
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.json} ({record['total_s']:.0f} s)")
    finally:
        if own_work:
            shutil.rmtree(root, ignore_errors=True)


def summarise(rows: list[dict]) -> dict:
    """Unbounded / bounded ratios per (kind, T) and the 3 GB at 16K criterion."""
    by = {(r["kind"], r["route"], r["T"]): r for r in rows}
    ratios, lines, criterion = [], [], {}
    for kind, T in sorted({(r["kind"], r["T"]) for r in rows}):
        b, u = by.get((kind, "bounded", T)), by.get((kind, "unbounded", T))
        if not b or "peak_rss_mib" not in b or not u:
            continue
        rec = {"kind": kind, "T": T}
        if "peak_rss_mib" in u:
            rec.update(
                measured=True,
                peak_rss_ratio=round(u["peak_rss_mib"] / b["peak_rss_mib"], 2),
                over_baseline_ratio=round(u["peak_over_baseline_mib"] / max(b["peak_over_baseline_mib"], 1), 2),
                wall_ratio=round(u["wall_s"] / b["wall_s"], 2),
                loss_difference=abs(u["loss"] - b["loss"]),
            )
            lines.append(f"{kind} T={T}: unbounded / bounded peak RSS = {rec['peak_rss_ratio']}x "
                         f"(over baseline {rec['over_baseline_ratio']}x), wall {rec['wall_ratio']}x, "
                         f"|loss difference| {rec['loss_difference']:.1e}")  # fmt: skip
        else:
            rec.update(
                measured=False,
                estimated_peak_rss_ratio=round(u["estimated_peak_gb"] * GB / 2**20 / b["peak_rss_mib"], 1),
                reason=u.get("skipped") or u.get("failed"),
            )
            lines.append(f"{kind} T={T}: unbounded not run ({rec['reason']}); estimated "
                         f"{u['estimated_peak_gb']:.1f} GB = ~{rec['estimated_peak_rss_ratio']}x the bounded peak")  # fmt: skip
        ratios.append(rec)
    for kind in KINDS:
        routes = {route: by.get((kind, route, CRITERION_T)) for route in KINDS[kind]}
        for route, r in routes.items():
            if r is None or route == "unbounded" or "peak_rss_mib" not in r:
                continue
            gb = r["peak_rss_mib"] * 2**20 / GB
            ok = gb < CRITERION_GB
            criterion[f"{kind}_{route}"] = {
                "T": CRITERION_T,
                "peak_rss_gb": round(gb, 2),  # 10^9 bytes, the whole process (imports included)
                "peak_over_baseline_gb": round(r["peak_over_baseline_mib"] * 2**20 / GB, 2),
                "under_3_gb": ok,
            }
            lines.append(f"criterion: {kind} ({route}) at T={CRITERION_T}: peak RSS {gb:.2f} GB -> "
                         f"{'under' if ok else 'NOT under'} {CRITERION_GB:g} GB")  # fmt: skip
    return {"ratios": ratios, "lines": lines, "criterion": criterion}


def machine(threads: int) -> dict:
    import torch
    import transformers

    return {
        "cpus": os.cpu_count(),
        "torch_threads": threads,
        "load_average_at_end": os.getloadavg(),
        "mem_total_gb": round(meminfo("MemTotal") / GB, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


if __name__ == "__main__":
    main()
