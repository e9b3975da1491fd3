"""A dry run: what a recipe would do, and the model card it would start from, without weights.

Reads only the source's config.json (and the law). The preview card is the real card template
rendered from the records the run would write before anything is measured: the planned head
change and merge method (gqa_convert.json) and the uptraining settings and budget
(uptrain.json); its verification section says NOT RUN, because nothing has been measured.
`model_cards/` holds the previews of the shipped recipes whose source is at hand offline
(`scripts/render_model_cards.py`; a test keeps them current).
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from .. import __version__
from ..settings import RunSettings


def planned_heads(recipe: RunSettings, config: dict) -> tuple[int, int]:
    """(query heads, KV heads) the run would convert to: the recipe's, `auto` from the law."""
    from ..architectures import get_family, head_shape

    old = head_shape(get_family(config), config)
    kv, q = recipe.kv_heads, recipe.q_heads
    if kv == "auto":
        from ..law.loss import load_law
        from ..plan import plan_conversion

        law = load_law(recipe.law) if recipe.law else None
        p = plan_conversion(config, recipe.context, max_loss_increase=recipe.max_loss_increase, law=law)
        kv = p.recommended.kv_heads
        if q == "auto" and p.recommended_joint is not None:
            q, kv = p.recommended_joint.q_heads, p.recommended_joint.kv_heads
    return (q if isinstance(q, int) else old.n_heads), int(kv)


def preview_card(recipe: RunSettings, *, reproduce: Optional[str] = None) -> str:
    """The model card text the run of `recipe` starts from (see the module docstring)."""
    from ..architectures import get_family, head_shape, new_shape, read_config
    from ..card import render_card
    from ..records import ConversionRecord, HeadLayout, UptrainRecord
    from ..source import aliases, resolve_source

    src = resolve_source(recipe.source, revision=recipe.revision, config_only=True)
    config = read_config(src)
    family = get_family(config)
    old = head_shape(family, config)
    n_q, n_kv = planned_heads(recipe, config)
    new = new_shape(old, n_kv, n_q)
    method = recipe.convert.method
    if method == "auto":
        method = "optimal" if recipe.calibration_spec() is not None else "mean"
    local = Path(recipe.source).expanduser().exists()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / Path(recipe.run_dir).name
        folder.mkdir()
        from ..fileio import write_json_atomic

        write_json_atomic(folder / "config.json", family.updated_config(config, n_kv, n_q))
        ConversionRecord(
            version=__version__,
            source=Path(recipe.source).name if local else recipe.source,
            source_repo=aliases()[recipe.source].repo if recipe.source in aliases() else None,
            revision=recipe.revision,
            family=family.name,
            old=HeadLayout(**asdict(old)),
            new=HeadLayout(**asdict(new)),
            method=method,
        ).write(folder)
        up = recipe.uptrain
        if up.enabled:
            per_step = recipe.context * up.batch_size * up.grad_accum
            steps = up.steps or (up.tokens // per_step if up.tokens else 0)
            UptrainRecord(
                data=Path(up.data).name if up.data and Path(up.data).exists() else up.data,
                context=recipe.context,
                steps=steps,
                tokens=steps * per_step,
                heldout_docs=up.heldout_docs,
                train_start=up.train_start if up.train_start is not None else up.heldout_docs,
                settings=up.model_dump(mode="json", exclude={"enabled", "data"}),
            ).write(folder)
        from ..pipeline.stages import _base_model

        return render_card(
            folder,
            repo_id=recipe.push.repo if recipe.push else None,
            base_model=recipe.card.base_model or _base_model(recipe.source),
            title=recipe.card.title,
            license=recipe.card.license,
            reproduce=reproduce,
        )
