"""Streaming reader and shard writer: our writer against the safetensors library's own reader,
sharding and the index, byte-identical copies, bad files, pickle opt-in."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import IDS_DEFAULT, logits, save_tiny, tiny_model

from gqa_convert.checkpoint import ShardWriter, TensorReader, write_safetensors
from gqa_convert.convert import convert_checkpoint
from gqa_convert.errors import CheckpointError, ConfigError
from gqa_convert.units import parse_size


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


# --- raw copies (issue 2: unchanged tensors go file to file, never loaded) ---------------------


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def raw_source(tmp_path):
    """A safetensors file written by the safetensors library, and its tensors."""
    tensors = sample_tensors()
    tensors["h.noncontig"] = tensors["h.noncontig"].contiguous()
    tensors["big"] = torch.randn(300, 70, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    (tmp_path / "src").mkdir()
    save_file(tensors, tmp_path / "src" / "model.safetensors", metadata={"format": "pt"})
    return TensorReader(tmp_path / "src"), tensors


def copy_raw(reader, folder, max_shard_size=2000, ways=None):
    plan = [(n, *reader.dtype_shape(n)) for n in reader.names()]
    folder.mkdir()
    w = ShardWriter(folder, max_shard_size, plan=plan)
    if ways is not None:
        w.copier.ways = list(ways)
    for n in reader.names():
        loc = reader.location(n)
        w.add_raw(n, *reader.dtype_shape(n), loc.path, loc.offset, loc.nbytes)
    return w, w.finish()


@pytest.mark.parametrize("ways", [None, ["sendfile", "buffer"], ["buffer"]])
def test_raw_copies_keep_every_byte(tmp_path, ways, monkeypatch):
    """Each copy route (copy_file_range, sendfile, the bounce buffer in 64-byte chunks) gives
    shards the safetensors library reads back to the very bytes it wrote."""
    monkeypatch.setattr("gqa_convert.checkpoint.BOUNCE_BYTES", 64)
    reader, tensors = raw_source(tmp_path)
    data = (tmp_path / "src" / "model.safetensors").read_bytes()
    for n in reader.names():  # the location is where the library put the bytes
        loc = reader.location(n)
        assert data[loc.offset : loc.offset + loc.nbytes] == as_bytes(tensors[n]).numpy().tobytes()
    w, files = copy_raw(reader, tmp_path / "out", ways=ways)
    assert len(files) > 2 and w.total_size == sum(t.numel() * t.element_size() for t in tensors.values())
    assert w.max_pending <= 64  # nothing loaded; at most the bounce buffer
    back = TensorReader(tmp_path / "out")
    for k, t in tensors.items():
        got = load_file(tmp_path / "out" / back.file_of(k))[k]
        assert got.dtype == t.dtype and got.shape == t.shape and as_bytes(got).equal(as_bytes(t)), k


def test_raw_copy_falls_back_when_the_kernel_refuses(tmp_path, monkeypatch):
    """copy_file_range across filesystems fails with EXDEV on kernels >= 5.19: fall back, once."""
    import errno
    import os

    calls = []

    def exdev(*args, **kwargs):
        calls.append(args)
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", exdev, raising=False)
    reader, tensors = raw_source(tmp_path)
    w, _ = copy_raw(reader, tmp_path / "out", ways=["copy_file_range", "buffer"])
    assert len(calls) == 1 and w.copier.ways == ["buffer"]
    back = TensorReader(tmp_path / "out")
    assert all(as_bytes(back.get(k)).equal(as_bytes(t)) for k, t in tensors.items())


def test_raw_copy_refuses_bad_input(tmp_path):
    reader, _ = raw_source(tmp_path)
    loc = reader.location("big")
    with pytest.raises(CheckpointError, match="raw copies need a write plan"):
        ShardWriter(tmp_path / "a").add_raw("big", torch.bfloat16, (300, 70), loc.path, loc.offset, loc.nbytes)
    w = ShardWriter(tmp_path / "src", plan=[("big", torch.bfloat16, (300, 70))])
    with pytest.raises(CheckpointError, match="is 42000 bytes, not 41998"):
        w.add_raw("big", torch.bfloat16, (300, 70), loc.path, loc.offset, loc.nbytes - 2)
    w.close()
    (tmp_path / "short").write_bytes(b"x" * 100)  # a source that ends early
    for ways in (None, ["buffer"]):
        (tmp_path / "o").mkdir(exist_ok=True)
        w = ShardWriter(tmp_path / "o", plan=[("big", torch.bfloat16, (300, 70))])
        if ways:
            w.copier.ways = ways
        with pytest.raises(CheckpointError, match="short ended early"):
            w.add_raw("big", torch.bfloat16, (300, 70), tmp_path / "short", 8, 42000)
        w.close()


def test_convert_loads_only_attention_tensors(tmp_path, monkeypatch):
    """From safetensors, convert reads only the attention tensors; all else is copied raw."""
    model = tiny_model("llama", n_kv=4)
    src = save_tiny(model, tmp_path / "src")
    loaded = []
    get = TensorReader.get
    monkeypatch.setattr(TensorReader, "get", lambda self, name: loaded.append(name) or get(self, name))
    res = convert_checkpoint(src, tmp_path / "out", 2, progress=False)
    assert loaded and all(".self_attn." in n for n in loaded)
    assert res.tensors_copied + res.tensors_changed == len(TensorReader(src).names())
    assert res.tensors_changed == 2 * 2 * 2  # k/v weight + bias, 2 layers


def test_attention_tensor_changed_in_place_is_written_from_memory(tmp_path):
    """q/o handed back untouched are copied from the file; a method that edits q in place and
    returns the same tensor must still get its edit written (the version counter tells)."""
    from dataclasses import replace

    from gqa_convert.regroup import mean_pool

    model = tiny_model("llama", n_kv=4)
    src = save_tiny(model, tmp_path / "src")

    def scale_q_in_place(layer, block, shape, new_kv):
        block.q_w.mul_(2)
        return replace(mean_pool(layer, block, shape, new_kv), q_w=block.q_w)

    convert_checkpoint(src, tmp_path / "out", 2, method=scale_q_in_place, progress=False)
    before, after = TensorReader(src), TensorReader(tmp_path / "out")
    for name in before.names():
        if name.endswith("q_proj.weight"):
            assert torch.equal(after.get(name), before.get(name) * 2), name
        elif ".k_proj." not in name and ".v_proj." not in name:
            assert as_bytes(after.get(name)).equal(as_bytes(before.get(name))), name
