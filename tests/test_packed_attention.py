"""sdpa_packed (train/attention.py): packed-row attention without a T×T mask, against independent oracles.

Oracles: the stock masked SDPA path on the same packed rows (outputs and every parameter gradient),
each document run alone, stock generation, and TensorMemory's record of every tensor created.
"""

from __future__ import annotations

import pytest
import tiny as registry
import torch
from transformers import AutoModelForCausalLM

from gqa_convert.train import attention
from gqa_convert.train.attention import NAME, PackedAttentionError, document_starts, register, supports_packed_attention
from gqa_convert.train.backend import choose_attention
from gqa_convert.train.data import collate, pack_rows, packed_forward
from gqa_convert.train.memtrace import TensorMemory

TOL = dict(atol=1e-5, rtol=1e-5)
register()


def tiny_config(family: str, **overrides):
    """The registry's tiny config of a family (tests/tiny.py); families outside it from its common fields."""
    if family in registry.FAMILIES:
        return registry.tiny_config(family, **overrides)
    from transformers import AutoConfig

    return AutoConfig.for_model(family, **{**registry.COMMON, **overrides})


def model_of(family: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = tiny_config(family, **overrides)
    extra = {"experts_implementation": "eager"} if family == "mixtral" else {}
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", **extra).float().eval()


def docs_of(lengths, vocab: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def batch_of(lengths, context: int, vocab: int) -> dict[str, torch.Tensor]:
    """Packed rows from data.pack_rows: documents of `lengths` laid end to end in rows of `context` tokens."""
    return collate(list(pack_rows(docs_of(lengths, vocab), context)))


def run(model, impl: str, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits of the packed batch and the gradient of every parameter, under attention `impl`."""
    model.set_attn_implementation(impl)
    model.zero_grad(set_to_none=True)
    logits = packed_forward(model, batch)
    weights = torch.linspace(0.5, 1.5, logits.shape[-1])
    (logits.float().pow(2) * weights).mean().backward()  # a loss that reaches every logit
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], **TOL)
    assert a[1].keys() == b[1].keys() and a[1]
    for n in a[1]:
        torch.testing.assert_close(a[1][n], b[1][n], **TOL, msg=lambda m, n=n: f"{n}: {m}")


# Row 1 holds three documents (one continues into row 2), row 2 two: the rows are segmented differently.
LENGTHS, CONTEXT = [9, 17, 30, 8, 16], 40

FAMILIES = [
    ("llama", {}),
    ("llama", dict(num_key_value_heads=1)),  # MQA
    ("llama", dict(num_key_value_heads=8)),  # MHA
    ("qwen2", {}),
    ("mistral", dict(sliding_window=None)),
    ("mistral", dict(sliding_window=64)),  # window longer than the row: plain causal
    ("mistral", dict(sliding_window=7)),  # window shorter than the documents: banded blocks
    ("gemma", {}),
    ("gemma3_text", dict(head_dim=16, sliding_window=6, layer_types=["sliding_attention", "full_attention"])),
    ("qwen3", {}),
    ("phi3", {}),
    ("mixtral", {}),
    ("starcoder2", dict(sliding_window=5)),
    ("olmo2", {}),
    ("stablelm", {}),
    ("granite", {}),
    ("cohere", {}),
]


@pytest.mark.parametrize(
    "family, extra", FAMILIES, ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={x}" for k, x in v.items())
)
def test_outputs_and_gradients_equal_stock_masked_sdpa(family, extra, monkeypatch):
    model = model_of(family, **extra)
    assert supports_packed_attention(model) == (True, "")
    batch = batch_of(LENGTHS, CONTEXT, model.config.vocab_size)
    assert (batch["position_ids"] == 0).sum(1).tolist() == [3, 3]  # several documents per row
    stock = run(model, "sdpa", batch)
    calls = []
    rows = attention._rows
    monkeypatch.setattr(attention, "_rows", lambda *a, **k: calls.append(a[3]) or rows(*a, **k))
    assert_same(stock, run(model, NAME, batch))
    # every layer took the mask-free path, each row with its own documents
    assert calls == [(0, 9, 26), (0, 16, 24)] * model.config.num_hidden_layers


@pytest.mark.parametrize("family, extra", [("llama", {}), ("mistral", dict(sliding_window=5)), ("gemma", {})])
def test_each_document_equals_the_document_run_alone(family, extra):
    model = model_of(family, **extra)
    docs = docs_of([7, 13, 1, 11], model.config.vocab_size)
    ids = torch.tensor([sum(docs, [])])
    pos = torch.tensor([sum((list(range(len(d))) for d in docs), [])])
    model.set_attn_implementation(NAME)
    packed = packed_forward(model, {"input_ids": ids, "position_ids": pos})
    scale = 1.0 / packed.numel()  # gradients of order 1, so float32 rounding stays far below the tolerance
    (packed.float().pow(2).sum() * scale).backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.set_attn_implementation("eager")  # another oracle: eager attention, one document at a time
    model.zero_grad(set_to_none=True)
    start = 0
    for d in docs:
        alone = model(input_ids=torch.tensor([d]), use_cache=False).logits
        torch.testing.assert_close(packed[0, start : start + len(d)], alone[0].detach(), **TOL)
        (alone.float().pow(2).sum() * scale).backward()
        start += len(d)
    for n, p in model.named_parameters():
        torch.testing.assert_close(packed_grads[n], p.grad, **TOL)


def test_gradient_checkpointing_and_peft():
    from peft import LoraConfig, get_peft_model

    batch = batch_of(LENGTHS, CONTEXT, 64)
    plain = model_of("llama")
    ref = run(plain, "sdpa", batch)
    ckpt = model_of("llama")
    ckpt.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})  # as uptrain
    ckpt.train()  # checkpointing only acts in training mode; dropout is 0 in these configs
    assert ckpt.config.attention_dropout == 0.0
    assert_same(ref, run(ckpt, NAME, batch))

    lora_ref, lora = (get_peft_model(model_of("qwen2"), LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"]))
                      for _ in range(2))  # fmt: skip
    for m in (lora_ref, lora):
        with torch.no_grad():  # LoRA B starts at zero: move it so the adapters take part
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.linspace(-0.1, 0.1, p.numel()).view_as(p))
    a, b = run(lora_ref, "sdpa", batch), run(lora, NAME, batch)
    assert all("lora" in n for n in b[1]) and b[1]
    assert_same(a, b)


def test_no_t_by_t_tensor_is_created():
    T = 2048
    model = model_of("llama", max_position_embeddings=T, num_hidden_layers=1)
    lengths = [300, 700, 148, 500, 400]  # five documents in one row
    batch = batch_of(lengths, T, model.config.vocab_size)
    one_doc = batch_of([T], T, model.config.vocab_size)
    found = {}
    for impl, b in [("sdpa", batch), (NAME, batch), (NAME + " one document", one_doc)]:
        model.set_attn_implementation(impl.split()[0])
        model.zero_grad(set_to_none=True)
        with TensorMemory() as mem:
            packed_forward(model, b).float().pow(2).mean().backward()
        found[impl] = mem
    assert found["sdpa"].largest_numel >= T * T, found["sdpa"].largest_op  # the oracle can see the mask
    for impl in (NAME, NAME + " one document"):
        assert found[impl].largest_numel < T * T, (impl, found[impl].largest_op, found[impl].largest_numel)
        assert found["sdpa"].peak_bytes - found[impl].peak_bytes >= T * T * 4  # at least a float32 T×T less


def test_sliding_window_blocks_create_no_t_by_t_tensor():
    T = 1024
    model = model_of("mistral", sliding_window=300, max_position_embeddings=T, num_hidden_layers=1)
    batch = batch_of([T], T, model.config.vocab_size)  # one document longer than the window
    with TensorMemory() as mem:
        model.set_attn_implementation(NAME)
        packed_forward(model, batch).float().sum().backward()
    assert mem.largest_numel < T * T / 4, (mem.largest_op, mem.largest_numel)


@pytest.mark.parametrize("family, extra", [("llama", {}), ("mistral", dict(sliding_window=6))])
def test_generation_is_unchanged(family, extra):
    model = model_of(family, **extra)
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(3, 64, (2, 11), generator=g)
    mask = torch.ones_like(prompt)
    mask[1, :4] = 0  # the second prompt is left-padded: a dense mask, stock path
    out = {}
    for impl in ("sdpa", NAME):
        model.set_attn_implementation(impl)
        for name, kw in [
            ("plain", dict(input_ids=prompt[:1])),
            ("padded", dict(input_ids=prompt, attention_mask=mask)),
        ]:
            r = model.generate(**kw, max_new_tokens=9, do_sample=False, output_scores=True, return_dict_in_generate=True,
                               pad_token_id=0)  # fmt: skip
            out[impl, name] = r
        out[impl, "cached"] = model(input_ids=prompt[:1], use_cache=True).logits
    for name in ("plain", "padded"):
        assert torch.equal(out["sdpa", name].sequences, out[NAME, name].sequences)
        for a, b in zip(out["sdpa", name].scores, out[NAME, name].scores):
            torch.testing.assert_close(a, b, **TOL)
    torch.testing.assert_close(out["sdpa", "cached"], out[NAME, "cached"], **TOL)


def test_a_cache_makes_the_row_one_sequence_as_in_stock_transformers():
    model = model_of("llama")
    batch = batch_of(LENGTHS, CONTEXT, 64)
    res = {}
    for impl in ("sdpa", NAME):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            res[impl] = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=True).logits
    torch.testing.assert_close(res["sdpa"], res[NAME], **TOL)


def test_mask_function_builds_no_mask_for_packed_rows_and_the_stock_one_otherwise():
    from transformers.masking_utils import create_causal_mask

    model = model_of("llama")
    batch = batch_of(LENGTHS, CONTEXT, 64)
    embeds = torch.zeros(2, CONTEXT, 8)
    masks = {}
    for impl in ("sdpa", NAME):
        model.set_attn_implementation(impl)
        masks[impl] = create_causal_mask(config=model.config, inputs_embeds=embeds, attention_mask=None, cache=None,
                                         position_ids=batch["position_ids"])  # fmt: skip
    assert masks["sdpa"].shape == (2, 1, CONTEXT, CONTEXT) and masks[NAME] is None
    padding = torch.ones(2, CONTEXT, dtype=torch.long)
    padding[0, :5] = 0  # left padding: the stock mask
    for impl in ("sdpa", NAME):
        model.set_attn_implementation(impl)
        masks[impl] = create_causal_mask(config=model.config, inputs_embeds=embeds, attention_mask=padding, cache=None)
    assert masks["sdpa"].shape == (2, 1, CONTEXT, CONTEXT) and torch.equal(masks["sdpa"], masks[NAME])


def test_right_padded_batch_needs_no_mask_and_real_tokens_are_exact():
    """evaluate.document_loss's batches: documents right-padded to the longest, a 2-D padding mask."""
    T = 1024
    model = model_of("mistral", sliding_window=200, max_position_embeddings=T, num_hidden_layers=1)
    lengths = [T, 700, 1]
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, doc in enumerate(docs_of(lengths, 64)):
        ids[row, : len(doc)], mask[row, : len(doc)] = torch.tensor(doc), 1
    real = mask.bool()
    out = {}
    for impl in ("sdpa", NAME):
        model.set_attn_implementation(impl)
        model.zero_grad(set_to_none=True)
        with TensorMemory() as mem:
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            logits[real].pow(2).mean().backward()  # a loss on the real tokens only, as evaluation's
        out[impl] = (logits[real].detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, mem)
    assert out["sdpa"][2].largest_numel >= T * T > out[NAME][2].largest_numel
    assert_same(out["sdpa"][:2], out[NAME][:2])


def test_document_starts():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [5, 6, 7, 8, 0, 1]])
    assert document_starts(pos, 2) == [(0, 3, 5), (0, 4)]
    assert document_starts(torch.arange(6)[None], 3) == [(0,)] * 3  # unsqueezed, not expanded
    with pytest.raises(PackedAttentionError, match="2-D"):
        document_starts(torch.zeros(3, 2, 6, dtype=torch.long), 2)
    with pytest.raises(PackedAttentionError, match="5 tokens"):
        document_starts(torch.arange(5)[None], 1, length=6)


def test_softcapping_and_unverified_families_are_refused():
    ok, why = supports_packed_attention(tiny_config("gemma2"))
    assert not ok and "attn_logit_softcapping" in why
    model = AutoModelForCausalLM.from_config(tiny_config("gemma2"), attn_implementation="eager")
    with pytest.raises(ValueError):  # transformers itself refuses SDPA for Gemma-2
        model.set_attn_implementation(NAME)
    model.config._attn_implementation = NAME  # forced anyway: a clear error, never a silent wrong answer
    with pytest.raises(PackedAttentionError, match="soft-cap"):
        model(input_ids=torch.tensor([[3, 4, 5, 6]]), use_cache=False)
    ok, why = supports_packed_attention(tiny_config("falcon"))
    assert not ok and "not among the families" in why


def test_register_is_idempotent_and_the_backend_offers_it(tmp_path):
    assert register() == register() == NAME and attention.is_registered()
    assert choose_attention("packed") == NAME and choose_attention("sdpa") == "sdpa"
    model_of("llama").save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=NAME)
    assert loaded.config._attn_implementation == NAME
