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


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipe_runs_where_it_is(path):
    """No shipped recipe asks for flash-attn: on this machine (no flash-attn, no CUDA) the
    pre-flight check that would refuse `attn: flash` passes for every one of them."""
    from gqa_convert.pipeline.stages import preflight

    recipe = load_recipe(path)
    assert recipe.uptrain.attn == "auto"
    preflight(recipe)


def test_refusal_names_the_recipe_key_before_any_work(tmp_path, capsys):
    """`attn: flash` where flash-attn cannot run: refused before the first stage (nothing converted),
    naming the recipe key and its fix, not the uptrain command's --attn flag."""
    from gqa_convert.commands import main

    fixtures = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
    run_dir = tmp_path / "run"
    rc = main(["run", str(RECIPES[0].parent / "demo-stories260k.yaml"), f"run_dir={run_dir}",
               f"source={fixtures / 'stories260K' / 'stories260K.bin'}",
               f"uptrain.data={fixtures / 'text' / 'tinystories_val_head.txt'}", "uptrain.attn=flash"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "uptrain.attn: flash cannot run here" in err[0] and "uptrain.attn: auto" in err[0] and "--attn" not in err[0]
    assert not (run_dir / "converted").exists() and not (run_dir / "state.json").exists()


def test_messages_in_recipe_terms():
    from gqa_convert.pipeline import in_recipe_terms

    assert in_recipe_terms("--lr must be > 0", "uptrain") == "uptrain.lr must be > 0"
    assert in_recipe_terms("--context 4096 is longer", "uptrain") == "context: 4096 is longer"
    assert in_recipe_terms("--context 4096 is longer", "uptrain", top=False) == "--context 4096 is longer"
    assert in_recipe_terms("--device cuda, but none", "verify") == "verify.device: cuda, but none"
    assert in_recipe_terms("--token is private; --debug shows more", "push") == "--token is private; --debug shows more"


def test_a_key_given_twice_is_refused(tmp_path):
    """YAML keeps the last of two equal keys; a recipe must not silently drop a setting."""
    with pytest.raises(ConfigError, match=r"key 'steps' is given twice \(line 7\)"):
        load_recipe(_write(tmp_path, BASE + "uptrain:\n  steps: 3\n  steps: 5\n"))
    with pytest.raises(ConfigError, match="'context' is given twice"):
        load_recipe(_write(tmp_path, BASE + "context: 16K\n"))


def test_sequence_parallel_degree_checked_against_the_converted_heads_before_any_work(tmp_path, capsys):
    """stories260K (8 query heads) converted to 2 KV heads cannot be split over 3 Ulysses ranks:
    refused before the run folder exists, naming the recipe key and the degrees that work;
    `--gpus N` is the pipeline's flag for uptrain.num_processes."""
    from gqa_convert.commands import main
    from gqa_convert.commands.pipeline import recipe_from_flags, register

    fixtures = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
    src, text = fixtures / "stories260K" / "stories260K.bin", fixtures / "text" / "tinystories_val_head.txt"
    run_dir = tmp_path / "run"
    rc = main([str(src), "--kv-heads", "2", "--context", "256", "--data", str(text), "--run-dir", str(run_dir),
               "--gpus", "3", "--set", "uptrain.sequence_parallel=3", "uptrain.steps=2"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "uptrain.sequence_parallel: 3 cannot split 8 query / 2 KV heads" in err[0]
    assert "use one of 1" in err[0] and not run_dir.exists()

    import argparse

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["pipeline", str(src), "--kv-heads", "2", "--context", "256", "--data", str(text),
                              "--steps", "2", "--gpus", "4", "--run-dir", str(run_dir)])  # fmt: skip
    recipe = recipe_from_flags(args)
    assert recipe.uptrain.num_processes == 4 and recipe.hardware.gpus == 4


def test_flag_spellings_of_the_pipeline(tmp_path, capsys):
    """`--gpus 0` is refused in the user's words; `run RECIPE --json key=value` takes the overrides
    after the flag (argparse alone stops the key=value list at it)."""
    from gqa_convert.commands import main

    fixtures = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
    src, text = fixtures / "stories260K" / "stories260K.bin", fixtures / "text" / "tinystories_val_head.txt"
    rc = main([str(src), "--kv-heads", "2", "--context", "256", "--data", str(text), "--steps", "2",
               "--run-dir", str(tmp_path / "a"), "--gpus", "0"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [
        "gqa-convert: error: --gpus must be a whole number >= 1 (processes to uptrain on), not 0"
    ]
    rc = main(["run", str(RECIPES[0].parent / "demo-stories260k.yaml"), "--json", f"run_dir={tmp_path / 'b'}",
               f"source={src}", f"uptrain.data={text}", "uptrain.attn=flash"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("gqa-convert: error: uptrain.attn: flash cannot run here")  # overrides read
