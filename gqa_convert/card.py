"""The model card (README.md) of a converted model, rendered from templates/model_card.md.j2.

The card says what was done and what was measured, and nothing else: every number comes from the
folder's verification.json (written by `gqa-convert verify`), gqa_convert.json (written by
`convert`) and uptrain.json (written by `uptrain`), when present. The YAML metadata is built as
data with huggingface_hub's ModelCardData (so `model-index` is the hub's own schema) and checked
by parsing it back before the card is written.

Metadata choices:
- base_model: the source's hub repo id (from the convert record, or a hub cache path); left out
  when the source is only a local folder, because the hub accepts repo ids only.
- base_model_relation: "finetune". The hub knows adapter, merge, quantized and finetune; a
  regrouped model has new k/v weights derived from the source and (normally) further training,
  which is a fine-tune of the source, not an adapter, a merge of several models, or a quantization.
- license: inherited from the source (its README metadata, else the alias table); "unknown" if
  neither says.
"""

from __future__ import annotations

import json
import math
import re
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import yaml

from . import __version__
from .errors import CheckpointError, ConfigError
from .fileio import write_text_atomic

TEMPLATE = "model_card.md.j2"
BASE_MODEL_RELATION = "finetune"
TAGS = ["gqa", "gqa-convert", "grouped-query-attention", "text-generation"]
HUB_CACHE_DIR = re.compile(r"models--([^/]+?)--([^/]+)/snapshots/")
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


# How each merge method made the new K/V heads, for the card (docs/merging.md has the details).
METHOD_LINES = {
    "mean": "each new K/V head the mean of a contiguous group of old heads (Ainslie et al., 2023)",
    "align": "old K/V heads aligned by function-preserving rotations, then mean-pooled (Jin et al., 2024)",
    "optimal": "activation-optimal closed-form merge of contiguous K/V-head groups, "
               "the per-head maps absorbed into q_proj/o_proj (calibrated on held-in text)",
}


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); re-run the step that wrote it") from None


def source_repo_id(*candidates: Optional[str]) -> Optional[str]:
    """The first candidate that is a hub repo id, or a huggingface_hub cache snapshot path of one."""
    for c in candidates:
        if not c:
            continue
        m = HUB_CACHE_DIR.search(str(c))
        if m:
            return f"{m.group(1)}/{m.group(2)}"
        if REPO_ID.match(str(c)) and not Path(str(c)).exists():
            return str(c)
        try:
            from .source import aliases

            if str(c) in aliases():
                return aliases()[str(c)].repo
        except Exception:  # the alias table is optional here
            pass
    return None


def source_licence(source_dir: Optional[Path], repo_id: Optional[str]) -> dict[str, str]:
    """{'license': id[, 'license_name', 'license_link']} of the source: README metadata, else alias table."""
    if source_dir:
        readme = Path(source_dir) / "README.md"
        if readme.is_file():
            text = readme.read_text(errors="replace")
            if text.startswith("---"):
                try:
                    meta = yaml.safe_load(text.split("---", 2)[1]) or {}
                except yaml.YAMLError:
                    meta = {}
                if isinstance(meta, dict) and meta.get("license"):
                    return {k: str(meta[k]) for k in ("license", "license_name", "license_link") if meta.get(k)}
    if repo_id:
        try:
            from .source import aliases

            for alias in aliases().values():
                if alias.repo == repo_id and alias.licence:
                    return {"license": alias.licence}
        except Exception:
            pass
    return {"license": "unknown"}


def _local_name(spec: Optional[str]) -> str:
    """A local source shown by its folder name only: absolute paths say nothing to readers and leak the user's layout."""
    return Path(str(spec)).name if spec else "unknown"


def _gb(n: float) -> str:
    return f"{n / 1e9:.4g} GB" if n >= 1e7 else f"{n / 1e6:.4g} MB"


def _flops(n: float) -> str:
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if n >= scale:
            return f"{n / scale:.4g} {unit}"
    return f"{n:.4g} FLOP"


def _saving(old: float, new: float) -> str:
    return f"{100 * (1 - new / old):.1f}%" if old else "n/a"


def _ppl(loss: float) -> str:
    return f"{math.exp(loss):.3f}" if loss < 50 else "inf"


def _human_tokens(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(int(n))


def build_metadata(
    verification: Optional[dict],
    *,
    base_model: Optional[str],
    licence: dict[str, str],
    datasets: list[str],
    model_name: str,
) -> dict[str, Any]:
    """The card's YAML metadata as a dict, via ModelCardData (model-index in the hub's schema)."""
    from huggingface_hub import EvalResult, ModelCardData

    results = []
    if verification and verification.get("loss"):
        loss, data = verification["loss"], verification.get("data", {})
        common = dict(
            task_type="text-generation", task_name="Causal language modeling",
            dataset_type=data.get("dataset_id") or "text", dataset_name=data.get("name") or "held-out text",
            dataset_split=data.get("selection"), verified=False,
        )  # fmt: skip
        results.append(
            EvalResult(
                metric_type="loss",
                metric_name=f"loss at T={verification['context']}",
                metric_value=round(float(loss["converted"]), 4),
                **common,
            )
        )
        results.append(
            EvalResult(
                metric_type="perplexity",
                metric_name=f"perplexity at T={verification['context']}",
                metric_value=round(float(loss["converted_perplexity"]), 4),
                **common,
            )
        )
    data = ModelCardData(
        base_model=base_model,
        base_model_relation=BASE_MODEL_RELATION if base_model else None,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=list(TAGS),
        datasets=datasets or None,
        model_name=model_name,
        eval_results=results or None,
        **licence,
    )
    meta = data.to_dict()
    return {k: v for k, v in meta.items() if v is not None}


UPTRAIN_SKIP = {
    "output",
    "progress",
    "resume",
    "save_every",
    "losses",
    "history",
    "metrics",
    "log",
    "gradient_checkpointing",
    "attn",
}


def read_uptraining(model_dir: Path) -> Optional[dict]:
    """The uptraining settings and result of a folder written by `gqa-convert uptrain`, else None.

    Reads uptrain_config.json + result.json (or a single uptrain.json); local paths are reduced to
    their names, since the record is published.
    """
    model_dir = Path(model_dir)
    parts = [_read_json(model_dir / n) for n in ("uptrain.json", "uptrain_config.json", "result.json")]
    if not any(parts):
        return None
    merged: dict = {}
    for part in parts:
        merged.update(part or {})
    out = {}
    for k, v in merged.items():
        if k in UPTRAIN_SKIP or v is None:
            continue
        if isinstance(v, str) and (v.startswith(("/", "~", "./")) or Path(v).exists()):
            v = Path(v).name
        out[k] = v
    return out


def _uptraining_rows(up: dict) -> list[tuple[str, str]]:
    """Flat (setting, value) rows of uptrain.json, long lists and nested dicts shortened."""
    rows = []
    for k, v in up.items():
        if k in ("history", "metrics", "losses", "log"):
            continue
        if isinstance(v, dict):
            v = ", ".join(f"{a}={b}" for a, b in v.items() if not isinstance(b, (list, dict)))
        elif isinstance(v, float):
            v = f"{v:.4g}"
        elif isinstance(v, list):
            v = f"{len(v)} entries" if len(v) > 8 else ", ".join(map(str, v))
        rows.append((str(k), str(v).replace("|", "\\|")))
    return rows


def render_card(
    model_dir: Path,
    *,
    base_model: Optional[str] = None,
    datasets: Optional[list[str]] = None,
    repo_id: Optional[str] = None,
    reproduce: Optional[str] = None,
    title: Optional[str] = None,
) -> str:
    """The card's text for `model_dir` (README.md content), from the template and the run's records."""
    import jinja2

    model_dir = Path(model_dir)
    config = _read_json(model_dir / "config.json")
    if config is None:
        raise CheckpointError(f"{model_dir} has no config.json: pass a converted model folder")
    ver = _read_json(model_dir / "verification.json")
    record = _read_json(model_dir / "gqa_convert.json") or {}
    up = read_uptraining(model_dir)

    source_spec = (ver or {}).get("source") or record.get("source")
    source_path = (ver or {}).get("source_path") or record.get("source_path")  # only when a caller records one
    base = (
        base_model
        or (ver or {}).get("source_id")
        or source_repo_id(record.get("source_repo"), source_spec, source_path)
    )
    licence = (ver or {}).get("source_licence") or source_licence(Path(source_path) if source_path else None, base)

    from .law.shapes import shape_from_config

    new = shape_from_config(config)
    old_heads = (ver or {}).get("heads", {}).get("source") or record.get("old") or {}
    old = {
        "n_heads": old_heads.get("n_heads", new.n_heads),
        "n_kv": old_heads.get("n_kv", new.n_kv),
        "head_dim": old_heads.get("head_dim", new.head_dim),
    }
    src_params = (ver or {}).get("params", {}).get("source_non_embedding")
    if src_params is None and old_heads:
        src_params = new.with_heads(old["n_heads"], old["n_kv"]).non_embedding_params
    ctx: dict[str, Any] = {
        "title": repo_id.split("/")[-1] if repo_id else (title or model_dir.name),
        "old": old,
        "new": {"n_heads": new.n_heads, "n_kv": new.n_kv, "head_dim": new.head_dim},
        "params": {"source": f"{src_params:,}" if src_params else "n/a", "converted": f"{new.non_embedding_params:,}"},
        "source_line": f"[{base}](https://huggingface.co/{base})"
        if base
        else f"`{_local_name(source_spec)}` (a local checkpoint)",
        "method_line": METHOD_LINES.get(record.get("method", "mean"), f"{record.get('method')} merge"),
        "repo_hint": repo_id or "REPO_ID",
        "verified": ver is not None,
        "passed": bool(ver and ver.get("passed")),
        "reasons": (ver or {}).get("reasons") or ([] if ver else ["no verification.json: run `gqa-convert verify`"]),
        "licence_line": licence.get("license_name") or licence.get("license", "unknown"),
        "plots": sorted(
            p.relative_to(model_dir).as_posix()
            for p in list(model_dir.glob("*.png")) + list(model_dir.glob("plots/*.png"))
        ),
        "costs": None,
        "loss": None,
        "uptraining": None,
    }
    if ver and ver.get("costs"):
        c = ver["costs"]
        kv, fl = c["kv_cache_bytes"], c["flops_per_token"]
        worst = max(abs(x[w]["rel_error"]) for x in (kv, fl) for w in ("source", "converted") if w in x)
        ctx["costs"] = {
            "context": ver["context"], "dtype": c.get("dtype", "model dtype"),
            "kv_source": _gb(kv["source"]["measured"]), "kv_converted": _gb(kv["converted"]["measured"]),
            "kv_saving": _saving(kv["source"]["measured"], kv["converted"]["measured"]),
            "flops_source": _flops(fl["source"]["measured"]), "flops_converted": _flops(fl["converted"]["measured"]),
            "flops_saving": _saving(fl["source"]["measured"], fl["converted"]["measured"]),
            "worst_error": f"{100 * worst:.2f}%", "limit": f"{100 * c.get('limit', 0.02):.3g}%",
        }  # fmt: skip
    if ver and ver.get("loss"):
        lo, data = ver["loss"], ver.get("data", {})
        ctx["loss"] = {
            "data": f"{data.get('name', 'text')} ({data.get('selection', '')})", "tokens": f"{data.get('tokens', 0):,}",
            "context": ver["context"],
            "source": f"{lo['source']:.4f}", "source_ppl": _ppl(lo["source"]),
            "delta": f"{lo['delta']:+.4f}", "predicted": f"{lo['predicted']:.4f}", "predicted_ppl": _ppl(lo["predicted"]),
            "tolerance": f"{lo['tolerance']:.3g}", "limit": f"{lo['limit']:.4f}", "limit_ppl": _ppl(lo["limit"]),
            "converted": f"{lo['converted']:.4f}", "converted_ppl": _ppl(lo["converted"]),
            "law": lo.get("law", "the shipped default"), "notes": " ".join(lo.get("notes") or []),
        }  # fmt: skip
    if up:
        tokens = up.get("tokens") or up.get("train_tokens") or 0
        ctx["uptraining"] = {
            "tokens_human": _human_tokens(float(tokens)) if tokens else "its",
            "rows": _uptraining_rows(up),
        }
    if not datasets:
        up_data = (up or {}).get("data")
        datasets = [
            d
            for d in [
                (up or {}).get("dataset_id"),
                (ver or {}).get("data", {}).get("dataset_id"),
                up_data if isinstance(up_data, str) and REPO_ID.match(up_data) else None,
            ]
            if d
        ]
    metadata = build_metadata(
        ver, base_model=base, licence=licence, datasets=sorted(set(datasets)), model_name=ctx["title"]
    )
    ctx["metadata_yaml"] = yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True, width=100)
    ctx["reproduce"] = reproduce or _reproduce(ver, record, up, model_dir)
    ctx["versions"] = ", ".join(
        f"{k} {v}" for k, v in ((ver or {}).get("versions") or {"gqa-convert": __version__}).items()
    )

    template = resources.files("gqa_convert").joinpath("templates", TEMPLATE).read_text()
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    return re.sub(r"\n{3,}", "\n\n", env.from_string(template).render(**ctx))


UPTRAIN_FLAGS = (
    "data",
    "context",
    "tokens",
    "steps",
    "alpha",
    "lr",
    "batch_size",
    "grad_accum",
    "train",
    "train_start",
    "heldout_docs",
    "distill_from",
    "distill_weight",
    "lora",
    "seed",
)


def _uptrain_command(up: dict, output: str) -> str:
    """`gqa-convert uptrain ...` rebuilt from the recorded settings (budget from the config, not the result)."""
    parts = ["gqa-convert uptrain", str(up.get("model", "MODEL"))]
    budget = [k for k in ("steps", "tokens", "alpha") if up.get(k) is not None][:1]
    for key in UPTRAIN_FLAGS:
        value = up.get(key)
        if value is None or value is False or (key in ("steps", "tokens", "alpha") and key not in budget):
            continue
        if key == "distill_weight" and not up.get("distill_from"):
            continue
        flag = "--" + key.replace("_", "-")
        parts.append(flag if value is True else f"{flag} {value}")
    return " ".join(parts + [f"--output {output}"])


def _reproduce(ver: Optional[dict], record: dict, up: Optional[dict], model_dir: Path) -> str:
    """The commands that rebuild this folder, from the recorded steps."""
    lines = []
    src = record.get("source") or (ver or {}).get("source") or "SOURCE"
    if source_repo_id(src) is None:
        src = _local_name(src)
    converted = (up or {}).get("model") or model_dir.name
    new = record.get("new") or (ver or {}).get("heads", {}).get("converted") or {}
    if record or ver:
        method = record.get("method", "mean")
        lines.append(f"gqa-convert convert {src} --kv-heads {new.get('n_kv', 'N')} --method {method} -o {converted}")
    if up:
        lines.append(up.get("command") or _uptrain_command(up, model_dir.name))
    if ver and ver.get("command"):
        lines.append(str(ver["command"]))
    return "\n".join(lines) or f"# no recorded steps in {model_dir.name}"


def check_card_text(text: str) -> dict:
    """Parse a card's metadata the way the hub client does; ConfigError when it does not parse."""
    from huggingface_hub import ModelCard

    try:
        card = ModelCard(text)
        return card.data.to_dict()
    except Exception as err:
        raise ConfigError(
            f"model card metadata does not parse ({str(err).splitlines()[0]}); fix the template or inputs"
        ) from None


def write_model_card(
    model_dir: Path,
    *,
    base_model: Optional[str] = None,
    datasets: Optional[list[str]] = None,
    repo_id: Optional[str] = None,
    reproduce: Optional[str] = None,
    title: Optional[str] = None,
) -> Path:
    """Render and write MODEL_DIR/README.md atomically (after checking its metadata parses); return its path."""
    model_dir = Path(model_dir)
    text = render_card(model_dir, base_model=base_model, datasets=datasets, repo_id=repo_id, reproduce=reproduce, title=title)
    check_card_text(text)
    return write_text_atomic(model_dir / "README.md", text)
