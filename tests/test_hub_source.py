"""The download side of `convert`: a hub repo id as the source, against the loopback test hub."""

from __future__ import annotations

import json

import pytest
import torch
from hubserver import BOB_TOKEN
from safetensors.torch import load_file

from gqa_convert.commands import main
from gqa_convert.errors import AccessError, HubError, SourceNotFoundError
from gqa_convert.source import resolve_source


@pytest.fixture
def stories_repo(hub, stories_hf):
    """stories260K on the test hub as alice/stories260K, with files a conversion must not fetch."""
    hub.add_repo("alice/stories260K", stories_hf)
    repo = hub.state.repos["alice/stories260K"]
    extra = {
        "pytorch_model.bin": b"not really pickle",
        "README.md": b"---\nlicense: mit\n---\n",
        "optimizer.pt": b"state",
        "images/big.png": b"\x89PNG",
    }
    hub.state.commit(repo, "main", extra, [], "extra files")
    return "alice/stories260K"


def test_public_repo_fetches_only_what_conversion_needs(stories_repo, stories_hf, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")  # a public repo needs no token
    folder = resolve_source(stories_repo)
    got = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= got
    assert not got & {"pytorch_model.bin", "optimizer.pt", "images"}
    assert (folder / "model.safetensors").read_bytes() == (stories_hf / "model.safetensors").read_bytes()


def test_private_repo_without_token_is_access_error(hub, stories_hf, monkeypatch):
    hub.add_repo("bob/private-stories", stories_hf, private=True)
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(AccessError, match="hf auth login|HF_TOKEN"):
        resolve_source("bob/private-stories")
    monkeypatch.setenv("HF_TOKEN", BOB_TOKEN)  # the owner's token works
    assert (resolve_source("bob/private-stories") / "config.json").is_file()


def test_private_repo_of_someone_else(hub, stories_hf):
    """With a valid token that lacks access the hub answers 404, not revealing the repo: the message
    must still mention that it may be private and how to authenticate."""
    hub.add_repo("bob/private-stories", stories_hf, private=True)
    with pytest.raises(SourceNotFoundError, match="private.*(hf auth login|HF_TOKEN)"):
        resolve_source("bob/private-stories")  # alice's token (the fixture's HF_TOKEN)


def test_missing_repo_is_source_not_found(hub):
    with pytest.raises(SourceNotFoundError, match="alice/does-not-exist"):
        resolve_source("alice/does-not-exist")


def test_server_down_is_hub_error(hub):
    hub.stop()
    with pytest.raises(HubError):
        resolve_source("alice/anything")


def test_convert_from_hub_end_to_end(stories_repo, stories_hf, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "kv2"
    assert main(["convert", stories_repo, "--kv-heads", "2", "-o", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["num_key_value_heads"] == 2
    model = AutoModelForCausalLM.from_pretrained(out)
    src = load_file(stories_hf / "model.safetensors")
    # Oracle: the mean of each contiguous pair of the source's KV heads (layer 0, k_proj; d_h = 8).
    k = src["model.layers.0.self_attn.k_proj.weight"].view(4, 8, 64)
    expected = k.view(2, 2, 8, 64).mean(1).reshape(16, 64)
    assert torch.allclose(model.model.layers[0].self_attn.k_proj.weight, expected, atol=1e-6)
    assert main(["convert", "alice/nope", "--kv-heads", "2", "-o", str(tmp_path / "x")]) == 2
    assert "alice/nope" in capsys.readouterr().err
