"""The chunked loss (gqa_convert/train/loss.py) against independent oracles: the unchunked
computation from full logits (loss and gradients, float32, 1e-5), each document run alone (packed
rows), the model's own logits (head post-processing of every family), and a tensor-allocation
trace (no [T, V] tensor in forward or backward)."""

from __future__ import annotations

from pathlib import Path

import pytest
import tiny as registry
import torch
import torch.nn.functional as F
from tiny_models import FAMILIES, tiny_model

from gqa_convert.errors import ConfigError, UnsupportedModelError
from gqa_convert.train.data import IGNORE, collate, pack_rows, packed_forward
from gqa_convert.train.loss import (
    Head,
    chunk_size,
    chunked_token_losses,
    loss_peak_bytes,
    output_head,
    packed_hidden,
    packed_losses,
)
from gqa_convert.train.memtrace import TensorMemory

TOL = dict(atol=1e-5, rtol=1e-5)


def full_token_losses(logits, labels, teacher=None):
    """Oracle: the unchunked loss from whole [B, T, V] logits (the loop's original token_losses)."""
    logits = logits[:, :-1].float()
    target = labels[:, 1:]
    keep = target != IGNORE
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE, reduction="sum")
    kl = logits.new_zeros(())
    if teacher is not None:
        logp = F.log_softmax(logits[keep], dim=-1)
        logq = F.log_softmax(teacher[:, :-1].float()[keep], dim=-1)
        kl = (logq.exp() * (logq - logp)).sum()
    return ce, kl, int(keep.sum())


def random_case(B=2, T=37, H=16, V=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, requires_grad=True)
    weight = (torch.randn(V, H, generator=g) * 0.5).requires_grad_()
    bias = (torch.randn(V, generator=g) * 0.1).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.2] = IGNORE  # document starts and masked spans
    t_hidden = torch.randn(B, T, 24, generator=g)
    t_head = Head(torch.randn(V, 24, generator=g) * 0.5)
    return hidden, weight, bias, labels, t_hidden, t_head


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("chunk", [1, 5, 7, 64, 1000])  # 5 and 7 don't divide the 72 targets; 1000 > all of them
@pytest.mark.parametrize("post", [{}, {"scale": 0.25}, {"softcap": 2.0}])
@pytest.mark.parametrize("distill", [False, True])
def test_loss_and_gradients_equal_unchunked(chunk, post, distill):
    hidden, weight, bias, labels, t_hidden, t_head = random_case()
    head = Head(weight, bias, **post)
    w = 0.3 if distill else 0.0
    ce, kl, n = chunked_token_losses(
        hidden,
        head,
        labels,
        teacher_hidden=t_hidden if distill else None,
        teacher_head=t_head if distill else None,
        chunk_tokens=chunk,
    )
    got = grads((1 - w) * ce + w * kl, (hidden, weight, bias))
    # oracle: whole logits, then the family post-processing, written out independently of Head
    z = hidden @ weight.T + bias
    if "scale" in post:
        z = z * post["scale"]
    if "softcap" in post:
        z = torch.tanh(z / post["softcap"]) * post["softcap"]
    ce0, kl0, n0 = full_token_losses(z, labels, (t_hidden @ t_head.weight.T) if distill else None)
    want = grads((1 - w) * ce0 + w * kl0, (hidden, weight, bias))
    assert n == n0 == int((labels[:, 1:] != IGNORE).sum())
    torch.testing.assert_close(ce, ce0, **TOL)
    torch.testing.assert_close(kl, kl0, **TOL)
    if distill:
        assert kl0 > 0
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)


def test_no_grad_path_and_all_ignored():
    hidden, weight, bias, labels, _, _ = random_case()
    with torch.no_grad():
        ce, _, n = chunked_token_losses(hidden, Head(weight, bias), labels, chunk_tokens=3)
        ce0, _, _ = full_token_losses(hidden @ weight.T + bias, labels)
    torch.testing.assert_close(ce, ce0, **TOL)
    ce, kl, n = chunked_token_losses(hidden, Head(weight), torch.full_like(labels, IGNORE), chunk_tokens=8)
    assert n == 0 and ce.item() == 0 and kl.item() == 0
    ce.backward()  # a batch without targets still backpropagates (zeros), as the unchunked loss does
    assert hidden.grad is not None and hidden.grad.abs().sum() == 0


def test_bad_settings_are_one_line_errors():
    hidden, weight, _, labels, _, _ = random_case()
    for bad in (0, -3, 2.5, "1K", True):
        with pytest.raises(ConfigError, match="positive number of tokens"):
            chunk_size(bad, 100)
    with pytest.raises(ConfigError, match="one of chunked, liger, auto"):
        chunked_token_losses(hidden, Head(weight), labels, impl="fast")
    with pytest.raises(ConfigError, match="liger is not available"):  # CPU tensors (and no liger here)
        chunked_token_losses(hidden, Head(weight), labels, impl="liger")
    ce, _, _ = chunked_token_losses(hidden, Head(weight), labels, impl="auto", chunk_tokens=4)  # auto falls back
    torch.testing.assert_close(ce, full_token_losses(hidden @ weight.T, labels)[0], **TOL)
    assert chunk_size(None, 128_256) == 256 and chunk_size(None, 32_000) == 1024 and chunk_size(None, 10**7) == 64


def test_liger_call_folds_the_scale_and_passes_the_softcap(monkeypatch):
    """The liger route's plumbing, against a stand-in with liger's documented semantics (liger itself
    needs CUDA): logits = softcap(h W^T + b), summed CE with ignore_index."""
    import sys
    import types

    from gqa_convert.train import loss

    def fake(input, weight, target, bias=None, *, ignore_index, reduction, softcap):
        z = input @ weight.T + (0 if bias is None else bias)
        z = z if softcap is None else softcap * torch.tanh(z / softcap)
        return F.cross_entropy(z, target, ignore_index=ignore_index, reduction=reduction), None

    mod = types.ModuleType("liger_kernel.transformers.functional")
    mod.liger_fused_linear_cross_entropy = fake
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.functional", mod)
    hidden, weight, bias, labels, _, _ = random_case()
    for post in ({"scale": 0.25}, {"softcap": 2.0}):
        head = Head(weight, bias, **post)
        h, y = hidden[:, :-1].reshape(-1, hidden.shape[-1]), labels[:, 1:].reshape(-1)
        want, _, _ = chunked_token_losses(hidden, head, labels, chunk_tokens=9)
        torch.testing.assert_close(loss._liger_ce(h, y, head), want, **TOL)


# ----------------------------------------------------------------------------- real models


EXTRA_TYPES = {  # post-processing types beyond our families, built the same way, so the table is checked too
    "cohere": dict(model_type="cohere", logit_scale=0.5),
    "gemma3_text": dict(model_type="gemma3_text", head_dim=16, final_logit_softcapping=3.0, sliding_window=8),
}
BITE = {"gemma2": dict(final_logit_softcapping=2.0), "granite": dict(logits_scaling=4.0)}  # make post-processing matter


def family_model(name, seed=0):
    if name in EXTRA_TYPES:
        from transformers import AutoConfig

        fields = {**registry.COMMON, **EXTRA_TYPES[name]}
        torch.manual_seed(seed)
        return registry.model_from_config(AutoConfig.for_model(fields.pop("model_type"), **fields))
    return tiny_model(name, seed=seed, **BITE.get(name, {}))


def packed_batch(V, lengths=(5, 9, 3, 12, 7, 4, 8), context=24, seed=0):
    """Rows of `context` tokens holding several documents; positions restart at each document start."""
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(3, V, (n,), generator=g).tolist() for n in lengths]
    return collate(list(pack_rows(docs, context))), docs


@pytest.mark.parametrize("family", sorted(FAMILIES) + sorted(EXTRA_TYPES))
def test_head_of_every_family_reproduces_its_logits(family):
    model = family_model(family)
    batch, _ = packed_batch(model.config.vocab_size)
    with torch.no_grad():
        want = packed_forward(model, batch)
        got = output_head(model)(packed_hidden(model, batch))
    torch.testing.assert_close(got, want.float(), **TOL)


def test_unknown_model_type_is_refused():
    model = family_model("llama")
    model.config.model_type = "mystery"
    with pytest.raises(UnsupportedModelError, match="post-processes its logits"):
        output_head(model)


@pytest.mark.parametrize("family", ["llama", "gemma2", "granite", "falcon", "phi3", "qwen2"])
def test_packed_losses_equal_unchunked_through_a_model(family):
    """Gradients w.r.t. every parameter, with a teacher, packed documents, chunks that don't divide T."""
    model = family_model(family).train()
    teacher = family_model(family, seed=1)
    batch, _ = packed_batch(model.config.vocab_size)
    params = [p for p in model.parameters() if p.requires_grad]
    ce, kl, n = packed_losses(model, batch, teacher, chunk_tokens=7)
    got = grads(0.6 * ce + 0.4 * kl, params)
    with torch.no_grad():
        t_logits = packed_forward(teacher, batch)
    ce0, kl0, n0 = full_token_losses(packed_forward(model, batch), batch["labels"], t_logits)
    want = grads(0.6 * ce0 + 0.4 * kl0, params)
    assert n == n0
    torch.testing.assert_close(ce, ce0, **TOL)
    torch.testing.assert_close(kl, kl0, **TOL)
    for (name, _), a, b in zip(model.named_parameters(), got, want):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, name=name: f"{name}: {m}")
    assert all(p.grad is None for p in teacher.parameters())


def test_with_activation_checkpointing_as_the_loop_enables_it():
    model = family_model("llama").train()
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    batch, _ = packed_batch(model.config.vocab_size)
    params = list(model.parameters())
    ce, _, _ = packed_losses(model, batch, chunk_tokens=10)
    got = grads(ce, params)
    want = grads(full_token_losses(packed_forward(model, batch), batch["labels"])[0], params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)


def test_packed_rows_score_each_document_as_if_alone():
    """Per-document losses from packed rows (chunked) equal each document run alone (full logits)."""
    model = family_model("llama")
    batch, docs = packed_batch(model.config.vocab_size)
    head = output_head(model)
    with torch.no_grad():
        hidden = packed_hidden(model, batch)
    seen = 0
    for r in range(batch["input_ids"].shape[0]):
        pos = batch["position_ids"][r].tolist()
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        for a, b in zip(starts, starts[1:]):
            ids = batch["input_ids"][r, a:b].tolist()
            if ids not in docs:  # a document cut by a row boundary
                continue
            labels = torch.full_like(batch["labels"][r : r + 1], IGNORE)
            labels[0, a + 1 : b] = batch["labels"][r, a + 1 : b]  # only this document's targets
            with torch.no_grad():
                ce, _, n = chunked_token_losses(hidden[r : r + 1], head, labels, chunk_tokens=4)
                alone = model(input_ids=torch.tensor([ids])).logits[0, :-1]
            want = F.cross_entropy(alone, torch.tensor(ids[1:]), reduction="sum")
            assert n == len(ids) - 1
            torch.testing.assert_close(ce, want, **TOL)
            seen += 1
    assert seen >= 4


def test_hidden_through_peft():
    peft = pytest.importorskip("peft")
    model = family_model("llama")
    batch, _ = packed_batch(model.config.vocab_size)
    config = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)  # B != 0: LoRA acts
    lora = peft.get_peft_model(model, config)
    with torch.no_grad():
        want = packed_forward(lora, batch)  # LoRA active: differs from the base model
        got = output_head(lora)(packed_hidden(lora, batch))
    torch.testing.assert_close(got, want, **TOL)
    ce, _, _ = packed_losses(lora, batch, chunk_tokens=5)
    ce.backward()
    assert all(p.grad is not None for n, p in lora.named_parameters() if "lora_" in n)


def test_ddp_wrapped_model_gets_the_unchunked_gradients(tmp_path):
    """Through DistributedDataParallel (1 process, gloo): the forward runs DDP's own hooks."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = family_model("llama").train()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        batch, _ = packed_batch(model.config.vocab_size)
        ce, _, _ = packed_losses(ddp, batch, chunk_tokens=6)
        ce.backward()
        got = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        full_token_losses(packed_forward(model, batch), batch["labels"])[0].backward()
        for (name, p), g in zip(model.named_parameters(), got):
            torch.testing.assert_close(g, p.grad, **TOL, msg=lambda m, name=name: f"{name}: {m}")
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- memory


def test_no_tensor_of_t_by_v_in_forward_or_backward():
    T, V, H, chunk = 2048, 4096, 16, 128
    hidden, weight, _, labels, t_hidden, t_head = random_case(B=1, T=T, H=H, V=V)
    with TensorMemory() as mem:
        ce, kl, n = chunked_token_losses(
            hidden, Head(weight), labels, teacher_hidden=t_hidden, teacher_head=t_head, chunk_tokens=chunk
        )
        (0.5 * ce + 0.5 * kl).backward()
    assert mem.largest_numel <= chunk * V, mem.largest_op
    # alive at once: a few chunk x V buffers (logits, softmax, their gradients) and [T, H]-sized ones
    assert mem.peak_bytes <= 6 * chunk * V * 4 + 8 * T * 24 * 4 + 2 * V * H * 4, mem.peak_bytes
    with TensorMemory() as full:  # the tracker does see the unchunked loss's [T, V] logits
        z = hidden @ weight.T
        ce0, kl0, _ = full_token_losses(z, labels, t_hidden @ t_head.weight.T)
        (0.5 * ce0 + 0.5 * kl0).backward()
    assert full.largest_numel >= (T - 1) * V and full.peak_bytes > 4 * mem.peak_bytes


@pytest.mark.parametrize("distill", [False, True])
def test_planning_estimate_matches_the_traced_peak(distill):
    T, V, H, chunk = 1024, 16384, 8, 128
    hidden, weight, _, labels, t_hidden, t_head = random_case(B=1, T=T, H=H, V=V)
    with TensorMemory() as mem:
        ce, kl, _ = chunked_token_losses(
            hidden,
            Head(weight),
            labels,
            teacher_hidden=t_hidden if distill else None,
            teacher_head=t_head if distill else None,
            chunk_tokens=chunk,
        )
        (ce + kl).backward()
    loss_only = mem.peak_bytes - V * H * 4 - 3 * T * H * 4  # less the weight gradient and [T, H]-sized tensors
    assert abs(loss_only / loss_peak_bytes(V, chunk_tokens=chunk, teacher=distill) - 1) < 0.05
    assert loss_peak_bytes(V, chunk_tokens=chunk, tokens=50) == 3 * 50 * V * 4


def test_model_step_never_creates_t_by_v_logits():
    """A whole training step through a model (forward + backward, with a teacher)."""
    T, V, chunk = 512, 8192, 32
    small = dict(
        vocab_size=V, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=T
    )
    model = registry.tiny_model("llama", **small).train()
    teacher = registry.tiny_model("llama", seed=1, **small)
    batch, _ = packed_batch(V, lengths=(100, 300, 200), context=T)
    with TensorMemory() as mem:
        ce, kl, n = packed_losses(model, batch, teacher, chunk_tokens=chunk)
        (ce + kl).backward()
    assert n == T - 1 - 2  # the two document starts inside the row predict nothing
    assert mem.largest_numel < T * V // 4, (mem.largest_numel, mem.largest_op)  # eager attention: 2 x T x T
    with TensorMemory() as full:
        ce0, _, _ = full_token_losses(packed_forward(model, batch), batch["labels"])
        ce0.backward()
    assert full.largest_numel >= T * V


def test_every_supported_family_has_a_known_head():
    """Adding a family to architectures.yaml forces a decision about its logit post-processing."""
    import yaml

    from gqa_convert.train import loss

    spec = yaml.safe_load((Path(loss.__file__).parents[1] / "data" / "architectures.yaml").read_text())
    types = {t for fam in spec["families"].values() for t in fam["model_types"]}
    assert types <= loss.PLAIN | loss.SOFTCAP | loss.DIVIDE | loss.MULTIPLY, types - loss.PLAIN


# ----------------------------------------------------------------------------- evaluation


STORY = (
    "Once upon a time there was a cat. The dog ran to the park and played with a red ball all day long. "
    "Tom said hi. A bird sang in the tall green tree while the sun went down over the hill. "
)


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from tiny import make_tiny_llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = make_tiny_llama(tmp_path_factory.mktemp("tiny") / "m", [STORY] * 4, layers=2)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def test_position_buckets():
    from gqa_convert.evaluate import position_buckets

    assert position_buckets(512) == [(0, 64), (64, 128), (128, 256), (256, 512)]
    assert position_buckets(8192) == [(0, 1024), (1024, 2048), (2048, 4096), (4096, 8192)]
    assert position_buckets(131072)[:2] == [(0, 1024), (1024, 2048)] and position_buckets(131072)[-1] == (65536, 131072)
    assert len(position_buckets(131072)) == 8
    assert position_buckets(1000) == [(0, 64), (64, 128), (128, 256), (256, 512), (512, 1000)]
    assert position_buckets(10_000)[-1] == (8192, 10_000)
    assert position_buckets(2) == [(0, 1), (1, 2)]


def test_document_loss_and_loss_by_position_match_full_logits_per_document(tiny_lm):
    """document_loss (padded batches, chunked head) against each document alone with full logits."""
    from gqa_convert.evaluate import document_loss, encode_documents

    model, tok = tiny_lm
    docs = [STORY[:n] for n in (20, 300, 90, 150, 45, 400, 260)]  # 7 lengths, many cut at max_tokens
    max_tokens = 64
    got = document_loss(model, tok, docs, max_tokens=max_tokens, batch_size=3, chunk_tokens=5)
    nll, pos = [], []
    with torch.no_grad():
        for ids in encode_documents(tok, docs, max_tokens):
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
            nll += F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none").tolist()
            pos += list(range(1, len(ids)))
    assert got.tokens == len(nll) and got.documents == len(docs)
    assert got.mean_loss == pytest.approx(sum(nll) / len(nll), abs=1e-5)
    want = []
    for start, end in [(0, 8), (8, 16), (16, 32), (32, 64)]:
        xs = [x for x, p in zip(nll, pos) if start <= p < end]
        want.append((start, end, len(xs), sum(xs) / len(xs)))
    assert [(b["start"], b["end"], b["tokens"]) for b in got.by_position] == [w[:3] for w in want]
    for b, w in zip(got.by_position, want):
        assert b["mean_loss"] == pytest.approx(w[3], abs=1e-5)
    assert got.to_dict()["by_position"][0]["tokens"] == 7 * 7  # position 1..7 of every document
    # chunking and batching change nothing
    again = document_loss(model, tok, docs, max_tokens=max_tokens, batch_size=1, chunk_tokens=1000)
    assert abs(again.mean_loss - got.mean_loss) < 1e-6
    assert [b["tokens"] for b in again.by_position] == [b["tokens"] for b in got.by_position]


def test_document_loss_rejects_a_bad_chunk_before_any_work(tiny_lm):
    from gqa_convert.evaluate import document_loss

    model, tok = tiny_lm
    with pytest.raises(ConfigError, match="positive number of tokens"):
        document_loss(model, tok, ["a story"], chunk_tokens=0)
