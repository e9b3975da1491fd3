"""The memory planner (gqa_convert/memory.py) against the measured peak of real training steps.

Measured: one steady-state step of the uptrain loop's pieces on CPU -- a tiny LlamaForCausalLM
(SDPA, packed documents), select_trainable / add_lora / gradient checkpointing as uptrain sets them
up, the chunked loss `packed_losses`, backward, gradient clipping and an AdamW step whose states
already exist -- as the peak of live tensor bytes (train/memtrace.py's TensorMemory sees every aten
op of forward, backward and step) plus the tensors that were there before the step (weights,
buffers, optimizer states, counted from the real objects). `dtype="bf16"` is the CUDA loop
emulated on CPU: bf16 autocast, foreach AdamW, a bf16 teacher.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from gqa_convert.errors import ConfigError
from gqa_convert.law.shapes import ModelShape
from gqa_convert.memory import (
    CHUNK_LOGITS,
    MemoryPlan,
    default_chunk,
    format_memory_plan,
    parse_gpu_memory,
    plan_memory,
    tokens_per_s_from_run,
    usable_bytes,
    valid_sequence_parallel,
)

TOLERANCE = 0.20


# ----------------------------------------------------------------------------- measuring a step


def _model(cfg: dict, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    from gqa_convert.train.attention import register

    attn = register() if cfg["attention"] == "packed" else "sdpa"  # "sdpa_packed": uptrain's --attn packed

    config = LlamaConfig(
        vocab_size=cfg["V"],
        hidden_size=cfg["d"],
        intermediate_size=cfg["ff"],
        num_hidden_layers=cfg["L"],
        num_attention_heads=cfg["nh"],
        num_key_value_heads=cfg["nkv"],
        max_position_embeddings=1 << 16,
        tie_word_embeddings=cfg["tied"],
        attn_implementation=attn,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float()
    model.config.use_cache = False
    return model


def _batch(T: int, V: int, rows: int):
    from gqa_convert.train.data import collate, pack_rows

    rng = random.Random(0)
    docs, n = [], 0
    while n < rows * T + 16:  # documents of T/8 .. T/2 tokens: several per row, attention confined to each
        k = rng.randint(T // 8, T // 2)
        docs.append([rng.randrange(V) for _ in range(k)])
        n += k
    it = pack_rows(docs, T)
    return collate([next(it) for _ in range(rows)])


def measure_step(cfg: dict) -> dict[str, int]:
    """Peak bytes of one steady-state training step (see the module docstring), and by phase."""
    from gqa_convert.train.loss import packed_losses
    from gqa_convert.train.memtrace import TensorMemory
    from gqa_convert.train.uptrain import add_lora, select_trainable

    bf16 = cfg["dtype"] == "bf16"
    model = _model(cfg, 0)
    select_trainable(model, cfg["train"])
    if cfg["lora"]:
        model = add_lora(model, cfg["train"], 16)
    if cfg["ckpt"]:  # as uptrain enables it
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg["train"] != "all" or cfg["lora"]:
            model.enable_input_require_grads()
    teacher = None
    if cfg["distill"]:
        teacher = _model(cfg, 1).to(torch.bfloat16 if bf16 else torch.float32).eval()
        teacher.requires_grad_(False)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=bf16)  # foreach: torch's default for CUDA tensors
    for p in params:  # steady state: the optimizer's states exist before the measured step
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    batch = _batch(cfg["T"], cfg["V"], cfg["B"])

    before, seen = 0, set()
    held = [t for m in (model, teacher) if m is not None for t in (*m.parameters(), *m.buffers())]
    held += [t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
    for t in held:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            before += t.untyped_storage().nbytes()

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    peaks = {}
    with TensorMemory() as mem:

        def phase(name):
            peaks[name] = before + mem.peak_bytes
            mem.peak_bytes = mem.current

        with autocast:
            ce, kl, n = packed_losses(model, batch, teacher, chunk_tokens=cfg["chunk"])
        loss = (0.5 * ce + 0.5 * kl) / n if teacher is not None else ce / n
        saved = mem.current  # what the forward left for the backward
        phase("forward")
        loss.backward()
        phase("backward")
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del loss, ce, kl
        phase("step")
    return {"total": max(peaks.values()), "saved": saved, **peaks}


def planned(cfg: dict) -> MemoryPlan:
    shape = ModelShape(
        n_layers=cfg["L"],
        hidden=cfg["d"],
        n_heads=cfg["nh"],
        n_kv=cfg["nkv"],
        head_dim=cfg["d"] // cfg["nh"],
        d_ff=cfg["ff"],
        vocab=cfg["V"],
        tied=cfg["tied"],
    )
    return plan_memory(
        shape,
        cfg["T"],
        train=cfg["train"],
        lora=cfg["lora"],
        batch_size=cfg["B"],
        gradient_checkpointing=cfg["ckpt"],
        distill=cfg["distill"],
        dtype=cfg["dtype"],
        attention=cfg["attention"],
        chunk_tokens=cfg["chunk"],
    )


def point(**kw) -> dict:
    cfg = dict(
        V=32768,
        d=64,
        L=2,
        nh=4,
        nkv=2,
        ff=176,
        T=2048,
        B=1,
        train="all",
        lora=False,
        ckpt=False,
        distill=False,
        dtype="fp32",
        tied=False,
        chunk=None,
        attention="sdpa",
    )
    cfg.update(kw)
    return cfg


# (model, T, setting) points: vocabularies 32K-128K, T 1K-4K (8K-16K slow), every training setting, both
# dtypes, stock SDPA (a T x T mask per layer) and uptrain's mask-free "packed" attention.
# The fast ones use loss chunks of 32-128 tokens (buffers below glibc's mmap threshold: no page faults
# to pay for on every chunk); the slow ones the default chunk (256 tokens at V = 128K).
FAST = {
    "V32K-T2K-fp32-full-activations": point(chunk=128),
    "V128K-T1K-fp32-tied-checkpointed": point(V=131072, T=1024, tied=True, ckpt=True, chunk=64),
    "V32K-T4K-bf16-checkpointed": point(d=128, ff=352, T=4096, ckpt=True, dtype="bf16", chunk=128),
    "V64K-T2K-fp32-train-attention-packed": point(
        V=65536, d=128, ff=352, train="attention", chunk=128, attention="packed"
    ),
    "V32K-T2K-fp32-lora-checkpointed": point(d=128, ff=352, lora=True, ckpt=True, chunk=128),
    "V32K-T2K-bf16-distill": point(distill=True, dtype="bf16", chunk=128),
    "V32K-T1Kx2-fp32-train-kv": point(d=128, ff=352, T=1024, B=2, train="kv", chunk=128),
    "V32K-T2K-fp32-3-layers-checkpointed": point(d=128, ff=352, L=3, ckpt=True, chunk=32),
}
SLOW = {
    "V32K-T4K-fp32-packed": point(d=128, ff=352, T=4096, chunk=128, attention="packed"),
    "V128K-T8K-bf16-distill-checkpointed": point(
        V=131072, d=128, ff=352, T=8192, ckpt=True, distill=True, dtype="bf16"
    ),
    "V32K-T4K-fp32-4-layers-full-activations": point(d=256, ff=688, nh=8, L=4, T=4096),
    "V64K-T4K-bf16-lora-kv": point(V=65536, d=128, ff=352, T=4096, lora=True, train="kv", dtype="bf16"),
    "V128K-T16K-bf16-packed-distill-checkpointed": point(
        V=131072, d=128, ff=352, T=16384, ckpt=True, distill=True, dtype="bf16", attention="packed"
    ),
    "V128K-T2K-bf16-tied-checkpointed": point(V=131072, T=2048, tied=True, ckpt=True, dtype="bf16"),
    "V128K-T2K-fp32-full-activations": point(V=131072, T=2048),
}


def _check(cfg: dict) -> None:
    got = measure_step(cfg)
    plan = planned(cfg)
    err = plan.total_bytes / got["total"] - 1
    assert abs(err) <= TOLERANCE, (
        f"planned {plan.total_bytes / 1e6:.1f} MB, measured {got['total'] / 1e6:.1f} MB "
        f"({err:+.1%}); measured by phase {got}, planned {plan.phases}"
    )
    # The backward and the optimizer step on their own, too.
    backward = max(
        plan.phases[k] for k in ("loss backward", "last layer backward", "first layer backward", "embedding backward")
    )
    assert abs(backward / got["backward"] - 1) <= TOLERANCE, (backward, got)
    assert abs(plan.phases["optimizer step"] / got["step"] - 1) <= TOLERANCE, (plan.phases, got)
    # What the forward saves for the backward (activations, masks, the teacher's hidden states, autocast's
    # weight copies), measured after the forward, against the same parts of the plan's loss-backward moment.
    saved = _saved(cfg, plan)
    assert abs(saved / got["saved"] - 1) <= 0.10, (saved, got["saved"], plan.phase_parts["loss backward"])


@pytest.mark.parametrize("name", list(FAST))
def test_estimate_within_20_percent_of_measured_peak(name):
    _check(FAST[name])


@pytest.mark.heavy  # minutes on 2 cores: `pytest -m heavy` (the 8 fast points above run by default)
@pytest.mark.parametrize("name", list(SLOW))
def test_estimate_within_20_percent_of_measured_peak_slow(name):
    _check(SLOW[name])


# ----------------------------------------------------------------------------- the plan itself

LLAMA3_8B = ModelShape(n_layers=32, hidden=4096, n_heads=32, n_kv=8, head_dim=128, d_ff=14336, vocab=128256, tied=False)
KV2 = LLAMA3_8B.with_heads(32, 2)


def test_chunk_rule_is_the_loss_modules():
    from gqa_convert.train import loss

    assert CHUNK_LOGITS == loss.CHUNK_LOGITS
    for vocab in (256, 32000, 65536, 128256, 256000):
        assert default_chunk(vocab) == loss.chunk_size(None, vocab)


def test_parts_add_up_and_the_big_terms_are_right():
    plan = plan_memory(KV2, 8192, gpus=1, dtype="bf16")
    assert sum(plan.parts.values()) == plan.total_bytes
    p = KV2.total_params
    assert plan.parts["weights"] == 4 * p  # float32, as uptrain loads them; they are AdamW's master copy
    assert plan.parts["optimizer states"] == 8 * p
    assert plan.phases["optimizer step"] >= 4 * p + 4 * p + 8 * p  # weights, gradients, states
    # 8 GPUs, fully sharded: weights, gradients and states divide by 8
    sharded = plan_memory(KV2, 8192, gpus=8, sharding="fsdp")
    assert sharded.parts["weights"] == pytest.approx(4 * p / 8, rel=1e-6)
    assert sharded.parts["optimizer states"] == pytest.approx(8 * p / 8, rel=1e-6)
    assert sharded.settings["sharding"] == "full"


def test_checkpointing_sequence_parallel_lora_and_train_lower_memory():
    base = plan_memory(KV2, 32768, gpus=8, sharding="full", gradient_checkpointing=False)
    ckpt = plan_memory(KV2, 32768, gpus=8, sharding="full")
    assert ckpt.total_bytes < base.total_bytes
    assert ckpt.activations_full == base.activations_full > ckpt.activations_checkpointed
    sp = plan_memory(KV2, 32768, gpus=8, sharding="full", sequence_parallel=4)
    assert sp.total_bytes < ckpt.total_bytes
    assert plan_memory(KV2, 32768, train="attention").total_bytes < plan_memory(KV2, 32768).total_bytes
    assert plan_memory(KV2, 32768, lora=True).parts["optimizer states"] < 0.01 * 8 * KV2.total_params
    # SDPA's dense mask grows as T^2 and is never divided by sequence parallelism
    flash = plan_memory(KV2, 65536, gpus=8, sharding="full", sequence_parallel=8)
    sdpa = plan_memory(KV2, 65536, gpus=8, sharding="full", sequence_parallel=8, attention="sdpa")
    assert sdpa.parts["attention masks"] >= 65536**2 * 2 and flash.parts["attention masks"] == 0


def test_llama3_8b_at_128k_on_8x80gb_says_what_to_change():
    plan = plan_memory(KV2, 131072, gpus=8, gpu_memory="80GB")
    assert plan.fits is False and plan.advice
    best = plan.advice[0]
    assert best.fits and best.total_bytes <= usable_bytes(80 * 10**9)
    assert best.change.get("sharding") == "full" and best.change.get("sequence_parallel", 1) > 1
    text = format_memory_plan(plan)
    assert "does NOT fit" in text and "--sequence-parallel" in text and "--sharding full" in text
    assert json.loads(json.dumps(plan.to_dict()))["advice"][0]["change"] == best.change
    fixed = plan_memory(KV2, 131072, gpus=8, gpu_memory=80 * 10**9, **best.change)
    assert fixed.fits and fixed.total_bytes == best.total_bytes


def test_single_changes_are_listed_when_each_one_fits():
    plan = plan_memory(KV2, 16384, gpus=8, gpu_memory="80GB", gradient_checkpointing=False, sharding="full")
    assert plan.fits is False
    assert plan.advice[0].change == {"gradient_checkpointing": True}  # the least disruptive first
    assert {"sequence_parallel": 4} in [a.change for a in plan.advice] and all(a.fits for a in plan.advice)


def test_context_and_budget_as_text():
    plan = plan_memory(KV2, "128K", gpus=8, sharding="full", sequence_parallel=8, tokens="2B", tokens_per_s=20_000)
    assert plan.settings["context"] == 131072 and plan.steps == 2_000_000_000 // 131072
    with pytest.raises(ConfigError, match="smaller than one step"):
        plan_memory(KV2, "128K", gpus=8, tokens=1000)


def test_teacher_is_held_whole_on_every_gpu():
    plan = plan_memory(KV2, 32768, gpus=8, sharding="full", distill=True, teacher=LLAMA3_8B)
    assert plan.parts["teacher weights"] == 2 * LLAMA3_8B.total_params  # bf16, not sharded (uptrain moves it whole)


def test_time_estimate():
    plan = plan_memory(
        KV2, 131072, gpus=8, sharding="full", sequence_parallel=8, tokens=2_000_000_000, tokens_per_s=20_000
    )
    assert plan.tokens_per_step == 131072  # one data-parallel group of 8 GPUs
    assert plan.steps == 2_000_000_000 // 131072
    assert plan.time_s == pytest.approx(plan.steps * 131072 / 20_000)
    assert "time at 20,000 tokens/s: 27.8 h" in format_memory_plan(plan)


def test_tokens_per_s_from_a_recorded_run(tmp_path):
    from gqa_convert.records import UptrainRecord

    assert tokens_per_s_from_run(tmp_path) is None
    UptrainRecord(tokens_per_s=1234.5, steps=3).write(tmp_path)
    assert tokens_per_s_from_run(tmp_path) == 1234.5


def test_gpu_memory_sizes():
    assert parse_gpu_memory("80GB") == parse_gpu_memory("80G") == 80 * 10**9
    assert parse_gpu_memory("40GiB") == 40 * 2**30
    assert parse_gpu_memory(24 * 10**9) == 24 * 10**9


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"gpu_memory": 0}, "--gpu-memory"),
        ({"gpu_memory": -5}, "--gpu-memory"),
        ({"gpu_memory": "eighty gigs"}, "--gpu-memory"),
        ({"gpu_memory": "80GX"}, "--gpu-memory"),
        ({"chunk_tokens": 0}, "loss chunk"),
        ({"gpus": 8, "sequence_parallel": 3}, "does not divide --gpus 8"),
        ({"gpus": 6, "sequence_parallel": 6}, "cannot split 32 query / 2 KV heads"),  # 2 % 6 and 6 % 2 fine, 32 % 6 not
        ({"gpus": 8, "sequence_parallel": 0}, "--sequence-parallel"),
        ({"sharding": "zero4"}, "--sharding"),
        ({"train": "mlp"}, "--train"),
        ({"dtype": "fp16"}, "dtype"),
        ({"attention": "eager"}, "--attn"),
        ({"tokens_per_s": 0}, "tokens/s"),
        ({"batch_size": 0}, "--batch-size"),
    ],
)
def test_bad_inputs_one_line(kwargs, words):
    with pytest.raises(ConfigError) as err:
        plan_memory(KV2, 8192, **kwargs)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_ulysses_rule():
    # n_heads % sp == 0 and (n_kv % sp == 0 or sp % n_kv == 0)
    assert valid_sequence_parallel(KV2, 8) == [1, 2, 4, 8]  # 2 KV heads: replicated for sp = 4, 8
    odd = ModelShape(n_layers=2, hidden=768, n_heads=12, n_kv=4, head_dim=64, d_ff=2048, vocab=1000)
    assert valid_sequence_parallel(odd, 12) == [1, 2, 4, 12]  # 3, 6: 4 % 3, 3 % 4, 4 % 6 and 6 % 4 all fail
    with pytest.raises(ConfigError, match="use one of 1, 2, 4, 12"):
        plan_memory(odd, 4096, gpus=12, sequence_parallel=6)


def _saved(cfg: dict, plan: MemoryPlan) -> int:
    """The plan's bytes of what the forward leaves for the backward (see _check)."""
    loss_bw = plan.phase_parts["loss backward"]
    saved = sum(loss_bw.get(k, 0) for k in ("activations", "attention masks", "teacher forward"))
    if cfg["dtype"] == "bf16" and not cfg["ckpt"]:  # autocast's saved weight copies, but the head's: the loss
        saved += loss_bw["weight copies"] - 2 * cfg["V"] * cfg["d"]  # chunks recompute theirs in the backward
    return saved


if __name__ == "__main__":  # the measured-vs-planned table of docs/long-context.md
    torch.set_num_threads(2)
    print(
        "| point | L, d, V | T x rows | measured peak | planned | error | backward: measured / planned | "
        "saved by the forward: measured / planned | planned peak moment |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, cfg in {**FAST, **SLOW}.items():
        got, plan = measure_step(cfg), planned(cfg)
        backward = max(plan.phases[k] for k in plan.phases if "backward" in k)
        saved = _saved(cfg, plan)
        print(
            f"| {name}{' (slow)' if name in SLOW else ''} | {cfg['L']}, {cfg['d']}, {cfg['V']:,} | "
            f"{cfg['T']:,} x {cfg['B']} | {got['total'] / 1e6:,.1f} MB | "
            f"{plan.total_bytes / 1e6:,.1f} MB | {plan.total_bytes / got['total'] - 1:+.1%} | "
            f"{got['backward'] / 1e6:,.1f} / {backward / 1e6:,.1f} MB | "
            f"{got['saved'] / 1e6:,.1f} / {saved / 1e6:,.1f} MB | {plan.peak_phase} |",
            flush=True,
        )


LLAMA3_8B_CONFIG = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "tie_word_embeddings": False,
}


def test_plan_command_reports_uptraining_memory(tmp_path, capsys):
    import json

    from gqa_convert.commands import main

    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B_CONFIG))
    base = [
        "plan",
        str(tmp_path),
        "--context",
        "128K",
        "--kv-heads",
        "2",
        "--gpus",
        "8",
        "--gpu-memory",
        "80GB",
        "--distill-weight",
        "0.5",
        "--batch-size",
        "1",
        "--json",
    ]
    assert main([*base, "--sharding", "none"]) == 0
    ddp = json.loads(capsys.readouterr().out)["memory"]
    assert ddp["fits"] is False and ddp["advice"]  # 8B at 128K under DDP: too big, and it says what to change
    assert main([*base, "--sharding", "full", "--sequence-parallel", "4"]) == 0
    sharded = json.loads(capsys.readouterr().out)["memory"]
    assert sharded["fits"] is True and sharded["total_bytes"] < ddp["total_bytes"]
    for bad, words in (
        (["--gpu-memory", "lots"], "--gpu-memory must be a size"),
        (["--loss-chunk-tokens", "0"], "--loss-chunk-tokens"),
        (["--sequence-parallel", "3"], "sequence"),
    ):
        assert main([*base, *bad]) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err
