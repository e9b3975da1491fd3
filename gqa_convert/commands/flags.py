"""CLI flags generated from the settings models (as mergekit generates its options).

`add_flags(parser, Model)` adds one flag per field: `--name-with-dashes`, the field's help with
its default, choices for a Literal, `--x/--no-x` for a bool. Flags are parsed as text and the
values a user gave are validated by the model itself (`settings_from_args`), so a flag accepts
exactly what the recipe key accepts (`--context 128K` included) and fails with the same one line,
spelled with the flag's name.
"""

from __future__ import annotations

import argparse
import typing
from typing import Any, Iterable, Literal, Optional

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from ..recipe import validate_settings
from ..settings import flag_name

SEP = "."  # dest of a section's flag: "uptrain.data"


def _inner(annotation: Any) -> Any:
    """X of Optional[X] / Annotated[X, ...]."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin is typing.Union:
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return annotation
            annotation = args[0]
        else:
            return annotation


def _metavar(annotation: Any, name: str) -> Optional[str]:
    inner = _inner(annotation)
    if inner is int:
        return "N"
    if inner is float:
        return "X"
    return name.upper()


def add_flags(
    parser: argparse.ArgumentParser | Any,
    model: type[BaseModel],
    *,
    only: Optional[Iterable[str]] = None,
    exclude: Iterable[str] = (),
    positional: Iterable[str] = (),
    optional: Iterable[str] = (),
    require: Iterable[str] = (),
    prefix: str = "",
) -> list[str]:
    """Add a flag for each field of `model` (or those in `only`); return the dests added.

    positional: fields taken as positional arguments. optional: required fields that this
    command does not require (e.g. --context, needed by convert only with --kv-heads auto);
    require: optional fields that this command requires (verify's --data).
    prefix: dest prefix ("uptrain.") for a section's flags on the pipeline command.
    """
    names = list(only) if only is not None else list(model.model_fields)
    positional, optional, exclude, require = set(positional), set(optional), set(exclude), set(require)
    dests = []
    for name in names:
        if name in exclude:
            continue
        info = model.model_fields[name]
        extra: dict[str, Any] = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        help_text = info.description or ""
        required = info.default is PydanticUndefined and info.default_factory is None
        default = None if required else info.get_default(call_default_factory=True)
        if default not in (None, False, "") and not isinstance(default, BaseModel):
            shown = ", ".join(map(str, default)) if isinstance(default, tuple) else default
            help_text += f" (default: {shown})"
        dest = prefix + name
        inner = _inner(info.annotation)
        kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "help": help_text}
        if name in positional:
            kwargs.pop("dest")
            parser.add_argument(dest, metavar=str(extra.get("metavar") or name.upper()), **kwargs)
            dests.append(dest)
            continue
        if inner is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(inner) is Literal:
            # Shown, not enforced by argparse: the model checks it, with the same one-line error
            # as the recipe's (argparse would exit from inside parse_args).
            kwargs["metavar"] = "{" + ",".join(map(str, typing.get_args(inner))) + "}"
        elif typing.get_origin(inner) is tuple:
            kwargs["nargs"] = len(typing.get_args(inner))
            kwargs["metavar"] = "X"
        else:
            kwargs["metavar"] = extra.get("metavar") or _metavar(info.annotation, name)
        if (required and name not in optional) or name in require:
            kwargs["required"] = True
        spellings = [flag_name(name)] + ([extra["short"]] if extra.get("short") else [])
        spellings += list(extra.get("aliases", ()))
        parser.add_argument(*spellings, **kwargs)
        dests.append(dest)
    return dests


def given(args: argparse.Namespace, prefix: str = "") -> dict[str, Any]:
    """The values the user gave for flags under `prefix` (others keep the model's defaults)."""
    out = {}
    for key, value in vars(args).items():
        if prefix and not key.startswith(prefix):
            continue
        if not prefix and SEP in key:
            continue
        out[key[len(prefix) :]] = list(value) if isinstance(value, list) else value
    return out


def settings_from_args(
    model: type[BaseModel],
    args: argparse.Namespace,
    *,
    fields: Iterable[str] = (),
    prefix: str = "",
    extra: Optional[dict] = None,
    positional: Iterable[str] = (),
):
    """Validate the given flags (restricted to `fields` when given) as `model`; errors name the flag."""
    allowed = set(fields) or set(model.model_fields)
    values = {k: v for k, v in given(args, prefix).items() if k in allowed}
    values.update(extra or {})
    pos = set(positional)

    def name(loc: list[str]) -> str:
        last = loc[-1] if loc else ""
        return last.upper() if last in pos else flag_name(last)

    return validate_settings(model, values, name=name)
