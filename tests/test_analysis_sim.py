"""The analysis against data drawn from known logistic models (evaluate/simulate.py): planted
effects are recovered, intervals cover at about their nominal rate, and the size of the b2 test
stays near alpha when benign slopes differ between queries."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import statsmodels.api as sm

from stagesweep.evaluate import analysis
from stagesweep.evaluate.analysis import fits, hypotheses
from stagesweep.evaluate.simulate import SimCheckpoint, SimSpec, simulate

ALPHA = 0.05


def fit(spec: SimSpec) -> dict:
    frame = analysis.validate(simulate(spec), "simulation")
    return fits.benign_effect(frame, alpha=ALPHA, cluster="query")[0]


def test_planted_b2_is_recovered_with_nominal_coverage():
    # No random effects here, so the population-averaged slope equals the planted one.
    truth = 0.2
    results = [fit(SimSpec(design="joint", queries=30, draws=2, b2=truth, seed=s))
               for s in range(100)]
    betas = np.array([r["beta"] for r in results])
    covered = np.mean([r["ci_low"] <= truth <= r["ci_high"] for r in results])
    assert abs(betas.mean() - truth) < 0.03
    assert 0.85 <= covered <= 0.99, covered


@pytest.mark.parametrize(("b2", "expected"), [(0.4, "amplification"), (-0.4, "dilution")])
def test_direction_follows_the_planted_sign(b2, expected):
    directions = [fit(SimSpec(design="joint", queries=30, b2=b2, intercept_sd=0.5, seed=s))
                  ["direction"] for s in range(10)]
    assert directions.count(expected) >= 9, directions


def test_no_effect_gives_direction_none_mostly():
    directions = [fit(SimSpec(design="joint", queries=30, b2=0.0, intercept_sd=0.5, seed=s))
                  ["direction"] for s in range(20)]
    assert directions.count("none") >= 17, directions


def test_size_stays_near_alpha_when_benign_slopes_vary_between_queries():
    """Random slopes (SD 0.4 on the logit scale per unit log(N_b+1), mean 0): query-clustered
    errors keep the false-positive rate near alpha, while model-based (iid) errors, which treat
    the 32 answers per query as independent, reject far too often -- so the check has teeth."""
    clustered, naive = [], []
    for seed in range(200):
        spec = SimSpec(design="joint", queries=30, draws=2, b2=0.0, intercept_sd=0.5,
                       slope_sd=0.4, seed=seed)
        frame = analysis.validate(simulate(spec), "simulation")
        clustered.append(fits.benign_effect(frame, alpha=ALPHA, cluster="query")[0]["p_value"])
        x = sm.add_constant(fits.design_columns(frame)[["log_nh", "log_nb"]])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = sm.GLM(frame["complied"].astype(float), x, family=sm.families.Binomial()).fit()
        naive.append(res.pvalues["log_nb"])
    fpr = np.mean(np.array(clustered) < ALPHA)
    fpr_naive = np.mean(np.array(naive) < ALPHA)
    assert 0.01 <= fpr <= 0.10, fpr
    assert fpr_naive >= 0.15, fpr_naive


def test_h_total_rejected_under_joint_model_not_under_counting_model():
    def rejected(spec: SimSpec) -> bool:
        frame = analysis.validate(simulate(spec), "simulation")
        return hypotheses.h_total_tests(frame, alpha=ALPHA)["rejected"]

    joint = [rejected(SimSpec(design="total_count", queries=30, b2=-0.5, intercept_sd=0.5,
                              seed=s)) for s in range(10)]
    counting = [rejected(SimSpec(design="total_count", queries=30, counting=True, seed=s))
                for s in range(20)]
    assert sum(joint) >= 9, joint
    assert sum(counting) <= 3, counting


def test_model_comparison_prefers_the_generating_hypothesis():
    joint = analysis.validate(simulate(SimSpec(design="total_count", queries=40, b2=-0.6,
                                               seed=1)), "sim")
    harm = analysis.validate(simulate(SimSpec(design="total_count", queries=40, b2=0.0,
                                              b1=0.6, seed=1)), "sim")
    assert hypotheses.model_comparison(joint)["best_aic"] == "h_joint"
    comparison = hypotheses.model_comparison(harm)
    assert comparison["best_aic"] in ("h_harm", "h_joint")
    assert comparison["lr_tests"][1]["p_value"] < ALPHA  # H_total is rejected against both


def test_planted_stage_drop_is_found_with_an_interval_that_covers():
    truth = -0.35
    results = []
    for seed in range(30):
        spec = SimSpec(design="stages", queries=30, draws=2, intercept_sd=0.5, seed=seed,
                       checkpoints=[SimCheckpoint("sft", 0.25, "sft"),
                                    SimCheckpoint("dpo", 0.25 + truth, "dpo")])
        frame = analysis.validate(simulate(spec), "sim")
        results.append(analysis.stage_difference(frame, "sft", "dpo", alpha=ALPHA,
                                                 cluster="query"))
    found = np.mean([r["ci_high"] < 0 for r in results])
    # random intercepts attenuate the population-averaged slopes by ~4%: allow for it
    covered = np.mean([r["ci_low"] <= truth * 0.96 <= r["ci_high"] for r in results])
    assert found >= 0.9, found
    assert covered >= 0.85, covered


def test_pooled_model_uses_the_pairing_across_checkpoints():
    """Same queries under both checkpoints: the pooled, query-clustered difference must be more
    precise than treating the two checkpoints as independent samples."""
    spec = SimSpec(design="stages", queries=30, draws=2, intercept_sd=1.0, slope_sd=0.3,
                   seed=3, checkpoints=[SimCheckpoint("sft", 0.2, "sft"),
                                        SimCheckpoint("dpo", 0.2, "dpo")])
    frame = analysis.validate(simulate(spec), "sim")
    paired = analysis.stage_difference(frame, "sft", "dpo", alpha=ALPHA, cluster="query")
    ses = [fits.benign_effect(frame[frame["checkpoint"] == c], alpha=ALPHA,
                               cluster="query")[0]["se"] for c in ("sft", "dpo")]
    assert paired["se"] < np.hypot(*ses)


def test_shared_contexts_need_two_way_clustering():
    """Shared contexts (every query sees demo set d) whose benign slope varies by demo set:
    query-only clustering misses the correlation across queries within a draw and over-rejects;
    Cameron-Gelbach-Miller two-way clustering (chosen by `auto` from the `contexts` column)
    keeps the size near alpha."""
    one_way, two_way = [], []
    for seed in range(100):
        spec = SimSpec(design="joint", queries=20, draws=20, contexts="shared", b2=0.0,
                       intercept_sd=0.5, slope_sd=0.2, draw_slope_sd=0.25, seed=seed)
        frame = analysis.validate(simulate(spec), "simulation")
        one_way.append(fits.benign_effect(frame, alpha=ALPHA, cluster="query")[0]["p_value"])
        mode = analysis.choose_cluster(frame, "auto")
        assert mode == "query+draw"
        two_way.append(fits.benign_effect(frame, alpha=ALPHA, cluster=mode)[0]["p_value"])
    fpr_one, fpr_two = np.mean(np.array(one_way) < ALPHA), np.mean(np.array(two_way) < ALPHA)
    assert fpr_two <= 0.10, fpr_two
    assert fpr_one >= fpr_two + 0.05, (fpr_one, fpr_two)


def test_validation_scenarios_hold_on_a_few_datasets():
    """The README's simulation table comes from `stagesweep power --validate` (hundreds of
    datasets); here a few datasets per scenario, with bounds loose enough for that count."""
    from stagesweep.evaluate.analysis import validation

    rows = {r.criterion: r for name in ("exclusions", "mixed_model")
            for r in validation.SCENARIOS[name](12, 500)}
    rows |= {r.criterion: r for r in validation.SCENARIOS["logprob"](60, 500)}
    assert rows["b2 95% interval covers 0.3"].rate >= 0.85
    assert abs(rows["b2 95% interval covers 0.3"].mean_estimate - 0.3) < 0.05
    assert rows["b2 interval excludes 0 (false positive)"].rate <= 0.15
    assert rows["exclusion flagged (dependence test)"].rate >= 10 / 12
    assert rows["b2 bounds (outer 95% interval) contain the truth"].rate >= 10 / 12
    assert rows["b2 95% interval covers 0.2"].rate >= 9 / 12
    assert abs(rows["b2 95% interval covers 0.2"].mean_estimate - 0.2) < 0.05
    assert abs(rows["slope SD interval covers 0.3"].mean_estimate - 0.3) < 0.08
