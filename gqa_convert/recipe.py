"""The recipe: one YAML file that fully describes a run (torchtune-style plain config).

    source: meta-llama/Meta-Llama-3-8B   # hub id, alias, local folder or llama2.c .bin
    kv_heads: 2                          # or "auto" (the law's recommendation at `context`)
    context: 131072
    run_dir: runs/llama3-8b-kv2
    convert:  {method: mean, max_shard_size: 5GB}
    uptrain:  {data: ..., tokens: 1B, lr: 1e-5, ...}   # omit or `enabled: false` to skip
    verify:   {data: ..., tolerance: 0.05}
    push:     {repo: user/name, private: false}         # omit to keep the model local

Every key is validated before any work: an unknown or invalid key is reported by its dotted
path together with what is allowed. `key=value` overrides (`uptrain.steps=100`) are applied
before validation, values parsed as YAML scalars.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ConfigError
from .units import parse_count

class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ConvertSettings(_Section):
    # auto = optimal when calibration text is at hand (calib_data, else uptrain.data's training
    # documents), mean otherwise: optimal starts far closer to the source (docs/merging.md).
    method: Literal["auto", "mean", "align", "optimal"] = "auto"
    max_shard_size: str = "5GB"
    calib_data: Optional[str] = None  # for align/optimal; defaults to uptrain.data minus its held-out slice
    calib_tokens: int = Field(default=65536, gt=0)
    allow_pickle: bool = False


class UptrainSettings(_Section):
    enabled: bool = True
    data: Optional[str] = None  # file, folder, or HF dataset name
    text_field: str = "text"
    tokens: Optional[Union[int, str]] = None  # budget: one of tokens / steps / alpha
    steps: Optional[int] = Field(default=None, gt=0)
    alpha: Optional[float] = Field(default=None, gt=0, le=1)
    pretraining_tokens: Optional[Union[int, str]] = None
    lr: float = Field(default=1e-4, gt=0)
    batch_size: int = Field(default=8, gt=0)
    grad_accum: int = Field(default=1, gt=0)
    warmup: float = Field(default=0.1, ge=0, lt=1)
    decay: float = Field(default=0.2, ge=0, le=1)
    weight_decay: float = Field(default=0.1, ge=0)
    clip: float = Field(default=1.0, gt=0)
    train: Literal["all", "attention", "kv"] = "all"
    distill_weight: float = Field(default=0.0, ge=0, le=1)
    lora: bool = False
    lora_rank: int = Field(default=16, gt=0)
    attn: Literal["auto", "flash", "sdpa"] = "auto"
    gradient_checkpointing: bool = False
    heldout_docs: int = Field(default=200, ge=0)
    save_every: int = Field(default=50, gt=0)
    seed: int = 0


class VerifySettings(_Section):
    data: Optional[str] = None  # defaults to uptrain.data (its held-out slice)
    tolerance: Optional[float] = Field(default=None, ge=0)
    heldout_docs: int = Field(default=200, gt=0)


class PushSettings(_Section):
    repo: str
    private: bool = False
    revision: Optional[str] = None
    force: bool = False

    @field_validator("repo")
    @classmethod
    def _repo_id(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", v):
            raise ValueError("must be a hub repo id like 'user/name'")
        return v


class Recipe(_Section):
    source: str
    kv_heads: Union[int, Literal["auto"]]
    context: Union[int, str]
    run_dir: str
    revision: Optional[str] = None
    max_loss_increase: Optional[float] = Field(default=None, gt=0)
    law: Optional[str] = None  # a law.yaml from `gqa-convert law fit`; default: the shipped law
    convert: ConvertSettings = Field(default_factory=ConvertSettings)
    uptrain: UptrainSettings = Field(default_factory=lambda: UptrainSettings(enabled=False))
    verify: VerifySettings = Field(default_factory=VerifySettings)
    push: Optional[PushSettings] = None

    @field_validator("kv_heads")
    @classmethod
    def _positive_heads(cls, v):
        if v != "auto" and v <= 0:
            raise ValueError("must be a positive integer or 'auto'")
        return v

    @property
    def context_tokens(self) -> int:
        return parse_count(self.context, what="context", binary_k=True)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        if node.get(part) is None:
            node[part] = {}
        if not isinstance(node[part], dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
        node = node[part]
    node[parts[-1]] = value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b=value` overrides; values are parsed as YAML scalars (`true`, `1e-4`, `null`)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or not re.fullmatch(r"[A-Za-z_][\w.]*", key):
            raise ConfigError(f"override {item!r} must look like key=value, e.g. uptrain.steps=100")
        _set_dotted(data, key, yaml.safe_load(raw) if raw else None)
    return data


def _describe(error: dict, model: type[BaseModel]) -> str:
    """One line for the first pydantic error: its dotted key and what is allowed there."""
    loc = [str(p) for p in error["loc"] if not isinstance(p, int)]
    key = ".".join(loc) or "recipe"
    if error["type"] == "extra_forbidden":
        section: Any = model
        for part in loc[:-1]:
            field = section.model_fields.get(part)
            ann = getattr(field, "annotation", None)
            inner = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
            section = inner[0] if inner else section
        allowed = ", ".join(section.model_fields)
        return f"unknown key {key!r}; allowed here: {allowed}"
    if error["type"] == "missing":
        return f"missing required key {key!r}"
    return f"invalid value for {key!r}: {error['msg']} (got {error.get('input')!r})"


def load_recipe(path: Union[str, Path, None] = None, overrides: Optional[list[str]] = None,
                data: Optional[dict] = None) -> Recipe:
    """Read, override and validate a recipe. Relative paths in it stay relative to the CWD."""
    if data is None:
        path = Path(path)  # type: ignore[arg-type]
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"recipe {path} not found; see recipes/ for examples") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"recipe {path} is not valid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"recipe {path} must be a YAML mapping of settings")
    data = apply_overrides(dict(data), overrides or [])
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        where = f"recipe {path}: " if path else ""
        raise ConfigError(where + _describe(err.errors()[0], Recipe)) from None
    recipe.context_tokens  # validates the context string early
    if recipe.uptrain.enabled:
        budgets = [b for b in (recipe.uptrain.tokens, recipe.uptrain.steps, recipe.uptrain.alpha) if b is not None]
        if len(budgets) != 1:
            raise ConfigError("uptrain needs exactly one budget: uptrain.tokens, uptrain.steps or uptrain.alpha")
        if recipe.uptrain.data is None:
            raise ConfigError("uptrain.data is required when uptrain is enabled (a file, folder or dataset name)")
        same_text = recipe.verify.data in (None, recipe.uptrain.data)
        if same_text and recipe.verify.heldout_docs > recipe.uptrain.heldout_docs:
            raise ConfigError(
                f"verify.heldout_docs ({recipe.verify.heldout_docs}) exceeds uptrain.heldout_docs "
                f"({recipe.uptrain.heldout_docs}): verification would score documents the model was trained on"
            )
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
