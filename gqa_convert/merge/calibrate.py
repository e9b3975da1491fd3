"""Calibration statistics: per-layer covariance of the attention input, one layer at a time.

For every decoder layer we want Σ = Σ_t [x_t; 1][x_t; 1]ᵀ ((D+1)×(D+1), float64), where x_t is
what the attention block's q/k/v projections read (after the input layernorm where the family
has one). The trailing 1 makes biases part of the same quadratic form: a projection with bias b
is [W b] applied to [x; 1].

Memory does not grow with depth: the model is built on the meta device (buffers such as rotary
inv_freq stay real), the input embedding is loaded, one forward pass with every decoder layer
replaced by a recorder captures each layer's keyword arguments (rotary position embeddings,
causal / sliding-window masks, exactly as the model builds them), and then the layers run one
at a time: materialise layer i from safetensors, push the calibration hidden states through it
while a hook accumulates Σ_i, write Σ_i to the cache, drop the layer. Only the calibration
batch's hidden states (tokens × D floats) and one layer live at once.

The cache is a folder `calib-<key>/` under the run's cache folder: one safetensors per layer
and a `meta.json` written last (the folder is renamed into place only when complete). The key
hashes the checkpoint (config, safetensors headers, sizes, sampled bytes) and the exact token ids.

The same machinery records another site of a layer when asked (`site`, a module path inside the
decoder layer): the query-head reduction (`merge.qheads`) takes Σ of o_proj's input, the
concatenated per-head attention outputs, with site "self_attn.o_proj".
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Optional, Sequence, Union, cast

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..architectures import read_config
from ..checkpoint import TensorReader
from ..errors import CheckpointError, DataError
from ..hostmem import release_freed_memory

if TYPE_CHECKING:
    from transformers import PreTrainedModel

DEFAULT_SEQ_LEN = 512
ATTENTION_NAMES = ("self_attn", "self_attention", "attn", "attention")


# --- calibration text -> token chunks ------------------------------------------------------------


def tokenize_documents(tokenizer, documents: Iterable[str], n_tokens: int) -> Tensor:
    """The first n_tokens of the documents, each BOS-prefixed (when the tokenizer has one), concatenated."""
    bos = getattr(tokenizer, "bos_token_id", None)
    ids: list[int] = []
    for doc in documents:
        ids.extend(([bos] if bos is not None else []) + tokenizer(doc, add_special_tokens=False)["input_ids"])
        if len(ids) >= n_tokens:
            break
    return torch.tensor(ids[:n_tokens], dtype=torch.long)


def chunk_tokens(ids: Tensor, seq_len: int = DEFAULT_SEQ_LEN) -> list[Tensor]:
    """[1, L] chunks of a token stream (the last one may be shorter)."""
    return [ids[i : i + seq_len].unsqueeze(0) for i in range(0, ids.numel(), seq_len)]


def check_enough_tokens(n_tokens: int, hidden: int, where: str = "calibration data") -> None:
    """Σ is (hidden+1)² with the bias row: fewer tokens than that cannot make it full rank."""
    if n_tokens < hidden + 1:
        raise DataError(
            f"{where} gives {n_tokens} tokens, fewer than the {hidden + 1} needed for a full-rank "
            f"covariance of the hidden size {hidden}; give more text or a larger --calib-tokens "
            f"(at least {hidden + 1}, ideally 10x that)"
        )


# --- cache keys ----------------------------------------------------------------------------------


def checkpoint_fingerprint(folder: Union[str, Path]) -> str:
    """A cheap hash of a checkpoint: config.json, each weight file's size, header and sampled bytes.

    Reading every byte of a large checkpoint just for a cache key would cost as much as
    calibrating; the safetensors header (names, shapes, offsets) plus three 64 KiB samples per
    file changes whenever any realistic edit of the weights does.
    """
    folder = Path(folder)
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        p = folder / name
        if name == "config.json" or name.endswith(".safetensors.index.json"):
            h.update(name.encode() + p.read_bytes())
        elif name.endswith(".safetensors") and p.is_file():
            size = p.stat().st_size
            h.update(f"{name}:{size}".encode())
            with open(p, "rb") as f:
                for off in (0, size // 2, max(0, size - 65536)):
                    f.seek(off)
                    h.update(f.read(65536))
    return h.hexdigest()


def cache_key(folder: Union[str, Path], chunks: Sequence[Tensor], site: Optional[str] = None) -> str:
    h = hashlib.sha256(checkpoint_fingerprint(folder).encode())
    if site is not None:  # the attention input keeps its old keys (existing caches stay valid)
        h.update(f"site={site}".encode())
    for c in chunks:
        h.update(f"|{c.shape[-1]}|".encode())
        h.update(c.to(torch.int64).numpy().tobytes())
    return h.hexdigest()[:24]


# --- layer-by-layer execution -------------------------------------------------------------------


class _StopForward(Exception):
    pass


class _Recorder(nn.Module):
    """Stands in for a decoder layer: records the keyword arguments the model passes it."""

    def __init__(self, sink: list, last: bool):
        super().__init__()
        self.sink, self.last = sink, last

    def forward(self, hidden_states, *args, **kwargs):
        self.sink.append((args, kwargs))
        if self.last:
            raise _StopForward
        return hidden_states


def _find_layers(model: nn.Module, n_layers: int) -> tuple[str, nn.ModuleList]:
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n_layers:
            return name, mod
    raise CheckpointError(f"cannot find the {n_layers} decoder layers in {type(model).__name__}")


def _attention_module(layer: nn.Module) -> nn.Module:
    for name in ATTENTION_NAMES:
        if isinstance(getattr(layer, name, None), nn.Module):
            return getattr(layer, name)
    raise CheckpointError(f"cannot find the attention module of {type(layer).__name__} (looked for {ATTENTION_NAMES})")


class _CheckpointLayout:
    """Which checkpoint tensors make each model parameter, by transformers' own loading rules.

    transformers 5 loads some families through a checkpoint conversion mapping
    (`transformers.conversion_mapping`), applied inside `from_pretrained` and reversed by
    `save_pretrained`: Mixtral's checkpoints hold `block_sparse_moe.gate` and one
    `experts.N.w1/w2/w3` per expert, the module has `mlp.gate` and the stacked
    `mlp.experts.gate_up_proj` [E, 2I, D] (w1 and w3 concatenated) and `down_proj` [E, D, I]; the
    Qwen2-MoE family and the families mapped onto it are stacked the same way. Building the
    skeleton from the config and loading it layer by layer must make the same renamings and run
    the same tensor operations, so the rules are transformers' own objects
    (`get_model_conversion_mapping`, `rename_source_key`, the converters' `convert`), not a copy
    of them: a family transformers renames next release is loaded the way it loads it.
    """

    def __init__(self, model: PreTrainedModel, names: Iterable[str]):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

        transforms = get_model_conversion_mapping(model)  # the split convert_and_load_state_dict_in_model makes
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        meta = model.state_dict()  # on meta: names and shapes only
        prefix = getattr(model, "base_model_prefix", None)
        # target parameter -> (the converter, or None for a plain rename; [(checkpoint name, pattern)])
        self.sources: dict[str, tuple[Optional[Any], list[tuple[str, str]]]] = {}
        # natural order (experts.2 before experts.10): the converters stack experts in list order
        for key in sorted(names, key=dot_natural_key):
            target, pattern = rename_source_key(key, renamings, converters, prefix, meta)
            if target not in meta and key in meta:  # what transformers does: keep a name the model has
                target, pattern = rename_source_key(key, [], [], prefix, meta)
            if target not in meta:
                continue  # a tensor the model does not hold (transformers reports it as unexpected)
            converter = None if pattern is None else by_pattern[pattern]
            self.sources.setdefault(target, (converter, []))[1].append((key, pattern or key))

    def load(self, model: nn.Module, names: Iterable[str], reader: TensorReader) -> dict[str, Tensor]:
        """The tensors of the given parameter names (full names in `model`), converted as transformers would."""
        from copy import deepcopy

        wanted = set(names)
        out: dict[str, Tensor] = {}
        for target, (converter, sources) in self.sources.items():
            if target not in wanted:
                continue
            if converter is None:
                out[target] = reader.get(sources[0][0])
                continue
            job = deepcopy(converter)  # it collects tensors: one instance per target, as in from_pretrained
            for key, pattern in sources:
                if key not in reader:
                    raise CheckpointError(f"tensor {key} is missing from the checkpoint")
                job.add_tensor(target, key, pattern, reader.get(key))
            made = job.convert(target, model=model, config=getattr(model, "config", None))
            out.update({k: v[0] if isinstance(v, list) else v for k, v in made.items() if k in wanted})
        return out


def _materialize(
    model: nn.Module, names: Sequence[str], layout: _CheckpointLayout, reader: TensorReader, dtype: torch.dtype
) -> None:
    """Replace the model's meta parameters of these (full) names by the checkpoint's tensors, cast to dtype."""
    tensors = layout.load(model, names, reader)
    for full in names:
        if full not in tensors:
            raise CheckpointError(f"tensor {full} is missing from the checkpoint")
        t = tensors.pop(full).to(dtype)
        owner_name, _, leaf = full.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        param = getattr(owner, leaf)
        if tuple(t.shape) != tuple(param.shape):
            raise CheckpointError(f"tensor {full} has shape {tuple(t.shape)}, the config implies {tuple(param.shape)}")
        setattr(owner, leaf, nn.Parameter(t, requires_grad=False))


def _empty_model(folder: Path):
    """The model skeleton: parameters on meta, buffers (rotary tables, embed scales) real."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.eval(), config


@dataclass(frozen=True)
class RunOptions:
    """Where the calibration's layer passes run and whether they show progress."""

    device: str = "cpu"
    progress: bool = False


_OPTIONS: ContextVar[Optional[RunOptions]] = ContextVar("calibration_options", default=None)


@contextmanager
def options(device: str = "auto", progress: bool = False) -> Iterator[RunOptions]:
    """Run the calibrations started inside on `device` ("auto": CUDA when there is one), with a
    progress bar over layers. A context, so the merge methods' signatures need not carry it."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    run = RunOptions(device=device, progress=progress)
    token = _OPTIONS.set(run)
    try:
        yield run
    finally:
        _OPTIONS.reset(token)


def _to(value: Any, device: torch.device) -> Any:
    """Tensors inside a layer's recorded (args, kwargs) moved to the device (position embeddings, masks)."""
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


@torch.no_grad()
def layer_covariances(
    folder: Union[str, Path],
    chunks: Sequence[Tensor],
    *,
    dtype: torch.dtype = torch.float32,
    out_dir: Optional[Path] = None,
    site: Optional[str] = None,
) -> list[Tensor]:
    """Σ per layer ((D+1)×(D+1) float64) of the attention input over the token chunks.

    Args:
        folder: a Hugging Face checkpoint folder (safetensors).
        chunks: [1, L] token-id tensors.
        dtype: compute dtype of the layers (Σ is always accumulated in float64).
        out_dir: when given, each Σ_i is written there as layer-{i:05d}.safetensors as soon as it
            is complete and not kept in memory (the return value is then empty).
        site: a module path inside each decoder layer whose input is recorded instead (D is then
            that input's width), e.g. "self_attn.o_proj"; None = the attention module's input.
    Returns:
        the list of Σ_i when out_dir is None, else [].
    """
    folder = Path(folder)
    model, config = _empty_model(folder)
    n_layers = int(config.num_hidden_layers)
    prefix, layers = _find_layers(model, n_layers)
    reader = TensorReader(folder)
    layout = _CheckpointLayout(model, reader.names())
    _load_outside_layers(model, layers, layout, reader, dtype)

    originals = list(layers)
    kwargs_by_len: dict[int, list] = {}  # chunk length -> per layer (args, kwargs)
    for L in sorted({c.shape[-1] for c in chunks}):
        sink: list = []
        for i in range(n_layers):
            layers[i] = _Recorder(sink, last=i == n_layers - 1)
        try:
            model(input_ids=chunks[[c.shape[-1] for c in chunks].index(L)], use_cache=False)
        except _StopForward:
            pass
        kwargs_by_len[L] = sink
    for i in range(n_layers):
        layers[i] = originals[i]

    run = _OPTIONS.get() or RunOptions()
    device = torch.device(run.device)
    hidden = [h.to(device) for h in _layer0_inputs(model, layers, chunks)]
    kwargs_by_len = {n: [_to(entry, device) for entry in per_layer] for n, per_layer in kwargs_by_len.items()}
    results: list[Tensor] = []
    reader.close()  # unmap: touched pages of a memory-mapped file count as resident memory
    from tqdm.auto import tqdm

    for i in tqdm(range(n_layers), desc="calibration", unit="layer", disable=not run.progress, dynamic_ncols=True):
        layer = layers[i]
        with TensorReader(folder) as layer_reader:  # reopened per layer for the same reason
            names = [f"{prefix}.{i}.{n}" for n, _ in layer.named_parameters()]
            _materialize(model, names, layout, layer_reader, dtype)
        layer.to(device)
        acc: list[Tensor] = []  # Σ_i, sized by the first input the hook sees (the site's width)

        # The hook (and `First` below) run only within their own loop iteration, so the loop
        # variables they read are the current ones (B023 does not apply).
        def hook(mod, args, kwargs):
            x = args[0] if args else kwargs.get("hidden_states", kwargs.get("input"))
            x = x.reshape(-1, x.shape[-1]).to(torch.float64)
            x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64, device=x.device)], dim=1)
            if not acc:  # noqa: B023
                acc.append(torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device))  # noqa: B023
            acc[0].add_(x.T @ x)  # noqa: B023

        target = _attention_module(layer) if site is None else layer.get_submodule(site)
        handle = target.register_forward_pre_hook(hook, with_kwargs=True)
        for j, h in enumerate(hidden):
            args, kwargs = kwargs_by_len[h.shape[1]][i]
            out = layer(h, *args, **kwargs)
            hidden[j] = out[0] if isinstance(out, tuple) else out
        handle.remove()
        sigma = acc.pop().cpu()
        layers[i] = layer.to("meta")  # drop the weights
        if out_dir is not None:
            save_file({"sigma": sigma}, str(Path(out_dir) / f"layer-{i:05d}.safetensors"))
            del sigma
        else:
            results.append(sigma)
        release_freed_memory()  # each layer's freed buffers would otherwise stay as heap fragments
    return results


def _load_outside_layers(
    model: PreTrainedModel, layers: nn.ModuleList, layout: _CheckpointLayout, reader: TensorReader, dtype
) -> None:
    """Load the embeddings and small norms; the decoder layers wait, an untied output head is skipped."""
    skip = {id(p) for p in layers.parameters()}
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    if out_emb is not None:
        skip |= {id(p) for p in out_emb.parameters()} - {id(p) for p in in_emb.parameters()}
    names = [name for name, param in model.named_parameters() if id(param) not in skip]
    _materialize(model, names, layout, reader, dtype)


def _layer0_inputs(model: nn.Module, layers: nn.ModuleList, chunks: Sequence[Tensor]) -> list[Tensor]:
    """The hidden states entering layer 0 for each chunk (what the recorder saw)."""
    out = []
    for c in chunks:
        grabbed: list = []

        class First(nn.Module):
            def forward(self, hidden_states, *a, **k):
                grabbed.append(hidden_states)  # noqa: B023
                raise _StopForward

        keep = layers[0]
        layers[0] = First()
        try:
            model(input_ids=c, use_cache=False)
        except _StopForward:
            pass
        finally:
            layers[0] = keep
        out.append(grabbed[0])
    return out


# --- the cached entry point ---------------------------------------------------------------------


@dataclass
class Calibration:
    """Per-layer Σ on disk (one safetensors per layer), loaded one layer at a time."""

    folder: Path
    n_layers: int
    n_tokens: int
    key: str

    def sigma(self, layer: int) -> Tensor:
        return load_file(str(self.folder / f"layer-{layer:05d}.safetensors"))["sigma"]


def calibration_chunks(
    source_dir: Union[str, Path],
    calib_data: Union[str, Path, Iterable[str], Tensor, Sequence[Tensor]],
    calib_tokens: int,
    seq_len: int = DEFAULT_SEQ_LEN,
) -> list[Tensor]:
    """Token chunks for calibration: documents from a path (file, folder, dataset name) or a list
    of strings, tokenized with the source's tokenizer; or token ids already (a tensor or a list of
    tensors, e.g. for a checkpoint without a tokenizer), read as one stream."""
    from transformers import AutoTokenizer

    if isinstance(calib_data, Tensor) or (
        isinstance(calib_data, (list, tuple)) and calib_data and all(isinstance(c, Tensor) for c in calib_data)
    ):
        parts = [calib_data] if isinstance(calib_data, Tensor) else list(calib_data)
        ids = torch.cat([p.reshape(-1).to(torch.long) for p in parts])[: int(calib_tokens)]
        return chunk_tokens(ids, seq_len)

    from ..train.data import DataSpec

    # Tensor inputs returned above; what is left is text (mypy cannot narrow the all(...) test).
    text = cast(Iterable[str], calib_data)
    docs = DataSpec(source=str(calib_data)).documents() if isinstance(calib_data, (str, Path)) else iter(text)
    tokenizer = AutoTokenizer.from_pretrained(str(source_dir), trust_remote_code=False)
    ids = tokenize_documents(tokenizer, docs, int(calib_tokens))
    if ids.numel() == 0:
        raise DataError(f"calibration data {calib_data} holds no text")
    return chunk_tokens(ids, seq_len)


def calibrate(
    source_dir: Union[str, Path],
    chunks: Sequence[Tensor],
    cache_dir: Union[str, Path],
    *,
    hidden: Optional[int] = None,
    dtype: torch.dtype = torch.float32,
    site: Optional[str] = None,
) -> Calibration:
    """Σ per layer for these token chunks, computed once and cached under cache_dir (reused after).

    site: see `layer_covariances` (None = the attention input); each site has its own cache key.

    Raises:
        DataError: fewer tokens than hidden+1 (Σ could not be full rank).
    """
    source_dir, cache_dir = Path(source_dir), Path(cache_dir)
    config = read_config(source_dir)
    n_layers = int(config.get("num_hidden_layers") or config["n_layer"])
    hidden = hidden or int(config["hidden_size"])
    n_tokens = int(sum(c.numel() for c in chunks))
    check_enough_tokens(n_tokens, hidden)
    key = cache_key(source_dir, chunks, site)
    final = cache_dir / f"calib-{key}"
    meta_path = final / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        return Calibration(final, meta["n_layers"], meta["n_tokens"], key)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".calib-{key}-", dir=cache_dir))
    try:
        layer_covariances(source_dir, chunks, dtype=dtype, out_dir=tmp, site=site)
        meta = {
            "key": key,
            "n_layers": n_layers,
            "n_tokens": n_tokens,
            "seq_lens": sorted({c.shape[-1] for c in chunks}),
        }
        if site is not None:
            meta["site"] = site
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if final.exists():  # a concurrent run finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Calibration(final, n_layers, n_tokens, key)
