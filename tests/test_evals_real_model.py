"""The passkey probe separates a real model that retrieves from the same model with its attention broken.

The model is a real `LlamaForCausalLM` (RMSNorm, RoPE, SwiGLU, KV cache, `save_pretrained`)
whose weights are set by hand so that it is a trigram induction/copy model: at every position it
looks for the earlier position whose three preceding tokens equal the last three tokens it has
read, and predicts the token found there. Its behaviour is known by construction, independently
of how the probe builds prompts or scores answers: given "... The pass key is 71432. ... The pass
key is" it continues " 71432", whatever the key, the filler and the depth, at any length up to
its maximum. `test_the_model_copies_by_construction` checks that on random token streams, with
no probe involved.

Construction (one-hot residual stream, d = 5V + 1 rounded up to a multiple of 3, V = vocabulary):

- embedding: token v -> CUR[v] = 1, plus a constant ONE = 1 (the input of position-only heads);
- layer 0, three heads, previous-token heads: head k attends from t to t - (k + 1) only, through
  RoPE alone (constant queries and keys on the 32 fastest-rotating pairs, the query rotated
  back by k + 1 steps, so q.k = a^2 sum_p cos(f_p (t - s - k - 1)) peaks at s = t - k - 1, with a
  logit margin of 30 over every other s); it copies CUR of that position into PREV_{k+1};
- layer 1, head 0, induction head: query [CUR, PREV1, PREV2] at t, key [PREV1, PREV2, PREV3] at
  s, on pairs that RoPE does not rotate within the window (frequency < 1e-5), so q.k counts the
  trigram matches (30 logits per match); it copies CUR of s into OUT;
- lm_head reads OUT. MLPs are zero; RMSNorm weights are set to the stream's constant RMS, so
  each norm is the identity on it.

The tokenizer is a word-level one on the probe's own wording (byte-level pre-tokenisation,
digits split one per token, as in Llama's and most tokenizers), so every prompt token is a whole
word and the vocabulary, hence the model, stays small (V = 57).

Broken: the same weights with the induction head's attention replaced, (a) "uniform": its keys
zeroed, every position attends uniformly to all before it; (b) "self": query and key set to the
position-only pattern of offset 0, every position attends to itself only. Everything else is
unchanged.

Chance level: the probe's passkey is a 5-digit number drawn uniformly from 10000..99999, so an
answer that does not depend on the prompt's key is right with probability 1/90000 (and matches a
given digit with probability 1/10).
"""

from __future__ import annotations

import copy
import json
import math
import random
import re

import pytest
import torch

from gqa_convert.evals import passkey as pk

HIGH_PAIRS = 32  # RoPE pairs used by the position-only heads (the fastest-rotating ones)
CONTENT_FROM = 48  # first pair used for content matching: frequency (1/2048)^(48/32) ~ 1e-5
LOGIT_GAP = 30.0  # softmax margin: the wrong positions share < T * e^-30 of the attention
MAX_POSITIONS = 1024
DIGITS = 5
CHANCE = 1 / (10**DIGITS - 10 ** (DIGITS - 1))  # a key-independent answer hits a 5-digit key w.p. 1/90000
LENGTHS = [128, 256, 512]
SEED = 3

pytestmark = pytest.mark.slow  # ~30 s in all on a shared 2-core machine (each test ~2-10 s)


def word_tokenizer():
    """A word-level tokenizer on the probe's public wording: byte-level pre-tokenisation (the
    space kept on the following word, as GPT-2 / Llama 3), one token per digit, BOS prepended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    filler = " ".join(pk.FILLER)
    text = pk.INSTRUCTION + " " + filler + " " + filler + pk.NEEDLE.format(key="0123456789") + pk.QUESTION
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator([text], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _position_head(attn, head: int, one: int, offset: int, inv_freq: torch.Tensor, head_dim: int) -> None:
    """Make `head` of `attn` attend from t to t - offset only, by RoPE: constant query and key read
    from the ONE coordinate, the query rotated back by `offset` steps on each fast pair."""
    half = head_dim // 2
    f = inv_freq[:HIGH_PAIRS].double()
    deltas = torch.arange(MAX_POSITIONS, dtype=torch.float64)
    score = torch.cos(f[:, None] * (deltas[None] - offset)).sum(0)  # q.k / a^2 at distance t - s
    margin = (score[offset] - torch.cat([score[:offset], score[offset + 1 :]]).max()).item()
    a = math.sqrt(LOGIT_GAP * math.sqrt(head_dim) / margin)  # Llama scales q.k by head_dim^-0.5
    rows = head * head_dim + torch.arange(HIGH_PAIRS)
    q, k = attn.q_proj.weight, attn.k_proj.weight
    q[rows, one] = (a * torch.cos(-f * offset)).float()
    q[rows + half, one] = (a * torch.sin(-f * offset)).float()
    k[rows, one] = a
    k[rows + half, one] = 0.0


def induction_llama(tok):
    """The trigram induction LlamaForCausalLM described in the module docstring (float32, eval)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    V = len(tok)
    d = -(-(5 * V + 1) // 3) * 3  # Llama wants hidden_size divisible by the head count
    CUR, PREV, OUT, ONE = 0, (V, 2 * V, 3 * V), 4 * V, 5 * V
    half = CONTENT_FROM + math.ceil(3 * V / 2)  # room for the 3V content coordinates
    head_dim = 2 * half
    ratio = (1 / 2048) ** (1 / HIGH_PAIRS)  # frequency of pair p is ratio^p: pair 32 turns once in ~13K steps
    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=d,
        intermediate_size=4,
        num_hidden_layers=2,
        num_attention_heads=3,
        num_key_value_heads=3,
        head_dim=head_dim,
        max_position_embeddings=MAX_POSITIONS,
        rope_parameters={"rope_type": "default", "rope_theta": ratio ** (-half)},
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
    )
    model = LlamaForCausalLM(cfg).eval()
    inv_freq = model.model.rotary_emb.inv_freq
    # content pairs must not rotate within the window, or q.k would stop counting matches
    assert inv_freq[CONTENT_FROM].item() * MAX_POSITIONS < 0.02
    ids = torch.arange(V)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.embed_tokens.weight[ids, CUR + ids] = 1.0
        model.model.embed_tokens.weight[:, ONE] = 1.0
        first, second = model.model.layers
        first.input_layernorm.weight.fill_(math.sqrt(2 / d))  # stream = CUR + ONE: RMS sqrt(2/d)
        second.input_layernorm.weight.fill_(math.sqrt(5 / d))  # + PREV1..3: RMS sqrt(5/d)
        model.model.norm.weight.fill_(1.0)
        for k in range(3):  # previous-token heads: PREV_{k+1} <- CUR at t - (k + 1)
            _position_head(first.self_attn, k, ONE, k + 1, inv_freq, head_dim)
            first.self_attn.v_proj.weight[k * head_dim + ids, CUR + ids] = 1.0
            first.self_attn.o_proj.weight[PREV[k] + ids, k * head_dim + ids] = 1.0
        c = torch.arange(3 * V)
        dims = CONTENT_FROM + c // 2 + (c % 2) * half  # both halves of the slow pairs
        beta = LOGIT_GAP * math.sqrt(head_dim)
        second.self_attn.q_proj.weight[dims, torch.cat([CUR + ids, PREV[0] + ids, PREV[1] + ids])] = beta
        second.self_attn.k_proj.weight[dims, torch.cat([PREV[0] + ids, PREV[1] + ids, PREV[2] + ids])] = 1.0
        second.self_attn.v_proj.weight[ids, CUR + ids] = 1.0
        second.self_attn.o_proj.weight[OUT + ids, ids] = 1.0
        model.lm_head.weight[ids, OUT + ids] = 10.0
    return model


def broken(model, how: str):
    """The same model with the induction head's attention replaced (nothing else touched)."""
    out = copy.deepcopy(model)
    attn = out.model.layers[1].self_attn
    with torch.no_grad():
        if how == "uniform":  # zero keys: equal scores, each position averages all before it
            attn.k_proj.weight.zero_()
        elif how == "self":  # each position attends to itself only
            attn.q_proj.weight[: out.config.head_dim].zero_()
            attn.k_proj.weight[: out.config.head_dim].zero_()
            one = 5 * out.config.vocab_size
            _position_head(attn, 0, one, 0, out.model.rotary_emb.inv_freq, out.config.head_dim)
        else:
            raise ValueError(how)
    return out


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return induction_llama(tok)


def _stream(vocab: list[int], n: int, rng: random.Random) -> list[int]:
    """n random tokens in which no trigram repeats (so the copy target is unambiguous)."""
    out: list[int] = []
    seen: set[tuple[int, ...]] = set()
    while len(out) < n:
        t = rng.choice(vocab)
        if len(out) >= 2 and (out[-2], out[-1], t) in seen:
            continue
        if len(out) >= 2:
            seen.add((out[-2], out[-1], t))
        out.append(t)
    return out


def test_the_model_copies_by_construction(tok, model):
    """No probe: a random stream, then its first 12 tokens again; greedy decoding must go on with
    the stream's next 20 tokens (and the broken models must not)."""
    from gqa_convert.evals.common import greedy_generate

    rng = random.Random(0)
    words = [i for i in range(len(tok)) if i not in tok.all_special_ids]
    stream = _stream(words, 400, rng)
    ids = torch.tensor([[tok.bos_token_id] + stream + stream[:12]])
    assert greedy_generate(model, ids, 20)[0].tolist() == stream[12:32]
    for how in ("uniform", "self"):
        hits = sum(a == b for a, b in zip(greedy_generate(broken(model, how), ids, 20)[0].tolist(), stream[12:32]))
        assert hits <= 4, how  # 1/54 per token by chance


_KEY = re.compile(r"The pass key is (\d+)\.")


def _scored(model, tok, prompts):
    """The probe's result, and for each sample the key read back from its prompt's text (an
    independent reading: not the probe's own record of the key)."""
    result = pk.passkey_probe(
        model, tok, LENGTHS, pk.DEFAULT_DEPTHS, samples=2, seed=SEED, digits=DIGITS, prompts=prompts
    )
    keys = [_KEY.search(tok.decode(p.input_ids, skip_special_tokens=True)).group(1) for p in prompts]
    return result, keys


def _digit_agreement(answers: list[str], keys: list[str]) -> float:
    """Share of key digits the answer's first number gets right, position by position (chance 1/10)."""
    right = 0
    for answer, key in zip(answers, keys):
        found = re.search(r"\d+", answer)
        right += sum(a == b for a, b in zip(found.group(0) if found else "", key))
    return right / (len(keys) * DIGITS)


@pytest.fixture(scope="module")
def prompts(tok):
    out = pk.build_passkey_prompts(tok, LENGTHS, pk.DEFAULT_DEPTHS, samples=2, seed=SEED, digits=DIGITS)
    assert all(tok.unk_token_id not in p.input_ids for p in out)  # the tokenizer covers the whole prompt
    return out


@pytest.fixture(scope="module")
def working(tok, model, prompts):
    return _scored(model, tok, prompts)


def test_probe_scores_the_model_near_1_in_every_cell(working, prompts):
    good, keys = working
    n = len(prompts)  # 3 lengths x 5 depths x 2 samples = 30
    # every cell, and the answers themselves start with the key read from the prompt
    assert all(acc >= 0.9 for row in good.grid() for acc in row), good.grid()
    assert sum(s.answer.strip().startswith(k) for s, k in zip(good.samples, keys)) >= 0.9 * n
    assert _digit_agreement([s.answer for s in good.samples], keys) >= 0.9


@pytest.mark.parametrize("how", ["uniform", "self"])
def test_probe_scores_the_model_with_broken_attention_near_chance(tok, model, prompts, working, how):
    good, keys = working
    bad, _ = _scored(broken(model, how), tok, prompts)
    n = len(prompts)
    # broken: at chance the expected hits are n x 1/90000 ~ 3e-4 and two hits or more have
    # probability ~ C(n, 2) / 90000^2 ~ 5e-8, so at most one hit (<= 1/n); digits at most twice
    # their chance of 1/10 (3 sigma over 150 digits is 0.17)
    assert n * CHANCE < 1e-3
    assert bad.overall <= 1 / n, [s.answer for s in bad.samples][:5]
    assert _digit_agreement([s.answer for s in bad.samples], keys) <= 0.2
    assert good.prompts_sha256 == bad.prompts_sha256


def test_eval_command_separates_source_that_retrieves_from_broken_conversion(tok, model, tmp_path, capsys):
    """`gqa-convert eval` end to end on saved folders: the working model as the source, its
    broken copy as the "converted" model; accuracies from the written retrieval.json."""
    from gqa_convert.commands import main

    src, out = tmp_path / "source", tmp_path / "broken"
    for folder, m in ((src, model), (out, broken(model, "uniform"))):
        m.save_pretrained(folder)
        tok.save_pretrained(folder)
    argv = ["eval", str(out), "--source", str(src), "--context", "512", "--lengths", "128,256,512"]
    argv += ["--tasks", "passkey", "--samples", "1", "--seed", str(SEED), "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    capsys.readouterr()
    report = json.loads((out / "retrieval.json").read_text())["report"]
    scores = next(t for t in report["tasks"] if t["task"] == "passkey")["scores"]
    assert all(v >= 0.9 for v in scores["source"].values()), scores
    assert all(v <= 1 / 5 for v in scores["converted"].values()), scores  # <= 1 hit of 5 per length
    assert all(acc >= 0.9 for row in report["passkey_grid"]["source"] for acc in row)
    assert report["ratio"] is not None and report["ratio"] <= 0.1
