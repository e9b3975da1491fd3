"""Passkey retrieval: a number hidden at a chosen depth in filler text, the model asked to repeat it.

The probe of Mohtashami & Jaggi (2023, "Landmark Attention"), used by LongLoRA, YaRN and most
long-context work since; it needs no data set and no extra package, so every user gets a
retrieval figure. Each prompt reads

    [special prefix] INSTRUCTION  filler ... NEEDLE filler ...  QUESTION
    NEEDLE   = " The pass key is 71432. Remember it. 71432 is the pass key."
    QUESTION = " What is the pass key? The pass key is"

and the model continues greedily; a sample is correct when the first number in its answer is
the passkey.

Lengths are in tokens of the model's own tokenizer and follow RULER's convention: a length L is
the prompt plus the tokens allowed for the answer, so L can be the model's maximum. Prompts are
built as ids, piece by piece (each piece tokenised as it reads mid-text, `encode_piece`), and
the filler is cut to the token, so every prompt has exactly `L - answer_budget(digits)` ids.
For tokenizers that split at whitespace (byte-level BPE, sentencepiece, tiktoken-style) the
ids are what the tokenizer gives for the prompt's text, except when the filler's last word is
cut mid-word (then the text re-tokenises to within a token or two); docs/eval.md has the checks.

Depth d places the needle at the sentence boundary of the filler nearest to d x (filler tokens):
0 = right after the instruction, 1 = right before the question. The depth actually used and the
needle's token position are kept with every sample.

Determinism: sample i of cell (L, d) draws its passkey from `random.Random(f"{seed}:{L}:{d}:{i}")`,
so a cell's samples do not depend on which other cells were asked for, and the prompts depend
only on the tokenizer and these settings: a source model and its conversion (same tokenizer)
are scored on identical prompts, and `PasskeyResult.prompts_sha256` proves it.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import torch

from ..errors import ConfigError
from .common import batches, check_lengths, encode_piece, greedy_generate, model_max_length, special_prefix

INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about the important information there."
)
FILLER = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"

DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_SAMPLES = 5
DEFAULT_DIGITS = 5
_NUMBER = re.compile(r"\d+")


def answer_budget(digits: int) -> int:
    """Tokens generated per answer: a leading space, the digits, a full stop and one spare.

    No tokenizer we know spends more than one token per digit, so the passkey always fits;
    the budget is a fixed function of `digits` so that every prompt of a length has one size.
    """
    return digits + 3


@dataclass(frozen=True)
class PasskeyPrompt:
    """One probe input: its ids and where the needle sits in them."""

    length: int  # requested length L (prompt + answer budget)
    depth: float  # requested depth in [0, 1]
    index: int  # sample number within the (length, depth) cell
    passkey: str
    input_ids: tuple[int, ...]
    needle_start: int  # token index of the needle's first id in input_ids
    needle_tokens: int
    filler_tokens: int
    actual_depth: float  # filler tokens before the needle / all filler tokens


@dataclass(frozen=True)
class PasskeySample:
    """A scored prompt: its metadata (not its ids) and what the model answered."""

    length: int
    depth: float
    index: int
    passkey: str
    prompt_tokens: int
    needle_start: int
    actual_depth: float
    answer: str
    correct: bool


@dataclass(frozen=True)
class PasskeyCell:
    length: int
    depth: float
    accuracy: float
    samples: int


@dataclass(frozen=True)
class PasskeyResult:
    """Accuracy by length x depth, and every sample behind it."""

    lengths: tuple[int, ...]
    depths: tuple[float, ...]
    samples_per_cell: int
    seed: int
    digits: int
    prompts_sha256: str  # equal for two results <=> they were scored on identical prompts
    samples: tuple[PasskeySample, ...] = field(repr=False)

    def accuracy(self, length: int, depth: float) -> float:
        hits = [s.correct for s in self.samples if s.length == length and s.depth == depth]
        if not hits:
            raise KeyError(f"no samples at length {length}, depth {depth}")
        return sum(hits) / len(hits)

    @property
    def cells(self) -> tuple[PasskeyCell, ...]:
        return tuple(
            PasskeyCell(L, d, self.accuracy(L, d), self.samples_per_cell) for L in self.lengths for d in self.depths
        )

    def grid(self) -> list[list[float]]:
        """Accuracy rows by length (ascending), columns by depth (as given)."""
        return [[self.accuracy(L, d) for d in self.depths] for L in self.lengths]

    def by_length(self) -> dict[int, float]:
        return {L: sum(self.accuracy(L, d) for d in self.depths) / len(self.depths) for L in self.lengths}

    @property
    def overall(self) -> float:
        return sum(s.correct for s in self.samples) / len(self.samples)

    def to_dict(self) -> dict:
        return {
            "lengths": list(self.lengths),
            "depths": list(self.depths),
            "samples_per_cell": self.samples_per_cell,
            "seed": self.seed,
            "digits": self.digits,
            "prompts_sha256": self.prompts_sha256,
            "overall": self.overall,
            "by_length": {str(k): v for k, v in self.by_length().items()},
            "cells": [asdict(c) for c in self.cells],
            "samples": [asdict(s) for s in self.samples],
        }


def check_depths(depths: Sequence[float]) -> tuple[float, ...]:
    if isinstance(depths, (int, float, str)) or not depths:
        raise ConfigError(f"give at least one depth as a list of fractions in [0, 1] (got {depths!r})")
    out = []
    for d in depths:
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= float(d) <= 1.0:
            raise ConfigError(f"every depth must be a fraction in [0, 1], 0 = start, 1 = end (got {d!r})")
        out.append(float(d))
    return tuple(dict.fromkeys(out))  # as given, duplicates dropped


def _check_counts(samples: int, digits: int, batch_size: int = 1) -> None:
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ConfigError(f"samples per cell must be a whole number >= 1 (got {samples!r})")
    if isinstance(digits, bool) or not isinstance(digits, int) or not 1 <= digits <= 20:
        raise ConfigError(f"passkey digits must be a whole number from 1 to 20 (got {digits!r})")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch size must be a whole number >= 1 (got {batch_size!r})")


class _Pieces:
    """The tokenizer's ids for the fixed parts of the prompt, computed once per build."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.head = special_prefix(tokenizer) + list(tokenizer(INSTRUCTION, add_special_tokens=False)["input_ids"])
        self.question = encode_piece(tokenizer, QUESTION)
        # Filler as (ids of " word", starts a sentence?) pairs: cutting at word ids keeps the
        # prompt's ids equal to the tokenisation of its text except for a cut last word.
        self.words = [
            (encode_piece(tokenizer, " " + word), i == 0)
            for sentence in FILLER
            for i, word in enumerate(sentence.split())
        ]
        if any(not ids for ids, _ in self.words):
            raise ConfigError("the tokenizer encodes a filler word to no ids; it cannot size a passkey prompt")

    def needle(self, key: str) -> list[int]:
        return encode_piece(self.tokenizer, NEEDLE.format(key=key))

    def filler(self, n_tokens: int) -> tuple[list[int], list[int]]:
        """Exactly n_tokens filler ids, and the positions where a sentence starts in them."""
        ids: list[int] = []
        starts: list[int] = []
        k = 0
        while len(ids) < n_tokens:
            word, first = self.words[k % len(self.words)]
            if first:
                starts.append(len(ids))
            ids.extend(word[: n_tokens - len(ids)])  # the last word may be cut to hit n exactly
            k += 1
        return ids, starts

    def fixed_tokens(self, key: str) -> int:
        return len(self.head) + len(self.needle(key)) + len(self.question)


def _passkey(seed: int, length: int, depth: float, index: int, digits: int) -> str:
    rng = random.Random(f"{seed}:{length}:{depth!r}:{index}")  # str seeds hash the same in every run
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def _insertion_point(starts: list[int], n_filler: int, depth: float) -> int:
    """The sentence boundary (or the filler's end) nearest to depth x n_filler; ties go earlier."""
    candidates = sorted(set(starts + [0, n_filler]))
    target = depth * n_filler
    return min(candidates, key=lambda pos: (abs(pos - target), pos))


def _build_one(pieces: _Pieces, length: int, depth: float, index: int, seed: int, digits: int) -> PasskeyPrompt:
    key = _passkey(seed, length, depth, index, digits)
    needle = pieces.needle(key)
    n_filler = length - answer_budget(digits) - pieces.fixed_tokens(key)
    filler, starts = pieces.filler(n_filler)
    cut = _insertion_point(starts, n_filler, depth)
    ids = pieces.head + filler[:cut] + needle + filler[cut:] + pieces.question
    return PasskeyPrompt(
        length=length,
        depth=depth,
        index=index,
        passkey=key,
        input_ids=tuple(ids),
        needle_start=len(pieces.head) + cut,
        needle_tokens=len(needle),
        filler_tokens=n_filler,
        actual_depth=cut / n_filler if n_filler else 0.0,
    )


def minimum_length(tokenizer, digits: int = DEFAULT_DIGITS) -> int:
    """The shortest length whose prompts hold the instruction, needle, question, answer and one
    filler token, for this tokenizer (the longest passkey spelling is taken: all nines)."""
    pieces = _Pieces(tokenizer)
    return pieces.fixed_tokens("9" * digits) + answer_budget(digits) + 1


def build_passkey_prompts(
    tokenizer,
    lengths: Sequence[int],
    depths: Sequence[float] = DEFAULT_DEPTHS,
    *,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    digits: int = DEFAULT_DIGITS,
) -> list[PasskeyPrompt]:
    """Every prompt of the probe, in (length, depth, index) order; see the module docstring.

    Raises:
        ConfigError: a length too short for the prompt's fixed parts, bad depths or counts.
    """
    _check_counts(samples, digits)
    lengths = check_lengths(lengths, None)
    depths = check_depths(depths)
    pieces = _Pieces(tokenizer)
    prompts = []
    for L in lengths:
        for d in depths:
            for i in range(samples):
                key = _passkey(seed, L, d, i, digits)
                if L - answer_budget(digits) - pieces.fixed_tokens(key) < 1:
                    raise ConfigError(
                        f"length {L} is too short for the passkey prompt with this tokenizer: "
                        f"it needs at least {minimum_length(tokenizer, digits)} tokens"
                    )
                prompts.append(_build_one(pieces, L, d, i, seed, digits))
    return prompts


def prompts_digest(prompts: Sequence[PasskeyPrompt]) -> str:
    h = hashlib.sha256()
    for p in prompts:
        h.update(f"{p.length}:{p.depth!r}:{p.index}:{p.passkey}:".encode())
        h.update(torch.tensor(p.input_ids, dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


def score_answer(answer: str, passkey: str) -> bool:
    """Correct when the first number in the answer is the passkey (a model that lists many
    numbers gets no credit for one of them being right)."""
    match = _NUMBER.search(answer)
    return match is not None and match.group(0) == passkey


def _group_by_length(prompts: Sequence[PasskeyPrompt]) -> dict[int, list[PasskeyPrompt]]:
    groups: dict[int, list[PasskeyPrompt]] = {}
    for p in prompts:
        groups.setdefault(len(p.input_ids), []).append(p)
    return groups


def _score_batch(model, tokenizer, batch: Sequence[PasskeyPrompt], new_tokens: int) -> list[PasskeySample]:
    ids = torch.tensor([p.input_ids for p in batch], dtype=torch.long)
    out = greedy_generate(model, ids, new_tokens)
    samples = []
    for p, row in zip(batch, out.tolist()):
        answer = tokenizer.decode(row, skip_special_tokens=True)
        samples.append(
            PasskeySample(
                length=p.length,
                depth=p.depth,
                index=p.index,
                passkey=p.passkey,
                prompt_tokens=len(p.input_ids),
                needle_start=p.needle_start,
                actual_depth=p.actual_depth,
                answer=answer,
                correct=score_answer(answer, p.passkey),
            )
        )
    return samples


def passkey_probe(
    model,
    tokenizer,
    lengths: Sequence[int],
    depths: Sequence[float] = DEFAULT_DEPTHS,
    *,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    digits: int = DEFAULT_DIGITS,
    batch_size: int = 4,
    max_length: Optional[int] = None,
    prompts: Optional[Sequence[PasskeyPrompt]] = None,
    progress: bool = False,
) -> PasskeyResult:
    """Passkey retrieval accuracy of `model` by length x depth (greedy decoding).

    Args:
        model: a causal LM already on its device (a Hugging Face model, or any module mapping
            `input_ids` to an object with `.logits`).
        tokenizer: its tokenizer; lengths are counted in its tokens.
        lengths: token counts L (prompt + answer budget), each <= the model's maximum.
        depths: needle depths in [0, 1].
        samples: prompts per (length, depth) cell.
        seed: fixes the passkeys (hence the prompts).
        digits: passkey digits.
        batch_size: prompts per forward pass (all prompts of a length have one size: no padding).
        max_length: the model's maximum, if its config does not say (or to allow more).
        prompts: prompts from `build_passkey_prompts`, to score a second model on the very same
            inputs; built from the other arguments when omitted.
        progress: show a progress bar (stderr).

    Raises:
        ConfigError: a length above the model's maximum or too short, bad depths or counts —
            before the model runs.
    """
    _check_counts(samples, digits, batch_size)
    lengths = check_lengths(lengths, model_max_length(model, max_length))
    depths = check_depths(depths)
    if prompts is None:
        prompts = build_passkey_prompts(tokenizer, lengths, depths, samples=samples, seed=seed, digits=digits)
    else:
        _check_given_prompts(prompts, lengths, depths, samples, seed, digits)
    model.eval()
    scored: dict[tuple[int, float, int], PasskeySample] = {}
    from tqdm.auto import tqdm

    with tqdm(total=len(prompts), desc="passkey", unit="prompt", disable=not progress) as bar:
        for group in _group_by_length(prompts).values():
            for batch in batches(group, batch_size):
                for s in _score_batch(model, tokenizer, batch, answer_budget(digits)):
                    scored[(s.length, s.depth, s.index)] = s
                bar.update(len(batch))
    ordered = tuple(scored[(p.length, p.depth, p.index)] for p in prompts)
    return PasskeyResult(
        lengths=lengths,
        depths=depths,
        samples_per_cell=samples,
        seed=seed,
        digits=digits,
        prompts_sha256=prompts_digest(prompts),
        samples=ordered,
    )


def _check_given_prompts(prompts, lengths, depths, samples, seed, digits) -> None:
    """Prompts passed in must be the ones these settings build (the result records them)."""
    cells = {(p.length, p.depth) for p in prompts}
    wanted = {(L, d) for L in lengths for d in depths}
    same = cells == wanted and len(prompts) == len(wanted) * samples
    same = same and all(
        p.passkey == _passkey(seed, p.length, p.depth, p.index, digits)
        and len(p.input_ids) == p.length - answer_budget(digits)
        for p in prompts
    )
    if not same:
        raise ConfigError(
            "the prompts given were built with other lengths, depths, samples, seed or digits; "
            "build them with the same settings as the probe"
        )
