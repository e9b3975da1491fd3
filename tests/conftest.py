"""Shared test fixtures: the read-only fixtures folder beside the project, and the stories260K
model exported once per session as a Hugging Face folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tiny models: one thread is fastest, and CI machines are small and shared.
torch.set_num_threads(1)

# The loopback hub server (`hub`) and the verified stories260K folders shared by the publish tests.
pytest_plugins = ["hubserver"]

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("GQA_CONVERT_FIXTURES", ROOT.parent / "shared" / "fixtures"))
STORIES_BIN = FIXTURES / "stories260K" / "stories260K.bin"
STORIES_TOK = FIXTURES / "stories260K" / "tok512.bin"
VAL_TEXT = FIXTURES / "text" / "tinystories_val_head.txt"
SAMPLE_TEXT = FIXTURES / "text" / "tinystories_sample.txt"


def need(path: Path) -> Path:
    """Skip (naming the path) when a shared fixture is absent; CI always has them."""
    if not path.exists():
        pytest.skip(f"fixture missing: {path} (set GQA_CONVERT_FIXTURES)")
    return path


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return need(FIXTURES)


@pytest.fixture(scope="session")
def val_text() -> Path:
    return need(VAL_TEXT)


@pytest.fixture(scope="session")
def stories_hf(tmp_path_factory) -> Path:
    """stories260K exported as a Hugging Face Llama folder (weights, config, tokenizer)."""
    from gqa_convert.llama2c import export_llama2c

    out = tmp_path_factory.mktemp("stories260K") / "hf"
    export_llama2c(need(STORIES_BIN), need(STORIES_TOK), out)
    return out
