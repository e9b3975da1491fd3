"""Models whose retrieval behaviour is known by construction, for the eval tests, and tests of them.

`OracleLM` is a Hugging Face causal LM (it has `generate`, so lm-eval's HFLM can drive it) that
reads its whole visible input as text, finds the answer with a rule (`passkey_answer`,
`niah_answer`), and emits the answer's tokens one per step, then EOS. It is an independent
oracle: it knows nothing of how gqa_convert.evals builds prompts or scores answers, only the
public wording of the needle and the question.

- `window=W` makes it see only the last W tokens: attention "broken" beyond W, so it finds a
  needle exactly when the needle lies wholly inside the last W tokens.
- `answer_fn=constant("…")` ignores its input: a model that cannot retrieve.

Also `byte_bpe_tokenizer()`: a byte-level BPE tokenizer trained here in a second on text that
covers the probes' wording, so prompt sizing is checked on a GPT-2-style tokenizer as well as
on stories260K's sentencepiece-style one.
"""

from __future__ import annotations

import re
from typing import Callable, Optional

import pytest
import torch
from transformers import GenerationMixin, LlamaConfig, PreTrainedModel, PreTrainedTokenizerFast
from transformers.modeling_outputs import CausalLMOutputWithPast

AnswerFn = Callable[[str], Optional[str]]

_PASSKEY = re.compile(r"The pass key is (\d+)\.")
_NIAH_QUERY = re.compile(r"special magic \w+ for (\S+) mentioned in the provided text")


def passkey_answer(text: str) -> Optional[str]:
    match = _PASSKEY.search(text)
    return match.group(1) if match else None


def niah_answer(text: str) -> Optional[str]:
    """RULER NIAH: the value stated for the key the question asks about."""
    queries = _NIAH_QUERY.findall(text)
    if not queries:
        return None
    needle = re.search(rf"special magic \w+ for {re.escape(queries[-1])} is: (\S+?)\.(?:\s|$)", text)
    return needle.group(1) if needle else None


def constant(answer: str) -> AnswerFn:
    return lambda text: answer


class OracleLM(PreTrainedModel, GenerationMixin):
    """A causal LM that answers by rule from its visible input (see the module docstring)."""

    config_class = LlamaConfig
    _supports_sdpa = True

    def __init__(self, config, tokenizer, answer_fn: AnswerFn, window: Optional[int] = None, fallback: str = "0"):
        super().__init__(config)
        self.tok = tokenizer
        self.answer_fn = answer_fn
        self.window = window
        self.fallback = fallback  # what it says when it cannot find the answer
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the model a device and a dtype
        self.calls = 0
        self._prompt: Optional[torch.Tensor] = None
        self._targets: list[list[int]] = []

    def _target(self, row: torch.Tensor, mask: Optional[torch.Tensor]) -> list[int]:
        ids = row[mask.bool()] if mask is not None else row
        if self.window is not None:
            ids = ids[-self.window :]
        text = self.tok.decode(ids.tolist(), skip_special_tokens=True)
        answer = self.answer_fn(text)
        answer = self.fallback if answer is None else answer
        anchor = self.tok(".", add_special_tokens=False)["input_ids"]
        ids = self.tok("." + " " + answer + ".", add_special_tokens=False)["input_ids"]
        assert ids[: len(anchor)] == anchor
        return ids[len(anchor) :] + [self.tok.eos_token_id]

    def _new_prompt(self, input_ids: torch.Tensor) -> bool:
        p = self._prompt
        return p is None or input_ids.shape[1] <= p.shape[1] or not torch.equal(input_ids[:, : p.shape[1]], p)

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        self.calls += 1
        if self._new_prompt(input_ids):
            self._prompt = input_ids.clone()
            masks = attention_mask if attention_mask is not None else [None] * len(input_ids)
            self._targets = [self._target(r, m) for r, m in zip(input_ids, masks)]
        step = input_ids.shape[1] - self._prompt.shape[1]
        logits = torch.zeros(input_ids.shape[0], 1, self.config.vocab_size)
        for i, target in enumerate(self._targets):
            logits[i, -1, target[step] if step < len(target) else self.tok.eos_token_id] = 1.0
        return CausalLMOutputWithPast(logits=logits.to(self.anchor.device))

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        # no KV cache: it reads the whole sequence at every step
        return {"input_ids": input_ids, "attention_mask": attention_mask}


def oracle(tokenizer, answer_fn: AnswerFn = passkey_answer, *, window=None, max_positions=4096) -> OracleLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=8,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=False,
    )
    model = OracleLM(config, tokenizer, answer_fn, window=window).eval()
    model.generation_config.use_cache = False
    return model


def _word_lists() -> list[str]:
    """wonderwords' word lists (RULER's common-words task draws from them), when installed:
    a tokenizer that knows them spends about as few tokens per word as a real one."""
    try:
        from importlib.resources import files

        assets = files("wonderwords") / "assets"
        return [" ".join((assets / f"{kind}list.txt").read_text().split()) for kind in ("noun", "adjective", "verb")]
    except (ImportError, OSError):
        return []


def byte_bpe_tokenizer(vocab_size: int = 2000, word_lists: bool = False) -> PreTrainedTokenizerFast:
    """A GPT-2-style tokenizer (byte-level BPE, space kept on the following word) with BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from gqa_convert.evals import passkey

    text = [passkey.INSTRUCTION, passkey.NEEDLE, passkey.QUESTION, *passkey.FILLER] * 50
    text += ["One of the special magic numbers for key is: 1234567. What is the special magic number?"] * 20
    text += [" ".join(str(i) for i in range(1000))]
    text += _word_lists() * 3 if word_lists else []
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


# ---------------------------------------------------------------- the oracles themselves


@pytest.fixture(scope="module")
def bpe():
    return byte_bpe_tokenizer()


def _prompt_ids(tok, text):
    return torch.tensor([tok(text)["input_ids"]])


def test_oracle_reads_the_passkey_and_stops(bpe):
    model = oracle(bpe)
    text = "Filler. The pass key is 40213. Remember it. More filler. What is the pass key? The pass key is"
    ids = _prompt_ids(bpe, text)
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    answer = bpe.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert answer.strip() == "40213."
    assert out[0, -1].item() == bpe.eos_token_id


def test_windowed_oracle_is_blind_beyond_its_window(bpe):
    text = "The pass key is 40213. Remember it." + " The grass is green." * 40 + " The pass key is"
    ids = _prompt_ids(bpe, text)
    near = oracle(bpe, window=ids.shape[1])  # sees everything
    far = oracle(bpe, window=ids.shape[1] // 2)  # the needle is in the first half

    def say(model) -> str:
        out = model.generate(ids, max_new_tokens=10, do_sample=False)
        return bpe.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()

    assert say(near) == "40213."
    assert say(far) == "0."


def test_niah_answer_picks_the_asked_key():
    text = (
        "One of the special magic numbers for red-cat is: 111.\nOne of the special magic numbers for "
        "blue-dog is: 222.\nWhat is the special magic number for blue-dog mentioned in the provided text? "
        "The special magic number for blue-dog mentioned in the provided text is"
    )
    assert niah_answer(text) == "222"
    assert niah_answer("no question here") is None
