"""Training documents: read them, hold some out, tokenise them, and pack them into rows.

Sources: a local .txt (blank-line separated blocks, or `<|endoftext|>`-separated), .jsonl (one
JSON object per line, text in `text_field`), .parquet (a `text_field` column), a folder of those
(sorted, recursive), or a Hugging Face dataset name (streamed through `datasets`).

Documents are numbered in the order of the source (document id = that index, held-out ones
included). The first `heldout` documents are the held-out slice; training starts at `train_start`
(default: right after the held-out slice) and cycles when it runs out. `RowStream` reads the training
documents in that order, or shuffled (`shuffle_buffer` > 0): through a seeded shuffle buffer, with a
new seed each epoch (`shuffled`). Either way the stream is a deterministic function of the data and
the seed, so a run is resumed by replaying it up to the saved row count.

Packing (`pack_rows`): each document is tokenised with the model's tokenizer (BOS if the tokenizer
adds one), EOS appended, and laid end to end into rows of exactly `context` tokens; no padding. The
position ids restart at 0 at every document start and at every row start, which is what confines
attention to a document (see `collate`).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, TypeVar

import torch

from ..errors import DataError

EXTENSIONS = (".txt", ".jsonl", ".parquet")
EOT = "<|endoftext|>"
IGNORE = -100  # label value skipped by the loss
T = TypeVar("T")


def split_text(text: str) -> list[str]:
    """Documents of a text file: `<|endoftext|>`-separated if that marker occurs, else blank-line blocks."""
    if EOT in text:
        parts = text.split(EOT)
    else:
        parts = re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n"))
    return [p.strip() for p in parts if p.strip()]


def local_files(path: Path) -> list[Path]:
    """The data files under `path` (itself if a file), sorted; a DataError if none or unreadable."""
    if not path.exists():
        raise DataError(
            f"data path {path} does not exist; give a .txt/.jsonl/.parquet file, a folder of them, or a dataset name"
        )
    if path.is_file():
        if path.suffix not in EXTENSIONS:
            raise DataError(f"data file {path} has an unsupported extension; use one of {', '.join(EXTENSIONS)}")
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in EXTENSIONS)
        if not files:
            raise DataError(f"data folder {path} holds no {'/'.join(EXTENSIONS)} files")
    for f in files:
        try:
            with open(f, "rb") as fh:
                fh.read(1)
        except OSError as err:
            raise DataError(f"data file {f} cannot be read ({err.strerror})") from err
    return files


def _file_documents(path: Path, text_field: str) -> Iterator[str]:
    if path.suffix == ".txt":
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"data file {path} cannot be read as UTF-8 text ({err})") from err
        yield from split_text(text)
    elif path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)[text_field]
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise DataError(
                        f"{path} line {n}: expected a JSON object with a {text_field!r} string field"
                    ) from err
                if isinstance(text, str) and text.strip():
                    yield text
    else:  # .parquet
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as err:  # pyarrow raises several types for corrupt files
            raise DataError(f"data file {path} is not a readable Parquet file ({err})") from err
        if text_field not in pf.schema_arrow.names:
            raise DataError(
                f"{path} has no {text_field!r} column (columns: {', '.join(pf.schema_arrow.names)}); set --text-field"
            )
        for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
            for text in batch.column(0).to_pylist():
                if isinstance(text, str) and text.strip():
                    yield text


def _hub_documents(name: str, text_field: str, split: str, config_name: Optional[str]) -> Iterator[str]:
    import datasets

    try:
        ds = datasets.load_dataset(name, config_name, split=split, streaming=True)
    except Exception as err:  # datasets raises many types (not found, offline, bad config)
        raise DataError(f"cannot open dataset {name!r} (split {split!r}): {err}".splitlines()[0]) from err
    for row in ds:
        text = row.get(text_field)
        if text is None:
            raise DataError(
                f"dataset {name!r} has no {text_field!r} field (fields: {', '.join(row)}); set --text-field"
            )
        if isinstance(text, str) and text.strip():
            yield text


def is_local(source: str) -> bool:
    """A source is local if it exists, or looks like a path (has a separator or a data extension)."""
    p = Path(source)
    return p.exists() or source.startswith((".", "/", "~")) or p.suffix in EXTENSIONS


@dataclass(frozen=True)
class DataSpec:
    """Where the documents come from, and which of them are held out."""

    source: str
    text_field: str = "text"
    split: str = "train"  # HF datasets only
    config_name: Optional[str] = None  # HF datasets only
    heldout: int = 0  # first `heldout` documents are never trained on
    train_start: Optional[int] = None  # first training document; default = heldout

    @property
    def first_train_doc(self) -> int:
        return self.heldout if self.train_start is None else self.train_start

    def documents(self) -> Iterator[str]:
        """All documents of the source, in order (held-out ones included)."""
        if is_local(self.source):
            for f in local_files(Path(self.source).expanduser()):
                yield from _file_documents(f, self.text_field)
        else:
            yield from _hub_documents(self.source, self.text_field, self.split, self.config_name)

    def heldout_documents(self) -> list[str]:
        out = []
        for i, doc in enumerate(self.documents()):
            if i >= self.heldout:
                break
            out.append(doc)
        return out

    def training_documents(self) -> Iterator[str]:
        """The training documents in the source's order."""
        for _, doc in self.indexed_training_documents():
            yield doc

    def indexed_training_documents(self) -> Iterator[tuple[int, str]]:
        """(document id, text) of the training documents in the source's order; the id is the
        document's index in `documents()`."""
        for i, doc in enumerate(self.documents()):
            if i >= self.first_train_doc:
                yield i, doc

    def check(self) -> None:
        """Fail early (before any model work) on data that is missing, unreadable or empty."""
        if self.train_start is not None and self.train_start < self.heldout:
            raise DataError(
                f"training would start at document {self.train_start}, inside the held-out slice of {self.heldout}"
            )
        if is_local(self.source):
            local_files(Path(self.source).expanduser())
        if next(iter(self.training_documents()), None) is None:
            raise DataError(
                f"no training documents in {self.source} after the {self.first_train_doc} reserved/held-out ones; "
                "give more data or a smaller --heldout-docs"
            )


@dataclass(frozen=True)
class TrainingDocuments:
    """The training documents of a spec as a re-iterable (each `iter()` reads them anew), for
    consumers that pass over them more than once (calibration of K/V and of query heads)."""

    spec: DataSpec

    def __iter__(self) -> Iterator[str]:
        return self.spec.training_documents()


def shuffled(items: Iterable[T], buffer: int, rng: random.Random) -> Iterator[T]:
    """`items` in a random order drawn from `rng`, holding at most `buffer` of them at a time.

    The shuffle buffer of `datasets.IterableDataset.shuffle`: fill the buffer, then for each further
    item yield a uniformly chosen buffered one and put the new item in its place; at the end, yield
    what is left in a random order. With at most `buffer` items this is a uniform random permutation
    of all of them; with more, an item moves about `buffer` places from where the source has it.
    """
    buf: list[T] = []
    for item in items:
        if len(buf) < buffer:
            buf.append(item)
            continue
        i = rng.randrange(buffer)
        yield buf[i]
        buf[i] = item
    rng.shuffle(buf)
    yield from buf


def epoch_rng(seed: int, epoch: int) -> random.Random:
    """The generator of one epoch's document order: its own, so the order depends on (seed, epoch)
    only, not on anything else that draws random numbers (str seeds hash with SHA-512: stable)."""
    return random.Random(f"gqa-convert document order, seed {seed}, epoch {epoch}")


def tokenize_indexed(docs: Iterable[tuple[int, str]], tokenizer, batch: int = 256) -> Iterator[tuple[int, list[int]]]:
    """(document id, token ids) of each document: the tokenizer's special prefix (BOS) if any, EOS appended."""
    eos = tokenizer.eos_token_id
    chunk: list[tuple[int, str]] = []

    def flush() -> Iterator[tuple[int, list[int]]]:
        encoded = tokenizer([text for _, text in chunk], add_special_tokens=True)["input_ids"]
        for (doc_id, _), ids in zip(chunk, encoded):
            yield doc_id, list(ids) + ([eos] if eos is not None and (not ids or ids[-1] != eos) else [])

    for doc in docs:
        chunk.append(doc)
        if len(chunk) == batch:
            yield from flush()
            chunk = []
    if chunk:
        yield from flush()


def tokenize_documents(docs: Iterable[str], tokenizer, batch: int = 256) -> Iterator[list[int]]:
    """Token ids of each document: the tokenizer's special prefix (BOS) if any, then EOS appended."""
    for _, ids in tokenize_indexed(enumerate(docs), tokenizer, batch):
        yield ids


def pack_indexed(
    token_docs: Iterable[tuple[int, list[int]]], context: int
) -> Iterator[tuple[list[int], list[int], tuple[int, ...]]]:
    """`pack_rows` that also names, for each row, the ids of the documents with tokens in it."""
    ids: list[int] = []
    pos: list[int] = []
    docs: list[int] = []
    for doc_id, doc in token_docs:
        start = 0
        while start < len(doc):
            take = min(len(doc) - start, context - len(ids))
            ids.extend(doc[start : start + take])
            pos.extend(range(take))
            docs.append(doc_id)
            start += take
            if len(ids) == context:
                yield ids, pos, tuple(docs)
                ids, pos, docs = [], [], []


def pack_rows(token_docs: Iterable[list[int]], context: int) -> Iterator[tuple[list[int], list[int]]]:
    """(input_ids, position_ids) rows of exactly `context` tokens; a trailing partial row is dropped.

    A document longer than the space left in a row continues in the next row; its positions restart
    at 0 there, because flash-attn's varlen path splits sequences where the position id is 0.
    """
    for ids, pos, _ in pack_indexed(enumerate(token_docs), context):
        yield ids, pos


class RowStream:
    """The infinite, deterministic stream of packed training rows (cycling over the data).

    shuffle_buffer 0: the training documents in the source's order, every epoch. shuffle_buffer B > 0:
    each epoch reads them through `shuffled` with a buffer of B documents and the generator
    `epoch_rng(seed, epoch)`, so every epoch has its own order, the same for the same seed.
    Documents are shuffled before tokenising and packing: rows are packed from shuffled documents.

    `skip(n)` replays past the first n rows, so a resumed run sees exactly the rows it would have;
    every process of a multi-process run builds the same stream. `last_docs`: the ids of the
    documents in the row `next()` returned last.
    """

    def __init__(self, spec: DataSpec, tokenizer, context: int, *, shuffle_buffer: int = 0, seed: int = 0):
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, not {shuffle_buffer}")
        self.spec, self.tokenizer, self.context = spec, tokenizer, context
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.epoch = 0
        self.rows_read = 0
        self.last_docs: tuple[int, ...] = ()
        self._it = self._rows()

    def epoch_documents(self, epoch: int) -> Iterator[tuple[int, str]]:
        """(document id, text) of the training documents in the order epoch `epoch` reads them."""
        docs = self.spec.indexed_training_documents()
        if self.shuffle_buffer:
            return shuffled(docs, self.shuffle_buffer, epoch_rng(self.seed, epoch))
        return docs

    def _rows(self) -> Iterator[tuple[list[int], list[int], tuple[int, ...]]]:
        while True:
            n = 0
            token_docs = tokenize_indexed(self.epoch_documents(self.epoch), self.tokenizer)
            for row in pack_indexed(token_docs, self.context):
                n += 1
                yield row
            if n == 0:
                raise DataError(
                    f"the training documents of {self.spec.source} hold fewer than --context {self.context} tokens in all; "
                    "give more data or a shorter context"
                )
            self.epoch += 1

    def next(self) -> tuple[list[int], list[int]]:
        self.rows_read += 1
        ids, pos, self.last_docs = next(self._it)
        return ids, pos

    def skip(self, n: int) -> None:
        for _ in range(n):
            self.next()


def collate(rows: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
    """Batch tensors: input_ids, position_ids, and labels (-100 at each document start).

    No attention_mask on purpose: with position ids that restart, transformers (5.x) builds a
    block-diagonal causal mask for SDPA/eager (masking_utils.find_packed_sequence_indices) and
    uses the varlen kernel for flash-attn, so no token attends across a document boundary. The label
    at a document start is ignored so the previous document's EOS does not predict it.
    """
    ids = torch.tensor([r[0] for r in rows], dtype=torch.long)
    pos = torch.tensor([r[1] for r in rows], dtype=torch.long)
    labels = ids.clone()
    labels[pos == 0] = IGNORE
    return {"input_ids": ids, "position_ids": pos, "labels": labels}


def packed_forward(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of a packed batch with attention confined to each document.

    `use_cache=False` matters: with a cache, transformers skips the packed-sequence detection and
    every token would attend to the earlier documents of its row.
    """
    return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits


def write_heldout(spec: DataSpec, path: Path) -> int:
    """Save the held-out documents as JSONL ({"text": ...}) so evaluation uses the same slice."""
    docs = spec.heldout_documents()
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for d in docs:
            fh.write(json.dumps({"text": d}) + "\n")
    tmp.replace(path)
    return len(docs)
