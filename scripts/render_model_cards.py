"""Render model_cards/<recipe>.md: the card each shipped recipe's run starts from (a dry run).

    python scripts/render_model_cards.py [--check]

Only recipes whose source config is at hand offline are rendered (the demo's local stories260K);
a hub-sourced recipe needs the hub for its config.json and is listed as skipped. --check exits 1
when a card on disk differs from what the recipe renders now (tests/test_model_cards.py runs it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = ["demo-stories260k"]  # recipes whose source is a local file in ../shared/fixtures


def render(name: str) -> str:
    import os

    from gqa_convert.pipeline.preview import preview_card
    from gqa_convert.recipe import load_recipe

    here = os.getcwd()
    os.chdir(ROOT)  # recipe paths are relative to the repository root
    try:
        recipe = load_recipe(ROOT / "recipes" / f"{name}.yaml")
        return preview_card(recipe, reproduce=f"gqa-convert run recipes/{name}.yaml")
    finally:
        os.chdir(here)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare with model_cards/ instead of writing")
    args = ap.parse_args()
    stale = []
    for name in OFFLINE:
        text, path = render(name), ROOT / "model_cards" / f"{name}.md"
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
            print(f"wrote {path}")
    others = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml") if p.stem not in OFFLINE)
    print(f"skipped (source config on the hub): {', '.join(others)}")
    if stale:
        print(f"stale: {', '.join(stale)}; run python scripts/render_model_cards.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
