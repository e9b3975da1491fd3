"""The recipe: one YAML file that fully describes a run (torchtune-style plain config).

Its schema is `settings.RunSettings` (see there, and recipes/ for examples). Every key is
validated before any work: an unknown or invalid key is reported by its dotted path together with
what is allowed. `key=value` overrides (`uptrain.steps=100`) are applied before validation, values
parsed as YAML scalars.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .errors import ConfigError
from .settings import RunSettings, validate_settings

# A recipe is a few KB of settings. Bounds that keep a hostile file from costing more than that.
MAX_RECIPE_BYTES = 1 << 20


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
        try:
            value = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError:
            value = raw  # not a YAML scalar: take the text as it is
        _set_dotted(data, key, value)
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping: YAML's last-one-wins would silently
    drop a setting the user wrote (two `steps:` under `uptrain:`, say)."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, (str, int, float, bool)) and key in seen:
            mark = key_node.start_mark
            raise yaml.constructor.ConstructorError(
                None, None, f"key {str(key)[:40]!r} is given twice (line {mark.line + 1}); keep one", mark
            )
        seen.add(key) if isinstance(key, (str, int, float, bool)) else None
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _read(path: Path) -> dict:
    try:
        if not path.is_file():
            raise ConfigError(f"recipe {path} not found (or not a file); see recipes/ for examples")
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read recipe {path}: {err.strerror}") from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise ConfigError(f"recipe {path} is {len(raw):,} bytes; a recipe is a few KB of settings")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"recipe {path} is not UTF-8 text; save it as UTF-8") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader) or {}  # noqa: S506 -- a SafeLoader subclass
    except yaml.constructor.ConstructorError as err:
        raise ConfigError(f"recipe {path}: {err.problem}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"recipe {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    except RecursionError:
        raise ConfigError(f"recipe {path} is nested too deeply") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a YAML mapping of settings")
    return data


def load_recipe(
    path: Union[str, Path, None] = None, overrides: Optional[list[str]] = None, data: Optional[dict] = None
) -> RunSettings:
    """Read, override and validate a recipe. Relative paths in it stay relative to the CWD."""
    if data is None:
        if path is None:
            raise ConfigError("load_recipe needs a path or data")
        data = _read(Path(path))
    data = apply_overrides(dict(data), overrides or [])
    return validate_settings(RunSettings, data, where=f"recipe {path}: " if path else "")


def dump_recipe(recipe: RunSettings) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
