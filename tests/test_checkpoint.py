"""Streaming reader and shard writer: our writer against the safetensors library's own reader,
sharding and the index, byte-identical copies, bad files, pickle opt-in."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import IDS_DEFAULT, logits, save_tiny, tiny_model

from gqa_convert.checkpoint import ShardWriter, TensorReader, parse_size, write_safetensors
from gqa_convert.convert import convert_checkpoint
from gqa_convert.errors import CheckpointError, ConfigError


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.f32": torch.randn(7, 5, generator=g),
        "b.bf16": torch.randn(3, 8, generator=g).to(torch.bfloat16),
        "c.f16": torch.randn(4, generator=g).to(torch.float16),
        "d.i64": torch.arange(6).reshape(2, 3),
        "e.bool": torch.tensor([True, False, True]),
        "f.scalar": torch.tensor(3.5),
        "g.empty": torch.zeros(0, 4),
        "h.noncontig": torch.randn(4, 6, generator=g).t(),
    }


def test_write_safetensors_is_read_back_by_the_library(tmp_path):
    tensors = sample_tensors()
    write_safetensors(tmp_path / "x.safetensors", tensors, {"format": "pt"})
    back = load_file(tmp_path / "x.safetensors")
    assert set(back) == set(tensors)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t), k
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_shard_writer_splits_and_indexes(tmp_path):
    tensors = {f"w{i}": torch.full((250,), float(i)) for i in range(10)}  # 1000 bytes each
    w = ShardWriter(tmp_path, max_shard_size=2500)
    for k, t in tensors.items():
        w.add(k, t)
    files = w.finish()
    assert files[:-1] == [f"model-0000{k}-of-00005.safetensors" for k in range(1, 6)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 10_000
    assert set(index["weight_map"]) == set(tensors)
    assert w.max_pending <= 2500
    r = TensorReader(tmp_path)
    assert sorted(r.names()) == sorted(tensors)
    for k, t in tensors.items():
        assert torch.equal(r.get(k), t)
    assert not list(tmp_path.glob("*.partial"))


def test_planned_writer_streams_one_tensor_at_a_time(tmp_path):
    tensors = {f"w{i}": torch.full((250,), float(i)) for i in range(10)}
    plan = [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]
    w = ShardWriter(tmp_path, max_shard_size=2500, plan=plan)
    for k, t in tensors.items():
        w.add(k, t)
    assert len(w.finish()) == 6 and w.max_pending == 1000  # never more than one tensor held
    r = TensorReader(tmp_path)
    assert all(torch.equal(r.get(k), t) for k, t in tensors.items())
    for k, t in tensors.items():
        assert torch.equal(load_file(tmp_path / r.file_of(k))[k], t)  # the library reads our shards
    w = ShardWriter(tmp_path / "x", 2500, plan=plan)
    with pytest.raises(CheckpointError, match="arrived where the plan expected w0"):
        w.add("w1", tensors["w1"])


def test_single_shard_named_model_safetensors(tmp_path):
    w = ShardWriter(tmp_path, "5GB")
    w.add("x", torch.ones(3))
    assert w.finish() == ["model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()


@pytest.mark.parametrize(
    "text, value", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30), ("100KB", 10**5), (1234, 1234)]
)
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("bad", ["five", "5XB", "-1GB", "0"])
def test_parse_size_refuses(bad):
    with pytest.raises(ConfigError):
        parse_size(bad)


def test_reader_errors(tmp_path):
    save_file({"a": torch.randn(100, 10), "b": torch.randn(10)}, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-64])
    with pytest.raises(CheckpointError, match="model.safetensors is truncated"):
        TensorReader(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        TensorReader(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}})
    )
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors named in the index is missing"):
        TensorReader(tmp_path)


def test_pickle_refused_then_read_with_opt_in(tmp_path):
    sd = {"w": torch.randn(4, 4), "tied": None}
    sd["tied"] = sd["w"]  # shared storage, as tied embeddings are in pickles
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        TensorReader(tmp_path)
    r = TensorReader(tmp_path, allow_pickle=True)
    assert torch.equal(r.get("w"), sd["w"]) and torch.equal(r.get("tied"), sd["w"])
    write_safetensors(tmp_path / "out.safetensors", {k: r.get(k) for k in r.names()})  # no shared-storage error


def test_untouched_tensors_are_byte_identical_and_pooling_is_float32_mean(tmp_path):
    """bf16 source, 4 -> 2 KV heads, tiny shards: every tensor but k/v keeps its bytes; k/v are the
    float32 mean of their group cast back to bf16; the sharded output loads and runs."""
    model = tiny_model("qwen2", n_kv=4).to(torch.bfloat16)
    src = save_tiny(model, tmp_path / "src")
    res = convert_checkpoint(src, tmp_path / "out", 2, max_shard_size="20KB", progress=False)
    assert len(res.weight_files) > 3 and "model.safetensors.index.json" in res.weight_files
    before, after = TensorReader(src), TensorReader(res.output)
    assert set(before.names()) == set(after.names())
    d = model.config.hidden_size // model.config.num_attention_heads
    for name in before.names():
        old, new = before.get(name), after.get(name)
        if ".k_proj." in name or ".v_proj." in name:
            want = old.float().view(2, 2, d, *old.shape[1:]).mean(1).reshape(2 * d, *old.shape[1:]).bfloat16()
            assert new.dtype == torch.bfloat16 and torch.equal(new, want), name
        else:
            assert new.dtype == old.dtype and new.view(torch.uint8).equal(old.view(torch.uint8)), name
    index = json.loads((res.output / "model.safetensors.index.json").read_text())
    sizes = sum(after.nbytes(n) for n in after.names())
    assert index["metadata"]["total_size"] == sizes == res.bytes_written
    assert logits(res.output, IDS_DEFAULT).isfinite().all()
