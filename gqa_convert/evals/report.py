"""Retrieval of several models on identical prompts: what `gqa-convert eval` and `verify` report.

    report = retrieval_report({"source": src_dir, "converted": model_dir}, EvalSettings(), context=32768)

The passkey prompts are built once, from the first model's tokenizer (a conversion keeps the
tokenizer), and scored by every model; RULER tasks use the same lm-eval samples for every model
(same seed). Every check runs before the first model is loaded: lengths against the models'
maximum, task names, the [eval] extra when a RULER task is named. A RULER task whose smallest
sample does not fit a length is skipped at that length, with the reason in the report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Optional, Union

from ..errors import ConfigError
from ..records import RetrievalReport, RetrievalTask
from ..settings import EvalSettings

PLOT = "retrieval.png"


def _ruler_tasks(settings: EvalSettings, notes: list[str]) -> list[str]:
    from .ruler import OFFLINE_TASKS, require_lm_eval

    named = [t for t in settings.tasks if t not in ("passkey", "ruler")]
    tasks = list(dict.fromkeys([*(OFFLINE_TASKS if "ruler" in settings.tasks else ()), *named]))
    if not tasks:
        return []
    try:
        require_lm_eval()
    except ConfigError:
        if named:
            raise  # asked for by name: say how to install it
        notes.append("RULER not run: install gqa-convert[eval] (lm-evaluation-harness) to add it")
        return []
    return tasks


def _stderr(message: str) -> None:
    import sys

    print(message, file=sys.stderr)  # stdout is the command's result (a table or --json)


def _device(settings: EvalSettings) -> str:
    from ..verify import _device as checked_device  # --device bogus / cuda without CUDA: one line

    return str(checked_device(settings.device or "auto"))


def retrieval_report(
    models: Mapping[str, Union[str, Path]],
    settings: EvalSettings,
    context: int,
    *,
    plot_dir: Optional[Path] = None,
    log: Optional[Callable[[str], None]] = None,
) -> RetrievalReport:
    """Accuracy by task x length for each model (names are the keys: "source", "converted")."""
    from ..architectures import read_config
    from ..evaluate import load_model
    from .passkey import build_passkey_prompts, minimum_length, passkey_probe, prompts_digest

    lengths = settings.lengths_for(context)
    maxima = []
    for name, folder in models.items():
        max_pos = read_config(Path(folder)).get("max_position_embeddings")
        if max_pos and max(lengths) > max_pos:
            raise ConfigError(
                f"length {max(lengths)} is above the max_position_embeddings {max_pos} of the "
                f"{name} model; use --lengths up to {max_pos}"
            )
        if max_pos:
            maxima.append(int(max_pos))
    maximum = min(maxima) if maxima else None
    notes: list[str] = []
    ruler = _ruler_tasks(settings, notes)
    first = next(iter(models.values()))
    from ..evaluate import load_tokenizer

    tokenizer = load_tokenizer(first)
    passkey = "passkey" in settings.tasks
    prompts = []
    if passkey:
        shortest = minimum_length(tokenizer)
        kept = [n for n in lengths if n >= shortest]
        if len(kept) < len(lengths):
            notes.append(f"passkey lengths below {shortest} tokens (the shortest prompt) left out")
        prompts = (
            build_passkey_prompts(tokenizer, kept, settings.depths, samples=settings.samples, seed=settings.seed)
            if kept
            else []
        )
    ruler_ok: dict[str, list[int]] = {}
    skipped: dict[str, dict[int, str]] = {}
    if ruler:
        from .ruler import check_task_lengths

        for task in ruler:
            for n in lengths:
                try:
                    check_task_lengths([task], [n], tokenizer, maximum)
                    ruler_ok.setdefault(task, []).append(n)
                except ConfigError as err:
                    skipped.setdefault(task, {})[n] = str(err)[:160]

    results = {"passkey": RetrievalTask(task="passkey")} if prompts else {}
    results.update({t: RetrievalTask(task=t, skipped=skipped.get(t, {})) for t in ruler})
    grids, probes = {}, {}
    device = _device(settings)
    for name, folder in models.items():
        (log or _stderr)(f"[eval] {name}: retrieval at {', '.join(map(str, lengths))} tokens")
        model, tok = load_model(folder)
        model.to(device)
        if prompts:
            res = passkey_probe(
                model,
                tok,
                sorted({p.length for p in prompts}),
                settings.depths,
                samples=settings.samples,
                seed=settings.seed,
                batch_size=settings.batch_size,
                prompts=prompts,
                progress=settings.progress,
            )
            results["passkey"].scores[name] = {int(k): float(v) for k, v in res.by_length().items()}
            grids[name] = res.grid()
            probes[name] = res
        for task, ok in ruler_ok.items():
            from .ruler import ruler_scores

            rr = ruler_scores(
                model, tok, ok, [task], settings.ruler_limit, batch_size=settings.batch_size, seed=settings.seed
            )
            results[task].scores[name] = {n: float(rr.score(task, n)) for n in ok}
        del model
    report = RetrievalReport(
        context=context,
        lengths=lengths,
        depths=list(settings.depths),
        samples=settings.samples,
        seed=settings.seed,
        tasks=list(results.values()),
        passkey_grid=grids,
        prompts_sha256=prompts_digest(prompts) if prompts else None,
        notes=notes,
    )
    src, new = report.mean("source"), report.mean("converted")
    if src is not None and new is not None:
        if src > 0:
            report.ratio = new / src
        else:
            report.notes.append("the source retrieves nothing at these lengths: retention is not measurable here")
    if plot_dir is not None and probes:
        from .heatmap import plot_passkey_heatmap

        plot_passkey_heatmap(probes, Path(plot_dir) / PLOT, title=f"passkey retrieval, T={context}")
        report.plot = PLOT
    return report


def format_report(report: RetrievalReport) -> str:
    """The table `eval` and `verify` print: accuracy by task and length, per model."""
    models = sorted({m for t in report.tasks for m in t.scores}, key=lambda m: (m != "source", m))
    lines = [f"retrieval at {', '.join(map(str, report.lengths))} tokens (seed {report.seed})"]
    head = f"  {'task':<18} {'length':>8} " + " ".join(f"{m:>10}" for m in models)
    lines.append(head)
    for t in report.tasks:
        for n in report.lengths:
            if n in t.skipped:
                lines.append(f"  {t.task:<18} {n:>8}   skipped: {t.skipped[n][:70]}")
                continue
            cells = [t.scores.get(m, {}).get(n) for m in models]
            if all(c is None for c in cells):
                continue
            lines.append(
                f"  {t.task:<18} {n:>8} " + " ".join("         -" if c is None else f"{c:>10.3f}" for c in cells)
            )
    if report.ratio is not None:
        lines.append(f"  converted / source accuracy: {report.ratio:.3f}")
    lines += [f"  note: {n}" for n in report.notes]
    return "\n".join(lines)
