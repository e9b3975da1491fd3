"""model_cards/ holds the dry-run card of each offline recipe, current with the recipe and template."""

import subprocess
import sys

from conftest import ROOT, STORIES_BIN, need


def test_model_cards_are_current():
    need(STORIES_BIN)
    res = subprocess.run(
        [sys.executable, "scripts/render_model_cards.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    card = (ROOT / "model_cards" / "demo-stories260k.md").read_text()
    assert "8 query / 4 KV heads" in card and "8 query / 2 KV heads" in card and "license: mit" in card
    assert "Verification: NOT RUN" in card  # a dry run measures nothing, and says so
