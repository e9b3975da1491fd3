"""Pieces shared by the retrieval evals: input checks, mid-text tokenisation, greedy decoding.

Every check here runs before a model is touched, so a bad request costs one line and no compute.
"""

from __future__ import annotations

import inspect
from typing import Iterable, Optional, Sequence

import torch

from ..errors import ConfigError

# Text placed before a piece so that the piece is tokenised as it is in the middle of a document
# (no dummy-prefix space of sentencepiece, no start-of-text merge rules). A full stop is its own
# token in every tokenizer we know, and it never merges with a following space-led word.
_ANCHOR = "."


def model_max_length(model, override: Optional[int] = None) -> Optional[int]:
    """The longest sequence the model was built for: `override`, else its config's window."""
    if override is not None:
        return int(override)
    config = getattr(model, "config", None)
    text_config = getattr(config, "text_config", None)  # multimodal wrappers keep it one level down
    for cfg in (text_config, config):
        for name in ("max_position_embeddings", "n_positions", "max_seq_len", "n_ctx"):
            value = getattr(cfg, name, None) if cfg is not None else None
            if isinstance(value, int) and value > 0:
                return value
    return None


def check_lengths(lengths: Sequence[int], maximum: Optional[int], what: str = "length") -> tuple[int, ...]:
    """Sorted unique positive ints, none above `maximum`; else a one-line ConfigError."""
    if isinstance(lengths, (int, str)) or not lengths:
        raise ConfigError(f"give at least one {what} as a list of token counts, e.g. [256, 512] (got {lengths!r})")
    out = []
    for value in lengths:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"every {what} must be a positive whole number of tokens (got {value!r})")
        out.append(value)
    too_long = [v for v in out if maximum is not None and v > maximum]
    if too_long:
        raise ConfigError(
            f"{what} {max(too_long)} is above the model's maximum of {maximum} tokens "
            f"(config max_position_embeddings); use lengths up to {maximum}"
        )
    return tuple(sorted(set(out)))


def encode_piece(tokenizer, text: str) -> list[int]:
    """Ids of `text` as it reads in the middle of a document (no special tokens).

    Tokenising a piece on its own would add sentencepiece's dummy space or byte-level BPE's
    start-of-text form; tokenising it after an anchor and cutting the anchor's ids off gives the
    ids the piece has inside a longer text. When the anchor's ids are not a prefix (a tokenizer
    that merges across it), the piece's own ids are the fallback.
    """
    anchor = tokenizer(_ANCHOR, add_special_tokens=False)["input_ids"]
    joined = tokenizer(_ANCHOR + text, add_special_tokens=False)["input_ids"]
    if joined[: len(anchor)] == anchor:
        return list(joined[len(anchor) :])
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def special_prefix(tokenizer, sample: str = "Hello") -> list[int]:
    """The special ids the tokenizer puts before text on its own (BOS for Llama, none for Qwen).

    The prompt starts the way the model saw documents in training; a trailing special token (an
    EOS some tokenizers append) is not kept, since it would sit in the middle of the prompt.
    """
    plain = tokenizer(sample, add_special_tokens=False)["input_ids"]
    full = tokenizer(sample, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start])
    return []


def model_device(model) -> torch.device:
    """Where the model's weights are (CPU for a module without parameters)."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _forward_params(model) -> set[str]:
    """Keyword arguments `model.forward` names explicitly (the cache and logit-trimming ones)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return set()
    return {name for name, p in params.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}


def _cache_name(names: set[str]) -> Optional[str]:
    """The forward argument that takes the KV cache: `cache` (transformers >= 5.2x renamed it)
    or `past_key_values` (earlier); None for a model without one."""
    if "use_cache" not in names:
        return None
    return next((n for n in ("cache", "past_key_values") if n in names), None)


@torch.no_grad()
def greedy_generate(model, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy continuation (B, max_new_tokens) of equal-length prompts (B, T); no padding.

    Prompts of one length need no attention mask, so any causal LM that maps ids to logits
    works. A Hugging Face model is asked for its KV cache and for the last position's logits
    only (`logits_to_keep=1`): at 32K tokens and a 128K vocabulary the full logits would be
    16 GB per prompt. A model without a cache is re-run on the whole sequence each step.
    """
    names = _forward_params(model)
    cache_arg = _cache_name(names)
    extra = {"logits_to_keep": 1} if "logits_to_keep" in names else {}
    if cache_arg is not None:
        extra["use_cache"] = True
    ids = input_ids.to(model_device(model))
    out = model(input_ids=ids, **extra)
    generated = []
    for step in range(max_new_tokens):
        token = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)
        generated.append(token)
        if step == max_new_tokens - 1:
            break
        cache = _returned_cache(out) if cache_arg is not None else None
        if cache_arg is not None and cache is not None:
            out = model(input_ids=token, **{**extra, cache_arg: cache})
        else:
            ids = torch.cat([ids, token], dim=1)
            out = model(input_ids=ids, **extra)
    return torch.cat(generated, dim=1).cpu()


def _returned_cache(out):
    for name in ("cache", "past_key_values"):
        value = getattr(out, name, None)
        if value is not None:
            return value
    return None


def batches(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
