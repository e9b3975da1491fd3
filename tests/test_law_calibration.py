"""Issue 16, "one law for both jobs": the calibration published in ../shared/reference/law-calibration.md
checked in this implementation, and the shipped law held to the issue's criteria next to it.

The reference calibration is reproduced as its page states it (its own law form, settings and
coefficients): 26/40 Table 4 cells, Llama-3 references within 0.02 at N = 12·L·d², the largest
monotonicity violation 2e-5 on 12 values of N. It was not adopted because it misses two of the
criteria: one cell is two KV doublings off ((2.9, 8K): (32,4) for the paper's (32,1)), and it is
not monotone (2e-5 above 0 on its own grid, 0.2 nats at 1e5 parameters, so stories260K-sized
conversions would predict a loss GAIN); the shipped law beats it on every criterion.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from gqa_convert.law.cost import CostSettings
from gqa_convert.law.loss import DESIGN_LAW, LossLaw, candidates, load_law
from gqa_convert.law.recipe import (
    LLAMA3_REFERENCE,
    TABLE4,
    TABLE4_CONTEXTS,
    TABLE4_LOSSES,
    RecipeSettings,
    table,
    table4_match,
)
from gqa_convert.law.shapes import ModelShape

# law-calibration.md, "The law": L = e^{u_H}·(1e9/N)^{b_H} + E, X = (log2 n_h − 2.5)/2.5, Y likewise,
# f = [1, X, Y, X², X·Y, Y²], u_H = θu·f, b_H = 0.05 + 0.55·σ(θb·f), E = 1 + 1.34·σ(θE).
THETA_U = [-0.33798698605712324, -0.054405969358220396, -0.09248190231737419,
           0.02128075013537848, -0.013879582509287806, -0.027979804278272832]  # fmt: skip
THETA_B = [-1.0793679388810105, 0.03655082062053407, 0.14240118200664412,
           -0.015152082562446566, 0.02578656441520952, 0.03856417676285357]  # fmt: skip
THETA_E = 0.7494124025046669
MONOMIALS = ["1", "x", "y", "xx", "xy", "yy"]
# "Settings it was found under": M in bytes (bf16), C per sequence, no embeddings, d/L linear in
# log N between the tables' nodes at their size LABELS (3M … 64B; 1.2B is 1.02e9 by 12·L·d²).
REFERENCE_SETTINGS = RecipeSettings(
    interpolation="log", anchors="label", cost=CostSettings(memory_unit="bytes", compute="per_sequence")
)


def reference_law() -> LossLaw:
    return LossLaw(
        E=1 + 1.34 / (1 + math.exp(-THETA_E)),
        form="smooth",
        log_A=dict(zip(MONOMIALS, THETA_U)),
        b=dict(zip(MONOMIALS, THETA_B)),
        b_link="logistic",
        b_range=(0.05, 0.6),
        variables=(2.5, 2.5),
        settings=REFERENCE_SETTINGS.to_dict(),
    )


def far_cells(grid) -> list:
    return [(loss, TABLE4_CONTEXTS[j], (h, k), TABLE4[loss][j])
            for i, loss in enumerate(TABLE4_LOSSES) for j, (h, k) in enumerate(grid[i])
            if abs(math.log2(h / TABLE4[loss][j][0])) > 1 or abs(math.log2(k / TABLE4[loss][j][1])) > 1]  # fmt: skip


def monotone_excess(law: LossLaw, n_grid: np.ndarray, max_heads: int = 32) -> float:
    """Largest loss INCREASE from one doubling of n_h or of n_kv (≤ 0: monotone on the grid)."""
    worst = -np.inf
    for h, k in candidates(max_heads):
        base = law.loss(n_grid, h, k)
        if 2 * k <= h:
            worst = max(worst, float(np.max(law.loss(n_grid, h, 2 * k) - base)))
        if 2 * h <= max_heads:
            worst = max(worst, float(np.max(law.loss(n_grid, 2 * h, k) - base)))
    return worst


def llama3_errors(law: LossLaw) -> dict[str, tuple[float, float]]:
    """(error at N = 12·L·d², error at the real non-embedding count) for 1B, 3B, 8B."""
    out = {}
    for key, ((L, d, ff), ref) in LLAMA3_REFERENCE.items():
        real = ModelShape(L, d, d // 64, 8, 64, ff, 50304).non_embedding_params
        out[key] = (law.loss(12 * L * d * d, d // 64, 8) - ref, law.loss(real, d // 64, 8) - ref)
    return out


TWELVE = np.logspace(np.log10(3e6), np.log10(6.4e10), 12)  # the page's 12 values of N
DENSE = np.logspace(np.log10(3e6), np.log10(6e10), 2001)


def test_reference_calibration_reproduces_its_stated_figures():
    law = reference_law()
    assert law.E == pytest.approx(1.910, abs=5e-4)
    grid = table(law, settings=REFERENCE_SETTINGS)
    assert table4_match(grid) == 26
    # "Selected values": L(N) at 1e8 / 1e9 / 1e10
    for (h, k), values in {(1, 1): (3.125, 2.719, 2.449), (8, 1): (3.051, 2.665, 2.410),
                           (32, 8): (2.968, 2.585, 2.340), (32, 32): (2.899, 2.513, 2.278)}.items():  # fmt: skip
        assert [round(law.loss(n, h, k), 3) for n in (1e8, 1e9, 1e10)] == list(values)
    # Llama-3 references at N = 12·L·d²: errors −0.001, −0.001, +0.015
    errors = llama3_errors(law)
    assert [round(e[0], 3) for e in errors.values()] == [-0.001, -0.001, 0.015]
    # largest monotonicity violation 2e-5 on its 12 values of N
    assert monotone_excess(law, TWELVE) == pytest.approx(1.9e-5, abs=1e-6)


def test_reference_calibration_misses_two_of_the_criteria():
    law = reference_law()
    grid = table(law, settings=REFERENCE_SETTINGS)
    assert far_cells(grid) == [(2.9, 8192, (32, 4), (32, 1))]  # two KV doublings off
    assert monotone_excess(law, DENSE) > 0  # not monotone on 3e6–6e10
    assert monotone_excess(law, np.logspace(5, 6, 11)) > 0.1  # and badly so at stories260K's size
    stories = ModelShape(5, 64, 8, 4, 8, 172, 512)
    n = stories.non_embedding_params
    assert law.delta(n, (8, 4), stories.with_heads(8, 2).non_embedding_params, (8, 2)) < 0  # a loss gain
    # the real Llama-3.2-1B non-embedding count (0.97B, not 12·L·d² = 0.81B) is 0.027 off
    assert llama3_errors(law)["1B"][1] == pytest.approx(-0.027, abs=0.001)


def test_shipped_law_meets_the_criteria_and_beats_the_reference():
    """The issue's criteria on the shipped default, and each at least as well as the reference."""
    law, ref = load_law(), reference_law()
    assert load_law(DESIGN_LAW).to_dict() == law.to_dict()  # one law for both jobs
    grid = table(law)
    ref_grid = table(ref, settings=REFERENCE_SETTINGS)
    print(f"\nTable 4 cells: shipped {table4_match(grid)}/40, reference {table4_match(ref_grid)}/40")
    assert table4_match(grid) >= 24 and table4_match(grid) > table4_match(ref_grid)
    assert far_cells(grid) == []
    # monotone in both head counts over 3e6–6e10 (and 1e5–1e12, 64 heads: tests/test_law_monotone.py)
    assert monotone_excess(law, DENSE, max_heads=64) < 0
    for key, (label, real) in llama3_errors(law).items():
        print(f"Llama-3 {key}: error {label:+.4f} at 12·L·d², {real:+.4f} at the real count")
        assert abs(label) <= 0.02 and abs(real) <= 0.02
