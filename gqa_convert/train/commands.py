"""`gqa-convert uptrain MODEL_DIR --data PATH --context T (--tokens|--steps|--alpha) --output DIR`."""

from __future__ import annotations

import argparse

from .uptrain import TRAIN_CHOICES, UptrainConfig, uptrain


def register(sub) -> None:
    p = sub.add_parser(
        "uptrain",
        help="continue pretraining a converted model on packed documents (recovers the regrouping loss)",
        description="Uptrain a converted model: documents packed into rows of exactly --context tokens, attention "
        "confined to each document, AdamW + WSD schedule. Runs under `accelerate launch` for DDP/FSDP.",
    )
    p.add_argument("model", metavar="MODEL_DIR", help="converted model folder (or hub id)")
    p.add_argument("--data", required=True, help=".txt/.jsonl/.parquet file, a folder of them, or a HF dataset name")
    p.add_argument("--context", required=True, type=int, help="tokens per packed sequence")
    p.add_argument("--output", required=True, help="run folder: final model, metrics, checkpoints")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--tokens", help="training tokens, e.g. 50M")
    budget.add_argument("--steps", type=int, help="optimizer steps")
    budget.add_argument("--alpha", type=float, help="fraction of the source's pretraining tokens, e.g. 0.05")
    p.add_argument("--pretraining-tokens", help="the source's pretraining tokens for --alpha, e.g. 2T")
    p.add_argument("--text-field", default="text", help="JSONL/Parquet/dataset text field (default: text)")
    p.add_argument("--data-split", default="train", help="HF dataset split (default: train)")
    p.add_argument("--data-config", default=None, help="HF dataset configuration name")
    p.add_argument("--heldout-docs", type=int, default=200, help="first N documents held out, never trained on (default 200)")
    p.add_argument("--train-start", type=int, default=None, help="first training document (default: after the held-out ones)")
    p.add_argument("--lr", type=float, default=1e-4, help="maximum learning rate (default 1e-4)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per process per micro-step (default 8)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step (default 1)")
    p.add_argument("--warmup", type=float, default=0.1, help="WSD warmup fraction (default 0.1)")
    p.add_argument("--decay", type=float, default=0.2, help="WSD cosine-decay fraction, to 10%% of --lr (default 0.2)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping (default 1.0)")
    p.add_argument("--train", choices=TRAIN_CHOICES, default="all", help="what trains: all, attention, or kv (default all)")
    p.add_argument("--distill-from", default=None, metavar="SRC", help="unconverted source model to distil from")
    p.add_argument("--distill-weight", type=float, default=0.0, help="weight of KL(teacher||student) in [0,1]")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters (peft), merged back on save")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--attn", choices=("auto", "flash", "sdpa"), default="auto", help="attention kernel (default auto)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute activations in backward (default: on with CUDA)")
    p.add_argument("--save-every", type=int, default=50, help="steps between checkpoints (default 50)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    cfg = UptrainConfig(
        model=args.model, data=args.data, context=args.context, output=args.output, tokens=args.tokens,
        steps=args.steps, alpha=args.alpha, pretraining_tokens=args.pretraining_tokens, text_field=args.text_field,
        data_split=args.data_split, data_config=args.data_config, heldout_docs=args.heldout_docs,
        train_start=args.train_start, lr=args.lr, batch_size=args.batch_size, grad_accum=args.grad_accum,
        warmup=args.warmup, decay=args.decay, weight_decay=args.weight_decay, clip=args.clip, train=args.train,
        distill_from=args.distill_from, distill_weight=args.distill_weight, lora=args.lora, lora_rank=args.lora_rank,
        attn=args.attn, gradient_checkpointing=args.gradient_checkpointing, save_every=args.save_every,
        resume=args.resume, seed=args.seed, progress=not args.no_progress,
    )
    result = uptrain(cfg)
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        print(f"uptrained {result.steps} steps, {result.tokens:,} tokens, final train loss {result.final_loss:.4f}, "
              f"{result.tokens_per_s:,.0f} tokens/s -> {result.output}")
    return 0
