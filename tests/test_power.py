"""`stagesweep power`: a power table from simulations through the analysis's own test."""

from __future__ import annotations

import pytest

from stagesweep.cli import main
from stagesweep.evaluate.power import power_table


def test_power_prints_a_table_that_grows_with_queries(capsys):
    assert main(["power", "--design", "joint", "--queries", "6", "30", "--b2", "0.3",
                 "--sims", "30"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:4] == ["design", "queries", "draws", "b2"]
    rows = [line.split() for line in out[1:3]]
    assert [r[1] for r in rows] == ["6", "30"]
    small, large = (float(r[7]) for r in rows)  # after the population-averaged effect
    assert large >= 0.8 and large > small
    assert "share of 30 simulations" in out[3]


def test_zero_effect_gives_the_false_positive_rate():
    (row,) = power_table(design="joint", queries=[20], draws=2, b2=[0.0], heterogeneity=0.3,
                         sims=60)
    assert row.power <= 0.15
    assert row.units_per_checkpoint == 20 * 2 * 16


def test_stages_design_detects_a_planted_change(tmp_path, capsys):
    csv = tmp_path / "power.csv"
    assert main(["power", "--design", "stages", "--queries", "20", "--b2", "-0.4",
                 "--b2-from", "0.2", "--sims", "15", "--out", str(csv)]) == 0
    assert "delta b2" in capsys.readouterr().out
    text = csv.read_text().splitlines()
    assert text[0].startswith("design,queries") and float(text[1].split(",")[7]) >= 0.8


def test_bad_arguments_are_one_line_errors(capsys):
    assert main(["power", "--queries", "1"]) == 2
    assert "--queries" in capsys.readouterr().err


def test_population_averaged_effect_is_printed_beside_the_planted_one():
    (row,) = power_table(design="joint", queries=[10], draws=2, b2=[0.3], sims=2)
    # random query intercepts (SD 1 by default) pull the marginal slope toward 0
    assert 0.2 < row.population_averaged < 0.3
    (flat,) = power_table(design="joint", queries=[10], draws=2, b2=[0.3], sims=2,
                          intercept_sd=0.0)
    assert flat.population_averaged == pytest.approx(0.3, abs=1e-6)


def test_validate_prints_the_simulation_table(tmp_path, capsys):
    csv = tmp_path / "validate.csv"
    assert main(["power", "--validate", "--sims", "6", "--only", "shared_contexts",
                 "coverage_sd1", "--out", str(csv)]) == 0
    out = capsys.readouterr().out
    assert "| scenario | criterion | target | simulations | rate | MC error |" in out
    rows = list(csv.read_text().splitlines())
    assert len(rows) == 1 + 3 and "no direction call" in out
    assert main(["power", "--validate", "--only", "nonsense"]) == 2
