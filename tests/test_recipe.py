"""Recipe schema: every shipped recipe validates; bad keys are named with what is allowed."""

from pathlib import Path

import pytest

from gqa_convert.errors import ConfigError
from gqa_convert.recipe import load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_recipes_are_shipped():
    names = {p.stem for p in RECIPES}
    assert {
        "llama-3-8b-kv2-128k",
        "llama-2-7b-mha-kv8",
        "mistral-7b-kv2-32k",
        "qwen2.5-7b-kv2-32k",
        "smollm2-135m-laptop",
        "demo-stories260k",
    } <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.context > 0
    assert recipe.run_dir


def _write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


BASE = "source: x\nkv_heads: 2\ncontext: 8K\nrun_dir: runs/x\n"


def test_unknown_key_named_with_allowed(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_recipe(_write(tmp_path, BASE + "uptrain: {enabled: true, data: d, steps: 3, stepz: 4}\n"))
    msg = str(e.value)
    assert "uptrain.stepz" in msg and "steps" in msg and "\n" not in msg


def test_unknown_top_level_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'kv_head'.*kv_heads"):
        load_recipe(_write(tmp_path, BASE + "kv_head: 3\n"))


def test_invalid_value_and_missing_key(tmp_path):
    with pytest.raises(ConfigError, match="convert.method"):
        load_recipe(_write(tmp_path, BASE + "convert: {method: median}\n"))
    with pytest.raises(ConfigError, match="missing required key 'kv_heads'"):
        load_recipe(_write(tmp_path, "source: x\ncontext: 8K\nrun_dir: r\n"))
    with pytest.raises(ConfigError, match="context"):
        load_recipe(_write(tmp_path, BASE.replace("8K", "12x")))


def test_budget_rules(tmp_path):
    with pytest.raises(ConfigError, match="exactly one budget"):
        load_recipe(_write(tmp_path, BASE + "uptrain: {enabled: true, data: d, steps: 3, tokens: 5M}\n"))
    with pytest.raises(ConfigError, match="uptrain.data"):
        load_recipe(_write(tmp_path, BASE + "uptrain: {enabled: true, steps: 3}\n"))


def test_overrides(tmp_path):
    r = load_recipe(
        _write(tmp_path, BASE),
        ["uptrain.enabled=true", "uptrain.data=d.txt", "uptrain.steps=7", "push.repo=me/model", "kv_heads=auto"],
    )
    assert r.uptrain.steps == 7 and r.push.repo == "me/model" and r.kv_heads == "auto"
    with pytest.raises(ConfigError, match="key=value"):
        load_recipe(_write(tmp_path, BASE), ["uptrain.steps"])
    with pytest.raises(ConfigError, match="push.repo"):
        load_recipe(_write(tmp_path, BASE), ["push.repo=notarepo"])


def test_verification_never_scores_training_documents(tmp_path):
    with pytest.raises(ConfigError, match="trained on"):
        load_recipe(
            _write(
                tmp_path,
                BASE + "uptrain: {enabled: true, data: d, steps: 3, heldout_docs: 50}\nverify: {heldout_docs: 200}\n",
            )
        )
