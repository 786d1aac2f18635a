"""The study's hypothesis tests beside the b2 fit: H_total chi-squares across phi at fixed N,
the H_total / H_harm / H_joint model comparison, clustered group tests and judge agreement."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd

from stagesweep.evaluate.analysis import rates
from stagesweep.evaluate.analysis.fits import cluster_groups, design_columns, slope_problem


def h_total_tests(frame: pd.DataFrame, *, alpha: float) -> dict:
    """The study's test of H_total: at each N, Pearson chi-square across phi groups, Bonferroni
    over the N tested. A rejection at any N means the rate depends on the mix, not the count.
    The chi-square treats units as independent, as the study did; each test also carries the
    query-clustered Wald version (`clustered`) that respects repeated queries."""
    from scipy.stats import chi2_contingency

    frame = frame.assign(n_total=frame["n_harmful"] + frame["n_benign"])
    frame = frame[frame["n_total"] > 0]
    tests, skipped = [], []
    for n_total, cell in frame.groupby("n_total", sort=True):
        counts = cell.groupby("n_harmful")["complied"].agg(["sum", "count"])
        if len(counts) < 2:
            continue  # one phi at this N: nothing to compare, not worth a message each
        table = np.vstack([counts["sum"], counts["count"] - counts["sum"]])
        if (table.sum(axis=1) == 0).any():
            skipped.append(
                {"n_total": int(n_total), "reason": "all outcomes identical at this N"}
            )
            continue
        chi2, p, dof, _ = chi2_contingency(table, correction=False)
        tests.append(
            {
                "n_total": int(n_total),
                "chi2": float(chi2),
                "df": int(dof),
                "p_value": float(p),
                "n_phi": int(len(counts)),
                "n": int(counts["count"].sum()),
                # the same test with query-clustered errors, for comparison with the study's
                "clustered": group_test(cell, "n_harmful"),
                # with thousands of prompts per cell a rejection says nothing about size
                "largest_difference": largest_difference(cell, counts, alpha),
            }
        )
    # Bonferroni over the design's N values (those tested and those with identical outcomes)
    alpha_each = alpha / (len(tests) + len(skipped)) if tests else None
    for test in tests:
        test["rejected"] = bool(test["p_value"] < alpha_each)
    out = {
        "rejected": any(t["rejected"] for t in tests),
        "alpha_bonferroni": alpha_each,
        "tests": tests,
        "skipped_n": skipped,
    }
    if frame.empty:
        out["skipped"] = "no usable rows with at least one demonstration"
    elif not tests:
        out["skipped"] = (
            "no N with more than one phi group (no mix variation at fixed N_h + N_b): "
            "H_total cannot be tested"
            if not skipped
            else "all outcomes identical at every N: H_total cannot be tested"
        )
    return out


def largest_difference(cell: pd.DataFrame, counts: pd.DataFrame, alpha: float) -> dict:
    """The size beside the chi-square: the highest minus the lowest rate across phi at this N,
    in points, with a query-clustered interval (the pair is chosen by the data, so the
    difference leans away from 0 when there is none; read it as an upper size)."""
    share = counts["sum"] / counts["count"]
    high, low = share.idxmax(), share.idxmin()
    diff = rates.difference_pp(cell, "n_harmful", high, low, alpha) or {}
    return {"n_harmful_high": int(high), "n_harmful_low": int(low), **diff}


def model_comparison(frame: pd.DataFrame) -> dict:
    """H_total (log N), H_harm (log N_h) and H_joint (log N_h + log N_b) by log-likelihood, AIC
    and likelihood-ratio tests. H_harm is nested in H_joint; H_total is not, so it is tested
    against the model that encompasses both (log N, log N_h, log N_b; 2 df). The LR tests treat
    units as independent: read them as a ranking, the clustered Wald test of b2 as the inference.
    """
    import statsmodels.api as sm
    from scipy.stats import chi2

    if slope_problem(frame):
        return {"skipped": slope_problem(frame)}
    x = design_columns(frame)
    terms = {
        "h_total": ["log_n"],
        "h_harm": ["log_nh"],
        "h_joint": ["log_nh", "log_nb"],
        "encompassing": ["log_n", "log_nh", "log_nb"],
    }
    fits = {}
    for name, cols in terms.items():
        exog = sm.add_constant(x[cols], has_constant="add")
        rank = np.linalg.matrix_rank(exog.to_numpy())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = sm.GLM(frame["complied"].to_numpy(float), exog, family=sm.families.Binomial())
            res = res.fit()
        fits[name] = {"llf": float(res.llf), "k": int(rank), "aic": float(2 * rank - 2 * res.llf)}

    def lr(null: str, alt: str) -> dict:
        stat = max(2 * (fits[alt]["llf"] - fits[null]["llf"]), 0.0)
        df = fits[alt]["k"] - fits[null]["k"]
        p = float(chi2.sf(stat, df)) if df > 0 else None
        return {"null": null, "alt": alt, "lr_stat": stat, "df": df, "p_value": p}

    models = {k: v for k, v in fits.items() if k != "encompassing"}
    return {
        "models": models,
        "best_aic": min(models, key=lambda k: models[k]["aic"]),
        "lr_tests": [lr("h_harm", "h_joint"), lr("h_total", "encompassing")],
    }


def group_test(frame: pd.DataFrame, column: str) -> dict:
    """Does the rate differ between the groups in `column` (schedules; phi at fixed N)?
    Clustered Wald test of all group dummies in a logistic model (the same queries appear in
    every group, so the groups are paired, not independent); falls back to a Pearson chi-square
    when a group's outcomes are all identical (no finite dummy)."""
    import statsmodels.api as sm
    from scipy.stats import chi2_contingency

    dummies = pd.get_dummies(frame[column].astype(str), drop_first=True, dtype=float)
    counts = frame.groupby(column)["complied"].agg(["sum", "count"])
    table = np.vstack([counts["sum"], counts["count"] - counts["sum"]])
    if (table.sum(axis=1) == 0).any():
        return {"test": None, "p_value": None, "skipped": "all outcomes identical"}
    separated = ((counts["sum"] == 0) | (counts["sum"] == counts["count"])).any()
    if not separated and frame["query_id"].nunique() >= 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = sm.GLM(
                frame["complied"].to_numpy(float),
                sm.add_constant(dummies, has_constant="add"),
                family=sm.families.Binomial(),
            ).fit(cov_type="cluster", cov_kwds={"groups": cluster_groups(frame, "query")},
                  use_t=True)
        restriction = np.eye(len(res.params))[1:]
        wald = res.wald_test(restriction, scalar=True)
        stat, p = float(wald.statistic), float(wald.pvalue)
        if math.isfinite(stat) and math.isfinite(p):
            return {"test": "clustered Wald (F)", "statistic": stat, "p_value": p}
    chi2, p, _, _ = chi2_contingency(table, correction=False)
    return {"test": "Pearson chi-square (unclustered fallback)", "statistic": float(chi2),
            "p_value": float(p)}


def cohens_kappa(a: pd.Series, b: pd.Series) -> dict:
    """Chance-corrected agreement between two judges' 0/1 labels on the same units."""
    from statsmodels.stats.inter_rater import cohens_kappa as sm_kappa

    table = pd.crosstab(a, b).reindex(index=[0, 1], columns=[0, 1], fill_value=0).to_numpy()
    agreement = float(np.trace(table) / table.sum())
    if (table.sum(axis=0) == table.sum()).any() and (table.sum(axis=1) == table.sum()).any():
        return {"kappa": None, "agreement": agreement, "n": int(table.sum()),
                "note": "both judges gave a single label: kappa is undefined"}
    res = sm_kappa(table)
    return {"kappa": float(res.kappa), "agreement": agreement, "n": int(table.sum())}

