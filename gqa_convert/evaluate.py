"""Held-out language-model loss: the one number every stage of the project is judged by.

`document_loss` is the token-weighted mean next-token cross-entropy over whole documents, each
prefixed with BOS and truncated to `max_tokens`, batched with padding that carries no loss. The
logits are never held whole: the loss is taken from the final hidden states a chunk of tokens at a
time (train/loss.py), so a 128K-token document costs chunk x V logits, not 128K x V. The same
per-token losses give the loss by position (`by_position`): the mean over position buckets 0-1K,
1-2K, 2-4K, ... up to max_tokens, the standard picture of whether a model uses its long context.

Project convention for the TinyStories fixture (`text/tinystories_val_head.txt`):

- documents are its blank-line-separated blocks (`split_paragraphs`), in file order;
- held-out evaluation uses `documents[HELDOUT]`  = the first 200;
- training, uptraining and calibration use `documents[TRAINING]` = everything from 1000 on.

The two slices are disjoint, with a gap of 800 documents between them. stories260K scores about
1.38-1.44 on the held-out slice (fixtures README; measured value in docs/stories260k.md).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from .errors import DataError, SourceNotFoundError, UnsupportedModelError
from .train.data import split_text
from .train.loss import chunk_size, final_hidden, output_head, token_nll

HELDOUT = slice(0, 200)  # evaluation documents of the TinyStories fixture
TRAINING = slice(1000, None)  # training / uptraining / calibration documents


@dataclass(frozen=True)
class LossResult:
    """Mean next-token loss (nats per predicted token) over a set of documents."""

    mean_loss: float
    perplexity: float
    tokens: int  # predicted tokens (BOS is never predicted)
    documents: int
    # Mean loss per position bucket: ({"start", "end", "tokens", "mean_loss"}, ...), position = the
    # predicted token's index in its document (BOS is 0), start inclusive, end exclusive; empty buckets left out.
    by_position: tuple = ()

    def to_dict(self) -> dict:
        return asdict(self)


def split_paragraphs(path: Path) -> list[str]:
    """The documents of a text file whose documents are separated by blank lines."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read documents from {path}: {err}; give a UTF-8 text file") from None
    docs = split_text(text)  # the one splitter, shared with uptraining's data reader
    if not docs:
        raise DataError(f"{path} holds no documents; expected blank-line-separated paragraphs")
    return docs


def heldout_documents(path: Path) -> list[str]:
    """The project's held-out evaluation documents of a blank-line-separated text file."""
    return split_paragraphs(path)[HELDOUT]


def training_documents(path: Path) -> list[str]:
    """The project's training/uptraining/calibration documents (disjoint from the held-out ones)."""
    docs = split_paragraphs(path)[TRAINING]
    if not docs:
        raise DataError(f"{path} has no documents past #{TRAINING.start}; give a longer text file")
    return docs


def refuse_custom_code(folder: Path | str) -> None:
    """A folder whose config asks for its own modelling code (auto_map) is refused, never run."""
    from .architectures import read_config

    if "auto_map" in read_config(folder):
        raise UnsupportedModelError(
            f"{folder} carries custom modelling code (auto_map in config.json), which gqa-convert never runs; "
            "convert it with `gqa-convert convert` (the output is a stock transformers class) and use that folder"
        )


def load_model(folder: Path | str, dtype: Optional[torch.dtype] = None):
    """(model in eval mode, tokenizer) from a local Hugging Face folder; no remote code."""
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise SourceNotFoundError(
            f"{folder} is not a model folder (no config.json); give a converted or exported folder"
        )
    refuse_custom_code(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=False)
    return model.eval(), load_tokenizer(folder)


def load_tokenizer(folder: Path | str):
    """The folder's tokenizer (no remote code); a folder without a loadable one is a DataError of
    one line, not transformers' "Couldn't instantiate the backend tokenizer" ValueError."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError) as err:
        first = (str(err).splitlines() or [type(err).__name__])[0][:100]
        raise DataError(
            f"{folder} has no usable tokenizer ({first}); copy the source's tokenizer files "
            "(tokenizer.json, tokenizer_config.json) into it"
        ) from None


def encode_documents(tokenizer, documents: Sequence[str], max_tokens: int) -> list[list[int]]:
    """BOS + the document's tokens, cut to at most `max_tokens` ids in all."""
    bos = tokenizer.bos_token_id
    if bos is None:
        raise DataError("the tokenizer has no BOS token; document_loss prefixes every document with BOS")
    encoded = tokenizer(list(documents), add_special_tokens=False)["input_ids"]
    return [([bos] + ids)[:max_tokens] for ids in encoded]


def position_buckets(max_tokens: int) -> list[tuple[int, int]]:
    """[start, end) position buckets up to max_tokens: 0-1K, 1-2K, 2-4K, ... doubling, the last one
    ending at max_tokens. Below 8K tokens the first bucket shrinks (a power of two, max_tokens/8 or
    less) so that there are still at least four: 512 -> 0-64, 64-128, 128-256, 256-512."""
    first = 1024 if max_tokens >= 8192 else 2 ** max(0, math.floor(math.log2(max(1, max_tokens) / 8)))
    edges = [0, min(first, max_tokens)]
    while edges[-1] * 2 < max_tokens:
        edges.append(edges[-1] * 2)
    if edges[-1] < max_tokens:
        edges.append(max_tokens)
    return list(zip(edges, edges[1:]))


def loss_by_position(positions: torch.Tensor, nll: torch.Tensor, max_tokens: int) -> tuple[dict, ...]:
    """Mean of per-token losses `nll` in each of `position_buckets(max_tokens)`, by their `positions`."""
    out = []
    for start, end in position_buckets(max_tokens):
        sel = (positions >= start) & (positions < end)
        n = int(sel.sum())
        if n:
            out.append({"start": start, "end": end, "tokens": n, "mean_loss": nll[sel].double().sum().item() / n})
    return tuple(out)


def document_loss(
    model,
    tokenizer,
    documents: Sequence[str],
    *,
    max_tokens: int = 512,
    batch_size: int = 8,
    device: Optional[torch.device | str] = None,
    chunk_tokens: Optional[int] = None,
    progress: bool = False,
    desc: str = "scoring",
) -> LossResult:
    """Token-weighted mean next-token cross-entropy of `model` over `documents`.

    Args:
        model: a causal LM (`AutoModelForCausalLM`); put in eval mode here.
        tokenizer: its tokenizer; BOS is prepended explicitly, whatever its add_bos setting.
        documents: texts, one per document.
        max_tokens: ids per document including BOS (longer ones are truncated).
        batch_size: documents per forward pass (right-padded, padding masked out).
        device: where to run; default the model's device.
        chunk_tokens: tokens per chunk through the output head (default ~32M logits per chunk).
        progress: a progress bar over documents (stderr), labelled `desc`.

    Returns:
        LossResult with the mean loss over all predicted tokens, its perplexity and the loss by position.

    Raises:
        DataError: no documents, or none with a token to predict.
    """
    if not documents:
        raise DataError("no documents to evaluate; give at least one non-empty document")
    if max_tokens < 2 or batch_size < 1:
        raise DataError(f"max_tokens must be >= 2 and batch_size >= 1 (got {max_tokens}, {batch_size})")
    head = output_head(model)
    chunk_size(chunk_tokens, head.weight.shape[0])  # a bad chunk size fails before any work
    device = torch.device(device) if device is not None else next(model.parameters()).device
    seqs = sorted(encode_documents(tokenizer, documents, max_tokens), key=len, reverse=True)  # less padding
    model.eval()
    losses, positions = [], []
    from tqdm.auto import tqdm

    bar = tqdm(total=len(seqs), desc=desc, unit="doc", disable=not progress, dynamic_ncols=True)
    with torch.no_grad():
        for start in range(0, len(seqs), batch_size):
            batch = seqs[start : start + batch_size]
            width = len(batch[0])
            bar.update(len(batch))
            if width < 2:
                continue
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for row, seq in enumerate(batch):
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            ids, mask = ids.to(device), mask.to(device)
            # No padding in the batch (always so with batch_size 1): no mask, so attention runs
            # causal without a [T, T] mask tensor, which at 128K would be the largest thing in memory.
            padded = any(len(seq) < width for seq in batch)
            hidden = final_hidden(model, ids, attention_mask=mask if padded else None)
            # Right-padded: a row's targets are its first len-1 positions (slices are views, no copy).
            for row, seq in enumerate(batch):
                n = len(seq) - 1
                losses.append(token_nll(hidden[row, :n], head, ids[row, 1 : n + 1], chunk_tokens=chunk_tokens).cpu())
                positions.append(torch.arange(1, n + 1))  # the predicted token's index in its document
    bar.close()
    count = sum(len(x) for x in losses)
    if count == 0:
        raise DataError("the documents hold no token to predict; give longer documents")
    nll, pos = torch.cat(losses), torch.cat(positions)
    mean = nll.double().sum().item() / count
    return LossResult(
        mean_loss=mean,
        perplexity=math.exp(mean),
        tokens=count,
        documents=len(documents),
        by_position=loss_by_position(pos, nll, max_tokens),
    )


__all__ = [
    "HELDOUT",
    "TRAINING",
    "LossResult",
    "split_paragraphs",
    "heldout_documents",
    "training_documents",
    "load_model",
    "encode_documents",
    "document_loss",
    "position_buckets",
    "loss_by_position",
]
