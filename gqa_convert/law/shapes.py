"""Model shapes: the few numbers the cost model and the loss law need, read from a config.

A `ModelShape` is (L, d, n_h, n_kv, d_h, d_ff, V, tied). It comes from an explicit call, from a
Hugging Face config (dict, `PretrainedConfig`, local folder, alias or hub id — config only, never
weights), or from the paper's shape rule (`paper_shape`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Union

from ..errors import ConfigError, UnsupportedModelError

# Families whose MLP has two matrices (up, down) instead of SwiGLU's three (gate, up, down).
UNGATED_FFN = {"gpt2", "gpt_neox", "gptj", "gpt_bigcode", "phi", "falcon", "opt", "bloom", "starcoder2"}

# Config keys by meaning, first match wins (Llama naming first, then GPT-2/Falcon/NeoX names).
KEYS = {
    "n_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "hidden": ("hidden_size", "n_embd", "d_model"),
    "n_heads": ("num_attention_heads", "n_head", "num_heads"),
    "n_kv": ("num_key_value_heads", "num_kv_heads", "n_head_kv", "multi_query_group_num"),
    "d_ff": ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size"),
    "vocab": ("vocab_size", "padded_vocab_size"),
}


@dataclass(frozen=True)
class ModelShape:
    """A dense decoder: every layer alike. Counts are exact numbers of weights (no norms, biases)."""

    n_layers: int  # L
    hidden: int  # d
    n_heads: int  # n_h, query heads
    n_kv: int  # n_kv, key/value heads
    head_dim: int  # d_h
    d_ff: int  # FFN width (intermediate_size)
    vocab: int  # V
    tied: bool = True  # output embedding shares the input embedding
    gated_ffn: bool = True  # SwiGLU: 3 FFN matrices; else 2
    model_type: str = field(default="", compare=False)  # the config's model_type ("" = unknown)

    def __post_init__(self) -> None:
        for name in ("n_layers", "hidden", "n_heads", "n_kv", "head_dim", "d_ff", "vocab"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"model shape: {name} must be a positive integer, not {value!r}")
        if self.n_heads % self.n_kv:
            raise ConfigError(
                f"model shape: n_kv={self.n_kv} must divide n_heads={self.n_heads} "
                "(query head i reads KV head i // group)"
            )

    # ---- parameter counts (weights only: matrices; norms and biases are left out, < 0.1%)
    @property
    def attention_params_per_layer(self) -> int:
        """q, o: d·d_h·n_h each; k, v: d·d_h·n_kv each."""
        return 2 * self.hidden * self.head_dim * (self.n_heads + self.n_kv)

    @property
    def ffn_params_per_layer(self) -> int:
        return (3 if self.gated_ffn else 2) * self.hidden * self.d_ff

    @property
    def non_embedding_params(self) -> int:
        """N of the loss law: attention and FFN matrices of all layers."""
        return self.n_layers * (self.attention_params_per_layer + self.ffn_params_per_layer)

    @property
    def embedding_params(self) -> int:
        """Input embedding, plus the output embedding when untied."""
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def total_params(self) -> int:
        return self.non_embedding_params + self.embedding_params

    def with_heads(self, n_heads: int, n_kv: int) -> "ModelShape":
        """Same model with a different head configuration (d_h, d, L, FFN unchanged)."""
        return replace(self, n_heads=n_heads, n_kv=n_kv)

    def to_dict(self) -> dict:
        return asdict(self)


def _first(cfg: Mapping[str, Any], names: tuple[str, ...]) -> Any:
    for name in names:
        if cfg.get(name) is not None:
            return cfg[name]
    return None


def _with_defaults(cfg: dict) -> dict:
    """Fill the keys a saved config.json leaves out (class defaults) using transformers' config class."""
    model_type = cfg.get("model_type")
    if not model_type:
        return cfg
    try:
        from transformers import AutoConfig

        full = AutoConfig.for_model(model_type, **{k: v for k, v in cfg.items() if k != "model_type"}).to_dict()
    except Exception:  # unknown to this transformers: use the file as it is
        return cfg
    return {**full, **cfg}


def _family_heads(cfg: dict):
    """The converter's reading of the heads (architectures.head_shape) for a family it knows, so
    the law and the converter never disagree (e.g. StableLM ignores a `head_dim` in its config)."""
    from ..architectures import get_family, head_shape

    try:
        family = get_family(cfg)
    except UnsupportedModelError:
        return None  # planning covers families the converter does not
    try:
        return head_shape(family, cfg)
    except (KeyError, TypeError, ValueError):
        return None


def shape_from_config(config: Union[Mapping[str, Any], Any]) -> ModelShape:
    """ModelShape of a Hugging Face config (a dict as in config.json, or a PretrainedConfig).

    Handles an explicit `head_dim` (Gemma, Qwen3) or hidden/n_heads, a missing
    `num_key_value_heads` (= n_heads, multi-head), Falcon's `multi_query`, SwiGLU vs 2-matrix MLPs,
    tied embeddings, and a nested `text_config` (multimodal wrappers).
    """
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if not isinstance(config, Mapping):
        raise ConfigError(f"expected a model config (dict or PretrainedConfig), not {type(config).__name__}")
    cfg = dict(config)
    if isinstance(cfg.get("text_config"), Mapping):
        cfg = dict(cfg["text_config"])
    cfg = _with_defaults(cfg)
    model_type = str(cfg.get("model_type", ""))
    if cfg.get("num_local_experts") or cfg.get("num_experts") or cfg.get("n_routed_experts"):
        raise UnsupportedModelError(
            f"{model_type or 'this model'} has mixture-of-experts FFNs; the cost model covers dense decoders only"
        )
    values = {key: _first(cfg, names) for key, names in KEYS.items()}
    missing = [k for k in ("n_layers", "hidden", "n_heads", "vocab") if values[k] is None]
    if missing:
        raise UnsupportedModelError(
            f"config of model_type={model_type or '?'} lacks {', '.join(missing)}: not a decoder-only causal LM config"
        )
    n_heads, hidden = int(values["n_heads"]), int(values["hidden"])
    n_kv = values["n_kv"]
    if n_kv is None:
        n_kv = 1 if cfg.get("multi_query") else n_heads
    head_dim = cfg.get("head_dim") or hidden // n_heads
    heads = _family_heads(cfg)
    if heads is not None:  # a family we convert: its head layout as the converter reads it
        n_heads, n_kv, head_dim, hidden = heads.n_heads, heads.n_kv, heads.head_dim, heads.hidden
    gated = model_type not in UNGATED_FFN
    d_ff = values["d_ff"] or (4 * hidden)
    tied = cfg.get("tie_word_embeddings")
    return ModelShape(
        n_layers=int(values["n_layers"]),
        hidden=hidden,
        n_heads=n_heads,
        n_kv=int(n_kv),
        head_dim=int(head_dim),
        d_ff=int(d_ff),
        vocab=int(values["vocab"]),
        tied=True if tied is None else bool(tied),
        gated_ffn=gated,
        model_type=model_type,
    )


def load_model_config(spec: Union[str, Path, Mapping[str, Any]]) -> dict:
    """A config dict from a dict, a local folder / config.json, an alias or a hub id (config only)."""
    if isinstance(spec, Mapping):
        return dict(spec)
    if hasattr(spec, "to_dict"):
        return spec.to_dict()
    from ..architectures import read_config
    from ..source import resolve_source

    path = Path(spec)
    if path.is_file() and path.name == "config.json":
        return read_config(path.parent)
    if path.is_dir():
        return read_config(path)
    return read_config(resolve_source(str(spec), config_only=True))


def load_shape(spec: Union[str, Path, Mapping[str, Any], ModelShape]) -> ModelShape:
    """ModelShape of anything: a shape, a config dict/object, a folder, alias or hub id."""
    if isinstance(spec, ModelShape):
        return spec
    return shape_from_config(load_model_config(spec))
