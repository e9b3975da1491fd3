"""Which families we can regroup, and where their attention heads live.

The facts are data (`data/architectures.yaml`); the code here is one small adapter per LAYOUT
that turns a layer's tensors into the canonical `regroup.AttentionBlock` and back:

- separate:       q_proj / k_proj / v_proj / o_proj (Llama and most others), optional biases/norms
- fused_qkv:      one [Q; K; V] projection, contiguous row blocks (Phi-3 qkv_proj)
- falcon_grouped: one projection grouped per KV group: [q x r, k, v] for each group, r = H/H_kv
                  (Falcon new_decoder_architecture query_key_value)
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Union

import torch
import yaml
from torch import Tensor

from .errors import CheckpointError, SourceNotFoundError, UnsupportedModelError
from .regroup import AttentionBlock, HeadShape

BLOCK_ROLES = ("q_w", "k_w", "v_w", "o_w", "q_b", "k_b", "v_b", "q_norm", "k_norm")


@dataclass(frozen=True)
class Family:
    """One model family's attention facts, as read from architectures.yaml."""

    name: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    layout: str
    tensors: dict[str, str]  # canonical role -> name template with {i}
    optional: frozenset[str] = frozenset()
    kv_field: str = "num_key_value_heads"
    heads_field: str = "num_attention_heads"
    head_dim_rule: str = "config"  # "config": config.head_dim or hidden/heads; "hidden": hidden/heads
    requires: tuple[dict, ...] = ()
    notes: str = ""
    layers_field: str = "num_hidden_layers"
    q_heads_refused: str = ""  # why the query-head count cannot change ("" = it can)

    def n_layers(self, config: dict) -> int:
        return int(config[self.layers_field])

    def layer_tensor_names(self, i: int) -> dict[str, str]:
        """Role -> tensor name for layer i (optional roles included; they may be absent)."""
        return {role: tpl.format(i=i) for role, tpl in self.tensors.items()}

    def split(self, i: int, tensors: dict[str, Tensor], shape: HeadShape) -> AttentionBlock:
        """Canonical block from layer i's tensors (a dict name -> tensor, as stored)."""
        names = self.layer_tensor_names(i)
        by_role = {}
        for role, name in names.items():
            if name in tensors:
                by_role[role] = tensors[name]
            elif role not in self.optional:
                raise CheckpointError(
                    f"tensor {name} is missing: the checkpoint does not look like a {self.name} model "
                    f"(its config says model_type {self.model_types[0]!r})"
                )
        block = LAYOUTS[self.layout].split(by_role, shape)
        _check_block(block, shape, f"{self.name} layer {i}")
        return block

    def join(self, i: int, block: AttentionBlock, new_shape: HeadShape) -> dict[str, Tensor]:
        """Layer i's tensors (name -> tensor) in this family's layout from a canonical block."""
        _check_block(block, new_shape, f"{self.name} layer {i} after regrouping")
        names = self.layer_tensor_names(i)
        return {names[role]: t for role, t in LAYOUTS[self.layout].join(block, new_shape).items()}

    def joined_shapes(
        self, i: int, shapes: dict[str, tuple[int, ...]], old: HeadShape, new: HeadShape
    ) -> dict[str, tuple[int, ...]]:
        """Shapes `join` will produce for layer i, from the stored shapes alone (no tensors read):
        lets the writer lay out its shards before the first tensor is computed."""
        rows = LAYOUTS[self.layout].rows
        out = {}
        for role, name in self.layer_tensor_names(i).items():
            if name in shapes:
                shape = shapes[name]
                if role == "o_w":  # its columns are the query heads' outputs
                    shape = (shape[0], new.n_heads * new.head_dim)
                out[name] = (rows(role, shape[0], old, new), *shape[1:])
        return out

    def updated_config(self, config: dict, new_kv: int, n_heads: Optional[int] = None) -> dict:
        """A copy of config.json with the KV-head count (and, given n_heads, the query-head count) changed.

        head_dim, rope settings, sliding windows, tied embeddings and everything else are kept
        verbatim (the head size does not depend on the KV count, so nothing else needs writing).
        A query-head change writes `head_dim` explicitly: the classes fall back to
        hidden_size / num_attention_heads, which is no longer the head size.
        """
        out = copy.deepcopy(config)
        out[self.kv_field] = int(new_kv)
        # The converted model is a stock transformers class: custom code is never carried over (it
        # would need trust_remote_code), and a model_type that the source left out is written, so
        # that AutoConfig can load the output.
        out.pop("auto_map", None)
        out.setdefault("model_type", self.model_types[0])
        if n_heads is not None and int(n_heads) != int(config[self.heads_field]):
            self.check_query_heads()
            out["head_dim"] = head_shape(self, config).head_dim
            out[self.heads_field] = int(n_heads)
        return out

    def check_query_heads(self) -> None:
        """UnsupportedModelError (one line, with the reason) when this family's class cannot hold
        fewer query heads of the same size (a head_dim decoupled from hidden_size / heads)."""
        if self.q_heads_refused:
            raise UnsupportedModelError(
                f"{self.name} cannot change its query-head count: {self.q_heads_refused}; "
                f"families that can: {', '.join(n for n, f in families().items() if not f.q_heads_refused)}"
            )

    def o_proj_module(self) -> str:
        """The output projection's module path inside a decoder layer ("self_attn.o_proj"), read
        off the o_w tensor template: where the query-head calibration hooks its input."""
        return self.tensors["o_w"].split("{i}.", 1)[1].rsplit(".", 1)[0]


@dataclass(frozen=True)
class _Layout:
    split: Any
    join: Any
    rows: Any  # (role, rows, old shape, new shape) -> rows after regrouping (plans the output)


def _check_block(block: AttentionBlock, shape: HeadShape, where: str) -> None:
    """Shapes of a canonical block against a HeadShape (catches wrong layouts and bad methods)."""
    d, H, K, hid = shape.head_dim, shape.n_heads, shape.n_kv, shape.hidden
    want = {
        "q_w": (H * d, hid),
        "k_w": (K * d, hid),
        "v_w": (K * d, hid),
        "o_w": (hid, H * d),
        "q_b": (H * d,),
        "k_b": (K * d,),
        "v_b": (K * d,),
    }
    for role, expected in want.items():
        t = getattr(block, role)
        if t is not None and tuple(t.shape) != expected:
            raise CheckpointError(
                f"{where}: {role} has shape {tuple(t.shape)}, expected {expected} for "
                f"{H} query heads, {K} KV heads, head_dim {d}, hidden {hid}"
            )
    if block.k_norm is not None and block.k_norm.shape[0] not in (d, K * d):
        raise CheckpointError(f"{where}: k_norm has {block.k_norm.shape[0]} weights, expected {d} or {K * d}")


# --- layout: separate projections ---------------------------------------------------------------


def _split_separate(t: dict[str, Tensor], shape: HeadShape) -> AttentionBlock:
    # Any: required roles are present (Family.split checks), optional ones may be None
    roles: dict[str, Any] = {role: t.get(role) for role in BLOCK_ROLES}
    return AttentionBlock(**roles)


def _join_separate(block: AttentionBlock, shape: HeadShape) -> dict[str, Tensor]:
    return {role: getattr(block, role) for role in BLOCK_ROLES if getattr(block, role) is not None}


def _rows_separate(role: str, rows: int, old: HeadShape, new: HeadShape) -> int:
    per_kv = role in ("k_w", "v_w", "k_b", "v_b") or (role == "k_norm" and rows == old.n_kv * old.head_dim)
    per_q = role in ("q_w", "q_b") or (role == "q_norm" and rows == old.n_heads * old.head_dim)
    if per_kv:
        return rows // old.n_kv * new.n_kv
    return rows // old.n_heads * new.n_heads if per_q else rows


# --- layout: fused contiguous [Q; K; V] (Phi-3) --------------------------------------------------


def _split_fused(t: dict[str, Tensor], shape: HeadShape) -> AttentionBlock:
    sizes = [shape.n_heads * shape.head_dim, shape.n_kv * shape.head_dim, shape.n_kv * shape.head_dim]
    _check_rows(t["qkv_w"], sum(sizes), "qkv_proj")
    q, k, v = torch.split(t["qkv_w"], sizes, dim=0)
    qb = kb = vb = None
    if t.get("qkv_b") is not None:
        qb, kb, vb = torch.split(t["qkv_b"], sizes, dim=0)
    return AttentionBlock(q_w=q, k_w=k, v_w=v, o_w=t["o_w"], q_b=qb, k_b=kb, v_b=vb)


def _join_fused(block: AttentionBlock, shape: HeadShape) -> dict[str, Tensor]:
    out = {"qkv_w": torch.cat([block.q_w, block.k_w, block.v_w], dim=0), "o_w": block.o_w}
    if block.q_b is not None:
        assert block.k_b is not None and block.v_b is not None  # fused biases come and go together
        out["qkv_b"] = torch.cat([block.q_b, block.k_b, block.v_b], dim=0)
    return out


# --- layout: fused, grouped per KV group [q x r, k, v] (Falcon new decoder) ----------------------


def _split_grouped(t: dict[str, Tensor], shape: HeadShape) -> AttentionBlock:
    K, r, d = shape.n_kv, shape.group_size, shape.head_dim
    _check_rows(t["qkv_w"], (shape.n_heads + 2 * K) * d, "query_key_value")

    def parts(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        g = x.reshape(K, r + 2, d, *x.shape[1:])  # group-major: query head h belongs to group h // r
        rest = x.shape[1:]
        return g[:, :r].reshape(K * r * d, *rest), g[:, r].reshape(K * d, *rest), g[:, r + 1].reshape(K * d, *rest)

    q, k, v = parts(t["qkv_w"])
    qb = kb = vb = None
    if t.get("qkv_b") is not None:
        qb, kb, vb = parts(t["qkv_b"])
    return AttentionBlock(q_w=q, k_w=k, v_w=v, o_w=t["o_w"], q_b=qb, k_b=kb, v_b=vb)


def _join_grouped(block: AttentionBlock, shape: HeadShape) -> dict[str, Tensor]:
    K, r, d = shape.n_kv, shape.group_size, shape.head_dim

    def fuse(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        rest = q.shape[1:]
        g = torch.cat([q.reshape(K, r, d, *rest), k.reshape(K, 1, d, *rest), v.reshape(K, 1, d, *rest)], dim=1)
        return g.reshape(K * (r + 2) * d, *rest)

    out = {"qkv_w": fuse(block.q_w, block.k_w, block.v_w), "o_w": block.o_w}
    if block.q_b is not None:
        assert block.k_b is not None and block.v_b is not None  # fused biases come and go together
        out["qkv_b"] = fuse(block.q_b, block.k_b, block.v_b)
    return out


def _rows_fused(role: str, rows: int, old: HeadShape, new: HeadShape) -> int:
    return (new.n_heads + 2 * new.n_kv) * new.head_dim if role in ("qkv_w", "qkv_b") else rows


def _check_rows(t: Tensor, rows: int, what: str) -> None:
    if t.shape[0] != rows:
        raise CheckpointError(f"{what} has {t.shape[0]} rows, expected {rows} from the config's head counts")


LAYOUTS = {
    "separate": _Layout(_split_separate, _join_separate, _rows_separate),
    "fused_qkv": _Layout(_split_fused, _join_fused, _rows_fused),
    "falcon_grouped": _Layout(_split_grouped, _join_grouped, _rows_fused),
}


# --- loading the data and recognising a config ---------------------------------------------------


@lru_cache(maxsize=1)
def _data() -> dict:
    text = resources.files("gqa_convert").joinpath("data/architectures.yaml").read_text()
    return yaml.safe_load(text)


@lru_cache(maxsize=1)
def families() -> dict[str, Family]:
    """All supported families by name."""
    out = {}
    for name, f in _data()["families"].items():
        out[name] = Family(
            name=name,
            model_types=tuple(f["model_types"]),
            architectures=tuple(f.get("architectures", [])),
            layout=f["layout"],
            tensors=dict(f["tensors"]),
            optional=frozenset(f.get("optional", [])),
            kv_field=f.get("kv_field", "num_key_value_heads"),
            heads_field=f.get("heads_field", "num_attention_heads"),
            head_dim_rule=f.get("head_dim", "config"),
            requires=tuple(f.get("requires", [])),
            notes=f.get("notes", ""),
            q_heads_refused=" ".join(f.get("q_heads_refused", "").split()),
        )
        assert out[name].layout in LAYOUTS, f"architectures.yaml: unknown layout {out[name].layout}"
    return out


def unsupported_reasons() -> dict[str, str]:
    """model_type -> why it is refused."""
    return {k: " ".join(v.split()) for k, v in _data()["unsupported"].items()}


def supported_list() -> str:
    return ", ".join(families())


MAX_CONFIG_BYTES = 16 << 20


def read_config(folder: Union[str, Path]) -> dict:
    """config.json of a checkpoint folder as a dict: the package's one reader of config.json."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise SourceNotFoundError(f"{folder} has no config.json: not a Hugging Face checkpoint folder")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:  # real configs are kilobytes; reading gigabytes would only exhaust memory
        raise CheckpointError(
            f"{path} is {size / 1e6:.0f} MB, not a model config (at most {MAX_CONFIG_BYTES >> 20} MB); is it the right file?"
        )
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({str(err)[:120]})") from None
    except RecursionError:
        raise CheckpointError(f"{path} is nested too deeply to be a model config") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} holds a JSON {type(config).__name__}, not an object of model settings")
    return config


def get_family(config: dict) -> Family:
    """The family of a config.json dict, or UnsupportedModelError saying why not.

    Recognised by model_type, else by the architectures class name; a family's layout
    conditions (e.g. Falcon's new_decoder_architecture) are checked here too.
    """
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    found: Optional[Family] = None
    for fam in families().values():
        if model_type in fam.model_types:
            found = fam
            break
    if found is None and not model_type:
        for fam in families().values():
            if any(a in fam.architectures for a in archs):
                found = fam
                break
    if found is None:
        reasons = unsupported_reasons()
        label = model_type or (archs[0] if archs else "unknown")
        if model_type in reasons:
            raise UnsupportedModelError(
                f"{label} cannot be converted: {reasons[model_type]}. Supported families: {supported_list()}"
            )
        raise UnsupportedModelError(
            f"unknown model family {label!r} (model_type {model_type!r}, architectures {archs}); "
            f"supported families: {supported_list()}"
        )
    for cond in found.requires:
        value = config.get(cond["field"], cond.get("default"))
        if value != cond["equals"]:
            why = " ".join(cond["why"].split())
            raise UnsupportedModelError(f"{found.name} with {cond['field']}={value} cannot be converted: {why}")
    return found


def head_shape(family: Family, config: dict) -> HeadShape:
    """Query heads, KV heads, head size and hidden size, the way the family's class reads them."""
    missing = [k for k in ("hidden_size", family.heads_field) if not isinstance(config.get(k), int)]
    if missing:
        raise CheckpointError(
            f"config.json lacks {' and '.join(missing)} (a whole number each), which {family.name} models need; "
            "is it a complete transformers config?"
        )
    hidden = int(config["hidden_size"])
    n_heads = int(config[family.heads_field])
    n_kv = config.get(family.kv_field)
    n_kv = n_heads if n_kv is None else int(n_kv)
    head_dim = config.get("head_dim") if family.head_dim_rule == "config" else None
    head_dim = int(head_dim) if head_dim else hidden // n_heads
    if n_kv <= 0 or n_heads % n_kv:
        raise CheckpointError(f"config has {n_heads} query heads and {n_kv} KV heads: not a valid GQA shape")
    return HeadShape(n_heads=n_heads, n_kv=n_kv, head_dim=head_dim, hidden=hidden)


def new_shape(shape: HeadShape, new_kv: int, n_heads: Optional[int] = None) -> HeadShape:
    """The shape after a conversion: new KV count, optionally a new query-head count (same head_dim)."""
    heads = shape.n_heads if n_heads is None else int(n_heads)
    return HeadShape(n_heads=heads, n_kv=new_kv, head_dim=shape.head_dim, hidden=shape.hidden)
