"""`stagesweep analyze`: the summary.json contract, bad input, and the per-checkpoint tables."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stagesweep.cli import UserError, main
from stagesweep.evaluate import analysis
from stagesweep.evaluate.simulate import SimCheckpoint, SimSpec, simulate

MINIMAL = ["checkpoint", "query_id", "n_harmful", "n_benign", "complied"]


def strict_json(path: Path) -> dict:
    def reject(name):
        raise AssertionError(f"{path} contains {name}")

    return json.loads(path.read_text(), parse_constant=reject)


def two_stage_table(**kw) -> pd.DataFrame:
    spec = SimSpec(design="joint", queries=25, draws=2, intercept_sd=0.5, seed=7,
                   checkpoints=[SimCheckpoint("sft", 0.4), SimCheckpoint("dpo", -0.2)], **kw)
    return simulate(spec)


def test_cli_on_minimal_csv_follows_the_contract(tmp_path):
    csv = tmp_path / "minimal.csv"
    two_stage_table()[MINIMAL].to_csv(csv, index=False)
    out = tmp_path / "out"
    code = subprocess.run(
        [sys.executable, "-c",
         "import sys; from stagesweep.cli import main; rc = main(sys.argv[1:]); "
         "assert 'torch' not in sys.modules, 'analyze imported torch'; sys.exit(rc)",
         "analyze", str(csv), "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert code.returncode == 0, code.stderr
    assert "sft -> dpo" in code.stdout
    summary = strict_json(out / "summary.json")
    assert list(summary["checkpoints"]) == ["sft", "dpo"]  # order of first appearance
    for c in summary["checkpoints"].values():
        assert isinstance(c["n_units"], int) and c["n_units"] == 25 * 2 * 16
        assert isinstance(c["compliance_rate"], float) and 0 < c["compliance_rate"] < 1
        effect = c["benign_effect"]
        for key in ("beta", "ci_low", "ci_high", "p_value"):
            assert isinstance(effect[key], float), key
        assert effect["ci_low"] < effect["beta"] < effect["ci_high"]
        assert effect["direction"] in ("amplification", "dilution", "none")
        assert isinstance(c["h_total"]["rejected"], bool)
        for test in c["h_total"]["tests"]:
            assert isinstance(test["n_total"], int)
            assert isinstance(test["chi2"], float) and isinstance(test["p_value"], float)
    assert summary["checkpoints"]["sft"]["benign_effect"]["direction"] == "amplification"
    assert summary["checkpoints"]["dpo"]["benign_effect"]["direction"] == "dilution"
    (diff,) = summary["stage_differences"]
    assert (diff["from"], diff["to"]) == ("sft", "dpo")
    assert diff["delta_beta"] < 0 and diff["ci_high"] < 0 and diff["p_value"] < 0.05
    for name in ("per_checkpoint", "cells", "h_total", "ordering", "format",
                 "stage_differences"):
        assert (out / f"{name}.csv").exists(), name
    h_total = pd.read_csv(out / "h_total.csv")
    assert {"n_total", "chi2", "p_value", "clustered_p_value"} <= set(h_total.columns)
    cells = pd.read_csv(out / "cells.csv")
    assert len(cells) == 2 * 16 and cells["ci_low"].le(cells["rate"]).all()


def test_missing_column_is_a_one_line_error_naming_file_and_column(tmp_path, capsys):
    csv = tmp_path / "bad.csv"
    two_stage_table()[["checkpoint", "query_id", "n_harmful", "complied"]].to_csv(csv)
    assert main(["analyze", str(csv), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert "bad.csv" in err and "'n_benign'" in err and "have:" in err and "query_id" in err


def test_complied_outside_0_1_is_rejected(tmp_path):
    frame = two_stage_table()[MINIMAL]
    frame.loc[3, "complied"] = 2
    with pytest.raises(UserError, match="'complied' must be 0/1"):
        analysis.analyze(frame, tmp_path)


def test_perfect_separation_single_nb_and_tiny_n_are_reported_not_crashed(tmp_path):
    good = two_stage_table()
    good = good[good["checkpoint"] == "sft"]
    all_refused = good.assign(checkpoint="all_refused", complied=0)
    single_nb = good[good["n_benign"] == 16].assign(checkpoint="single_nb")
    tiny = good[good["query_id"] == "q0"].head(3).assign(checkpoint="tiny")
    quasi = good.assign(checkpoint="quasi", complied=(good["n_benign"] > 0).astype(int))
    summary = analysis.analyze(pd.concat([good, all_refused, single_nb, tiny, quasi]), tmp_path)
    strict_json(tmp_path / "summary.json")
    c = summary["checkpoints"]
    assert c["sft"]["benign_effect"].get("skipped") is None
    expected = {"all_refused": "perfect separation", "single_nb": "single N_b value",
                "tiny": "fewer than 2 queries", "quasi": "separation"}
    for name, phrase in expected.items():
        effect = c[name]["benign_effect"]
        assert phrase in effect["skipped"], (name, effect)
        assert effect["beta"] is None and effect["p_value"] is None
        assert effect["direction"] == "none"
    assert "all outcomes identical" in c["all_refused"]["h_total"]["skipped"]
    assert c["all_refused"]["compliance_rate"] == 0.0
    skipped = [d for d in summary["stage_differences"] if d.get("skipped")]
    assert {d["to"] for d in skipped} >= {"all_refused", "single_nb"}
    assert all(d["delta_beta"] is None for d in skipped)


def test_no_phi_variation_skips_h_total_but_fits_b2_without_b1(tmp_path):
    frame = simulate(SimSpec(design="stages", queries=25, b2=0.5, seed=2))
    frame = frame[frame["n_harmful"] == 32]
    out = analysis.analyze(frame, tmp_path)["checkpoints"]["model"]
    assert "no N with more than one phi group" in out["h_total"]["skipped"]
    assert out["h_total"]["tests"] == [] and out["h_total"]["rejected"] is False
    assert out["benign_effect"]["direction"] == "amplification"
    assert out["benign_effect"]["b1"] is None
    assert any("N_h is constant (32)" in n for n in out["benign_effect"]["notes"])


def test_excluded_rows_are_counted_and_kept_out_of_the_fits(tmp_path):
    frame = two_stage_table()
    frame = frame[frame["checkpoint"] == "sft"].reset_index(drop=True)
    frame["complied"] = frame["complied"].astype("Int64")
    frame.loc[:9, "status"] = "overflow"
    frame.loc[10:12, "status"] = "unparsed"
    frame.loc[10:12, "complied"] = pd.NA
    frame.loc[13:14, "complied"] = pd.NA
    out = analysis.analyze(frame, tmp_path)["checkpoints"]["sft"]
    assert out["excluded"] == {"overflow": 10, "unparsed": 3, "complied_missing": 2}
    assert out["n_units"] == len(frame) - 15
    # the zero-demo prompt is the same in both draws: fitted once per query
    assert out["benign_effect"]["n_obs"] == out["n_distinct_prompts"] == len(frame) - 15 - 24


def test_baseline_ordering_format_and_judge_agreement(tmp_path):
    spec = SimSpec(design="joint", queries=30, seed=4, intercept_sd=0.3,
                   ordering={"prefix": -1.0, "random": 0.0, "suffix": 1.0},
                   format_adoption=(0.1, 0.9))
    frame = simulate(spec)
    rng = np.random.default_rng(0)
    second = frame.assign(judge="second_judge")
    flip = rng.random(len(second)) < 0.1
    second.loc[flip, "complied"] = 1 - second.loc[flip, "complied"]
    out = analysis.analyze(pd.concat([frame, second]), tmp_path)["checkpoints"]["model"]
    assert out["baseline"]["n"] == 30  # the bare target is one prompt per query
    (phi,) = out["ordering"]["by_phi"]
    assert phi["phi"] == 0.5 and [r["schedule"] for r in phi["rates"]] == [
        "prefix", "random", "suffix"]
    assert phi["schedule_test"]["p_value"] < 0.05
    gap = phi["suffix_minus_prefix"]
    assert gap["difference_pp"] > 20 and gap["ci_low_pp"] > 0
    fmt = out["format"]["by_opening"]["Answer:"]
    assert fmt["refusals"]["rate"] < 0.3 < 0.7 < fmt["compliant"]["rate"]
    (pair,) = out["judge_agreement"]["pairs"]
    assert pair["judge_a"] == "simulated" and 0.6 < pair["kappa"] < 0.95
    assert out["judge"] == "simulated" and out["n_units"] == len(frame)
    assert (tmp_path / "ordering.csv").read_text().count("suffix") == 1


def test_stage_order_consecutive_pairs_and_user_pairs(tmp_path):
    spec = SimSpec(design="stages", queries=20, seed=5, checkpoints=[
        SimCheckpoint("dpo", -0.1, "dpo", 10), SimCheckpoint("dpo-step5", 0.1, "dpo", 5),
        SimCheckpoint("dpo-step10", 0.0, "dpo", 10), SimCheckpoint("sft", 0.3, "sft", 30),
        SimCheckpoint("base", 0.0, "base")])
    frame = simulate(spec)
    summary = analysis.analyze(frame, tmp_path, pairs=[("base", "dpo")])
    # lineage manifests give a stage's final output its global step: ties go to the final
    assert summary["settings"]["order"] == ["base", "sft", "dpo-step5", "dpo-step10", "dpo"]
    pairs = [(d["from"], d["to"]) for d in summary["stage_differences"]]
    assert pairs == [("base", "sft"), ("sft", "dpo"), ("base", "dpo")]
    assert [r["checkpoint"] for r in summary["trajectory"]] == summary["settings"]["order"]
    with pytest.raises(UserError, match="no checkpoint named 'rlhf'"):
        analysis.analyze(frame, tmp_path, pairs=[("sft", "rlhf")])


def test_sweep_dir_with_results_parquet(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    two_stage_table().to_parquet(sweep / "results.parquet")
    summary = analysis.analyze(sweep, tmp_path / "out")
    assert set(summary["checkpoints"]) == {"sft", "dpo"}
    assert summary["settings"]["clustering"] == "query"
    # a shared-contexts sweep (read from the spec.yaml the sweep writes) clusters by draw too
    shared = simulate(SimSpec(design="joint", queries=10, draws=4, seed=1)).drop(
        columns="contexts")
    shared.to_parquet(sweep / "results.parquet")
    (sweep / "spec.yaml").write_text("designs: []\ncontexts: shared\n")
    summary = analysis.analyze(sweep, tmp_path / "out")
    assert summary["settings"]["clustering"] == "query+draw"
    with pytest.raises(UserError, match="no results.parquet"):
        analysis.analyze(tmp_path / "out", tmp_path / "x")


def test_design_roles_follow_the_table_not_the_names(tmp_path):
    """Sweep-style rows (every count unit has schedule `random`, opening `unchanged`): a
    custom-named ordering design is recognised by its varying schedule, and an ablation design
    gets its own b2 without entering the headline fit unless asked."""
    frame = simulate(SimSpec(design="joint", queries=20, b2=0.4, seed=6,
                             ordering={"prefix": -1.0, "suffix": 1.0}))
    frame["design"] = frame["design"].replace({"ordering": "recency"})
    ablation = simulate(SimSpec(design="joint", queries=20, b2=-0.4, seed=7)).assign(
        design="ablation_orbench")
    ablation["unit_id"] = "abl/" + ablation["unit_id"]
    both = pd.concat([frame, ablation])
    out = analysis.analyze(both, tmp_path)["checkpoints"]["model"]
    assert out["fit_designs"] == ["joint"]
    assert out["benign_effect"]["direction"] == "amplification"
    assert out["benign_effect"]["n_obs"] == 20 * 2 * 16 - 20  # zero-demo prompt once per query
    by_design = out["benign_effect_by_design"]
    assert by_design["ablation_orbench"]["direction"] == "dilution"
    assert [r["schedule"] for r in out["ordering"]["by_phi"][0]["rates"]] == ["prefix", "suffix"]
    assert out["format"]["skipped"]
    only = analysis.analyze(both, tmp_path, designs=["ablation_orbench"])["checkpoints"]["model"]
    assert only["benign_effect"]["direction"] == "dilution"
    with pytest.raises(UserError, match="'recency' is not a count design"):
        analysis.analyze(both, tmp_path, designs=["recency"])


def test_checkpoint_with_every_row_failed(tmp_path):
    good = simulate(SimSpec(design="joint", queries=10, b2=0.3, seed=8))
    dead = good.assign(checkpoint="dead", status="failed", complied=None)
    summary = analysis.analyze(pd.concat([good, dead]), tmp_path)
    strict_json(tmp_path / "summary.json")
    out = summary["checkpoints"]["dead"]
    assert out["n_units"] == 0 and out["excluded"] == {"failed": len(dead)}
    assert out["compliance_rate"] is None and "no usable units" in out["note"]
    assert out["h_total"]["skipped"] == "no usable rows with at least one demonstration"
    (diff,) = summary["stage_differences"]
    assert diff["skipped"].startswith("dead: no usable rows")


def test_a_folder_with_two_copies_of_one_sweep_is_refused(tmp_path):
    for name in ("run", "run-copy"):
        (tmp_path / name).mkdir()
        two_stage_table().to_parquet(tmp_path / name / "results.parquet")
    with pytest.raises(UserError) as err:
        analysis.analyze(tmp_path, tmp_path / "out")
    message = str(err.value)
    assert "\n" not in message and "two copies" in message
    assert str(tmp_path / "run" / "results.parquet") in message
    assert str(tmp_path / "run-copy" / "results.parquet") in message
    doubled = pd.concat([two_stage_table()] * 2)
    with pytest.raises(UserError, match="appears more than once for checkpoint 'sft'"):
        analysis.analyze(doubled, tmp_path / "out")


def test_shared_prompts_count_once_and_h_total_uses_total_count(tmp_path):
    """paper.yaml's designs: 10 cells per query and draw are one prompt in total_count and
    joint, and the zero-demo prompt is one per query; the pooled fit sees each once."""
    frame = simulate(SimSpec(design="paper", queries=12, seed=3, b2=0.2))
    out = analysis.analyze(frame, tmp_path)["checkpoints"]["model"]
    assert out["n_units"] == len(frame)
    assert out["benign_effect"]["n_obs"] == frame["prompt_sha"].nunique() == out[
        "n_distinct_prompts"]
    assert out["h_total"]["designs"] == ["total_count"]
    assert out["h_total"]["alpha_bonferroni"] == pytest.approx(0.05 / 6)
    largest = out["h_total"]["tests"][0]["largest_difference"]
    assert largest["ci_low_pp"] <= largest["difference_pp"] <= largest["ci_high_pp"]
    assert out["baseline"]["n"] == 12 and out["baseline"]["n_queries"] == 12
    assert out["baseline"]["interval"].startswith("query-clustered")


def test_verdict_holm_primary_and_all_three_stage_coefficients(tmp_path):
    frame = two_stage_table()
    summary = analysis.analyze(frame, tmp_path, sesoi_pp=1.5, primary=("dpo", "sft"))
    sft = summary["checkpoints"]["sft"]["benign_effect"]
    assert sft["verdict"] == "amplification" and sft["equivalence"]["sesoi_pp"] == 1.5
    pp = sft["effect_pp"]
    assert pp["ci_low_pp"] < pp["change_pp"] < pp["ci_high_pp"] and pp["change_pp"] > 0
    assert sft["p_holm"] >= sft["p_value"]
    first, second = summary["stage_differences"]
    assert (first["from"], first["to"], first["primary"]) == ("sft", "dpo", False)
    assert (second["from"], second["to"], second["primary"]) == ("dpo", "sft", True)
    for d in (first, second):
        assert d["p_holm"] >= d["p_value"]
        assert set(d["b0_difference"]) >= {"delta", "ci_low", "ci_high", "p_value"}
        assert d["b1_difference"]["ci_low"] < d["b1_difference"]["ci_high"]
    assert first["delta_beta"] == pytest.approx(-second["delta_beta"])
    assert summary["b2_by_checkpoint"][0]["verdict"] == "amplification"
    # a null effect on many queries is negligible, on few inconclusive
    many = simulate(SimSpec(design="joint", queries=600, b2=0.0, intercept_sd=1.0, seed=2))
    few = simulate(SimSpec(design="joint", queries=12, b2=0.0, intercept_sd=1.0, seed=2))
    verdicts = [analysis.analyze(f, tmp_path / "v")["checkpoints"]["model"]["benign_effect"]
                for f in (many, few)]
    assert [v["verdict"] for v in verdicts] == ["negligible", "inconclusive"]
    assert all(v["direction"] == "none" for v in verdicts)


def test_exclusions_are_located_tested_and_bounded(tmp_path):
    frame = simulate(SimSpec(design="joint", queries=40, b2=0.0, intercept_sd=1.0,
                             exclusion=(-5.5, 0.6, 1.5), seed=5))
    out = analysis.analyze(frame, tmp_path)["checkpoints"]["model"]
    block = out["exclusions"]
    distinct = frame.drop_duplicates("prompt_sha")  # the zero-demo prompt once per query
    assert block["n_excluded"] == (distinct["status"] == "overflow").sum() > 0
    assert block["by_status"] == {"overflow": block["n_excluded"]}
    assert sum(c["n_excluded"] for c in block["by_cell"]) == block["n_excluded"]
    assert sum(q["n_excluded"] for q in block["by_query"].values()) == block["n_excluded"]
    assert block["dependence"]["depends"] and "exclusion depends" in block["warning"]
    bounds = block["b2_bounds"]
    assert bounds["as_refused"]["beta"] < bounds["as_complied"]["beta"]
    assert bounds["outer_ci_low"] <= bounds["low"] <= bounds["high"] <= bounds["outer_ci_high"]
    complete = block["complete_queries"]
    assert 0 < complete["n_queries"] < 40
    cells = pd.read_csv(tmp_path / "exclusions_cells.csv")
    assert cells["n_excluded"].sum() == block["n_excluded"]
    assert (tmp_path / "exclusions_queries.csv").exists()
    clean = analysis.analyze(simulate(SimSpec(design="joint", queries=10, seed=5)),
                             tmp_path)["checkpoints"]["model"]["exclusions"]
    assert clean == {"n_excluded": 0, "share": 0.0}


def test_sensitivity_recency_and_observed_vs_fitted(tmp_path):
    spec = SimSpec(design="joint", queries=30, b2=0.3, intercept_sd=1.0, seed=9,
                   ordering={"prefix": -1.0, "middle": -0.5, "interleave": 0.6, "suffix": 1.0})
    out = analysis.analyze(simulate(spec), tmp_path)["checkpoints"]["model"]
    sens = out["sensitivity"]
    assert sens["mixed_model"]["method"].startswith("binomial GLMM, Laplace")
    assert sens["mixed_model"]["ci_low"] < 0.3 < sens["mixed_model"]["ci_high"]
    assert sens["mixed_model"]["intercept_sd"] > 0.5
    shifts = sens["categorical_nb"]["shifts"]
    assert [s["n_benign"] for s in shifts] == [0, 4, 16, 64] and shifts[-1]["log_odds"] > 0
    assert sens["without_zero_demo_cells"]["direction"] == "amplification"
    cells = pd.read_csv(tmp_path / "cells.csv")
    assert (cells["fitted"] - cells["rate"]).abs().max() < 0.2
    recency = out["recency"]
    # at 32 + 32: prefix leaves 32 benign demos after the last harmful one, middle 16, the rest 0
    assert [r["distance"] for r in recency["by_distance"]] == [0, 16, 32]
    assert recency["distance_fit"]["slope"] < 0 < recency["last_k_fit"]["slope"]
    assert recency["n_random_units_without_positions"] == 0
    assert len(pd.read_csv(tmp_path / "recency.csv")) == 3


def test_shared_contexts_with_few_draws_make_no_direction_call(tmp_path):
    frame = simulate(SimSpec(design="stages", queries=20, draws=2, contexts="shared",
                             b2=0.5, seed=4, checkpoints=[SimCheckpoint("sft", 0.5, "sft"),
                                                          SimCheckpoint("dpo", -0.5, "dpo")]))
    summary = analysis.analyze(frame, tmp_path)
    effect = summary["checkpoints"]["sft"]["benign_effect"]
    assert effect["direction"] == "none" and effect["verdict"] == "inconclusive"
    assert effect["p_value"] is None and "only 2 draws" in effect["skipped"]
    assert effect["conditional_on_draws"]["p_value"] < 0.05
    (diff,) = summary["stage_differences"]
    assert diff["p_value"] is None and "draw-level uncertainty" in diff["skipped"]
