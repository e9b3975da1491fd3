"""Where a model comes from: a local folder, a short alias, a hub repo id, or a llama2.c `.bin`.

`resolve_source` always returns a local folder holding config.json (and, unless config_only,
the weights). Hub downloads fetch only config, generation, tokenizer and safetensors files (and
pickle .bin only when allowed); huggingface_hub failures become one-line errors that say what
to do. `HF_ENDPOINT` is read at call time, so a hub-compatible server can stand in for the hub.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Optional

import yaml

from .architectures import read_config as load_config  # noqa: F401  (the one config reader)
from .errors import CheckpointError, SourceNotFoundError
from .huberrors import download_error
from .settings import REPO_ID_PATTERN

CONFIG_PATTERNS = ["config.json", "generation_config.json"]
TOKENIZER_PATTERNS = [
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "LICENSE*", "LICENCE*", "NOTICE*", "USE_POLICY.md",
]  # fmt: skip
# Weights: the transformers names, then exactly the shards the index lists. Repos may also hold
# other copies (consolidated.safetensors, original/*.pth, onnx/ ...) that would double the download.
SAFE_FILES = ["model.safetensors.index.json", "model.safetensors"]
PICKLE_FILES = ["pytorch_model.bin.index.json", "pytorch_model.bin"]
LLAMA2C_TOKENIZERS = ("tok512.bin", "tokenizer.bin")
REPO_ID = re.compile(f"^{REPO_ID_PATTERN}$")  # the hub's user/name, as settings.is_repo_id checks it


@dataclass(frozen=True)
class Alias:
    """A short model name: its hub repo and what is publicly known about it."""

    name: str
    repo: str
    family: str
    heads: Optional[int] = None
    kv_heads: Optional[int] = None
    pretraining_tokens: Optional[float] = None
    licence: Optional[str] = None


@lru_cache(maxsize=1)
def aliases() -> dict[str, Alias]:
    """Aliases from data/aliases.yaml, by name."""
    data = yaml.safe_load(resources.files("gqa_convert").joinpath("data/aliases.yaml").read_text())
    return {name: Alias(name=name, **entry) for name, entry in data.items()}


def cache_dir() -> Path:
    """Where imported checkpoints are kept: $GQA_CONVERT_CACHE or ~/.cache/gqa-convert."""
    env = os.environ.get("GQA_CONVERT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "gqa-convert"


def snapshot_commit(folder: Path) -> Optional[str]:
    """The hub commit of a huggingface_hub cache snapshot folder (`.../snapshots/<sha>`), else None."""
    name = Path(folder).name
    return name if Path(folder).parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", name) else None


def resolve_source(
    spec: str,
    *,
    revision: Optional[str] = None,
    token: Optional[str] = None,
    config_only: bool = False,
    allow_pickle: bool = False,
) -> Path:
    """A local checkpoint folder for SPEC.

    Args:
        spec: a folder, an alias (`gqa-convert models`), a hub repo id (`org/name`), or a
            llama2.c checkpoint `.bin` with tok512.bin/tokenizer.bin beside it.
        revision: hub branch, tag or commit.
        token: hub token (else HF_TOKEN / the `hf auth login` token); never logged.
        config_only: fetch only config.json and generation_config.json from the hub.
        allow_pickle: also fetch pytorch_model*.bin when the repo has no safetensors.
    Returns:
        The folder (for hub sources, the huggingface_hub cache snapshot).
    Raises:
        SourceNotFoundError, AccessError, HubError: with a message that says what to do.

    Example:
        >>> resolve_source("smollm2-135m", config_only=True)  # doctest: +SKIP
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        return import_llama2c(path)
    if spec in aliases():
        return _download(aliases()[spec].repo, revision, token, config_only, allow_pickle)
    if REPO_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return _download(spec, revision, token, config_only, allow_pickle)
    raise SourceNotFoundError(
        f"{spec!r} is not a folder, a known alias or a hub repo id (org/name); run `gqa-convert models` for the aliases"
    )


def _download(repo: str, revision: Optional[str], token: Optional[str], config_only: bool, allow_pickle: bool) -> Path:
    """Config (and tokenizer, licence) first, then exactly the weight files the index names."""
    where = f"{repo}" + (f"@{revision}" if revision else "")
    if config_only:
        return _snapshot(repo, revision, token, CONFIG_PATTERNS)
    folder = _snapshot(repo, revision, token, CONFIG_PATTERNS + TOKENIZER_PATTERNS + SAFE_FILES)
    if not any((folder / f).is_file() for f in SAFE_FILES) and allow_pickle:
        folder = _snapshot(repo, revision, token, PICKLE_FILES)
    for index in (SAFE_FILES[0], PICKLE_FILES[0]):
        if (folder / index).is_file():
            try:
                shards = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            except (ValueError, KeyError, AttributeError) as err:
                raise CheckpointError(f"{where}: {index} is not a valid shard index ({err})") from None
            folder = _snapshot(repo, revision, token, shards)
            break
    return folder


def _snapshot(repo: str, revision: Optional[str], token: Optional[str], patterns: list[str]) -> Path:
    """snapshot_download restricted to `patterns`, with huggingface_hub errors made actionable."""
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import snapshot_download

    where = f"{repo}" + (f"@{revision}" if revision else "")
    try:
        folder = snapshot_download(
            repo,
            revision=revision,
            token=token,
            allow_patterns=patterns,
            endpoint=os.environ.get("HF_ENDPOINT") or None,
        )
    except (
        hf_errors.HfHubHTTPError,
        hf_errors.LocalEntryNotFoundError,
        hf_errors.HTTPError,
        ConnectionError,
        TimeoutError,
        OSError,
    ) as err:
        raise download_error(err, repo, revision) from None
    path = Path(folder)
    if not (path / "config.json").is_file():
        raise SourceNotFoundError(f"hub repo {where} has no config.json: not a transformers model")
    return path


# Bumped when the export writes something new (2: a sentencepiece tokenizer.model beside tokenizer.json).
LLAMA2C_EXPORT_VERSION = "2"


def import_llama2c(bin_path: Path) -> Path:
    """A Hugging Face folder for a llama2.c checkpoint, exported once into the cache (by file hash)."""
    bin_path = Path(bin_path)
    with open(bin_path, "rb") as fh:
        magic = fh.read(4)
    if magic[:2] == b"PK" or bin_path.suffix != ".bin":
        raise SourceNotFoundError(
            f"{bin_path} is a file; pass the checkpoint folder (or a llama2.c .bin with tok512.bin beside it)"
        )
    tok = next((bin_path.parent / t for t in LLAMA2C_TOKENIZERS if (bin_path.parent / t).is_file()), None)
    if tok is None or tok == bin_path:
        raise SourceNotFoundError(
            f"{bin_path} looks like a llama2.c checkpoint but no tokenizer ({' or '.join(LLAMA2C_TOKENIZERS)}) "
            "is beside it"
        )
    digest = hashlib.sha256(LLAMA2C_EXPORT_VERSION.encode())  # a newer exporter re-exports
    for p in (bin_path, tok):
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    target = cache_dir() / "llama2c" / f"{bin_path.stem}-{digest.hexdigest()[:16]}"
    if (target / "config.json").is_file():
        return target
    from .llama2c import export_llama2c  # imported late: only this route needs it

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        export_llama2c(bin_path, tok, tmp / "hf")
        os.replace(tmp / "hf", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
