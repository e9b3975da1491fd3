"""GPU throughput of `gqa-convert uptrain` on a ~0.5B model at 32K context: tokens/s and MFU.

The model is a randomly initialised Qwen2.5-0.5B-shaped Qwen2ForCausalLM (no download), already in
GQA form (14 query / 2 KV heads); the data are synthetic 32K-token documents, one per row, so
every token attends over the full causal context. Skips itself (exit 0) without CUDA.

Model FLOPs per trained token (fwd + bwd, no recompute counted, the usual MFU convention):
    6 * N_matmul + 6 * L * T * n_h * d_h      (causal attention: mean context T/2, 4 FLOPs/pair fwd)
N_matmul counts every weight matrix a token passes through, lm_head included, embeddings not.
MFU = achieved model FLOP/s / peak dense BF16 FLOP/s (H100/H200 SXM: 989 TFLOP/s; --peak-tflops).

    python benchmarks/gpu_uptrain.py                   # flash-attn 2, 32K, 8 steps
    python benchmarks/gpu_uptrain.py --attn sdpa --context 16384
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def qwen05_config(vocab: int, max_pos: int, **shape):
    from transformers import Qwen2Config

    dims = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                num_key_value_heads=2)
    dims.update(shape)
    return Qwen2Config(vocab_size=vocab, max_position_embeddings=max_pos, rope_theta=1_000_000.0,
                       tie_word_embeddings=True, bos_token_id=None, eos_token_id=2, **dims)


def model_flops_per_token(cfg, context: int) -> float:
    d, L, ff = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size
    dh = d // cfg.num_attention_heads
    attn_w = d * dh * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)  # q, o, k, v
    n_matmul = L * (attn_w + 3 * d * ff) + d * cfg.vocab_size
    return 6 * n_matmul + 6 * L * context * cfg.num_attention_heads * dh


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the timing")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--attn", default="flash", choices=("flash", "sdpa", "auto"))
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--peak-tflops", type=float, default=None, help="peak dense BF16 TFLOP/s of the GPU")
    p.add_argument("--json", type=Path)
    p.add_argument("--cpu-smoke", action="store_true",
                   help="exercise this script on CPU with a tiny model of the same family (no numbers worth keeping)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("gpu_uptrain: no CUDA device; skipped")
        return 0
    from transformers import Qwen2ForCausalLM

    from gqa_convert.train.tiny import make_tokenizer
    from gqa_convert.train.uptrain import UptrainConfig, uptrain

    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    work = Path(tempfile.mkdtemp(prefix="gpu-uptrain-"))
    try:
        rng = random.Random(0)
        words = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "ran", "far", "away", "from", "home", "to", "see"]
        tok = make_tokenizer([" ".join(words)] * 10, vocab_size=300)
        tiny = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
        cfg = qwen05_config(512 if args.cpu_smoke else args.vocab, max(args.context, 32768),
                            **(tiny if args.cpu_smoke else {}))
        cfg.eos_token_id = tok.eos_token_id
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
        n_params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(work / "model")
        tok.save_pretrained(work / "model")
        del model
        # documents of ~1.05 x context tokens: each row holds one document (positions 0..T-1)
        n_docs = args.steps * args.batch_size + 2
        doc = lambda: " ".join(rng.choice(words) for _ in range(int(args.context * 1.05)))  # noqa: E731
        (work / "data.txt").write_text("\n\n".join(doc() for _ in range(n_docs)))
        out = work / "run"
        t0 = time.time()
        uptrain(UptrainConfig(model=str(work / "model"), data=str(work / "data.txt"), context=args.context,
                              output=str(out), steps=args.steps, batch_size=args.batch_size, lr=1e-5, heldout_docs=0,
                              attn=args.attn, gradient_checkpointing=True, save_every=10**9, progress=True))
        wall = time.time() - t0
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][args.warmup :]
        tok_s = sum(r["tokens_per_s"] for r in rows) / len(rows)
        flops_tok = model_flops_per_token(cfg, args.context)
        res = {"gpu": name, "attn": args.attn, "context": args.context, "batch_size": args.batch_size,
               "params": n_params, "steps": args.steps, "tokens_per_s": round(tok_s, 1),
               "model_tflops_per_s": round(tok_s * flops_tok / 1e12, 2),
               "mfu": round(tok_s * flops_tok / (peak * 1e12), 4) if peak else None,
               "peak_bf16_tflops": peak, "max_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
               "wall_s": round(wall, 1)}
        print(json.dumps(res, indent=1))
        if args.json:
            args.json.write_text(json.dumps(res, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
