"""The GPU check (issue 11, item 5): a ~0.5B converted model at 32K context on one CUDA GPU, < 8 min.

Everything is built in-process, nothing is downloaded: a randomly initialised Qwen2.5-0.5B-shaped
Qwen2ForCausalLM (24 layers, hidden 896, FFN 4,864, 14 query / 2 KV heads, head size 64, vocabulary
151,936, tied embeddings; 494M parameters), saved in bf16 with a byte-level BPE tokenizer trained
here (`tests/tiny.py` make_tokenizer), on synthetic text. The phases, each timed, each guarded (a
failing phase records its error and the check goes on; a phase past its time limit is stopped):

  environment  GPU, peak BF16 TFLOP/s, versions, flash-attn, the attention `choose_attention` picks
  build        the source model and tokenizer
  convert      gqa_convert.convert.convert_checkpoint: 14 query / 2 KV -> 1 KV head (mean)
  uptrain      gqa_convert.train.uptrain at T = 32,768 for a few steps (bf16 autocast,
               gradient checkpointing, the chunked loss, attention as chosen): tokens/s (steps
               after the first `--warmup-steps` left out), MFU, peak CUDA memory
  memory_plan  gqa_convert.memory.plan_memory's estimate for that run against the measured peak
               (guarded import: "planner not available" where the module is not there)
  verify       gqa_convert.verify.verify_model at 32K on the GPU (retrieval off), source vs the
               uptrained model: losses, KV-cache bytes and FLOPs/token against the cost model
  decode       decode tokens/s and KV-cache bytes with a 32K context, source vs converted: prefill
               T - W - N tokens, W untimed + N timed greedy steps through the KV cache (bf16, SDPA),
               at batch 1 and at batch B (the prefilled cache repeated B times); against the cost
               model's KV bytes and its memory-bound decode ratio (weights + B x KV bytes read/step)

Model FLOPs (the MFU convention: forward + backward, recomputation not counted):
    per token   6 * N_matmul               N_matmul = L*(2*d*d_h*(n_h + n_kv) + 3*d*d_ff) + d*V
    per row     12 * L * n_h * d_h * P     P = causal (query, key) pairs; P = T^2/2 for one causal
                                           row ("mfu": 6*L*n_h*d_h*T per token, the usual figure),
                                           P = sum over packed documents of s^2/2 ("mfu_documents":
                                           what attention confined to documents actually needs)
    MFU = tokens/s * FLOPs per token / peak dense BF16 FLOP/s (H100/H200 SXM 989; --peak-tflops).
    HFU adds what is computed twice: the layers' forward (gradient checkpointing) and the head's
    (the chunked loss recomputes it in the backward): 2*N_matmul + 4*L*n_h*d_h*P/T per token.

Writes every number to OUT/gpu_check.json (after each phase, so a killed run keeps what it had;
OUT = --out, else $OUT, else ./gpu_check_out) and prints a summary. Without CUDA it prints one
skip line and exits 0; `--smoke` runs the same code path on CPU with a tiny model and T = 256
(seconds; numbers meaningless) -- tests/test_gpu_check.py runs it.

    python benchmarks/gpu_check.py                      # on the GPU machine: ~3-5 min on an H200
    python benchmarks/gpu_check.py --smoke --out /tmp/g # CPU smoke run
    python benchmarks/gpu_check.py --attn packed --steps 4 --decode-batch 1,32
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import inspect
import json
import math
import os
import platform
import random
import resource
import shutil
import signal
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # tests/tiny.py: tiny models built in-process
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

PHASES = ("environment", "build", "convert", "uptrain", "memory_plan", "verify", "decode")
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "H800": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "A10G": 125.0,
    "L4": 121.0,
}
WORDS = (
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "and",
    "then",
    "ran",
    "far",
    "away",
    "from",
    "home",
    "to",
    "see",
    "big",
    "red",
    "dog",
    "who",
    "was",
    "very",
    "happy",
    "with",
    "his",
    "new",
    "ball",
    "in",
    "park",
    "one",
    "day",
)

# Shapes and budgets. gpu: Qwen2.5-0.5B. smoke: the same family, tiny, on CPU.
PROFILES = {
    "gpu": dict(
        hidden=896,
        ffn=4864,
        layers=24,
        heads=14,
        kv=2,
        kv_to=1,
        vocab=151_936,
        context=32_768,
        steps=6,
        warmup_steps=2,
        verify_docs=2,
        decode_steps=32,
        decode_warmup=4,
        decode_batch="1,16",
        budget_s=420.0,
    ),
    "smoke": dict(
        hidden=64,
        ffn=128,
        layers=2,
        heads=4,
        kv=2,
        kv_to=1,
        vocab=512,
        context=256,
        steps=3,
        warmup_steps=1,
        verify_docs=2,
        decode_steps=8,
        decode_warmup=2,
        decode_batch="1,4",
        budget_s=110.0,
    ),
}
# Per-phase wall-clock limits, seconds (each also capped by what is left of --budget-s), and the
# least time a phase needs to be worth starting.
LIMITS = {"environment": 30, "build": 60, "convert": 60, "uptrain": 200, "memory_plan": 20, "verify": 120, "decode": 90}
MIN_START = {"environment": 1, "build": 10, "convert": 5, "uptrain": 45, "memory_plan": 1, "verify": 20, "decode": 15}


class PhaseTimeout(Exception):
    pass


# ----------------------------------------------------------------------------- bookkeeping


class Check:
    """The JSON record, written after every phase, and the phase runner."""

    def __init__(self, out: Path, args: argparse.Namespace, mode: str):
        self.out = out
        self.path = out / "gpu_check.json"
        self.t0 = time.time()
        self.deadline = self.t0 + args.budget_s
        self.data: dict[str, Any] = {
            "check": "gpu_check",
            "mode": mode,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "phases": {name: {"status": "pending"} for name in PHASES},
            "summary": {},
        }
        self.write()

    def write(self) -> None:
        self.data["elapsed_s"] = round(time.time() - self.t0, 2)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=_jsonable))
        os.replace(tmp, self.path)

    @contextmanager
    def phase(self, name: str, needs: tuple[str, ...] = ()):
        """Run a phase: its dict to fill in is yielded; errors and timeouts are recorded, not raised."""
        rec: dict[str, Any] = {}
        left = self.deadline - time.time()
        missing = [n for n in needs if self.data["phases"][n].get("status") != "ok"]
        skip = None
        if missing:
            skip = f"skipped: needs {', '.join(missing)}, which did not succeed"
        elif left < (MIN_START[name] if self.data["mode"] == "gpu" else 1):
            skip = f"skipped: {left:.0f} s left of the {self.data['args']['budget_s']:.0f} s budget"
        if skip:
            self.data["phases"][name] = {"status": "skipped", "reason": skip}
            print(f"gpu_check: {name}: {skip}", flush=True)
            self.write()
            yield None
            return
        limit = max(1, int(min(LIMITS[name] * self.data["args"].get("limit_scale", 1.0), left)))
        print(f"gpu_check: {name} (limit {limit} s) ...", flush=True)
        _reset_peak()
        t0 = time.perf_counter()
        old = _arm(limit)
        try:
            yield rec
            status = "ok"
        except PhaseTimeout:
            status = "timeout"
            rec["error"] = f"stopped after its {limit} s limit"
        except BaseException as err:  # noqa: B036 - a phase must never end the check (KeyboardInterrupt aside)
            if isinstance(err, KeyboardInterrupt):
                raise
            status = "error"
            rec["error"] = f"{type(err).__name__}: {str(err)[:2000]}"
            rec["traceback"] = traceback.format_exc(limit=12)[-4000:]
        finally:
            _disarm(old)
        rec = {"status": status, "seconds": round(time.perf_counter() - t0, 2), **rec}
        self.data["phases"][name] = rec
        print(
            f"gpu_check: {name}: {status} in {rec['seconds']} s" + (f" -- {rec['error']}" if "error" in rec else ""),
            flush=True,
        )
        _free()
        self.write()


def _arm(seconds: int):
    if not hasattr(signal, "SIGALRM"):
        return None

    def stop(signum, frame):
        raise PhaseTimeout()

    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    return old


def _disarm(old) -> None:
    if hasattr(signal, "SIGALRM"):
        signal.alarm(0)
        if old is not None:
            signal.signal(signal.SIGALRM, old)


def _jsonable(value):
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if hasattr(value, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(value)
    return str(value)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak() -> dict:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return {
            "max_memory_allocated": torch.cuda.max_memory_allocated(),
            "max_memory_reserved": torch.cuda.max_memory_reserved(),
        }
    # CPU (smoke): the process's lifetime peak RSS, for the code path only.
    return {"max_rss_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _gib(n: Optional[float]) -> Optional[float]:
    return None if n is None else round(n / 2**30, 3)


# ----------------------------------------------------------------------------- FLOPs


def n_matmul(p: dict) -> int:
    d, dh = p["hidden"], p["hidden"] // p["heads"]
    per_layer = 2 * d * dh * (p["heads"] + p["kv_to"]) + 3 * d * p["ffn"]
    return p["layers"] * per_layer + d * p["vocab"]


def attention_pairs(segments: list[list[int]], context: int) -> tuple[float, float]:
    """Causal (query, key) pairs per row: (one causal row of T, the mean over rows of documents)."""
    full = context * (context + 1) / 2
    docs = [sum(s * (s + 1) / 2 for s in row) for row in segments] or [full]
    return full, sum(docs) / len(docs)


def row_segments(cfg, tokenizer, rows: int) -> list[list[int]]:
    """Document lengths in each of the first `rows` training rows, by the library's own packing."""
    from gqa_convert.settings import data_spec
    from gqa_convert.train.data import pack_rows, tokenize_documents

    spec = data_spec(cfg.data, cfg, cfg.heldout_docs, cfg.train_start)
    out = []
    for _, pos in pack_rows(tokenize_documents(spec.training_documents(), tokenizer), cfg.context):
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        out.append([b - a for a, b in zip(starts, starts[1:])])
        if len(out) == rows:
            break
    return out


# ----------------------------------------------------------------------------- data and model


def synthetic_docs(rng: random.Random, tokens_per_word: float, lengths: list[int]) -> list[str]:
    """Documents of about `lengths` tokens each, words drawn at random."""
    return [" ".join(rng.choice(WORDS) for _ in range(max(1, math.ceil(n / tokens_per_word)))) for n in lengths]


def build(rec: dict, p: dict, work: Path, device: str) -> dict:
    import torch
    from tiny import make_tokenizer
    from transformers import Qwen2Config, Qwen2ForCausalLM

    rng = random.Random(0)
    tok = make_tokenizer([" ".join(WORDS)] * 20, vocab_size=min(400, p["vocab"]))
    sample = " ".join(rng.choice(WORDS) for _ in range(4000))
    tpw = len(tok(sample, add_special_tokens=False)["input_ids"]) / 4000
    cfg = Qwen2Config(
        vocab_size=p["vocab"],
        hidden_size=p["hidden"],
        intermediate_size=p["ffn"],
        num_hidden_layers=p["layers"],
        num_attention_heads=p["heads"],
        num_key_value_heads=p["kv"],
        max_position_embeddings=max(32_768, p["context"]),
        rope_theta=1_000_000.0,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg)
    model = model.to(torch.bfloat16)
    n_params = sum(x.numel() for x in model.parameters())
    src = work / "source"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    del model
    T = p["context"]
    # Training text: packed documents of T/4 .. 1.5 T tokens (rows hold 1-3 documents each, as in a
    # real run); enough for every step plus one row. Verification text: documents of > T tokens.
    lengths, total = [], 0
    while total < (p["steps"] + 2) * T:
        n = rng.randint(max(8, T // 4), max(16, 3 * T // 2))
        lengths.append(n)
        total += n
    (work / "train.txt").write_text("\n\n".join(synthetic_docs(rng, tpw, lengths)) + "\n")
    verify_lengths = [int(T * 1.15)] * p["verify_docs"]
    (work / "verify.txt").write_text("\n\n".join(synthetic_docs(rng, tpw, verify_lengths)) + "\n")
    rec.update(
        model="Qwen2ForCausalLM (random weights, bf16)",
        params=n_params,
        config={
            k: getattr(cfg, k)
            for k in (
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "vocab_size",
                "max_position_embeddings",
            )
        },
        tokenizer_vocab=len(tok),
        tokens_per_word=round(tpw, 3),
        train_docs=len(lengths),
        train_tokens_approx=total,
        verify_docs=len(verify_lengths),
    )
    return {"source": src, "tokenizer": tok, "train": work / "train.txt", "verify": work / "verify.txt"}


# ----------------------------------------------------------------------------- decode


def _cache_kwarg(model) -> str:
    """transformers 5.x names the cache argument `cache` (recent) or `past_key_values` (earlier)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _new_cache(config):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=config)
    except TypeError:
        return DynamicCache()


def _cache_of(out, fallback):
    for name in ("cache", "past_key_values"):
        c = getattr(out, name, None)
        if c is not None:
            return c
    return fallback


def _cache_bytes(cache) -> tuple[int, list[int]]:
    tensors = []
    for layer in getattr(cache, "layers", None) or []:
        tensors += [getattr(layer, "keys", None), getattr(layer, "values", None)]
    if not tensors:  # older cache layout
        tensors = list(getattr(cache, "key_cache", [])) + list(getattr(cache, "value_cache", []))
    tensors = [t for t in tensors if t is not None and hasattr(t, "numel")]
    return sum(t.numel() * t.element_size() for t in tensors), sorted({t.shape[-2] for t in tensors})


def _repeat_cache(cache, batch: int) -> str:
    if hasattr(cache, "batch_repeat_interleave"):
        cache.batch_repeat_interleave(batch)
        return "batch_repeat_interleave"
    for layer in cache.layers:
        layer.keys = layer.keys.repeat_interleave(batch, dim=0)
        layer.values = layer.values.repeat_interleave(batch, dim=0)
    return "manual"


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def decode_model(folder: Path, context: int, steps: int, warmup: int, batches: list[int], device: str) -> dict:
    """Decode tokens/s and KV bytes of one model with a `context`-token cache at each batch size."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    kw = _cache_kwarg(model)
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    prefill = context - steps - warmup
    if prefill < 1:
        raise ValueError(f"context {context} must exceed decode steps + warm-up {steps + warmup}")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (1, prefill), generator=gen).to(device)
    weights = sum(x.numel() * x.element_size() for x in model.parameters())
    out: dict[str, Any] = {
        "dtype": str(dtype).removeprefix("torch."),
        "cache_argument": kw,
        "prefill_tokens": prefill,
        "weight_bytes": weights,
        "batches": {},
    }
    for b in batches:
        _free()
        _reset_peak()
        base = torch.cuda.memory_allocated() if device.startswith("cuda") else 0
        cache = _new_cache(model.config)
        with torch.inference_mode():
            _sync(device)
            t0 = time.perf_counter()
            res = model(input_ids=ids, use_cache=True, **{kw: cache}, **keep)
            _sync(device)
            prefill_s = time.perf_counter() - t0
            cache = _cache_of(res, cache)
            nxt = res.logits[:, -1:].argmax(-1)
            how = None
            if b > 1:
                how = _repeat_cache(cache, b)
                nxt = nxt.repeat(b, 1)
            for _ in range(warmup):
                res = model(input_ids=nxt, use_cache=True, **{kw: cache})
                cache = _cache_of(res, cache)
                nxt = res.logits[:, -1:].argmax(-1)
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                res = model(input_ids=nxt, use_cache=True, **{kw: cache})
                cache = _cache_of(res, cache)
                nxt = res.logits[:, -1:].argmax(-1)
            _sync(device)
            dt = time.perf_counter() - t0
        kv, held = _cache_bytes(cache)
        row = {
            "batch": b,
            "prefill_s": round(prefill_s, 4),
            "decode_s": round(dt, 4),
            "step_ms": round(1000 * dt / steps, 3),
            "decode_tokens_per_s": round(b * steps / dt, 2),
            "kv_cache_bytes": kv,
            "kv_cache_bytes_per_sequence": kv // b,
            "cache_tokens": held,
            "cache_repeat": how,
        }
        if device.startswith("cuda"):
            row["peak_memory_above_weights"] = torch.cuda.max_memory_allocated() - base
        out["batches"][str(b)] = row
        del cache, res, nxt
    del model
    return out


# ----------------------------------------------------------------------------- the check


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="the same code path on CPU, tiny model, T = 256")
    ap.add_argument(
        "--out", type=Path, default=None, help="folder for gpu_check.json (default $OUT, else ./gpu_check_out)"
    )
    ap.add_argument("--work", type=Path, default=None, help="scratch folder for the models (default: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder (models, the run)")
    ap.add_argument(
        "--attn",
        default="auto",
        help="uptrain attention: auto (flash-attn 2 if importable, else SDPA), "
        "flash, sdpa, or packed where this version has it",
    )
    ap.add_argument("--context", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="uptraining steps")
    ap.add_argument("--warmup-steps", type=int, default=None, help="first steps left out of tokens/s")
    ap.add_argument("--verify-docs", type=int, default=None)
    ap.add_argument("--decode-steps", type=int, default=None, help="timed greedy decode steps")
    ap.add_argument("--decode-warmup", type=int, default=None, help="untimed decode steps before them")
    ap.add_argument("--decode-batch", default=None, help="comma-separated batch sizes for decode, e.g. 1,16")
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak dense BF16 TFLOP/s (default: by GPU name)")
    ap.add_argument(
        "--budget-s", type=float, default=None, help="wall-clock budget for all phases (default 420 on GPU, 110 smoke)"
    )
    ap.add_argument("--limit-scale", type=float, default=1.0, help="multiply every per-phase limit")
    args = ap.parse_args(argv)
    prof = dict(PROFILES["smoke" if args.smoke else "gpu"])
    for key in (
        "context",
        "steps",
        "warmup_steps",
        "verify_docs",
        "decode_steps",
        "decode_warmup",
        "decode_batch",
        "budget_s",
    ):
        if getattr(args, key) is None:
            setattr(args, key, prof[key])
        prof[key] = getattr(args, key)
    args.profile = prof
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("gpu_check: no CUDA device; skipped (run with --smoke for the CPU smoke test)")
        return 0
    mode = "smoke" if args.smoke else "gpu"
    device = "cuda" if (cuda and not args.smoke) else "cpu"
    if args.smoke:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    out = args.out or Path(os.environ.get("OUT") or "gpu_check_out")
    out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    p = args.profile
    check = Check(out, args, mode)
    ph = check.data["phases"]
    state: dict[str, Any] = {}
    try:
        with check.phase("environment") as rec:
            if rec is not None:
                rec.update(environment(args, device))
                state.update(peak_tflops=rec.get("peak_bf16_tflops"), gpu_memory_bytes=rec.get("gpu_memory_bytes"))
        with check.phase("build") as rec:
            if rec is not None:
                state.update(build(rec, p, work, device))
        with check.phase("convert", needs=("build",)) as rec:
            if rec is not None:
                from gqa_convert.convert import convert_checkpoint

                res = convert_checkpoint(state["source"], work / "converted", p["kv_to"], method="mean", progress=False)
                state["converted"] = res.output
                rec.update(
                    method=res.method,
                    family=res.family,
                    old_shape=res.old_shape,
                    new_shape=res.new_shape,
                    bytes_written=res.bytes_written,
                    tensors_changed=res.tensors_changed,
                )
        with check.phase("uptrain", needs=("convert",)) as rec:
            if rec is not None:
                uptrain_phase(rec, args, p, work, state, device)
        with check.phase("memory_plan", needs=("uptrain",)) as rec:
            if rec is not None:
                plan_phase(rec, p, state, device)
        with check.phase("verify", needs=("convert",)) as rec:
            if rec is not None:
                verify_phase(rec, p, state, work, device)
        with check.phase("decode", needs=("convert",)) as rec:
            if rec is not None:
                decode_phase(rec, args, p, state, device)
    finally:
        check.data["summary"] = summary(check.data, p)
        check.data["total_s"] = round(time.time() - check.t0, 2)
        check.write()
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print_summary(check.data, check.path)
    return 0 if all(ph[n]["status"] == "ok" for n in PHASES) else 1


def environment(args, device: str) -> dict:
    import torch
    import transformers

    from gqa_convert.train.backend import choose_attention, flash_available

    info: dict[str, Any] = {
        "device": device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda_runtime": torch.version.cuda,
    }
    for mod in ("accelerate", "peft", "triton", "flash_attn", "liger_kernel", "deepspeed"):
        if importlib.util.find_spec(mod) is None:
            info[mod] = None
            continue
        try:
            info[mod] = getattr(__import__(mod), "__version__", "installed")
        except Exception as err:  # a broken install is worth recording, not fatal
            info[mod] = f"import failed: {type(err).__name__}: {str(err)[:200]}"
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            gpu_memory_bytes=props.total_memory,
            capability=f"{props.major}.{props.minor}",
            gpus_visible=torch.cuda.device_count(),
        )
    name = info.get("gpu", "cpu")
    info["peak_bf16_tflops"] = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    ok, why = flash_available()
    info["flash_attn_usable"] = ok
    info["flash_attn_why_not"] = why or None
    info["attention_requested"] = args.attn
    info["attention_chosen"] = choose_attention(args.attn)
    return info


def uptrain_phase(rec: dict, args, p: dict, work: Path, state: dict, device: str) -> None:
    from gqa_convert.settings import UptrainConfig
    from gqa_convert.train.uptrain import uptrain

    T = p["context"]
    run = work / "run"
    cfg = UptrainConfig(
        model=str(state["converted"]),
        data=str(state["train"]),
        context=T,
        output=str(run),
        steps=p["steps"],
        batch_size=1,
        lr=1e-5,
        train="all",  # pinned, not the defaults (attention, distilling): the planner below is asked about
        distill=False,  # exactly this setting (every weight trains, no teacher)
        heldout_docs=0,
        attn=args.attn,
        gradient_checkpointing=True,
        loss_impl="chunked",
        save_every=10**9,
        progress=True,
    )
    rec["settings"] = {
        k: getattr(cfg, k)
        for k in (
            "context",
            "steps",
            "batch_size",
            "attn",
            "gradient_checkpointing",
            "loss_impl",
            "loss_chunk_tokens",
            "train",
            "lora",
        )
    }
    rec["autocast"] = "bf16 (accelerate, on CUDA)" if device == "cuda" else "none (CPU, float32)"
    segments = row_segments(cfg, state["tokenizer"], p["steps"])
    t0 = time.perf_counter()
    res = uptrain(cfg)
    rec["wall_s"] = round(time.perf_counter() - t0, 2)
    rec.update(_peak())
    state["run"] = run
    state["uptrain_peak"] = rec.get("max_memory_allocated")
    state["attention"] = res.attn_implementation
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    timed = rows[p["warmup_steps"] :] or rows
    secs = [T / r["tokens_per_s"] for r in timed]
    tok_s = T * len(timed) / sum(secs)
    rec.update(
        attn_implementation=res.attn_implementation,
        steps=res.steps,
        final_loss=res.final_loss,
        losses=res.losses,
        tokens_per_s_all_steps=round(res.tokens_per_s, 2),
        tokens_per_s=round(tok_s, 2),
        timed_steps=len(timed),
        step_seconds=[round(T / r["tokens_per_s"], 3) for r in rows],
        documents_per_row=[len(s) for s in segments],
    )
    n_mm = n_matmul(p)
    dh = p["hidden"] // p["heads"]
    full, docs = attention_pairs(segments, T)
    attn_coef = 12 * p["layers"] * p["heads"] * dh
    flops_row = 6 * n_mm + attn_coef * full / T  # per token, one causal row
    flops_doc = 6 * n_mm + attn_coef * docs / T  # per token, attention within documents
    recompute = 2 * n_mm + attn_coef / 3 * docs / T
    peak = state.get("peak_tflops")
    rec["flops"] = {
        "n_matmul": n_mm,
        "per_token_dense": 6 * n_mm,
        "per_token_causal_row": flops_row,
        "per_token_documents": flops_doc,
        "per_token_recompute": recompute,
        "formula": "6*N_matmul + 12*L*n_h*d_h*P/T per token; P = T^2/2 (row) or sum s^2/2 (documents)",
    }
    rec["model_tflops_per_s"] = round(tok_s * flops_row / 1e12, 3)
    rec["model_tflops_per_s_documents"] = round(tok_s * flops_doc / 1e12, 3)
    rec["peak_bf16_tflops"] = peak
    if peak:
        rec["mfu"] = round(tok_s * flops_row / (peak * 1e12), 4)
        rec["mfu_documents"] = round(tok_s * flops_doc / (peak * 1e12), 4)
        rec["hfu_documents"] = round(tok_s * (flops_doc + recompute) / (peak * 1e12), 4)


def plan_phase(rec: dict, p: dict, state: dict, device: str) -> None:
    try:
        from gqa_convert.memory import plan_memory
    except ImportError as err:
        rec.update(available=False, note=f"planner not available ({err})")
        return
    from gqa_convert import memory
    from gqa_convert.law.shapes import shape_from_config

    kinds = getattr(memory, "ATTENTION", ("flash", "sdpa"))
    attn = state.get("attention", "sdpa")
    if attn.startswith("flash"):
        kind = "flash"
    elif attn == "sdpa":
        kind = "sdpa"
    else:  # sdpa_packed: no T x T mask, like flash-attn's varlen kernel, unless the planner knows it
        kind = "packed" if "packed" in kinds else "flash"
    shape = shape_from_config(json.loads((Path(state["converted"]) / "config.json").read_text()))
    kw = dict(
        gpus=1,
        train="all",
        batch_size=1,
        gradient_checkpointing=True,
        dtype="bf16" if device == "cuda" else "fp32",
        attention=kind,
        loss="chunked",
    )
    if device == "cuda":
        import torch

        kw["gpu_memory"] = torch.cuda.get_device_properties(0).total_memory
    plan = plan_memory(shape, p["context"], **kw)
    measured = state.get("uptrain_peak")
    rec.update(
        available=True,
        attention_as_planned=kind,
        attention_run=attn,
        settings=kw,
        estimate_bytes=plan.total_bytes,
        estimate_gib=_gib(plan.total_bytes),
        peak_phase=plan.peak_phase,
        parts=plan.parts,
        fits=getattr(plan, "fits", None),
        notes=list(getattr(plan, "notes", []) or []),
    )
    if measured:
        rec.update(
            measured_bytes=measured,
            measured_gib=_gib(measured),
            estimate_over_measured=round(plan.total_bytes / measured, 4),
            within_20_percent=abs(plan.total_bytes / measured - 1) <= 0.20,
        )
    else:
        rec["measured_bytes"] = None
        rec["note"] = "no CUDA peak to compare (CPU smoke run: the estimate is recorded for the code path only)"


def verify_phase(rec: dict, p: dict, state: dict, work: Path, device: str) -> None:
    from gqa_convert.verify import verify_model

    model = (
        state.get("run") if state.get("run") and (Path(state["run"]) / "config.json").is_file() else state["converted"]
    )
    rec["model"] = "uptrained" if model == state.get("run") else "converted (uptrain did not finish)"
    t0 = time.perf_counter()
    r = verify_model(
        model,
        str(state["source"]),
        state["verify"],
        p["context"],
        heldout_docs=p["verify_docs"],
        batch_size=1,
        device=device,
        retrieval=False,
        write=False,
        card=False,
    )
    rec["wall_s"] = round(time.perf_counter() - t0, 2)
    rec.update(_peak())
    d = r.model_dump(mode="json")
    rec.update(
        passed=r.passed,
        reasons=r.reasons,
        loss=d.get("loss"),
        costs=d.get("costs"),
        data=d.get("data"),
        checks=d.get("checks"),
        extra={
            k: v
            for k, v in d.items()
            if k
            not in ("loss", "costs", "data", "checks", "reasons", "passed", "weights_sha256", "versions", "created")
        },
    )
    rec["note"] = (
        "random weights after a few steps: the loss check is expected to fail; the cost checks "
        "(KV bytes, FLOPs/token within 2% of the cost model) are what this phase verifies"
    )


def decode_phase(rec: dict, args, p: dict, state: dict, device: str) -> None:
    from gqa_convert.law.cost import cost_report
    from gqa_convert.law.shapes import shape_from_config

    T = p["context"]
    batches = [int(b) for b in str(p["decode_batch"]).split(",") if b.strip()]
    rec.update(
        context=T,
        decode_steps=p["decode_steps"],
        decode_warmup=p["decode_warmup"],
        batches=batches,
        attention="sdpa",
        method="prefill T-W-N tokens once; repeat the cache to the batch; W+N greedy steps",
    )
    models = {"source": state["source"], "converted": state["converted"]}
    for name, folder in models.items():
        try:
            rec[name] = decode_model(Path(folder), T, p["decode_steps"], p["decode_warmup"], batches, device)
        except PhaseTimeout:
            raise
        except Exception as err:
            rec[name] = {"error": f"{type(err).__name__}: {str(err)[:1000]}"}
        _free()
        dtype = "bf16" if device == "cuda" else "fp32"
        shape = shape_from_config(json.loads((Path(folder) / "config.json").read_text()))
        pred = cost_report(shape, T, dtype=dtype)
        rec[name]["predicted"] = {
            "kv_cache_bytes": pred.kv_cache_bytes,
            "weight_bytes": pred.weight_bytes,
            "memory_bytes": pred.memory_bytes,
            "dtype": dtype,
        }
        for row in rec[name].get("batches", {}).values():
            row["kv_rel_error"] = round(row["kv_cache_bytes_per_sequence"] / pred.kv_cache_bytes - 1, 5)
    compare = {}
    s, c = rec["source"], rec["converted"]
    for b in batches:
        rs, rc = s.get("batches", {}).get(str(b)), c.get("batches", {}).get(str(b))
        if not (rs and rc):
            continue
        ps, pc = s["predicted"], c["predicted"]
        compare[str(b)] = {
            "decode_speedup_measured": round(rc["decode_tokens_per_s"] / rs["decode_tokens_per_s"], 4),
            # memory-bound decode: each step reads the weights once and every sequence's KV cache
            "decode_speedup_cost_model": round(
                (ps["weight_bytes"] + b * ps["kv_cache_bytes"]) / (pc["weight_bytes"] + b * pc["kv_cache_bytes"]), 4
            ),
            "kv_ratio_measured": round(rc["kv_cache_bytes"] / rs["kv_cache_bytes"], 4),
            "kv_ratio_cost_model": round(pc["kv_cache_bytes"] / ps["kv_cache_bytes"], 4),
        }
    rec["converted_vs_source"] = compare
    gpu_mem = state.get("gpu_memory_bytes")
    if gpu_mem:
        rec["sequences_of_T_that_fit_cost_model"] = {
            n: int((gpu_mem - m["predicted"]["weight_bytes"]) // m["predicted"]["kv_cache_bytes"])
            for n, m in (("source", s), ("converted", c))
        }
    bad = [n for n in models if "error" in rec[n]]
    if bad:
        raise RuntimeError("decode failed for " + ", ".join(f"{n}: {rec[n]['error']}" for n in bad))


def summary(data: dict, p: dict) -> dict:
    ph = data["phases"]
    env, up, plan, ver, dec = (ph.get(n, {}) for n in ("environment", "uptrain", "memory_plan", "verify", "decode"))
    s: dict[str, Any] = {
        "statuses": {n: ph[n].get("status") for n in PHASES},
        "gpu": env.get("gpu", env.get("device")),
        "context": p["context"],
        "attention": up.get("attn_implementation", env.get("attention_chosen")),
    }
    for key in ("tokens_per_s", "mfu", "mfu_documents", "max_memory_allocated"):
        if key in up:
            s[f"uptrain_{key}"] = up[key]
    if plan.get("available"):
        s["planner_estimate_bytes"] = plan.get("estimate_bytes")
        s["planner_estimate_over_measured"] = plan.get("estimate_over_measured")
    elif plan.get("note"):
        s["planner"] = plan["note"]
    if ver.get("status") == "ok":
        costs = ver.get("costs") or {}
        s["verify_passed"] = ver.get("passed")
        s["verify_kv_rel_error"] = ((costs.get("kv_cache_bytes") or {}).get("converted") or {}).get("rel_error")
        s["verify_flops_rel_error"] = ((costs.get("flops_per_token") or {}).get("converted") or {}).get("rel_error")
        s["verify_loss"] = {k: (ver.get("loss") or {}).get(k) for k in ("source", "converted")}
    if "converted_vs_source" in dec:
        s["decode"] = {
            b: {
                "source_tok_s": dec["source"]["batches"][b]["decode_tokens_per_s"],
                "converted_tok_s": dec["converted"]["batches"][b]["decode_tokens_per_s"],
                "source_kv_bytes_per_seq": dec["source"]["batches"][b]["kv_cache_bytes_per_sequence"],
                "converted_kv_bytes_per_seq": dec["converted"]["batches"][b]["kv_cache_bytes_per_sequence"],
                **v,
            }
            for b, v in dec["converted_vs_source"].items()
        }
    return s


def print_summary(data: dict, path: Path) -> None:
    s = data["summary"]
    print(
        f"\ngpu_check ({data['mode']}) on {s.get('gpu')}: T = {s['context']:,}, attention {s.get('attention')}, "
        f"{data.get('total_s')} s in all"
    )
    for name in PHASES:
        r = data["phases"][name]
        line = f"  {name:<12} {r.get('status'):<8} {r.get('seconds', '')!s:>8} s"
        if r.get("error") or r.get("reason"):
            line += f"  {(r.get('error') or r.get('reason'))[:150]}"
        print(line)
    if "uptrain_tokens_per_s" in s:
        print(
            f"  uptrain: {s['uptrain_tokens_per_s']:,.0f} tokens/s, MFU {s.get('uptrain_mfu')} (causal row), "
            f"{s.get('uptrain_mfu_documents')} (documents), peak {_gib(s.get('uptrain_max_memory_allocated'))} GiB"
        )
    if "planner_estimate_bytes" in s:
        print(
            f"  planner: {_gib(s['planner_estimate_bytes'])} GiB estimated, estimate/measured "
            f"{s.get('planner_estimate_over_measured')}"
        )
    elif "planner" in s:
        print(f"  planner: {s['planner']}")
    if "verify_passed" in s:
        print(
            f"  verify: passed {s['verify_passed']}, loss {s['verify_loss']}, KV bytes vs cost model "
            f"{s['verify_kv_rel_error']}, FLOPs/token {s['verify_flops_rel_error']}"
        )
    for b, d in (s.get("decode") or {}).items():
        print(
            f"  decode batch {b}: {d['source_tok_s']:,.1f} -> {d['converted_tok_s']:,.1f} tokens/s "
            f"(x{d['decode_speedup_measured']}, cost model x{d['decode_speedup_cost_model']}); KV/sequence "
            f"{d['source_kv_bytes_per_seq']:,} -> {d['converted_kv_bytes_per_seq']:,} B"
        )
    print(f"  all numbers: {path}")


if __name__ == "__main__":
    sys.exit(main())
