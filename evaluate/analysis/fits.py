"""Statistical building blocks of the analysis: statsmodels/scipy calls plus the guards that turn
degenerate data (separation, one N_b value, too few queries) into a stated reason instead of a
NaN or a traceback.

Standard errors. Every target query is asked in many cells (and, with shared contexts, every
demo draw is reused by every query), so units are not independent. The logistic fits are plain
binomial GLMs (population-averaged coefficients, the quantity the study reports) with
cluster-robust (CR1) covariance: one-way by query, or Cameron-Gelbach-Miller two-way by query
and draw (`V_q + V_d - V_qd`, statsmodels' `cov_cluster_2groups`) when draws are shared across
queries. Inference uses t with G-1 degrees of freedom (G = the smaller number of clusters), which
keeps the size close to alpha with a few dozen queries. The README section "Standard errors"
explains why this and not a mixed model; tests/test_analysis_sim.py shows the size by simulation.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from stagesweep.evaluate.analysis import verdicts

# Logit-scale magnitude beyond which a coefficient is treated as diverging (separation):
# exp(15) is an odds ratio of 3 million per unit of log(N + 1), never a real effect.
DIVERGENT_LOGIT = 15.0


# Below this many clusters CR1 intervals are known to undercover; we still fit but say so.
FEW_CLUSTERS = 20
# Shared demo contexts: fewer draws than this and the draw-level variance is not estimable.
MIN_SHARED_DRAWS = 20


def cluster_groups(frame: pd.DataFrame, cluster: str) -> np.ndarray:
    """Integer cluster codes: one column (query) or two (query, draw) for two-way CGM."""
    query = pd.factorize(frame["query_id"].astype(str))[0]
    if cluster == "query+draw":
        draw = pd.factorize(frame["draw"].astype(str))[0]
        return np.column_stack([query, draw])
    return query


@dataclass
class LogitFit:
    """A fitted logistic model with cluster-robust covariance, indexed by term name."""

    params: pd.Series
    bse: pd.Series
    pvalues: pd.Series
    cov: pd.DataFrame
    df_inference: int
    n_obs: int
    n_clusters: int
    llf: float
    aic: float
    clustering: str
    notes: list[str] = field(default_factory=list)

    def ci(self, term: str, alpha: float) -> tuple[float, float]:
        from scipy import stats

        half = stats.t.ppf(1 - alpha / 2, self.df_inference) * self.bse[term]
        return float(self.params[term] - half), float(self.params[term] + half)


def fit_logit(
    y: pd.Series, exog: pd.DataFrame, groups: np.ndarray, *, alpha: float = 0.05
) -> LogitFit:
    """Binomial GLM with CR1 cluster-robust covariance and t(G-1) inference.

    Raises ValueError with a user-readable reason when the fit cannot give a finite slope."""
    import statsmodels.api as sm
    from statsmodels.tools.sm_exceptions import PerfectSeparationWarning

    notes: list[str] = []
    exog = sm.add_constant(exog, has_constant="add")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = sm.GLM(y.to_numpy(float), exog, family=sm.families.Binomial())
        try:
            res = model.fit(cov_type="cluster", cov_kwds={"groups": groups}, use_t=True)
        except (ZeroDivisionError, np.linalg.LinAlgError) as err:  # a single cluster
            raise ValueError(f"cluster-robust variance cannot be computed ({err}): too few "
                             "clusters") from err
    if any(issubclass(w.category, PerfectSeparationWarning) for w in caught):
        raise ValueError(
            "perfect separation: the covariates predict every outcome exactly; no finite "
            "slope exists"
        )
    params = pd.Series(res.params, index=exog.columns)
    bse = pd.Series(res.bse, index=exog.columns)
    diverging = [t for t in exog.columns if abs(params[t]) > DIVERGENT_LOGIT]
    if diverging:
        raise ValueError(
            f"quasi-complete separation: coefficient(s) {', '.join(diverging)} diverge "
            "(cells with all-0 or all-1 outcomes line up with the demo counts); no finite "
            "estimate"
        )
    if not np.all(np.isfinite(bse)) or np.any(bse <= 0):
        # CGM's V_q + V_d - V_qd is a difference of matrices and can lose positive
        # definiteness with few draws; no silent fallback to one-way clustering
        raise ValueError(
            "cluster-robust variance is not positive (too few clusters for this covariance)"
        )
    n_groups = res.n_groups if hasattr(res, "n_groups") else None
    n_clusters = int(min(n_groups) if isinstance(n_groups, tuple) else n_groups)
    if n_clusters < FEW_CLUSTERS:
        notes.append(
            f"only {n_clusters} clusters: cluster-robust intervals tend to be too narrow "
            f"below ~{FEW_CLUSTERS}; treat p-values near alpha with care"
        )
    return LogitFit(
        params=params,
        bse=bse,
        pvalues=pd.Series(res.pvalues, index=exog.columns),
        cov=pd.DataFrame(res.cov_params(), index=exog.columns, columns=exog.columns),
        df_inference=int(res.df_resid_inference),
        n_obs=int(res.nobs),
        n_clusters=n_clusters,
        llf=float(res.llf),
        aic=float(res.aic),
        clustering="query+draw" if groups.ndim == 2 else "query",
        notes=notes,
    )


def design_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """The study's covariates log(N_h + 1), log(N_b + 1) (and log(N + 1) for H_total)."""
    return pd.DataFrame(
        {
            "log_nh": np.log1p(frame["n_harmful"].to_numpy(float)),
            "log_nb": np.log1p(frame["n_benign"].to_numpy(float)),
            "log_n": np.log1p((frame["n_harmful"] + frame["n_benign"]).to_numpy(float)),
        },
        index=frame.index,
    )


def slope_problem(frame: pd.DataFrame) -> str | None:
    """Why the benign slope cannot be estimated from these rows, or None if it can."""
    if frame.empty:
        return "no usable rows (every row was excluded or the design has no count cells)"
    outcomes = frame["complied"].unique()
    if len(outcomes) == 1:
        return (
            f"all outcomes identical (every unit {'complied' if outcomes[0] else 'refused'}; "
            "perfect separation): no slope is estimable"
        )
    nb = sorted(frame["n_benign"].unique())
    if len(nb) < 2:
        return f"a single N_b value ({nb[0]}): the benign slope needs at least two N_b values"
    if frame["query_id"].nunique() < 2:
        return "fewer than 2 queries: cluster-robust errors need at least 2 clusters"
    return None


def average_effect(fit: LogitFit, frame: pd.DataFrame, alpha: float) -> dict:
    """The benign effect on the probability scale, inside the design: the average over the
    observed units with benign demos of P(N_h, N_b) - P(N_h, 0), each unit compared with the
    same harmful demos and none of the benign ones (an average marginal effect over the
    observed cells, not a prediction at a point the grid never visited). The interval is the
    delta method on the same clustered covariance; `se_pp` and `df` feed the TOST."""
    from scipy import stats

    with_benign = frame[frame["n_benign"] > 0]
    cells = with_benign.groupby(["n_harmful", "n_benign"]).size()
    weights = cells.to_numpy(float) / cells.sum()
    nh = np.log1p(cells.index.get_level_values(0).to_numpy(float))
    nb = np.log1p(cells.index.get_level_values(1).to_numpy(float))
    columns = {"const": np.ones_like(nh), "log_nh": nh, "log_nb": nb}
    terms = list(fit.params.index)
    x1 = np.column_stack([columns[t] for t in terms])
    x0 = x1.copy()
    x0[:, terms.index("log_nb")] = 0.0
    beta = fit.params.to_numpy()
    p1, p0 = 1 / (1 + np.exp(-x1 @ beta)), 1 / (1 + np.exp(-x0 @ beta))
    grad = weights @ ((p1 * (1 - p1))[:, None] * x1 - (p0 * (1 - p0))[:, None] * x0)
    se = math.sqrt(max(float(grad @ fit.cov.to_numpy() @ grad), 0.0))
    half = stats.t.ppf(1 - alpha / 2, fit.df_inference) * se
    diff = 100 * float(weights @ (p1 - p0))
    return {
        "estimand": "average over observed units with N_b > 0 of P(N_h, N_b) - P(N_h, 0)",
        "at_n_harmful": "observed",
        "from_n_benign": 0,
        "to_n_benign": "observed",
        "rate_from": float(weights @ p0),
        "rate_to": float(weights @ p1),
        "change_pp": diff,
        "ci_low_pp": diff - 100 * half,
        "ci_high_pp": diff + 100 * half,
        "se_pp": 100 * se,
        "n_cells": int(len(cells)),
    }


def shared_draws_problem(frame: pd.DataFrame, cluster: str) -> str | None:
    """With contexts shared by every query, the draw is a cluster of its own; below
    MIN_SHARED_DRAWS draws its variance cannot be estimated by any method, so no test is
    honest (query-only clustering would cover far below nominal: 33% with 2 draws)."""
    draws = frame["draw"].nunique()
    if cluster != "query+draw" or draws >= MIN_SHARED_DRAWS:
        return None
    return (f"contexts are shared by every query and there are only {draws} draw"
            f"{'s' if draws != 1 else ''}: the "
            f"draw-level uncertainty cannot be estimated (two-way clustering needs >= "
            f"{MIN_SHARED_DRAWS} draws), so no direction is called; `conditional_on_draws` "
            "holds the query-clustered fit, valid only for these particular demo contexts")


def empty_effect(reason: str) -> dict:
    """The contract keys with nulls, so a skipped fit never drops a key downstream code reads."""
    return {
        "beta": None,
        "se": None,
        "ci_low": None,
        "ci_high": None,
        "p_value": None,
        "direction": "none",
        "verdict": "inconclusive",
        "skipped": reason,
    }


def benign_effect(
    frame: pd.DataFrame, *, alpha: float, cluster: str,
    sesoi_pp: float = verdicts.DEFAULT_SESOI_PP,
) -> tuple[dict, LogitFit | None]:
    """Fit logit P = b0 + b1 log(N_h+1) + b2 log(N_b+1) and report b2 (the contract's `beta`),
    the effect in points inside the design (`effect_pp`) and the equivalence `verdict`."""
    reason = slope_problem(frame)
    if reason:
        return empty_effect(reason), None
    shared = shared_draws_problem(frame, cluster)
    if shared:
        conditional, fit = benign_effect(frame, alpha=alpha, cluster="query", sesoi_pp=sesoi_pp)
        keep = ("beta", "se", "ci_low", "ci_high", "p_value", "effect_pp")
        return {**empty_effect(shared), "beta": conditional["beta"],
                "conditional_on_draws": {k: conditional.get(k) for k in keep}}, fit
    x = design_columns(frame)[["log_nh", "log_nb"]]
    notes = []
    if frame["n_harmful"].nunique() < 2:
        x = x[["log_nb"]]
        notes.append(
            f"N_h is constant ({int(frame['n_harmful'].iloc[0])}): b1 is absorbed by the "
            "intercept and not estimated"
        )
    try:
        fit = fit_logit(frame["complied"], x, cluster_groups(frame, cluster), alpha=alpha)
    except ValueError as err:
        return empty_effect(str(err)), None
    low, high = fit.ci("log_nb", alpha)
    beta, p = float(fit.params["log_nb"]), float(fit.pvalues["log_nb"])
    out = {
        "beta": beta,
        "se": float(fit.bse["log_nb"]),
        "ci_low": low,
        "ci_high": high,
        "p_value": p,
        "direction": verdicts.direction(beta, p, alpha),
        "b0": float(fit.params["const"]),
        "b1": float(fit.params["log_nh"]) if "log_nh" in fit.params else None,
        "n_obs": fit.n_obs,
        "n_clusters": fit.n_clusters,
        "df": fit.df_inference,
        "clustering": fit.clustering,
        "effect_pp": average_effect(fit, frame, alpha),
        "notes": notes + fit.notes,
    }
    pp = out["effect_pp"]
    tost = verdicts.equivalence(pp["change_pp"], pp["se_pp"], fit.df_inference, sesoi_pp, alpha)
    out["verdict"] = verdicts.verdict(out["direction"], tost.pop("equivalent"))
    out["equivalence"] = {"sesoi_pp": sesoi_pp, "test": "TOST on effect_pp",
                          **{f"{k}_pp" if k.startswith("ci") else k: v for k, v in tost.items()}}
    return out, fit



# The continuous judge-free outcome (`outcome: logprob`): comply minus refuse opening log-prob.
LOGPROB_MODEL = "logprob_diff = b0 + b1 log(N_h+1) + b2 log(N_b+1) (OLS)"


def benign_effect_logprob(frame: pd.DataFrame, *, alpha: float, cluster: str) -> dict:
    """The benign effect on `logprob_diff`: the judged fit's design and clustering made linear
    (OLS, cluster-robust CR1 by query, or query and draw, with t(G-1) inference), so its b2
    (nats of comply-over-refuse per unit of log(N_b + 1)) can be read beside the judged b2:
    both positive means benign demos move the model towards complying."""
    import statsmodels.api as sm

    if frame.empty:
        return {**empty_effect("no rows with a logprob_diff"), "n": 0}
    reason = None
    if frame["n_benign"].nunique() < 2:
        reason = (f"a single N_b value ({int(frame['n_benign'].iloc[0])}): the benign slope "
                  "needs at least two N_b values")
    elif frame["query_id"].nunique() < 2:
        reason = "fewer than 2 queries: cluster-robust errors need at least 2 clusters"
    shared = shared_draws_problem(frame, cluster)
    if reason or shared:
        if reason:
            return {**empty_effect(reason), "n": int(len(frame))}
        conditional = benign_effect_logprob(frame, alpha=alpha, cluster="query")
        keep = ("beta", "se", "ci_low", "ci_high", "p_value")
        return {**empty_effect(shared), "beta": conditional["beta"], "n": int(len(frame)),
                "conditional_on_draws": {k: conditional.get(k) for k in keep}}
    x = design_columns(frame)[["log_nh", "log_nb"]]
    if frame["n_harmful"].nunique() < 2:
        x = x[["log_nb"]]
    exog = sm.add_constant(x, has_constant="add")
    groups = cluster_groups(frame, cluster)
    try:
        res = sm.OLS(frame["logprob_diff"].to_numpy(float), exog).fit(
            cov_type="cluster", cov_kwds={"groups": groups}, use_t=True)
    except (ZeroDivisionError, np.linalg.LinAlgError, ValueError) as err:
        return {**empty_effect(f"cluster-robust variance cannot be computed ({err})"),
                "n": int(len(frame))}
    params = pd.Series(res.params, index=exog.columns)
    bse = pd.Series(res.bse, index=exog.columns)
    if not math.isfinite(bse["log_nb"]) or bse["log_nb"] <= 0:
        return {**empty_effect("cluster-robust variance is not positive (too few clusters, or "
                               "logprob_diff does not vary)"), "n": int(len(frame))}
    from scipy import stats

    n_groups = res.n_groups if hasattr(res, "n_groups") else None
    n_clusters = int(min(n_groups) if isinstance(n_groups, tuple) else n_groups)
    df = int(res.df_resid_inference)
    beta, se = float(params["log_nb"]), float(bse["log_nb"])
    half = float(stats.t.ppf(1 - alpha / 2, df)) * se
    p = float(pd.Series(res.pvalues, index=exog.columns)["log_nb"])
    return {
        "beta": beta,
        "se": se,
        "ci_low": beta - half,
        "ci_high": beta + half,
        "p_value": p,
        "direction": verdicts.direction(beta, p, alpha),
        "b0": float(params["const"]),
        "b1": float(params["log_nh"]) if "log_nh" in params else None,
        "n": int(res.nobs),
        "n_clusters": n_clusters,
        "df": df,
        "clustering": "query+draw" if groups.ndim == 2 else "query",
        "mean_diff": float(frame["logprob_diff"].mean()),
        "model": LOGPROB_MODEL,
        "notes": [f"only {n_clusters} clusters: cluster-robust intervals tend to be too narrow "
                  f"below ~{FEW_CLUSTERS}"] if n_clusters < FEW_CLUSTERS else [],
    }
