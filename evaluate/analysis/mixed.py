"""A binomial mixed model by Laplace approximation: logit P = b0 + b1 log(N_h+1) + b2 log(N_b+1)
+ u_q + s_q (log(N_b+1) - c), with independent random intercepts u_q ~ N(0, sd_u^2) and random
benign slopes s_q ~ N(0, sd_s^2) by query (c centres the slope at the data's mean log(N_b+1)).

Why it exists: the headline b2 is population-averaged (a GLM with clustered errors, the study's
estimand). The mixed model answers the sensitivity question a reviewer asks next: what is the
slope for a typical query, and how much do queries differ in it (`slope_sd`)? statsmodels has
no frequentist binomial GLMM, and its variational-Bayes one took 40 s on 200 queries (6,400
rows), so this is the Laplace approximation that lme4's `glmer` uses by default (nAGQ = 1):
for each query the random effects' mode by Newton's method (2x2 systems, vectorised over
queries), the integral approximated at that mode, and the summed log-likelihood maximised over
(b0, b1, b2, log sd_u, log sd_s) with scipy's L-BFGS-B. Standard errors come from the numerical
Hessian of that log-likelihood (statsmodels' `approx_hess3`); the slope SD's interval is built on
the log scale. Outcomes are aggregated to one binomial count per query and cell first, so a
paper-scale checkpoint (84,240 rows) is ~40k terms. Recovery of planted values is shown by
simulation (`stagesweep power --validate`, README)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

# log SD bounds: below exp(-6) a random effect is indistinguishable from none.
LOG_SD_BOUNDS = (-6.0, 3.0)
NEWTON_STEPS = 30


@dataclass
class Aggregated:
    """One binomial count per (query, cell): successes, trials, covariates, query code."""

    y: np.ndarray
    m: np.ndarray
    x: np.ndarray  # const, log_nh, log_nb (columns that vary)
    c: np.ndarray  # centred log_nb: the random slope's covariate
    group: np.ndarray
    n_groups: int
    names: list[str]


def aggregate(frame: pd.DataFrame) -> Aggregated:
    table = frame.groupby(["query_id", "n_harmful", "n_benign"], sort=False)["complied"].agg(
        ["sum", "count"]).reset_index()
    log_nh = np.log1p(table["n_harmful"].to_numpy(float))
    log_nb = np.log1p(table["n_benign"].to_numpy(float))
    columns, names = [np.ones(len(table))], ["const"]
    if table["n_harmful"].nunique() > 1:
        columns.append(log_nh)
        names.append("log_nh")
    columns.append(log_nb)
    names.append("log_nb")
    group, _ = pd.factorize(table["query_id"])
    weights = table["count"].to_numpy(float)
    return Aggregated(table["sum"].to_numpy(float), weights, np.column_stack(columns),
                      log_nb - np.average(log_nb, weights=weights), group,
                      int(group.max()) + 1, names)


class Laplace:
    """The approximate marginal log-likelihood of the data as a function of the parameters,
    keeping the last random-effect modes as the next Newton start."""

    def __init__(self, data: Aggregated):
        self.data = data
        self.modes = np.zeros((data.n_groups, 2))

    def __call__(self, theta: np.ndarray) -> float:
        d = self.data
        k = d.x.shape[1]
        beta, var = theta[:k], np.exp(2 * theta[k:])
        fixed = d.x @ beta
        r = self.modes.copy()
        sums = lambda w: np.bincount(d.group, weights=w, minlength=d.n_groups)  # noqa: E731
        for _ in range(NEWTON_STEPS):
            eta = fixed + r[d.group, 0] + r[d.group, 1] * d.c
            p = 1 / (1 + np.exp(-eta))
            resid, w = d.y - d.m * p, d.m * p * (1 - p)
            g0 = sums(resid) - r[:, 0] / var[0]
            g1 = sums(resid * d.c) - r[:, 1] / var[1]
            h00, h01 = sums(w) + 1 / var[0], sums(w * d.c)
            h11 = sums(w * d.c * d.c) + 1 / var[1]
            det = h00 * h11 - h01 * h01
            step0, step1 = (h11 * g0 - h01 * g1) / det, (h00 * g1 - h01 * g0) / det
            r[:, 0] += step0
            r[:, 1] += step1
            if max(np.abs(step0).max(), np.abs(step1).max()) < 1e-8:
                break
        self.modes = r
        eta = fixed + r[d.group, 0] + r[d.group, 1] * d.c
        loglik = float(np.sum(d.y * eta - d.m * np.logaddexp(0, eta)))
        p = 1 / (1 + np.exp(-eta))
        w = d.m * p * (1 - p)
        h00, h01 = sums(w) + 1 / var[0], sums(w * d.c)
        h11 = sums(w * d.c * d.c) + 1 / var[1]
        penalty = 0.5 * float(np.sum(r[:, 0] ** 2 / var[0] + r[:, 1] ** 2 / var[1]))
        log_dets = 0.5 * float(np.sum(np.log(h00 * h11 - h01 * h01)))
        return loglik - penalty - 0.5 * d.n_groups * float(np.log(var).sum()) - log_dets


def _exp(value: float) -> float | None:
    """exp that says None (not an overflow) when a flat likelihood gives a huge SE."""
    return math.exp(value) if np.isfinite(value) and value < 50 else None


def fit_mixed(frame: pd.DataFrame, *, alpha: float) -> dict:
    """The conditional b2 with its interval and the estimated SDs of the random intercept and
    the random benign slope."""
    from scipy import optimize, stats
    from statsmodels.tools.numdiff import approx_hess3

    data = aggregate(frame)
    if data.n_groups < 5:
        return {"skipped": "fewer than 5 queries: random-effect SDs are not estimable"}
    k = data.x.shape[1]
    start_beta = np.linalg.lstsq(data.x, np.log((data.y + 0.5) / (data.m - data.y + 0.5)),
                                 rcond=None)[0]
    objective = Laplace(data)
    result = optimize.minimize(
        lambda t: -objective(t), np.r_[start_beta, math.log(0.5), math.log(0.2)],
        method="L-BFGS-B", bounds=[(None, None)] * k + [LOG_SD_BOUNDS] * 2)
    theta = result.x
    hess = approx_hess3(theta, lambda t: -objective(t))
    try:
        cov = np.linalg.inv(hess)
    except np.linalg.LinAlgError:
        cov = np.full_like(hess, np.nan)
    se = np.sqrt(np.clip(np.diag(cov), 0, None))
    z = float(stats.norm.ppf(1 - alpha / 2))
    b2 = data.names.index("log_nb")
    at_bound = theta[k + 1] <= LOG_SD_BOUNDS[0] + 1e-3
    log_sd, log_se = theta[k + 1], se[k + 1]
    p = float(2 * stats.norm.sf(abs(theta[b2] / se[b2]))) if se[b2] > 0 else None
    return {
        "method": "binomial GLMM, Laplace approximation (scipy L-BFGS-B; lme4 glmer nAGQ=1)",
        "beta": float(theta[b2]),
        "se": float(se[b2]),
        "ci_low": float(theta[b2] - z * se[b2]),
        "ci_high": float(theta[b2] + z * se[b2]),
        "p_value": p,
        "b0": float(theta[0]),
        "b1": float(theta[data.names.index("log_nh")]) if "log_nh" in data.names else None,
        "intercept_sd": float(math.exp(theta[k])),
        "slope_sd": 0.0 if at_bound else float(math.exp(log_sd)),
        # at the boundary (no slope variation found) a log-scale interval means nothing
        "slope_sd_ci": [0.0, None] if at_bound else [_exp(log_sd - z * log_se),
                                                      _exp(log_sd + z * log_se)],
        "n_queries": data.n_groups,
        "converged": bool(result.success),
        "loglik": float(-result.fun),
    }
