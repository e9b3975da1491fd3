"""`gqa-convert convert`: regroup a checkpoint's KV heads, streaming, into a new folder.

    source folder --TensorReader--> one layer's attention tensors --split--> AttentionBlock
        --method (mean pool, ...)--> AttentionBlock(new_kv) --join--> ShardWriter --> temp folder
    every other tensor is copied unchanged, file to file (os.copy_file_range: never loaded, the
    bytes kept exactly); then config.json (KV field only; with q_heads also the query-head count
    and an explicit head_dim: docs/query-heads.md), tokenizer,
    generation config, licence and gqa_convert.json; the temp folder is renamed into place last.

Everything that can be checked is checked before the first byte is written: the family, the
head counts, the output path, every shard of the source.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

from torch import Tensor

from . import __version__
from .architectures import Family, get_family, head_shape, new_shape
from .checkpoint import SAFE_INDEX, ShardWriter, TensorBytes, TensorReader
from .errors import CheckpointError, ConfigError, InvalidHeadCountError, OutputError
from .fileio import FolderLock, remove_stale_temp_dirs, temp_dir_beside
from .records import ConversionRecord, HeadLayout
from .regroup import METHODS, HeadShape, LayerMethod, valid_kv_counts, valid_q_counts
from .source import aliases, cache_dir, load_config, resolve_source, snapshot_commit
from .units import parse_size

# Files of a source folder that are never copied: weights (rewritten), the config (rewritten),
# the old model card (describes another model), our own record.
SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".partial")
MERGE_PLOT = "merge_report.png"  # per-layer K/V reconstruction errors of a calibrated merge
SKIP_NAMES = {"config.json", "README.md", "gqa_convert.json", SAFE_INDEX, "pytorch_model.bin.index.json"}


@dataclass
class ConvertResult:
    """What a conversion wrote."""

    output: Path
    family: str
    old_shape: HeadShape
    new_shape: HeadShape
    method: str
    tensors_changed: int = 0
    tensors_copied: int = 0
    bytes_written: int = 0
    weight_files: list[str] = field(default_factory=list)
    peak_tensor_bytes: int = 0  # most tensor bytes the writer held at once
    # per layer (int keys) and a "summary", filled by a merge method
    report: dict[Union[int, str], Any] = field(default_factory=dict)
    query_heads: Optional[Any] = None  # merge.qheads.QueryHeadReport when the query heads changed

    def to_dict(self) -> dict:
        d = asdict(self)
        d["output"] = str(self.output)
        return d


def resolve_method(
    method: Union[str, LayerMethod],
    *,
    source_dir: Path,
    calib_data: Any = None,
    calib_tokens: Optional[int] = None,
    cache_dir: Optional[Path] = None,
) -> tuple[str, LayerMethod]:
    """(name, callable) for a method name in regroup.METHODS, a gqa_convert.merge method, or a callable."""
    if callable(method):
        return getattr(method, "__name__", type(method).__name__), method
    if method in METHODS:
        return method, METHODS[method]
    fn = _merge_module(method).build_method(
        method, source_dir=source_dir, calib_data=calib_data, calib_tokens=calib_tokens, cache_dir=cache_dir
    )
    return method, fn


def _merge_module(method: str):
    """gqa_convert.merge (the calibrated merges), or a ConfigError naming what is available."""
    try:
        from . import merge  # built separately: align/optimal with calibration
    except ImportError:
        raise ConfigError(
            f"method {method!r} is not available in this install (have: {', '.join(METHODS)}); "
            "the calibrated merges (align, optimal) need the gqa_convert.merge package"
        ) from None
    return merge


def check_output(output: Path, source: Path, overwrite: bool) -> None:
    """Refuse an output that equals, contains or lies inside the source, exists, or cannot be written."""
    if overwrite and output.exists() and Path.cwd().resolve() in (output.resolve(), *Path.cwd().resolve().parents):
        raise OutputError(
            f"output {output} is (or holds) the current folder; --overwrite would replace it under "
            "you: cd elsewhere or choose another folder"
        )
    out = output.resolve()
    src = source.resolve()
    if out == src or src in out.parents or out in src.parents:
        raise OutputError(f"output {output} overlaps the source {source}; choose a folder outside it")
    if output.is_symlink():
        raise OutputError(f"output {output} is a symbolic link; give the folder itself (or a new path)")
    if out.exists() and not overwrite:
        raise OutputError(f"output {output} already exists; pass --overwrite to replace it or choose another folder")
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {output} exists and is not a folder")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"cannot create output {output}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write output {output}: no write permission in {parent}")


def convert_checkpoint(
    source: Union[str, Path],
    output: Union[str, Path],
    kv_heads: int,
    *,
    method: Union[str, LayerMethod] = "mean",
    max_shard_size: Union[int, str] = "5GB",
    overwrite: bool = False,
    allow_pickle: bool = False,
    progress: bool = True,
    revision: Optional[str] = None,
    token: Optional[str] = None,
    calib_data: Any = None,
    calib_tokens: Optional[int] = None,
    q_heads: Optional[int] = None,
    q_method: str = "merge",
    calib_device: str = "auto",
) -> ConvertResult:
    """Convert SOURCE to a checkpoint with `kv_heads` KV heads, written to OUTPUT.

    Args:
        source: folder, alias, hub repo id or llama2.c .bin (see `source.resolve_source`).
        output: the new checkpoint folder (created; must not exist unless overwrite).
        kv_heads: new KV-head count; must divide the old one (equal = identity conversion).
        method: "mean" (Ainslie et al. mean pooling), a gqa_convert.merge method name ("align",
            "optimal"), "auto" (= "optimal" when calib_data is given, else "mean"; docs/merging.md
            has the measurements behind it), or a LayerMethod callable. A callable with a `report`
            dict attribute fills result.report.
        max_shard_size: cap per output shard ("5GB", "500MB", or bytes).
        overwrite: replace an existing output (swapped in only when the new one is complete).
        allow_pickle: read pytorch_model*.bin weights (weights_only=True) when no safetensors.
        progress: show a progress bar over bytes (stderr).
        revision, token: for hub sources.
        calib_data: calibration text for align/optimal: a file, folder, dataset name, or an
            iterable of documents.
        calib_tokens: calibration token budget.
        calib_device: where calibration runs its layer passes ("auto": CUDA when there is one).
        q_heads: new query-head count (None = unchanged; docs/query-heads.md). Must divide the old
            count and be a multiple of kv_heads: every new KV group keeps q_heads / kv_heads query
            heads. The written config gets `head_dim` explicitly. Needs calib_data when it changes.
        q_method: "merge" (keep heads and refit o_proj by least squares on the calibration
            activations) or "prune" (keep the heads of largest measured contribution, o_proj's
            columns as they were).
    Returns:
        ConvertResult.
    Raises:
        InvalidHeadCountError, OutputError, CheckpointError, UnsupportedModelError,
        SourceNotFoundError, AccessError, HubError, ConfigError — before anything is written.

    Example:
        >>> convert_checkpoint("path/to/llama", "llama-gqa2", kv_heads=2)  # doctest: +SKIP
    """
    output = Path(os.path.abspath(Path(output).expanduser()))  # `-o .` has a name and a parent
    max_bytes = parse_size(max_shard_size)
    if method == "auto":
        method = "optimal" if calib_data is not None else "mean"
    # Config first (for a hub source: config.json only), so that every check below runs before
    # gigabytes are downloaded and before anything is written.
    src = resolve_source(str(source), revision=revision, token=token, config_only=True)
    config = load_config(src)
    family = get_family(config)
    old = head_shape(family, config)
    if not isinstance(kv_heads, int) or kv_heads not in valid_kv_counts(old.n_heads, old.n_kv):
        raise InvalidHeadCountError(
            f"{kv_heads} KV heads is not reachable from {old.n_kv} KV heads ({old.n_heads} query heads): "
            f"valid_kv_counts are {valid_kv_counts(old.n_heads, old.n_kv)}"
        )
    n_q = _check_q_heads(family, old, kv_heads, q_heads, q_method, calib_data)
    check_output(output, src, overwrite)
    if "auto_map" in config:
        print(
            f"convert: {Path(str(source)).name} carries custom code (auto_map); the output is the stock "
            f"{family.name} class, without it",
            file=sys.stderr,
        )
    FolderLock(output).probe()  # another run writing it: fail now, not after calibrating
    if isinstance(method, str) and method not in METHODS:
        _merge_module(method)  # fail now, not after a download
    local = Path(str(source)).expanduser().exists()
    if not local:  # hub source: now fetch the weights too
        src = resolve_source(str(source), revision=revision, token=token, allow_pickle=allow_pickle)
    from .merge.calibrate import options as calibration

    with calibration(calib_device, progress=progress):  # the calibrations: before any write
        name, fn = resolve_method(
            method,
            source_dir=src,
            calib_data=calib_data,
            calib_tokens=calib_tokens,
            cache_dir=cache_dir(),
        )
        reducer = _query_reducer(q_method, old, n_q, src, calib_data, calib_tokens)
    new = new_shape(old, kv_heads, n_q)
    reader = TensorReader(src, allow_pickle=allow_pickle)
    layers = _layer_of_names(family, family.n_layers(config), reader)
    result = ConvertResult(output=output, family=family.name, old_shape=old, new_shape=new, method=name)

    created = _missing_parents(output)
    lock = FolderLock(output).__enter__()  # released below, before the parents it created are removed
    remove_stale_temp_dirs(output, log=lambda m: print(f"convert: {m}", file=sys.stderr))
    tmp = temp_dir_beside(output)
    try:
        check_output(output, src, overwrite)  # again, under the lock: another run may have finished it meanwhile
        if isinstance(method, str) and hasattr(fn, "plot_path"):  # a named merge: its error plot ships with the model
            fn.plot_path = tmp / MERGE_PLOT
        layer_fn = fn if reducer is None else reducer.then(fn)  # query heads first, then the KV method
        _write_weights(reader, family, layers, old, new, layer_fn, max_bytes, tmp, result, progress)
        _copy_side_files(src, tmp)
        (tmp / "config.json").write_text(json.dumps(family.updated_config(config, kv_heads, n_q), indent=2) + "\n")
        fn_report = getattr(fn, "report", None)
        if isinstance(fn_report, dict):
            result.report = dict(fn_report)
            summary = result.report.get("summary")
            if isinstance(method, str) and isinstance(summary, dict) and "plot" in summary:
                summary["plot"] = MERGE_PLOT  # relative: the folder is renamed into place
            if isinstance(summary, dict) and summary.get("calibration_cache"):
                summary["calibration_cache"] = Path(summary["calibration_cache"]).name  # no local paths published
        ConversionRecord(
            version=__version__,
            # a hub id or alias as given; for a local folder only its name (no local paths published)
            source=Path(str(source)).name if local else str(source),
            source_repo=aliases()[str(source)].repo if str(source) in aliases() else None,
            source_path=str(Path(str(source)).expanduser().resolve()) if local else None,  # local only
            revision=revision,
            source_commit=None if local else snapshot_commit(src),
            family=family.name,
            old=HeadLayout(**asdict(old)),
            new=HeadLayout(**asdict(new)),
            method=name,
            report=json.loads(json.dumps({str(k): v for k, v in result.report.items()}, default=str)),
            query_heads=None if reducer is None else reducer.report.to_dict(),
        ).write(tmp)
        result.query_heads = None if reducer is None else reducer.report
        _move_into_place(tmp, output, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        lock.__exit__(None, None, None)
        for d in created:
            try:
                d.rmdir()
            except OSError:
                pass
        raise
    else:
        lock.__exit__(None, None, None)
    finally:
        reader.close()
    return result


def _check_q_heads(
    family: Family, old: HeadShape, kv_heads: int, q_heads: Optional[int], q_method: str, calib_data: Any
) -> int:
    """The new query-head count after every check that needs no weights (one-line errors)."""
    if q_heads is None or q_heads == old.n_heads:
        return old.n_heads
    valid = valid_q_counts(old.n_heads, kv_heads)
    if not isinstance(q_heads, int) or isinstance(q_heads, bool) or q_heads not in valid:
        raise InvalidHeadCountError(
            f"{q_heads} query heads is not reachable from {old.n_heads} query heads with {kv_heads} KV heads: "
            f"it must divide {old.n_heads} and be a multiple of {kv_heads}; valid_q_counts are {valid}"
        )
    family.check_query_heads()
    if q_method not in ("prune", "merge"):
        raise ConfigError(f"unknown query-head method {q_method!r}; choose one of prune, merge")
    if calib_data is None:
        raise ConfigError(
            f"q_heads {q_heads} ({q_method}) needs calibration text to measure the heads: "
            "pass calib_data (--calib-data)"
        )
    return q_heads


def _query_reducer(q_method: str, old: HeadShape, n_q: int, src: Path, calib_data: Any, calib_tokens: Optional[int]):
    """A merge.qheads.QueryHeadReducer (calibrated) when the query heads change, else None."""
    if n_q == old.n_heads:
        return None
    return _merge_module(q_method).build_query_reducer(
        q_method, n_q, source_dir=src, calib_data=calib_data, calib_tokens=calib_tokens, cache_dir=cache_dir()
    )


def _missing_parents(output: Path) -> list[Path]:
    """Ancestors of output that do not exist yet, deepest first (removed again on failure)."""
    out, p = [], output.parent
    while not p.exists():
        out.append(p)
        p = p.parent
    return out


def _layer_of_names(family: Family, n_layers: int, reader: TensorReader) -> dict[str, int]:
    """Attention tensor name -> layer index; checks every required tensor is there (before writing)."""
    owner = {}
    for i in range(n_layers):
        for role, name in family.layer_tensor_names(i).items():
            if name in reader:
                owner[name] = i
            elif role not in family.optional:
                raise CheckpointError(
                    f"tensor {name} is missing from {reader.folder}: not a complete {family.name} checkpoint"
                )
    return owner


def _walk(
    reader: TensorReader,
    family: Family,
    layers: dict[str, int],
    old: HeadShape,
    new: HeadShape,
    get: Callable[[str], Tensor],
    method: LayerMethod,
) -> Iterator[tuple[str, Union[Tensor, TensorBytes], Optional[Tensor]]]:
    """(name, tensor to write, tensor as read) in write order: the source's tensor order, with a
    layer's attention tensors regrouped together where its first one appears. A tensor the
    conversion leaves alone comes as its location on disk (TensorBytes) when the source is
    safetensors: one outside the attention blocks is never read; an attention tensor the method
    hands back untouched (the very tensor read, never modified in place — e.g. q/o under mean
    pooling) is read for the method but copied from the file rather than written from memory;
    so `get` must return tensors exactly as stored (reader.get)."""
    done: set[int] = set()
    for name in reader.names():
        if name not in layers:
            where = reader.location(name)
            if where is not None:
                yield name, where, None
                continue
            t = get(name)
            yield name, t, t
            del t  # do not hold it while the next one is read
            continue
        i = layers[name]
        if i in done:
            continue
        done.add(i)
        tensors = {n: get(n) for n, j in layers.items() if j == i}
        versions = {n: t._version for n, t in tensors.items()}  # bumped by any in-place change
        out = family.join(i, method(i, family.split(i, tensors, old), old, new.n_kv), new)
        if set(out) != set(tensors):
            raise CheckpointError(f"layer {i}: regrouping returned tensors {sorted(out)}, expected {sorted(tensors)}")
        for n in tensors:  # the source's order, which the write plan follows
            where = reader.location(n)
            if where is not None and out[n] is tensors[n] and tensors[n]._version == versions[n]:
                yield n, where, None
            else:
                yield n, out[n], tensors[n]


def _plan(
    reader: TensorReader, family: Family, layers: dict[str, int], old: HeadShape, new: HeadShape
) -> list[tuple[str, Any, tuple[int, ...]]]:
    """(name, dtype, shape) of every output tensor in the order `_walk` yields them, from the
    stored shapes alone. The writer checks each real tensor against it."""
    plan, done = [], set()
    for name in reader.names():
        if name not in layers:
            plan.append((name, *reader.dtype_shape(name)))
            continue
        i = layers[name]
        if i in done:
            continue
        done.add(i)
        own = [n for n, j in layers.items() if j == i]
        shapes = family.joined_shapes(i, {n: reader.dtype_shape(n)[1] for n in own}, old, new)
        plan += [(n, reader.dtype_shape(n)[0], shapes[n]) for n in own]
    return plan


def _write_weights(
    reader: TensorReader,
    family: Family,
    layers: dict[str, int],
    old: HeadShape,
    new: HeadShape,
    fn: LayerMethod,
    max_bytes: int,
    folder: Path,
    result: ConvertResult,
    progress: bool,
) -> None:
    """Stream every tensor: attention tensors a layer at a time through the method, the rest copied.

    The output layout is planned first from shapes alone (meta tensors through mean pooling), so
    each tensor goes to disk as soon as it is ready: memory holds one layer's attention tensors.
    Tensors outside the attention blocks are byte ranges copied straight from the source files
    (safetensors), so their bytes never pass through Python (issue 2: near the speed of a copy).
    """
    from tqdm.auto import tqdm

    plan = _plan(reader, family, layers, old, new)
    writer = ShardWriter(folder, max_bytes, plan=plan)
    total = sum(reader.nbytes(n) for n in reader.names())
    try:
        with tqdm(total=total, unit="B", unit_scale=True, desc="convert", disable=not progress, file=sys.stderr) as bar:
            for name, t, before in _walk(reader, family, layers, old, new, reader.get, fn):
                if isinstance(t, TensorBytes):  # unchanged: copied file to file
                    writer.add_raw(name, *reader.dtype_shape(name), t.path, t.offset, t.nbytes)
                    result.tensors_copied += 1
                    bar.update(t.nbytes)
                    continue
                writer.add(name, t.contiguous())
                if t is before or _same(t, before):
                    result.tensors_copied += 1
                else:
                    result.tensors_changed += 1
                if before is not None:
                    bar.update(before.numel() * before.element_size())
                del t, before
            result.weight_files = writer.finish()
    finally:
        writer.close()
    result.bytes_written = writer.total_size
    result.peak_tensor_bytes = writer.max_pending


def _same(a: Tensor, b: Optional[Tensor]) -> bool:
    return b is not None and a.dtype == b.dtype and a.shape == b.shape and bool(a.equal(b))


def _copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer, generation config, licence and other small top-level files; not weights or README."""
    for p in sorted(src.iterdir()):
        if p.name.startswith(".") or not p.is_file() or p.name in SKIP_NAMES or p.name.endswith(SKIP_SUFFIXES):
            continue
        if p.suffix == ".py":  # the source's custom modelling code: the output is a stock class (auto_map dropped)
            continue
        shutil.copy2(p, dst / p.name)


def _move_into_place(tmp: Path, output: Path, overwrite: bool) -> None:
    """Rename the finished temp folder to output; an old output is swapped out, then deleted."""
    if output.exists() and overwrite:
        old = temp_dir_beside(output, "old")
        os.replace(output, old / "x")
        try:
            os.replace(tmp, output)
        except BaseException:
            os.replace(old / "x", output)  # put the old one back
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, output)
