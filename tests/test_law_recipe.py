"""The three-step recipe against the paper: Table 4, its trends, the Llama-3 reference losses,
the predefined shapes of Tables 7 and 9; and `gqa-convert law optimize|table`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from gqa_convert.commands import main
from gqa_convert.law.loss import CONVERSION_LAW, DESIGN_LAW, candidates, load_law
from gqa_convert.law.recipe import (
    LLAMA3_REFERENCE,
    TABLE4,
    TABLE4_CONTEXTS,
    TABLE4_LOSSES,
    TABLE7,
    TABLE9,
    aspect_ratio,
    optimize,
    params_of,
    solve_layers,
    table,
    table4_match,
)
from gqa_convert.law.shapes import ModelShape

# What the shipped law reaches (docs/law.md): exact cells, cells more than one doubling off. Issue 16
# asks for at least 24 and none; the calibration in ../shared/reference/law-calibration.md had 26 and 1.
DEFAULT_LAW_CELLS = 29
DEFAULT_LAW_FAR = 0


def test_candidates_are_the_papers_21():
    c = candidates(32)
    assert len(c) == 21 and (32, 32) in c and (1, 1) in c and all(k <= h for h, k in c)


def test_shape_search_recovers_predefined_shapes():
    """A multi-head model (n_h = d/64) with 12·L·d² parameters gets back exactly its table shape."""
    for L, d in TABLE9 + TABLE7:
        n = 12 * L * d * d
        assert params_of(L, d, d // 64, d // 64) == n
        assert float(aspect_ratio(n)) == pytest.approx(d / L)
        layers = float(solve_layers(n, d // 64, d // 64, d / L))
        assert layers == pytest.approx(L, rel=1e-9)


def _print_grid(grid, name):
    print(f"\nTable 4 cells reproduced exactly by {name}: {table4_match(grid)}/40")
    for i, loss in enumerate(TABLE4_LOSSES):
        print(
            f"  {loss:<5}",
            "  ".join(f"{h:>2},{k:<2}{' ' if (h, k) == TABLE4[loss][j] else '*'}" for j, (h, k) in enumerate(grid[i])),
        )


def _far_cells(grid) -> list:
    return [
        (loss, TABLE4_CONTEXTS[j], (h, k), TABLE4[loss][j])
        for i, loss in enumerate(TABLE4_LOSSES)
        for j, (h, k) in enumerate(grid[i])
        if abs(math.log2(h / TABLE4[loss][j][0])) > 1 or abs(math.log2(k / TABLE4[loss][j][1])) > 1
    ]


def test_table4_reproduction_of_the_design_law():
    """The law `law optimize` / `law table` use by default: the paper's Table 4."""
    grid = table()  # default: DESIGN_LAW
    _print_grid(grid, "the shipped law (the default of law optimize/table)")
    assert table4_match(grid) >= 28
    assert _far_cells(grid) == []


def test_table4_reproduction_default_law():
    """One law for both jobs (issue 16): the monotone law of plan/verify IS the design law, and it
    reproduces at least 24/40 cells (floor: what the calibration reaches, so a regression shows),
    every cell within one doubling of n_h and n_kv."""
    assert DESIGN_LAW == CONVERSION_LAW == "shipped:default"
    grid = table(load_law(CONVERSION_LAW))
    _print_grid(grid, "the shipped monotone law (the default of plan/verify)")
    assert table4_match(grid) >= max(24, DEFAULT_LAW_CELLS)
    assert len(_far_cells(grid)) == DEFAULT_LAW_FAR == 0


def _violations(grid) -> list[str]:
    """Places where head counts rise with T at fixed L*, or fall as L* is lowered at fixed T."""
    bad = []
    for i in range(len(grid)):  # along T at fixed L*: never rise
        for j in range(1, len(grid[i])):
            if grid[i][j][0] > grid[i][j - 1][0] or grid[i][j][1] > grid[i][j - 1][1]:
                bad.append(f"row {i}: {grid[i][j - 1]} -> {grid[i][j]} as T grows")
    for j in range(len(grid[0])):  # lowering L* (rows go down in loss): never fall
        for i in range(1, len(grid)):
            if grid[i][j][0] < grid[i - 1][j][0] or grid[i][j][1] < grid[i - 1][j][1]:
                bad.append(f"column {j}: {grid[i - 1][j]} -> {grid[i][j]} as L* is lowered")
    return bad


def test_trends_hold_on_table4_and_wide_grids():
    assert _violations(table()) == []
    # wider in loss and context than Table 4, at its own resolution
    losses = [3.4, 3.2, 3.0, 2.9, 2.8, 2.7, 2.6, 2.5, 2.4, 2.35, 2.3]
    contexts = [2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144, 524288]
    assert _violations(table(losses=losses, contexts=contexts)) == []


def test_trends_hold_on_a_fine_grid():
    losses = list(np.round(np.arange(3.3, 2.279, -0.01), 4))
    contexts = sorted({int(2048 * 2 ** (i / 4)) for i in range(33)})
    for name in (CONVERSION_LAW, DESIGN_LAW):
        bad = _violations(table(load_law(name), losses=losses, contexts=contexts))
        print(
            f"\ntrend violations of {name} on a {len(losses)}x{len(contexts)} grid: {len(bad)}", *bad[:10], sep="\n  "
        )
        assert bad == []  # the shipped law has none (the retired `shipped:table4` has 8: two narrow pockets)


@pytest.mark.parametrize("name", [None, "shipped:table4"])
def test_llama3_reference_losses(name):
    law = load_law(name)
    for key, ((L, d, ff), ref) in LLAMA3_REFERENCE.items():
        s = ModelShape(L, d, d // 64, 8, 64, ff, 50304)
        pred = law.loss(s.non_embedding_params, s.n_heads, s.n_kv)
        print(f"Llama-3 {key}: predicted {pred:.4f}, paper {ref}")
        assert abs(pred - ref) <= 0.02
        if name is None:  # the shipped law also under the other reading of "the 1B/3B/8B scale": N = 12·L·d²
            label = law.loss(12 * L * d * d, d // 64, 8)
            print(f"Llama-3 {key} at N = 12·L·d²: predicted {label:.4f}")
            assert abs(label - ref) <= 0.02


def test_optimize_beats_llama3_heads_at_long_context():
    opt = optimize(2.6, 131072)
    assert opt.best.z == min(c.z for c in opt.candidates)
    assert (int(opt.best.n_heads), opt.best.n_kv) in candidates(32)
    assert opt.llama3 is not None and opt.memory_saved_pct > 30 and opt.flops_saved_pct > 30
    law = load_law(DESIGN_LAW)
    assert law.loss(opt.best.n_params, opt.best.n_heads, opt.best.n_kv) == pytest.approx(2.6)
    assert law.loss(opt.llama3.n_params, opt.llama3.n_heads, 8) == pytest.approx(2.6)
    assert opt.shape.hidden % 64 == 0 and abs(opt.shape_loss - 2.6) < 0.02


def test_cli_optimize_and_table(capsys):
    assert main(["law", "optimize", "--loss", "2.6", "--context", "128k", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("n_heads", "n_kv", "best", "shape", "llama3", "memory_saved_pct", "flops_saved_pct"):
        assert key in out
    assert main(["law", "optimize", "--loss", "2.6", "--context", "131072"]) == 0
    text = capsys.readouterr().out
    assert "Cost-optimal heads" in text and "Saved against Llama-3" in text
    assert main(["law", "table"]) == 0
    assert "cells equal the paper's Table 4" in capsys.readouterr().out
    assert main(["law", "table", "--losses", "2.9,2.5", "--contexts", "8K", "16384", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["contexts"] == [8192, 16384] and len(out["grid"]) == 2


@pytest.mark.parametrize(
    "args,match",
    [
        (["law", "optimize", "--loss", "2.6", "--context", "12x"], "--context"),
        (["law", "optimize", "--loss", "2.6", "--context", "0"], "--context"),
        (["law", "optimize", "--loss", "2.6", "--context=-8K"], "--context"),
        (["law", "optimize", "--loss", "abc", "--context", "8K"], "--loss"),
        (["law", "optimize", "--loss", "1.0", "--context", "8K"], "irreducible"),
        (["law", "table", "--contexts", "8K", "nope"], "--contexts"),
        (["law", "optimize", "--loss", "2.6", "--context", "8K", "--law", "/nonexistent/law.yaml"], "law file"),
    ],
)
def test_cli_bad_input_one_line(args, match, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("gqa-convert: error:") and match in err and err.count("\n") == 1
