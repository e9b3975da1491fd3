"""stories260K exported from llama2.c to Hugging Face, held to independent oracles:

- the greedy sample llama2.c documents for this model (fixtures README);
- a pure-Python copy of run.c's `encode` (written here, not the package's code);
- a NumPy forward pass of the raw llama2.c weights with llama2.c's interleaved RoPE (no
  permutation), read straight from the .bin by this file.
"""

from __future__ import annotations

import re
import struct

import numpy as np
import pytest
import torch
from conftest import STORIES_BIN, STORIES_TOK, need

from gqa_convert.errors import CheckpointError, OutputError
from gqa_convert.llama2c import export_llama2c

# The beginning of the greedy (temperature 0) sample llama2.c documents for stories260K.
DOCUMENTED_SAMPLE = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
    "One day, she saw a big, red ball. She wanted to play with it, but it was too high. "
    "Lily's mom said, \"Lily, let's go to the park.\" Lily was sad and didn't know what to do."
)


def squash(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


# --- independent oracles -----------------------------------------------------------------------


def read_llama2c_tokenizer(path, vocab_size=512):
    """tok512.bin as llama2.c's run.c holds it: raw piece strings and scores."""
    data = path.read_bytes()
    pieces, scores, off = [], [], 4
    for _ in range(vocab_size):
        score, n = struct.unpack_from("<fi", data, off)
        pieces.append(data[off + 8 : off + 8 + n].decode("utf-8"))
        scores.append(score)
        off += 8 + n
    return pieces, scores


def runc_encode(text: str, pieces: list[str], scores: list[float]) -> list[int]:
    """run.c's encode(): dummy-prefix space, char lookup or UTF-8 bytes + 3, best-score merges."""
    lookup = {p: i for i, p in enumerate(pieces)}
    tokens = [lookup[" "]] if text else []
    for ch in text:
        if ch in lookup:
            tokens.append(lookup[ch])
        else:
            tokens.extend(b + 3 for b in ch.encode("utf-8"))

    def pair_score(i: int) -> float:
        merged = lookup.get(pieces[tokens[i]] + pieces[tokens[i + 1]])
        return -1e10 if merged is None else scores[merged]

    pair = [pair_score(i) for i in range(len(tokens) - 1)]
    while pair:
        best = max(pair)
        if best == -1e10:
            break
        i = pair.index(best)  # leftmost best, as run.c's strict '>' scan picks
        tokens[i : i + 2] = [lookup[pieces[tokens[i]] + pieces[tokens[i + 1]]]]
        del pair[i]
        if i < len(pair):
            pair[i] = pair_score(i)
        if i > 0:
            pair[i - 1] = pair_score(i - 1)
    return tokens


def numpy_forward(path, ids: list[int]) -> np.ndarray:
    """llama2.c's forward pass (run.c) on the raw .bin, interleaved RoPE; logits [T, vocab]."""
    data = path.read_bytes()
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack_from("<7i", data, 0)
    hs = dim // n_heads
    off = 28

    def take(*shape):
        nonlocal off
        n = int(np.prod(shape))
        a = np.frombuffer(data, "<f4", n, off).reshape(shape).astype(np.float64)
        off += 4 * n
        return a

    emb = take(vocab, dim)
    rms_att = take(n_layers, dim)
    wq = take(n_layers, dim, dim)
    wk = take(n_layers, n_kv * hs, dim)
    wv = take(n_layers, n_kv * hs, dim)
    wo = take(n_layers, dim, dim)
    rms_ffn = take(n_layers, dim)
    w1 = take(n_layers, hidden, dim)
    w2 = take(n_layers, dim, hidden)
    w3 = take(n_layers, hidden, dim)
    rms_final = take(dim)

    def rmsnorm(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * w

    def rope(x):  # x [T, heads, hs]; rotate pairs (2i, 2i+1) by pos * 10000^(-2i/hs)
        T = x.shape[0]
        freq = 1.0 / 10000.0 ** (np.arange(0, hs, 2) / hs)
        ang = np.arange(T)[:, None] * freq[None, :]
        c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = x0 * c - x1 * s
        out[..., 1::2] = x0 * s + x1 * c
        return out

    T = len(ids)
    x = emb[ids]
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for layer in range(n_layers):
        h = rmsnorm(x, rms_att[layer])
        q = rope((h @ wq[layer].T).reshape(T, n_heads, hs))
        k = rope((h @ wk[layer].T).reshape(T, n_kv, hs))
        v = (h @ wv[layer].T).reshape(T, n_kv, hs)
        att_out = np.empty((T, n_heads, hs))
        for head in range(n_heads):
            kvh = head // (n_heads // n_kv)
            a = q[:, head] @ k[:, kvh].T / np.sqrt(hs) + mask
            a = np.exp(a - a.max(-1, keepdims=True))
            a /= a.sum(-1, keepdims=True)
            att_out[:, head] = a @ v[:, kvh]
        x = x + att_out.reshape(T, dim) @ wo[layer].T
        h = rmsnorm(x, rms_ffn[layer])
        g = h @ w1[layer].T
        x = x + ((g / (1 + np.exp(-g))) * (h @ w3[layer].T)) @ w2[layer].T
    return rmsnorm(x, rms_final) @ emb.T


# --- tests ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_and_tok(stories_hf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(stories_hf).eval()
    return model, AutoTokenizer.from_pretrained(stories_hf)


def test_folder_is_plain_hf_safetensors(stories_hf):
    names = {p.name for p in stories_hf.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth")) or n.startswith(".")]


def test_config_matches_llama2c_header(model_and_tok):
    model, tok = model_and_tok
    c = model.config
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (64, 172, 5)
    assert (c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == (8, 4, 512)
    assert c.max_position_embeddings == 512 and c.rms_norm_eps == 1e-5 and c.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert sum(p.numel() for p in model.parameters()) == 260_032  # fixtures README
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    assert type(tok).__name__ in {"PreTrainedTokenizerFast", "TokenizersBackend", "LlamaTokenizerFast"}


def test_logits_match_independent_llama2c_forward(model_and_tok):
    model, _ = model_and_tok
    ids = [1, 403, 407, 261, 378, 432, 410, 383, 286, 13, 412, 280, 300, 350, 99, 500]
    want = numpy_forward(need(STORIES_BIN), ids)
    with torch.no_grad():
        got = model(torch.tensor([ids])).logits[0].double().numpy()
    assert np.abs(got - want).max() < 1e-4, np.abs(got - want).max()


def test_greedy_sample_reproduces_documented_llama2c_output(model_and_tok):
    model, tok = model_and_tok
    with torch.no_grad():
        out = model.generate(torch.tensor([[1]]), max_new_tokens=110, do_sample=False, eos_token_id=2)
    text = squash(tok.decode(out[0], skip_special_tokens=True))
    assert text.startswith(DOCUMENTED_SAMPLE), text


def test_tokenizer_matches_runc_encode(model_and_tok, val_text):
    _, tok = model_and_tok
    pieces, scores = read_llama2c_tokenizer(need(STORIES_TOK))
    docs = [d.strip() for d in val_text.read_text(encoding="utf-8").split("\n\n") if d.strip()][:300]
    odd = [
        "  two leading spaces, tabs\tand\nnewlines  ",
        "café naïve – “quotes” 😀 ☃ 日本語",
        "<0x41> looks like a byte token but is plain text, as are <s and /s>",
        "x",
    ]
    for text in docs + odd:
        want = runc_encode(text, pieces, scores)
        got = tok(text, add_special_tokens=False).input_ids
        assert got == want, text
        assert tok(text).input_ids == [1, *want]  # BOS added by default


def test_decode_round_trips(model_and_tok, val_text):
    _, tok = model_and_tok
    docs = [d for d in val_text.read_text(encoding="utf-8").split("\n\n") if d.strip()][:200]
    for text in docs + ["café 😀\n\nend", " leading space"]:
        assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text


def test_truncated_checkpoint_is_a_one_line_error(tmp_path):
    bad = tmp_path / "cut.bin"
    bad.write_bytes(need(STORIES_BIN).read_bytes()[:50_000])
    with pytest.raises(CheckpointError, match="truncated"):
        export_llama2c(bad, STORIES_TOK, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["cut.bin"]  # no temp folder left behind


def test_existing_output_is_refused(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputError, match="already exists"):
        export_llama2c(need(STORIES_BIN), STORIES_TOK, tmp_path / "out")
