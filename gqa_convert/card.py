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

import math
import re
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import yaml

from . import __version__
from .architectures import read_config
from .errors import CheckpointError, ConfigError, SourceNotFoundError
from .fileio import write_text_atomic
from .records import ConversionRecord, RetrievalRecord, RetrievalReport, UptrainRecord, VerificationRecord
from .settings import REPO_ID_PATTERN

TEMPLATE = "model_card.md.j2"
BASE_MODEL_RELATION = "finetune"
TAGS = ["gqa", "gqa-convert", "grouped-query-attention", "text-generation"]
HUB_CACHE_DIR = re.compile(r"models--([^/]+?)--([^/]+)/snapshots/")
REPO_ID = re.compile(f"^{REPO_ID_PATTERN}$")


# How each merge method made the new K/V heads, for the card (docs/merging.md has the details).
METHOD_LINES = {
    "mean": "each new K/V head the mean of a contiguous group of old heads (Ainslie et al., 2023)",
    "align": "old K/V heads aligned by function-preserving rotations, then mean-pooled (Jin et al., 2024)",
    "optimal": "activation-optimal closed-form merge of contiguous K/V-head groups, "
    "the per-head maps absorbed into q_proj/o_proj (calibrated on held-in text)",
}


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


def _retrieval_results(report: Optional[RetrievalReport]) -> list[tuple[str, int, float]]:
    """(task, length, converted accuracy) at each task's longest measured length."""
    out = []
    for t in report.tasks if report else []:
        scores = t.scores.get("converted", {})
        if scores:
            length = max(scores)
            out.append((t.task, length, float(scores[length])))
    return out


def _retrieval_context(report: Optional[RetrievalReport]) -> Optional[dict[str, Any]]:
    """The card's retrieval section: a table and one sentence on what was retained."""
    if report is None or not report.tasks:
        return None
    rows = []
    for t in report.tasks:
        for n in sorted({*t.scores.get("source", {}), *t.scores.get("converted", {})}):
            cell = {m: t.scores.get(m, {}).get(n) for m in ("source", "converted")}
            rows.append(
                {
                    "task": t.task,
                    "length": f"{n:,}",
                    **{m: "–" if v is None else f"{100 * v:.0f}%" for m, v in cell.items()},
                }
            )
    src, new = report.mean("source"), report.mean("converted")
    if report.ratio is not None:
        summary = (
            f"Mean retrieval accuracy: source {100 * (src or 0):.0f}%, this model {100 * (new or 0):.0f}%; "
            f"the conversion retained {100 * report.ratio:.0f}% of the source's retrieval accuracy."
        )
    elif src == 0:
        summary = (
            "The source model retrieves nothing at these lengths, so retention could not be measured "
            f"(this model: {100 * (new or 0):.0f}%)."
        )
    else:
        summary = f"Mean retrieval accuracy of this model: {100 * (new or 0):.0f}%."
    depths = ", ".join(f"{d:g}" for d in report.depths)
    return {
        "summary": summary,
        "rows": rows,
        "seed": report.seed,
        "samples": report.samples,
        "depths": depths,
        "notes": " ".join(report.notes),
    }


def build_metadata(
    verification: Optional[VerificationRecord],
    *,
    retrieval: Optional[RetrievalReport] = None,
    base_model: Optional[str],
    licence: dict[str, str],
    datasets: list[str],
    model_name: str,
) -> dict[str, Any]:
    """The card's YAML metadata as a dict, via ModelCardData (model-index in the hub's schema)."""
    from huggingface_hub import EvalResult, ModelCardData

    results = []
    if verification is not None:
        v, used = verification, verification.data
        for kind, value in (("loss", v.loss.converted), ("perplexity", v.loss.converted_perplexity)):
            results.append(
                EvalResult(
                    task_type="text-generation",
                    task_name="Causal language modeling",
                    dataset_type=used.dataset_id or "text",
                    dataset_name=used.name or "held-out text",
                    dataset_split=used.selection,
                    verified=False,
                    metric_type=kind,
                    metric_name=f"{kind} at T={v.context}",
                    metric_value=round(float(value), 4),
                )
            )
    for task, length, value in _retrieval_results(retrieval):
        results.append(
            EvalResult(
                task_type="text-generation",
                task_name="Long-context retrieval",
                dataset_type="gqa-convert/passkey" if task == "passkey" else f"ruler/{task}",
                dataset_name=f"{task} (synthetic, seed {retrieval.seed})" if retrieval else task,
                verified=False,
                metric_type="accuracy",
                metric_name=f"{task} accuracy at {length} tokens",
                metric_value=round(value, 4),
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
        **licence,  # type: ignore[arg-type]  # license, license_name, license_link: all str
    )
    meta = data.to_dict()
    return {k: v for k, v in meta.items() if v is not None}


# Settings that do not change what the model learned: not listed on the card.
UPTRAIN_SKIP = {"save_every", "gradient_checkpointing", "attn", "seed"}


def _uptraining_rows(up: UptrainRecord) -> list[tuple[str, str]]:
    """Flat (setting, value) rows: what the run did, then the settings it ran with."""
    rows = []
    done = {
        "steps": up.steps,
        "tokens": up.tokens,
        (f"held-out loss ({up.eval_slice})" if up.eval_slice else "held-out loss"): up.eval_loss,
        "last batch's training loss": up.final_loss,
        "context": up.context,
        "data": up.data,
        "held-out documents": up.heldout_docs,
        "training from document": up.train_start,
    }
    settings = {k: v for k, v in up.settings.items() if k not in ("steps", "heldout_docs", "train_start")}
    if not settings.get("lora"):
        settings.pop("lora_rank", None)
    for k, v in [*done.items(), *settings.items()]:
        if v is None or v is False or k in UPTRAIN_SKIP:
            continue
        if isinstance(v, float):
            v = f"{v:.4g}"
        elif isinstance(v, (list, tuple)):
            v = ", ".join(map(str, v))
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
    license: Optional[str] = None,
) -> str:
    """The card's text for `model_dir` (README.md content), from the template and the run's records."""
    import jinja2

    model_dir = Path(model_dir)
    try:
        config = read_config(model_dir)
    except SourceNotFoundError:
        raise CheckpointError(f"{model_dir} has no config.json: pass a converted model folder") from None
    weights = sorted(p.name for p in model_dir.glob("*.safetensors"))  # none: a preview from records alone
    ver = VerificationRecord.read(model_dir)
    if weights and ver is not None and ver.weights_sha256 and sorted(ver.weights_sha256) != weights:
        # (push compares the digests; the names alone already tell another model's verification)
        raise CheckpointError(
            f"{model_dir}/verification.json measured other weights ({', '.join(sorted(ver.weights_sha256))[:80]}); "
            f"re-run `gqa-convert verify {model_dir} ...`"
        )
    record = ConversionRecord.read(model_dir) or ConversionRecord()
    up = UptrainRecord.read(model_dir)
    standalone = RetrievalRecord.read(model_dir)
    retrieval = (ver.retrieval if ver else None) or (standalone.report if standalone else None)

    source_spec = ver.source if ver else record.source
    source_path = (ver.source_path if ver else None) or record.source_path  # only when a caller records one
    base = (
        base_model or (ver.source_id if ver else None) or source_repo_id(record.source_repo, source_spec, source_path)
    )
    licence = (ver.source_licence if ver else None) or source_licence(Path(source_path) if source_path else None, base)
    if license:
        licence = {"license": license}

    from .law.shapes import shape_from_config

    new = shape_from_config(config)
    old_heads = ver.heads["source"] if ver else record.old
    old = {
        "n_heads": old_heads.n_heads if old_heads else new.n_heads,
        "n_kv": old_heads.n_kv if old_heads else new.n_kv,
        "head_dim": old_heads.head_dim if old_heads else new.head_dim,
    }
    src_params = ver.params.source_non_embedding if ver else None
    if src_params is None and old_heads:
        src_params = new.with_heads(old["n_heads"], old["n_kv"]).non_embedding_params
    ctx: dict[str, Any] = {
        "title": title or (repo_id.split("/")[-1] if repo_id else model_dir.name),
        "old": old,
        "new": {"n_heads": new.n_heads, "n_kv": new.n_kv, "head_dim": new.head_dim},
        "params": {"source": f"{src_params:,}" if src_params else "n/a", "converted": f"{new.non_embedding_params:,}"},
        "source_line": f"[{base}](https://huggingface.co/{base})"
        if base
        else f"`{_local_name(source_spec)}` (a local checkpoint)",
        "method_line": METHOD_LINES.get(record.method, f"{record.method} merge"),
        "repo_hint": repo_id or "REPO_ID",
        "verified": ver is not None,
        "passed": bool(ver and ver.passed),
        "reasons": ver.reasons if ver else ["no verification.json: run `gqa-convert verify`"],
        "licence_line": licence.get("license_name") or licence.get("license", "unknown"),
        "plots": sorted(
            p.relative_to(model_dir).as_posix()
            for p in list(model_dir.glob("*.png")) + list(model_dir.glob("plots/*.png"))
        ),
        "costs": None,
        "loss": None,
        "uptraining": None,
        "retrieval": _retrieval_context(retrieval),
    }
    if ver:
        c = ver.costs
        kv, fl = c.kv_cache_bytes, c.flops_per_token
        worst = max(abs(row.rel_error) for pair in (kv, fl) for row in (pair.source, pair.converted))
        ctx["costs"] = {
            "context": ver.context, "dtype": c.dtype,
            "kv_source": _gb(kv.source.measured), "kv_converted": _gb(kv.converted.measured),
            "kv_saving": _saving(kv.source.measured, kv.converted.measured),
            "flops_source": _flops(fl.source.measured), "flops_converted": _flops(fl.converted.measured),
            "flops_saving": _saving(fl.source.measured, fl.converted.measured),
            "worst_error": f"{100 * worst:.2f}%", "limit": f"{100 * c.limit:.3g}%",
        }  # fmt: skip
        lo, data = ver.loss, ver.data
        ctx["loss"] = {
            "data": f"{data.name} ({data.selection})", "tokens": f"{data.tokens:,}",
            "context": ver.context,
            "source": f"{lo.source:.4f}", "source_ppl": _ppl(lo.source),
            "delta": f"{lo.delta:+.4f}", "predicted": f"{lo.predicted:.4f}", "predicted_ppl": _ppl(lo.predicted),
            "tolerance": f"{lo.tolerance:.3g}", "limit": f"{lo.limit:.4f}", "limit_ppl": _ppl(lo.limit),
            "converted": f"{lo.converted:.4f}", "converted_ppl": _ppl(lo.converted),
            "law": lo.law, "notes": " ".join(lo.notes),
        }  # fmt: skip
    if up:
        ctx["uptraining"] = {
            "tokens_human": _human_tokens(float(up.tokens)) if up.tokens else "its",
            "rows": _uptraining_rows(up),
        }
    if not datasets:
        candidates = [
            up.dataset_id if up else None,
            ver.data.dataset_id if ver else None,
            up.data if up and up.data and REPO_ID.match(up.data) else None,
        ]
        datasets = [d for d in candidates if d]
    metadata = build_metadata(
        ver,
        retrieval=retrieval,
        base_model=base,
        licence=licence,
        datasets=sorted(set(datasets)),
        model_name=ctx["title"],
    )
    ctx["metadata_yaml"] = yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True, width=100)
    ctx["reproduce"] = reproduce or _reproduce(ver, record, up, model_dir)
    ctx["versions"] = ", ".join(
        f"{k} {v}" for k, v in ((ver.versions if ver else None) or {"gqa-convert": __version__}).items()
    )

    template = (resources.files("gqa_convert") / "templates" / TEMPLATE).read_text()
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    return re.sub(r"\n{3,}", "\n\n", env.from_string(template).render(**ctx))


def _reproduce(
    ver: Optional[VerificationRecord], record: ConversionRecord, up: Optional[UptrainRecord], model_dir: Path
) -> str:
    """The commands that rebuild this folder, from the recorded steps."""
    lines = []
    src = record.source if record.source != "unknown" else (ver.source if ver else "SOURCE")
    if source_repo_id(src) is None:
        src = _local_name(src)
    converted = (up.model if up else None) or model_dir.name
    new = record.new or (ver.heads["converted"] if ver else None)
    if record.new or ver:
        lines.append(
            f"gqa-convert convert {src} --kv-heads {new.n_kv if new else 'N'} --method {record.method} -o {converted}"
        )
    if up and up.command:
        lines.append(up.command)
    if ver and ver.command:
        lines.append(ver.command)
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
    license: Optional[str] = None,
) -> Path:
    """Render and write MODEL_DIR/README.md atomically (after checking its metadata parses); return its path."""
    model_dir = Path(model_dir)
    text = render_card(
        model_dir,
        base_model=base_model,
        datasets=datasets,
        repo_id=repo_id,
        reproduce=reproduce,
        title=title,
        license=license,
    )
    check_card_text(text)
    return write_text_atomic(model_dir / "README.md", text)
