"""Run by tests/test_sequence_parallel.py under `torchrun --nproc_per_node 2`: DeepSpeed Ulysses
(sp = 2, gloo, CPU) against one process, on a tiny float32 Llama.

    torchrun --nproc_per_node 2 tests/sp_worker.py MODEL_DIR TEXT_FILE OUT.json LENGTH

The oracles are computed in this process before the Ulysses attention is registered (it replaces
the attention in transformers' registry): the same weights with stock SDPA (transformers' own
block-diagonal document mask), the whole row in one process, and every document of the row run
alone. Rank 0 writes what it measured to OUT.json; the test asserts on it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

SP = 2
STEPS = 4
LR = 3e-3
CLIP = 0.05  # small enough that clipping acts at every step: the clip must be the configured one


def reference_grads(model, batch):
    """Loss and gradients of the whole row in one process (mean token CE over the row's targets)."""
    from gqa_convert.train.loss import packed_losses

    model.zero_grad(set_to_none=True)
    ce, _, n = packed_losses(model, batch)
    (ce / n).backward()
    return float(ce.detach() / n), {k: p.grad.detach().clone() for k, p in model.named_parameters()}


def document_losses(model, ids: list[int], starts: list[int]) -> list[float]:
    """Mean next-token loss of every document of the row, each run alone (the row's targets: the
    first token of a document predicts nothing from the previous one)."""
    from gqa_convert.train.loss import final_hidden, output_head, token_nll

    out = []
    bounds = list(zip(starts, [*starts[1:], len(ids)]))
    for s, e in bounds:
        if e - s < 2:
            continue
        x = torch.tensor([ids[s:e]])
        with torch.no_grad():
            h = final_hidden(model, x, position_ids=torch.arange(e - s)[None])
        out.append(float(token_nll(h[0, :-1], output_head(model), x[0, 1:]).mean()))
    return out


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gqa_convert.train import sequence_parallel as spm
    from gqa_convert.train.backend import choose_attention
    from gqa_convert.train.data import IGNORE, collate, pack_rows, split_text, tokenize_documents
    from gqa_convert.train.loss import final_hidden, output_head, token_nll

    model_dir, text, out_path, length = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    # Short documents (their first 8-20 words), so that a row holds several and cuts its last one.
    docs = [" ".join(d.split()[: 8 + 3 * (i % 5)]) for i, d in enumerate(split_text(Path(text).read_text())[:60])]
    # Rows of `length` tokens, packed from whole documents; the rows' last document is cut.
    rows = list(pack_rows(tokenize_documents(docs, tok), length))[: STEPS + 1]
    batch = collate(rows[:1])
    starts = [int(t) for t in torch.nonzero(batch["position_ids"][0] == 0).flatten()]
    assert len(starts) >= 3, f"want a row of several documents, got starts {starts}"

    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    ref.config.use_cache = False
    attn = choose_attention("packed")  # registers sdpa_packed (Ulysses wraps it below)
    sp_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn)
    sp_model.config.use_cache = False
    ref_loss, ref_grads = reference_grads(ref, batch)
    alone = document_losses(ref.eval(), batch["input_ids"][0].tolist(), starts)
    ref.train()

    # One process, several optimizer steps with clipping: the weights the SP run must reach.
    opt = torch.optim.AdamW(ref.parameters(), lr=LR, weight_decay=0.1)
    ref_norms = []
    for k in range(STEPS):
        _, _ = reference_grads(ref, collate(rows[k : k + 1]))
        ref_norms.append(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP)))
        opt.step()
    ref_weights = {k: v.detach().clone() for k, v in ref.state_dict().items()}

    # Sequence parallel: the same initial weights under sdpa_packed, wrapped by Ulysses.
    sp_model.train()  # Ulysses steps aside in eval mode (accelerate registers it with disable_in_eval)
    spm.check(SP, 2, sp_model.config, attn)
    acc = spm.make_accelerator(SP, length, attn, CLIP, mixed_precision="no")
    opt = torch.optim.AdamW(sp_model.parameters(), lr=LR, weight_decay=0.1)
    engine, opt = spm.prepare(acc, sp_model, opt, batch_size=1, grad_accum=1)
    dp, _, sp_rank = spm.groups(acc, SP)

    part = {k: v.to(acc.device) for k, v in spm.shard(batch, SP, sp_rank).items()}
    n_targets = int((batch["labels"][:, 1:] != IGNORE).sum())
    ce, _, _ = spm.losses(engine, batch, part, sp=SP, sp_rank=sp_rank)
    spm.backward(engine, ce * spm.loss_scale(dp, n_targets), last=True)
    sp_loss = float(acc.reduce(ce.detach(), reduction="sum")) / n_targets
    grads = {k: p.grad.detach().clone() for k, p in acc.unwrap_model(engine).named_parameters()}
    grad_diff = max(float((grads[k] - ref_grads[k]).abs().max()) for k in ref_grads)
    grad_norm_ratio = float(
        torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads.values()]))
        / torch.linalg.vector_norm(torch.cat([g.flatten() for g in ref_grads.values()]))
    )
    engine.optimizer.zero_grad()
    engine.zero_grad()

    # Per-document losses under SP: each rank's per-token losses of its slice, gathered.
    with torch.no_grad():
        h = final_hidden(engine, part["input_ids"], position_ids=part["position_ids"])
        nll = token_nll(h[0], output_head(engine), part["shift_labels"][0].clamp(min=0))
    pieces = [torch.zeros_like(nll) for _ in range(SP)]
    torch.distributed.all_gather(pieces, nll)
    whole = torch.cat(pieces)
    target = spm.shard(batch, 1, 0)["shift_labels"][0]
    sp_docs = []
    bounds = list(zip(starts, [*starts[1:], batch["input_ids"].shape[1]]))
    for s, e in bounds:
        if e - s < 2:
            continue
        keep = target[s : e - 1] != IGNORE  # position t predicts t + 1, inside the document
        sp_docs.append(float(whole[s : e - 1][keep].mean()))

    # Several optimizer steps under SP with the same clipping.
    sp_norms = []  # (the weights are still the initial ones: nothing has stepped yet)
    for k in range(STEPS):
        b = collate(rows[k : k + 1])
        part = {key: v.to(acc.device) for key, v in spm.shard(b, SP, sp_rank).items()}
        n_targets = int((b["labels"][:, 1:] != IGNORE).sum())
        ce, _, _ = spm.losses(engine, b, part, sp=SP, sp_rank=sp_rank)
        spm.backward(engine, ce * spm.loss_scale(dp, n_targets), last=True)
        sp_norms.append(spm.step(engine))
    weights = acc.unwrap_model(engine).state_dict()
    weight_diff = max(float((weights[k] - ref_weights[k]).abs().max()) for k in ref_weights)

    if acc.is_main_process:
        out_path.write_text(
            json.dumps(
                {
                    "ref_loss": ref_loss,
                    "sp_loss": sp_loss,
                    "grad_diff": grad_diff,
                    "grad_norm_ratio": grad_norm_ratio,
                    "doc_alone": alone,
                    "doc_sp": sp_docs,
                    "ref_norms": ref_norms,
                    "sp_norms": sp_norms,
                    "weight_diff": weight_diff,
                    "clip": acc.deepspeed_config["gradient_clipping"],
                    "starts": starts,
                },
                indent=1,
            )
        )
    acc.wait_for_everyone()


if __name__ == "__main__":
    main()
