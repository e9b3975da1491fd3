"""Pretrain a second small Llama on the TinyStories fixture, on CPU, in minutes.

Why: the uptraining defaults (docs/uptrain.md, "Defaults") are chosen by measurement, and one model
(stories260K) is not enough to keep a rule from being fitted to it. This script makes a second
real, trained model of another shape: 4x wider than stories260K's 64, 8 query heads and 8 KV heads
(full multi-head attention, so a conversion to 2 KV heads pools 4 heads into each), with
stories260K's own tokenizer (tok512, 512 pieces) so both read the same text the same way.

Model (`tiny-stories-mha`, 1,131,904 parameters with the tied embedding):
    hidden 128, intermediate 384, 5 layers, 8 heads of 16, 8 KV heads, vocabulary 512,
    max_position_embeddings 512, RMSNorm eps 1e-5, rope_theta 10000, tied embeddings.
Training (the library's own packed-document loop, gqa_convert.train.uptrain, from a random
init, every parameter trained):
    documents[200:] of text/tinystories_val_head.txt (documents[:200] are never seen: they are the
    held-out slice every measurement scores), rows of 256 tokens, batch 16, AdamW (0.9, 0.95),
    weight decay 0.1, LR 3e-3, warmup 5%, last 50% cosine-decayed to 10%, seed 0, --steps (default
    200 = 819K tokens, about 3 epochs of the training documents).

    python scripts/pretrain_tiny_stories.py --output /tmp/tiny-stories-mha   # 1 thread

Measured (the run behind docs/uptrain.md, "Defaults"): 200 steps, 819,200 tokens in 19 min at 716
tokens/s on this project's shared 2-core machine (load ~7; an idle core is several times faster);
held-out loss 2.412 on documents[:200] (stories260K, trained far longer by its author: 1.439).

The output is a Hugging Face folder (AutoModelForCausalLM.from_pretrained) outside the repository;
its held-out loss on documents[:200] is printed and written to OUTPUT/pretrain.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("GQA_CONVERT_FIXTURES", ROOT.parent / "shared" / "fixtures"))
TEXT = FIXTURES / "text" / "tinystories_val_head.txt"
SHAPE = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=5,
    num_attention_heads=8,
    num_key_value_heads=8,
    vocab_size=512,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
)
TRAIN = dict(context=256, batch_size=16, lr=3e-3, warmup=0.05, decay=0.5, train="all", heldout_docs=200, seed=0)


def init_model(folder: Path) -> None:
    """A randomly initialised Llama of SHAPE with stories260K's tokenizer files."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from gqa_convert.llama2c import export_llama2c

    with tempfile.TemporaryDirectory() as tmp:
        tok_src = export_llama2c(
            FIXTURES / "stories260K" / "stories260K.bin", FIXTURES / "stories260K" / "tok512.bin", Path(tmp) / "s"
        )
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**SHAPE))
        model.save_pretrained(folder, safe_serialization=True)
        for f in tok_src.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")):
                shutil.copyfile(f, folder / f.name)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", type=Path, required=True, help="folder to create (outside the repository)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from gqa_convert.evaluate import document_loss, load_model
    from gqa_convert.settings import TextFormat, data_spec
    from gqa_convert.train.uptrain import UptrainConfig, uptrain

    if args.output.exists():
        sys.exit(f"{args.output} exists; choose a new folder")
    work = Path(tempfile.mkdtemp(prefix="pretrain-", dir=args.output.parent))
    try:
        init_model(work / "init")
        res = uptrain(
            UptrainConfig(
                model=str(work / "init"),
                data=str(TEXT),
                output=str(work / "run"),
                steps=args.steps,
                distill_weight=0.0,
                eval_docs=0,
                progress=True,
                **TRAIN,
            )
        )
        held = data_spec(str(TEXT), TextFormat(), 200).heldout_documents()
        model, tok = load_model(work / "run")
        loss = document_loss(model, tok, held).mean_loss
        for name in ("checkpoint", "heldout.jsonl"):
            p_ = work / "run" / name
            shutil.rmtree(p_) if p_.is_dir() else p_.unlink(missing_ok=True)
        (work / "run" / "pretrain.json").write_text(
            json.dumps(
                {
                    "shape": SHAPE,
                    "train": {**TRAIN, "steps": args.steps, "data": "tinystories_val_head.txt documents[200:]"},
                    "parameters": sum(p.numel() for p in model.parameters()),
                    "tokens": res.tokens,
                    "tokens_per_s": res.tokens_per_s,
                    "heldout_loss": loss,
                    "heldout_slice": "documents[0:200]",
                },
                indent=1,
            )
        )
        (work / "run").rename(args.output)
        print(f"pretrained {res.steps} steps, {res.tokens:,} tokens; held-out loss {loss:.4f} -> {args.output}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
