"""Where models come from: aliases (data), local folders, llama2.c imports, and hub failures turned
into one-line errors — against a loopback server that answers like the hub does, no network."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import STORIES_BIN, STORIES_TOK, need

from gqa_convert.architectures import families
from gqa_convert.errors import AccessError, HubError, SourceNotFoundError
from gqa_convert.source import REPO_ID, aliases, load_config, resolve_source


def test_aliases_are_consistent_data():
    table = aliases()
    assert table["llama-3-8b"].repo == "meta-llama/Meta-Llama-3-8B"
    # publicly stated pretraining corpus sizes (Meta, Hugging Face model cards)
    assert table["llama-3-8b"].pretraining_tokens == 15e12
    assert table["llama-2-7b"].pretraining_tokens == 2e12
    assert table["smollm2-135m"].pretraining_tokens == 2e12
    for a in table.values():
        assert a.family in families(), a.name
        assert REPO_ID.match(a.repo), a.repo
        assert a.pretraining_tokens is None or isinstance(a.pretraining_tokens, float)
        if a.heads and a.kv_heads:
            assert a.heads % a.kv_heads == 0, a.name


def test_local_folder_and_missing_things(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert resolve_source(str(tmp_path)) == tmp_path
    assert load_config(tmp_path)["model_type"] == "llama"
    with pytest.raises(SourceNotFoundError, match="gqa-convert models"):
        resolve_source(str(tmp_path / "absent"))
    with pytest.raises(SourceNotFoundError, match="no config.json"):
        load_config(tmp_path / "absent")
    with pytest.raises(SourceNotFoundError, match="not a folder, a known alias or a hub repo id"):
        resolve_source("not a/valid/id")


def test_llama2c_bin_without_tokenizer(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"\x40\x00\x00\x00" * 7)
    with pytest.raises(SourceNotFoundError, match="tok512.bin"):
        resolve_source(str(tmp_path / "model.bin"))


def test_llama2c_import_is_cached(tmp_path, monkeypatch):
    need(STORIES_BIN), need(STORIES_TOK)
    monkeypatch.setenv("GQA_CONVERT_CACHE", str(tmp_path / "cache"))
    folder = resolve_source(str(STORIES_BIN))
    cfg = load_config(folder)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]) == (8, 4, 64)
    assert folder.parent == tmp_path / "cache" / "llama2c"
    mtime = (folder / "config.json").stat().st_mtime_ns
    assert resolve_source(str(STORIES_BIN)) == folder
    assert (folder / "config.json").stat().st_mtime_ns == mtime  # reused, not exported again
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]


class _Hub(BaseHTTPRequestHandler):
    """Answers every request the way the hub answers a missing, gated or failing repo."""

    mode = "missing"

    def _reply(self):
        status, code = {"missing": (404, "RepoNotFound"), "gated": (403, "GatedRepo"), "broken": (500, None)}[self.mode]
        body = json.dumps({"error": "nope"}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", "nope")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = _reply

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(c, "HF_HUB_ETAG_TIMEOUT", 5, raising=False)
    yield _Hub
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    "mode, error, text",
    [
        ("missing", SourceNotFoundError, "does not exist or is private"),
        ("gated", AccessError, "hf auth login"),
        ("broken", HubError, "hub"),
    ],
)
def test_hub_failures_are_one_line(fake_hub, mode, error, text, monkeypatch):
    monkeypatch.setattr(fake_hub, "mode", mode)
    with pytest.raises(error) as err:
        resolve_source("someorg/somemodel", token=None)
    assert text in str(err.value) and "\n" not in str(err.value)


def test_unreachable_hub(monkeypatch, tmp_path):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused
    with pytest.raises(HubError, match="cannot reach the hub at http://127.0.0.1:9"):
        resolve_source("llama-3-8b")


def test_hub_sharded_repo_fetches_exactly_the_indexed_shards(tmp_path, request):
    """Against the loopback hub (tests/hubserver.py): config first, then the shards the index names;
    other weight copies in the repo are not downloaded; converting the repo id works end to end."""
    import torch
    from hubserver import HubServer, point_hub_client
    from tiny_models import IDS_DEFAULT, logits, tiny_model

    from gqa_convert.convert import convert_checkpoint

    model = tiny_model("qwen2")
    model.save_pretrained(tmp_path / "m", max_shard_size="40KB")
    server = HubServer().start()
    request.addfinalizer(server.stop)
    mp = pytest.MonkeyPatch()
    request.addfinalizer(mp.undo)
    point_hub_client(mp, server.endpoint, tmp_path / "hf_home", None)
    files = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}
    files["consolidated.safetensors"] = files[sorted(n for n in files if n.startswith("model-"))[0]]
    files["original/params.json"] = b"{}"
    server.add_repo("alice/tiny-qwen2", files)

    config_only = resolve_source("alice/tiny-qwen2", config_only=True)
    assert {p.name for p in config_only.iterdir()} <= {"config.json", "generation_config.json"}
    folder = resolve_source("alice/tiny-qwen2")
    shards = set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values())
    got = {p.name for p in folder.iterdir()}
    assert shards <= got and len(shards) > 1
    assert "consolidated.safetensors" not in got and "original" not in got

    res = convert_checkpoint("alice/tiny-qwen2", tmp_path / "out", 2, progress=False)
    assert json.loads((res.output / "gqa_convert.json").read_text())["source"] == "alice/tiny-qwen2"
    assert logits(res.output, IDS_DEFAULT).isfinite().all()
    same = convert_checkpoint("alice/tiny-qwen2", tmp_path / "ident", 4, progress=False)
    assert torch.equal(logits(same.output, IDS_DEFAULT), logits(model, IDS_DEFAULT))
