"""Loss law: eq. 7/8 round trip, errors, law files, and fitting a_H, b_H, E to runs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gqa_convert.commands import main
from gqa_convert.errors import ConfigError, LawError
from gqa_convert.law.fit import fit_law, parse_runs, read_runs
from gqa_convert.law.loss import LossLaw, candidates, load_law, save_law


def test_shipped_law_n_star_round_trip():
    law = load_law()
    for h, k in candidates(32) + [(48, 8), (64, 8), (12, 4)]:
        for target in (3.2, 2.8, 2.5, 2.35, 2.2):
            n = law.n_star(target, h, k)
            assert n > 0
            assert law.loss(n, h, k) == pytest.approx(target, abs=1e-10)
    # eq. 8 by hand
    a, b = law.coefficients(16, 2)
    assert law.n_star(2.6, 16, 2) == pytest.approx(a / (2.6 - law.E) ** (1 / b), rel=1e-12)
    assert law.loss(1e9, 16, 2) == pytest.approx((a / 1e9) ** b + law.E, rel=1e-12)


def test_target_at_or_below_E_is_a_one_line_error():
    law = load_law()
    for bad in (law.E, law.E - 0.1, 0.5):
        with pytest.raises(LawError, match="irreducible") as err:
            law.n_star(bad, 32, 8)
        assert "\n" not in str(err.value)


def test_more_heads_lower_loss_and_law_is_provenanced():
    law = load_law()
    assert "Table 4" in law.provenance
    n = 1e9
    assert law.loss(n, 32, 8) < law.loss(n, 8, 8) < law.loss(n, 2, 2)
    assert law.loss(n, 32, 32) < law.loss(n, 32, 1)


def test_law_file_round_trip_and_errors(tmp_path):
    law = load_law()
    p = save_law(law, tmp_path / "law.yaml")
    again = load_law(p)
    assert again.loss(3e8, 16, 4) == pytest.approx(law.loss(3e8, 16, 4), rel=1e-12)
    (tmp_path / "bad.yaml").write_text("E: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_law(tmp_path / "bad.yaml")
    (tmp_path / "bad2.yaml").write_text("form: smooth\nlog_A: {'1': 1}\n")
    with pytest.raises(ConfigError, match="malformed"):
        load_law(tmp_path / "bad2.yaml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_law(tmp_path / "missing.yaml")


# --------------------------------------------------------------------------- fitting
TRUE = {"E": 1.95, (32, 8): (9.0e7, 0.30), (8, 2): (1.6e8, 0.28), (4, 1): (2.4e8, 0.26)}
SIZES = [3e6, 1.9e7, 8.5e7, 1.5e8, 2e8, 4.7e8, 6.8e8, 1.2e9]  # Table 9's model sizes


def _synthetic_runs(seed: int, noise: float) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for (h, k), (a, b) in ((key, v) for key, v in TRUE.items() if key != "E"):
        for n in SIZES:
            rows.append({"N": n, "n_h": h, "n_kv": k, "loss": (a / n) ** b + TRUE["E"] + rng.normal(0, noise)})
    return rows


def test_fit_recovers_known_coefficients_within_reported_uncertainty():
    result = fit_law(parse_runs(_synthetic_runs(seed=7, noise=0.004)))
    law = result.law
    assert result.r2 > 0.999
    assert abs(law.E - TRUE["E"]) <= 3 * law.stderr["E"]
    for key in ((32, 8), (8, 2), (4, 1)):
        a, b = law.heads[key]
        se = law.stderr[f"{key[0]},{key[1]}"]
        assert abs(b - TRUE[key][1]) <= 3 * se["b"], (key, b, se)
        assert abs(a - TRUE[key][0]) <= 3 * se["a"], (key, a, se)
        assert se["b"] < 0.05 and se["a"] < 0.5 * a  # informative, not vacuous


def test_fit_noiseless_is_exact():
    law = fit_law(parse_runs(_synthetic_runs(seed=0, noise=0.0) + _synthetic_runs(seed=1, noise=0.0)[:1])).law
    assert law.E == pytest.approx(TRUE["E"], abs=1e-6)
    assert law.heads[(8, 2)][1] == pytest.approx(0.28, abs=1e-6)


def test_fit_cli_csv_and_json(tmp_path, capsys):
    rows = _synthetic_runs(seed=3, noise=0.002)
    csv_path = tmp_path / "runs.csv"
    csv_path.write_text("N,n_h,n_kv,loss\n" + "".join(f"{r['N']},{r['n_h']},{r['n_kv']},{r['loss']}\n" for r in rows))
    json_path = tmp_path / "runs.json"
    json_path.write_text(json.dumps({"runs": rows}))
    assert len(read_runs(json_path)) == len(read_runs(csv_path)) == 24
    out = tmp_path / "law.yaml"
    assert main(["law", "fit", str(csv_path), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "R² =" in text and "E =" in text and "±" in text
    law = load_law(out)
    assert law.form == "per_head" and set(law.heads) == {(32, 8), (8, 2), (4, 1)}
    assert main(["law", "eval", "--heads", "8", "--kv-heads", "2", "--params", "1B", "--law", str(out), "--json"]) == 0
    val = json.loads(capsys.readouterr().out)
    assert val["loss"] == pytest.approx(law.loss(1e9, 8, 2))
    # a law without the head configuration asked for says so
    assert main(["law", "eval", "--heads", "16", "--kv-heads", "2", "--loss", "2.6", "--law", str(out)]) == 2
    assert "no coefficients for n_h=16" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text,match",
    [
        ("N,n_h,loss\n1e6,4,3.0\n", "missing column 'n_kv'"),
        ("N,n_h,n_kv,loss\nabc,4,2,3.0\n", "not a number"),
        ("N,n_h,n_kv,loss\n1e6,4,3,3.0\n", "n_kv dividing n_h"),
        ("N,n_h,n_kv,loss\n-1e6,4,2,3.0\n", "positive parameter count"),
        ("N,n_h,n_kv,loss\n1e6,4,2,3.0\n2e6,4,2,2.9\n", "cannot fit"),
        ("N,n_h,n_kv,loss\n1e6,4,2,3.0\n2e6,4,2,2.9\n3e6,4,2,2.8\n4e6,4,2,2.7\n1e6,8,8,3\n", "fewer than 2 runs"),
        ('[{"N": 1e6,', "not valid JSON"),
        ('{"runs": 5}', "JSON list"),
        ("N,n_h,n_kv,loss\n", "no runs"),
    ],
)
def test_malformed_runs(tmp_path, text, match, capsys):
    p = tmp_path / "runs.txt"
    p.write_text(text)
    with pytest.raises(ConfigError, match=match):
        fit_law(read_runs(p))
    assert main(["law", "fit", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gqa-convert: error:") and err.count("\n") == 1


# --------------------------------------------------------------------------- the grid form (shipped)
def test_grid_law_reads_its_lattice_and_interpolates_between():
    law = load_law()
    assert law.form == "grid" and law.continuous and law.max_heads == 64
    assert set(law.grid) == set(candidates(64))
    for (h, k), (log_a, b) in law.grid.items():  # lattice points exactly: A_H = (a_H/1e9)^b_H
        a, bb = law.coefficients(h, k)
        assert bb == b and bb * np.log(a / 1e9) == pytest.approx(log_a, rel=1e-12, abs=1e-15)
    # bilinear in (log2 n_h, log2 n_kv): 48 heads sit log2(1.5) of the way from 32 to 64
    w = np.log2(48) - 5
    (u32, b32), (u64, b64) = law.grid[(32, 8)], law.grid[(64, 8)]
    a48, b48 = law.coefficients(48, 8)
    assert b48 == pytest.approx((1 - w) * b32 + w * b64, rel=1e-12)
    assert b48 * np.log(a48 / 1e9) == pytest.approx((1 - w) * u32 + w * u64, rel=1e-12)
    # n_kv above n_h reads as n_kv = n_h; counts above the lattice as its largest (with a note)
    assert law.loss(1e9, 8, 16) == law.loss(1e9, 8, 8)
    assert law.loss(1e9, 128, 8) == law.loss(1e9, 64, 8)
    assert any("lattice" in n for n in law.extrapolation_notes(1e9, 128, 8))
    # arrays broadcast
    grid = law.loss(np.array([[1e8], [1e9]]), np.array([12, 24, 32]), 4)
    assert grid.shape == (2, 3) and np.all(np.diff(grid, axis=1) < 0)


def test_grid_law_file_errors(tmp_path):
    d = load_law().to_dict()
    d["grid"] = [r for r in d["grid"] if (r["n_heads"], r["n_kv"]) != (16, 2)]
    with pytest.raises(ConfigError, match=r"missing \(16,2\)"):
        LossLaw.from_dict(d)
    d = load_law().to_dict()
    d["grid"][3]["b"] = -0.1
    with pytest.raises(ConfigError, match="positive"):
        LossLaw.from_dict(d)
    with pytest.raises(ConfigError, match="form"):
        LossLaw(E=2.0, form="lattice")


def test_logistic_exponent_and_scaled_variables_round_trip(tmp_path):
    """The smooth form's options used by law-calibration.md's law: b_H = lo + (hi − lo)·σ(poly), and
    x, y centred and scaled."""
    law = LossLaw(E=1.9, log_A={"1": -0.3, "x": -0.05}, b={"1": -1.0, "y": 0.1}, b_link="logistic",
                  b_range=(0.05, 0.6), variables=(2.5, 2.5))  # fmt: skip
    a, b = law.coefficients(32, 8)
    y = (3 - 2.5) / 2.5
    assert b == pytest.approx(0.05 + 0.55 / (1 + np.exp(-(-1.0 + 0.1 * y))), rel=1e-12)
    again = load_law(save_law(law, tmp_path / "logistic.yaml"))
    assert again.loss(3e8, 16, 4) == pytest.approx(law.loss(3e8, 16, 4), rel=1e-12)
    with pytest.raises(ConfigError, match="b_link"):
        LossLaw(E=2.0, log_A={"1": 0.0}, b={"1": 0.3}, b_link="tanh")
