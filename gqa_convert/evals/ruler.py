"""RULER (Hsieh et al., 2024) through lm-evaluation-harness, on a model that is already loaded.

    ruler_scores(model, tokenizer, lengths=[4096, 8192], tasks=OFFLINE_TASKS, limit=20)

wraps the loaded model in lm-eval's `HFLM` and runs lm-eval's own RULER task code, one length at
a time, so the samples, prompts and scores are lm-eval's (the same as its CLI with the same
seeds; tests/test_evals_ruler.py compares them).

What it changes around lm-eval, and why:

- **No remote code, no tokenizer download.** lm-eval's RULER tasks size their prompts with
  `AutoTokenizer.from_pretrained(name, trust_remote_code=True)`. While a run is in progress,
  that call is answered with our tokenizer, already loaded without remote code, for a name made
  up for the run; any other tokenizer load is refused (`_tokenizer_served`). The model wrapper
  (`HFLM`) is given the loaded model and tokenizer objects, so it loads nothing either.
- **No nltk download.** Importing lm-eval's NIAH generator calls `nltk.download("punkt_tab")`;
  the sentence splitter is used only for the essay haystacks, which need a download anyway and
  are left out here, so the call is made a no-op while that module is first imported.
- **One length per lm-eval run.** lm-eval builds 500 samples per length and `limit` keeps the
  first ones of the whole list, which would all be of the first length; running each length on
  its own gives every length its `limit` samples.
- **Checks before any work.** Unknown or left-out task names, lengths above the model's
  maximum, a missing extra, and lengths too short for a task's smallest sample (where lm-eval's
  samplers would loop forever or divide by zero) are each reported in one line.

Tasks that run offline (their haystacks are synthetic: repeated sentences, generated keys,
wonderwords word lists shipped in its wheel, random letters) are OFFLINE_TASKS; LEFT_OUT says
why each other RULER task is not offered.
"""

from __future__ import annotations

import contextlib
import copy
import io
import random
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

from ..errors import ConfigError
from .common import check_lengths, model_max_length

OFFLINE_TASKS = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_vt", "ruler_cwe", "ruler_fwe")

_ESSAYS = (
    "needs the Paul Graham essays data set (baber/paul_graham_essays, downloaded from the Hugging Face hub) "
    "and nltk's punkt_tab sentence splitter (downloaded)"
)
LEFT_OUT = {
    "niah_single_2": _ESSAYS,
    "niah_single_3": _ESSAYS,
    "niah_multikey_1": _ESSAYS,
    "niah_multiquery": _ESSAYS,
    "niah_multivalue": _ESSAYS,
    "ruler_qa_squad": "needs the SQuAD v2 data set (downloaded from the Hugging Face hub)",
    "ruler_qa_hotpot": "needs the HotpotQA data set (downloaded)",
    "ruler": "the group of all 13 tasks; 7 of them need downloads (see LEFT_OUT)",
}

# Tokens each task lets the model generate (its YAML's max_gen_toks / RULER's tokens_to_generate).
GEN_TOKENS = {
    "niah_single_1": 128,
    "niah_multikey_2": 128,
    "niah_multikey_3": 128,
    "ruler_vt": 30,
    "ruler_cwe": 120,
    "ruler_fwe": 50,
}
# lm-eval's frequent-words sampler sizes the text, not text + answer, to the length: its prompts
# run up to this many tokens past L, and must still fit in the model.
OVERSHOOT = {"ruler_fwe": 50}
# The variable-tracking task prepends an in-context example that lm-eval sizes to 500 tokens.
VT_EXAMPLE_LENGTH = 500
MAX_SAMPLES = 500  # lm-eval generates this many samples per task and length


class EvalExtraMissing(ConfigError):
    """lm-evaluation-harness (the `[eval]` extra) is not installed."""


@dataclass(frozen=True)
class RulerSample:
    task: str
    length: int
    doc_id: int
    doc_length: int  # lm-eval's size of the sample: prompt tokens + the task's generation budget
    targets: tuple[str, ...]
    response: str
    score: float  # RULER's string_match_all: the fraction of targets found in the response
    doc_hash: str  # lm-eval's hash of the sample: equal hashes = the same sample


@dataclass(frozen=True)
class RulerScore:
    task: str
    length: int
    score: float  # lm-eval's aggregated score in [0, 1]
    samples: int


@dataclass(frozen=True)
class RulerResult:
    tasks: tuple[str, ...]
    lengths: tuple[int, ...]
    limit: int
    seed: Optional[int]  # None: lm-eval's default seeds (those of its CLI)
    lm_eval_version: str
    scores: tuple[RulerScore, ...]
    samples: tuple[RulerSample, ...] = field(repr=False)

    def score(self, task: str, length: int) -> float:
        for s in self.scores:
            if s.task == task and s.length == length:
                return s.score
        raise KeyError(f"no score for {task} at length {length}")

    def by_length(self) -> dict[int, float]:
        """Mean over tasks at each length (RULER's headline number per length)."""
        return {L: sum(self.score(t, L) for t in self.tasks) / len(self.tasks) for L in self.lengths}

    def sample_hashes(self) -> tuple[str, ...]:
        return tuple(s.doc_hash for s in self.samples)

    def to_dict(self) -> dict:
        return {
            "tasks": list(self.tasks),
            "lengths": list(self.lengths),
            "limit": self.limit,
            "seed": self.seed,
            "lm_eval_version": self.lm_eval_version,
            "by_length": {str(k): v for k, v in self.by_length().items()},
            "scores": [asdict(s) for s in self.scores],
            "samples": [asdict(s) for s in self.samples],
        }


# ---------------------------------------------------------------- checks (no model work)


def check_tasks(tasks: Sequence[str]) -> tuple[str, ...]:
    if isinstance(tasks, str) or not tasks:
        raise ConfigError(f"give RULER tasks as a list, from: {', '.join(OFFLINE_TASKS)} (got {tasks!r})")
    out = []
    for name in tasks:
        if name in LEFT_OUT:
            raise ConfigError(
                f"RULER task {name!r} is not offered: it {LEFT_OUT[name]}; use {', '.join(OFFLINE_TASKS)}"
            )
        if name not in OFFLINE_TASKS:
            raise ConfigError(f"unknown RULER task {name!r}; known: {', '.join(OFFLINE_TASKS)}")
        out.append(name)
    return tuple(dict.fromkeys(out))


def check_limit(limit: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_SAMPLES:
        raise ConfigError(
            f"limit must be a whole number of samples from 1 to {MAX_SAMPLES} per task and length (got {limit!r})"
        )
    return limit


def require_lm_eval() -> str:
    """lm-eval's version, or a one-line EvalExtraMissing naming the install command."""
    try:
        from importlib.metadata import version

        import lm_eval  # noqa: F401
        import nltk  # noqa: F401  (lm-eval's RULER generators import both at module level)
        import wonderwords  # noqa: F401
    except ImportError as err:
        raise EvalExtraMissing(
            # err.name is None for an ImportError raised by hand (a broken install, an import hook)
            f"RULER needs lm-evaluation-harness with its RULER extras ({err.name or 'a module'} is missing): "
            "pip install 'gqa-convert[eval]'"
        ) from None
    return version("lm-eval")


@contextlib.contextmanager
def _preserved_random_state() -> Iterator[None]:
    """The preflight draws samples with lm-eval's generators, which use the global RNGs."""
    import numpy as np

    py, npy = random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)


def _count(tokenizer, text: str) -> int:
    return len(tokenizer(text)["input_ids"])


def _niah_minimum(task: str, tokenizer) -> int:
    """Tokens of the smallest NIAH sample lm-eval can build (one haystack unit per needle)."""
    from lm_eval.tasks.ruler import niah_utils, prepare_niah

    kinds = {
        "niah_single_1": ("repeat", "words", "numbers"),
        "niah_multikey_2": ("needle", "words", "numbers"),
        "niah_multikey_3": ("needle", "uuids", "uuids"),
    }[task]
    text, answer, _ = prepare_niah.generate_input_output(
        1,
        prepare_niah.get_haystack(type_haystack=kinds[0]),
        type_haystack=kinds[0],
        num_needle_k=1,
        type_needle_k=kinds[1],
        num_needle_v=1,
        type_needle_v=kinds[2],
        template=niah_utils.TEMPLATE,
    )
    return _count(tokenizer, text + " ".join(answer)) + GEN_TOKENS[task]


def _vt_minimum(tokenizer) -> int:
    """Tokens of lm-eval's smallest variable-tracking sample with its in-context example.

    lm-eval retries a sample that does not fit by removing noise, forever once there is none
    left, so a length below this would hang; the example itself must fit its fixed 500 tokens.
    """
    from lm_eval.tasks.ruler import vt_utils

    example, answer = vt_utils.generate_input_output(5, 1, 4, is_icl=True)  # its smallest example
    example_tokens = _count(tokenizer, example + f" {answer}") + GEN_TOKENS["ruler_vt"]
    if example_tokens > VT_EXAMPLE_LENGTH:
        raise ConfigError(
            f"ruler_vt cannot run with this tokenizer: lm-eval's smallest in-context example takes "
            f"{example_tokens} tokens but must fit in {VT_EXAMPLE_LENGTH} (it would loop forever); leave ruler_vt out"
        )
    # lm-eval grows the example to nearly 500 tokens, then sizes the sample beside it
    text, answer = vt_utils.generate_input_output(10, 1, 4, is_icl=False)
    return VT_EXAMPLE_LENGTH + _count(tokenizer, text + f" {answer}") + GEN_TOKENS["ruler_vt"]


def _cwe_minimum(tokenizer, length: int) -> int:
    """Tokens of lm-eval's smallest common-words sample (10 words) at this length's settings;
    below it lm-eval builds samples with no answer words and divides by zero."""
    from lm_eval.tasks.ruler import cwe_utils

    example, text, answer = cwe_utils.generate_input_output(10, length)
    listed = " ".join(f"{i + 1}. {w}" for i, w in enumerate(answer))
    return _count(tokenizer, example + "\n" + text + " " + listed) + GEN_TOKENS["ruler_cwe"]


# lm-eval's frequent-words task answers with the 3 most frequent of L // 50 coded words, the
# most frequent of which is noise: below 4 x 50 tokens there are not enough words.
FWE_MIN_LENGTH = 4 * 50


def _minimum(task: str, tokenizer, length: int) -> int:
    if task.startswith("niah_"):
        return _niah_minimum(task, tokenizer)
    if task == "ruler_vt":
        return _vt_minimum(tokenizer)
    if task == "ruler_cwe":
        return _cwe_minimum(tokenizer, length)
    return FWE_MIN_LENGTH


def check_task_lengths(tasks: Sequence[str], lengths: Sequence[int], tokenizer, maximum: Optional[int]) -> None:
    """Each (task, length) can hold the task's smallest sample and fits the model; else one line."""
    _import_niah_generator()
    with _preserved_random_state():
        for task in tasks:
            for L in lengths:
                over = OVERSHOOT.get(task, 0)
                if maximum is not None and L + over > maximum:
                    raise ConfigError(
                        f"{task} at length {L}: lm-eval's prompts for it run up to {over} tokens past the length, "
                        f"beyond the model's maximum of {maximum}; use lengths up to {maximum - over} for {task}"
                    )
                need = _minimum(task, tokenizer, L)
                if need > L:
                    raise ConfigError(
                        f"length {L} is too short for {task} with this tokenizer: its smallest sample needs "
                        f"{need} tokens; use lengths of at least {need} for {task}"
                    )


# ---------------------------------------------------------------- lm-eval, patched for the run


def _import_niah_generator() -> None:
    """Import lm-eval's NIAH generator with nltk.download made a no-op (see module docstring)."""
    import sys

    if "lm_eval.tasks.ruler.prepare_niah" in sys.modules:
        return
    import nltk

    real = nltk.download
    nltk.download = lambda *args, **kwargs: False
    try:
        # lm-eval prints "Downloaded punkt_tab" whatever download returned: not true here
        with contextlib.redirect_stdout(io.StringIO()):
            import lm_eval.tasks.ruler.prepare_niah  # noqa: F401
    finally:
        nltk.download = real


_LOADER = "from_pretrained"  # the AutoTokenizer class method lm-eval's RULER tasks call


@contextlib.contextmanager
def _tokenizer_served(tokenizer) -> Iterator[str]:
    """While active, `AutoTokenizer.from_pretrained(NAME)` returns `tokenizer`, and any other
    tokenizer load is refused; yields NAME.

    lm-eval's RULER tasks call `AutoTokenizer.from_pretrained(name, trust_remote_code=True)`
    with the name given in the task metadata. Serving that call here, rather than replacing
    lm-eval's `get_tokenizer`, holds whatever lm-eval does with its task modules (0.4.13 re-runs
    common_utils.py from its YAML loader, which would undo a patch of the function). The name is
    new for every run because lm-eval caches tokenizers by name.
    """
    from transformers import AutoTokenizer

    name = f"gqa-convert/loaded-tokenizer-{uuid.uuid4().hex}"
    own = AutoTokenizer.__dict__.get(_LOADER)

    def serve(cls, pretrained_model_name_or_path, *args, **kwargs):
        if str(pretrained_model_name_or_path) == name:
            return tokenizer
        raise ConfigError(
            f"lm-eval asked for tokenizer {pretrained_model_name_or_path!r} during a RULER run; refused: "
            "nothing is downloaded and no repository code is run"
        )

    setattr(AutoTokenizer, _LOADER, classmethod(serve))
    try:
        yield name
    finally:
        if own is not None:
            setattr(AutoTokenizer, _LOADER, own)
        else:
            delattr(AutoTokenizer, _LOADER)


def _ruler_dir() -> Path:
    from lm_eval.tasks.ruler import common_utils

    return Path(common_utils.__file__).parent


def _seeds(seed: Optional[int]) -> dict:
    """lm-eval's CLI defaults for None, else every generator seeded with `seed` (CLI --seed N)."""
    if seed is None:
        return {}
    return dict(random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)


def _evaluate_length(
    lm, tasks: Sequence[str], length: int, limit: int, seed: Optional[int], tokenizer_name: str
) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    # Only the RULER folder is indexed: indexing all of lm-eval's tasks takes ~15 s per length.
    manager = TaskManager(
        include_path=str(_ruler_dir()),
        include_defaults=False,
        metadata={"max_seq_lengths": [length], "tokenizer": tokenizer_name},
    )
    return simple_evaluate(
        model=lm,
        tasks=list(tasks),
        task_manager=manager,
        limit=limit,
        log_samples=True,
        bootstrap_iters=0,
        **_seeds(seed),
    )


def _response(sample: dict) -> str:
    resp = sample.get("filtered_resps", sample.get("resps"))
    while isinstance(resp, (list, tuple)):
        resp = resp[0] if resp else ""
    return str(resp)


def _collect(results: dict, tasks: Sequence[str], length: int) -> tuple[list[RulerScore], list[RulerSample]]:
    scores, samples = [], []
    key = str(length)
    for task in tasks:
        logged = results["samples"][task]
        value = results["results"][task][f"{key},none"]
        scores.append(RulerScore(task=task, length=length, score=float(value), samples=len(logged)))
        for s in logged:
            doc = s["doc"]
            samples.append(
                RulerSample(
                    task=task,
                    length=length,
                    doc_id=int(s["doc_id"]),
                    doc_length=int(doc["length"]),
                    targets=tuple(doc["outputs"]),
                    response=_response(s),
                    score=float(s[key]),
                    doc_hash=str(s.get("doc_hash", "")),
                )
            )
    return scores, samples


def _hflm(model, tokenizer, batch_size: int, maximum: Optional[int]):
    from lm_eval.models.huggingface import HFLM

    # HFLM may give the tokenizer a pad token; a copy keeps the caller's tokenizer as it was.
    kwargs = {"max_length": maximum} if maximum is not None else {}
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **kwargs)


def ruler_scores(
    model,
    tokenizer,
    lengths: Sequence[int],
    tasks: Sequence[str] = OFFLINE_TASKS,
    limit: int = 20,
    *,
    batch_size: int = 1,
    seed: Optional[int] = None,
    max_length: Optional[int] = None,
    on_length: Optional[Callable[[int], None]] = None,
) -> RulerResult:
    """RULER scores of a loaded model by task x length, through lm-evaluation-harness.

    Args:
        model: a loaded Hugging Face causal LM (on its device; lm-eval runs it as it is).
        tokenizer: its tokenizer, used both to size the samples and by the model wrapper.
        lengths: RULER lengths L in tokens (prompt + generation budget), each <= the model's
            maximum.
        tasks: from OFFLINE_TASKS.
        limit: samples per task and length (the first `limit` of lm-eval's 500).
        batch_size: lm-eval's generation batch size.
        seed: None for lm-eval's default seeds (as its CLI), else all its seeds set to this
            (CLI `--seed N`). The samples depend only on the seeds and the tokenizer, so a
            source and its conversion are scored on the same samples
            (`RulerResult.sample_hashes()` are equal).
        max_length: the model's maximum when its config does not say.
        on_length: called with each length before it runs (for a progress display).

    Raises:
        EvalExtraMissing: lm-eval, nltk or wonderwords not installed.
        ConfigError: unknown/left-out tasks, a bad limit, a length above the model's maximum or
            too short for a task — all before the model runs.
    """
    tasks = check_tasks(tasks)
    limit = check_limit(limit)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch size must be a whole number >= 1 (got {batch_size!r})")
    maximum = model_max_length(model, max_length)
    lengths = check_lengths(lengths, maximum)
    version = require_lm_eval()
    tokenizer = copy.deepcopy(tokenizer)
    check_task_lengths(tasks, lengths, tokenizer, maximum)
    scores: list[RulerScore] = []
    samples: list[RulerSample] = []
    with _tokenizer_served(tokenizer) as name:
        lm = _hflm(model, tokenizer, batch_size, maximum)
        for L in lengths:
            if on_length is not None:
                on_length(L)
            s, d = _collect(_evaluate_length(lm, tasks, L, limit, seed, name), tasks, L)
            scores += s
            samples += d
    return RulerResult(
        tasks=tasks,
        lengths=lengths,
        limit=limit,
        seed=seed,
        lm_eval_version=version,
        scores=tuple(scores),
        samples=tuple(samples),
    )
