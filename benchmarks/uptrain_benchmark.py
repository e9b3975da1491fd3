"""Training throughput of `gqa_convert.train.uptrain` against a plain transformers `Trainer`.

Same model, same documents, same sequence length, same rows per step, same optimizer, one process,
side by side in one run. Two Trainer baselines, both the usual ways people feed it:

- "Trainer, padded": one document per row, right-padded/truncated to the context (what
  DataCollatorForLanguageModeling does with padding="max_length"); attention stays in the document
  but the padding is computed and wasted.
- "Trainer, concatenated": run_clm.py's group_texts: documents concatenated and cut into rows of
  exactly the context; no padding, but attention crosses document boundaries.

Tokens/s counts only real (non-padding) tokens, timed from the end of warm-up step `--warmup` to the
last step, so start-up and the first steps' allocations are left out for every contender.

    python benchmarks/uptrain_benchmark.py                      # stories260K (fixture) if present
    python benchmarks/uptrain_benchmark.py --steps 30 --context 512 --batch-size 8
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # tests/tiny.py: tiny models built in-process
FIXTURES = Path(os.environ.get("GQA_CONVERT_FIXTURES", ROOT.parent / "shared" / "fixtures"))


def prepare_model(work: Path) -> tuple[Path, Path]:
    """(model folder, text file): stories260K converted to 2 KV heads, else a tiny random Llama."""
    text = FIXTURES / "text" / "tinystories_val_head.txt"
    if (FIXTURES / "stories260K" / "stories260K.bin").is_file():
        from gqa_convert.convert import convert_checkpoint
        from gqa_convert.llama2c import export_llama2c

        src = export_llama2c(
            FIXTURES / "stories260K" / "stories260K.bin", FIXTURES / "stories260K" / "tok512.bin", work / "src"
        )
        convert_checkpoint(src, work / "kv2", 2, progress=False)
        return work / "kv2", text
    from tiny import make_tiny_llama

    from gqa_convert.train.data import split_text

    docs = split_text(text.read_text()) if text.is_file() else ["Once upon a time there was a cat. " * 8] * 400
    if not text.is_file():
        text = work / "docs.txt"
        text.write_text("\n\n".join(docs))
    return make_tiny_llama(work / "tiny", docs[1000:1300], hidden=64, layers=5, heads=8, kv_heads=2), text


def run_uptrain(model: Path, text: Path, out: Path, args) -> dict:
    from gqa_convert.train.uptrain import UptrainConfig, uptrain

    uptrain(
        UptrainConfig(
            model=str(model),
            data=str(text),
            context=args.context,
            output=str(out),
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            train="all",  # like the Trainer baselines: every weight, next-token loss, constant LR
            distill=False,
            warmup=0.0,
            decay=0.0,
            heldout_docs=200,
            train_start=1000,
            save_every=10**9,
            progress=False,
            attn="sdpa",
            gradient_checkpointing=False,
        )
    )
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][args.warmup :]
    tokens = sum(args.batch_size * args.context for _ in rows)
    seconds = sum(args.batch_size * args.context / r["tokens_per_s"] for r in rows)
    return {"tokens_per_s": tokens / seconds, "padding": 0.0, "cross_document_attention": False}


def run_trainer(model_dir: Path, text: Path, out: Path, args, mode: str) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    from gqa_convert.evaluate import split_paragraphs

    tok = AutoTokenizer.from_pretrained(model_dir)
    docs = split_paragraphs(text)[1000:]
    ids = [x + [tok.eos_token_id] for x in tok(docs, add_special_tokens=True)["input_ids"]]
    T = args.context
    rows: list[dict] = []
    if mode == "padded":
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        for x in ids:
            x = x[:T]
            n = len(x)
            rows.append(
                {
                    "input_ids": x + [pad] * (T - n),
                    "attention_mask": [1] * n + [0] * (T - n),
                    "labels": x + [-100] * (T - n),
                }
            )
    else:  # run_clm group_texts
        flat = [t for x in ids for t in x]
        for i in range(0, len(flat) - T + 1, T):
            rows.append({"input_ids": flat[i : i + T], "attention_mask": [1] * T, "labels": flat[i : i + T]})
    need = args.steps * args.batch_size
    rows = (rows * (need // len(rows) + 1))[:need]
    real = sum(sum(r["attention_mask"]) for r in rows)

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return {k: torch.tensor(v) for k, v in rows[i].items()}

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            times.append(time.perf_counter())

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    targs = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        learning_rate=args.lr,
        adam_beta1=0.9,
        adam_beta2=0.95,
        weight_decay=0.1,
        max_grad_norm=1.0,
        lr_scheduler_type="constant",
        warmup_steps=0,
        logging_strategy="no",
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
        bf16=torch.cuda.is_available(),
    )
    Trainer(model=model, args=targs, train_dataset=Data(), callbacks=[Clock()]).train()
    real_per_step = real / args.steps
    timed = times[args.warmup - 1 :]
    seconds = timed[-1] - timed[0]
    steps = len(timed) - 1
    return {
        "tokens_per_s": real_per_step * steps / seconds,
        "padding": 1 - real / (len(rows) * T),
        "cross_document_attention": mode == "concatenated",
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the timing")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, help="also write the numbers here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="uptrain-bench-"))
    try:
        model, text = prepare_model(work)
        res = {
            "uptrain (packed)": run_uptrain(model, text, work / "up", args),
            "Trainer, padded": run_trainer(model, text, work / "tp", args, "padded"),
            "Trainer, concatenated": run_trainer(model, text, work / "tc", args, "concatenated"),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = res["uptrain (packed)"]["tokens_per_s"]
    print(
        f"\nmodel {model.name}, context {args.context}, batch {args.batch_size}, {args.steps} steps "
        f"(first {args.warmup} untimed), {args.threads} thread(s), torch {torch.__version__}"
    )
    print(
        f"{'contender':24s} {'real tokens/s':>14s} {'padding':>8s} {'uptrain / it':>13s}  attention crosses documents"
    )
    for name, r in res.items():
        print(
            f"{name:24s} {r['tokens_per_s']:14,.0f} {r['padding']:8.1%} {base / r['tokens_per_s']:12.2f}x  "
            f"{'yes' if r['cross_document_attention'] else 'no'}"
        )
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": res}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
