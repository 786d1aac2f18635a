"""Rates and rate differences on the probability scale, and the JSON cleaning every summary
goes through."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from stagesweep.evaluate.analysis.fits import cluster_groups


def clean(value):
    """A JSON-safe copy: numpy scalars to Python, NaN/inf to None (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def wilson(successes: int, n: int, alpha: float) -> tuple[float | None, float | None]:
    """Wilson score interval: unlike the Wald interval it stays inside [0, 1] and keeps its
    coverage at rates near 0 or 1, where refusal rates often sit."""
    from statsmodels.stats.proportion import proportion_confint

    if n == 0:
        return None, None
    low, high = proportion_confint(successes, n, alpha=alpha, method="wilson")
    return float(low), float(high)


def rate_row(frame: pd.DataFrame, alpha: float, column: str = "complied") -> dict:
    """A rate with a query-clustered interval. Every query is asked many times, so rows are not
    independent and a binomial (Wilson) interval on all rows covers the truth far less often
    than it claims (46% at a query intercept SD of 1). The interval is CR1 on the logit scale:
    the clustered variance of the mean, V = G/(G-1) sum_g r_g^2 / n^2 (r_g the query's summed
    residuals), t with G-1 df, mapped back through the logistic so it stays inside (0, 1).
    At a rate of exactly 0 or 1 there is no residual to cluster: Wilson with one observation
    per query (the most conservative effective n)."""
    from scipy import stats

    y = frame[column].astype(float).to_numpy()
    n, k = int(len(y)), int(y.sum())
    out = {"n": n, "successes": k, "rate": k / n if n else None, "ci_low": None,
           "ci_high": None, "n_queries": int(frame["query_id"].nunique()),
           "interval": "query-clustered (CR1, logit scale)"}
    groups = pd.factorize(frame["query_id"].astype(str))[0]
    g = out["n_queries"]
    if n == 0:
        return out
    p = k / n
    if g < 2 or p in (0.0, 1.0):
        out["ci_low"], out["ci_high"] = wilson(round(p * g), g, alpha) if g else (None, None)
        out["interval"] = "Wilson with one observation per query (no residual to cluster)"
        return out
    resid = np.bincount(groups, weights=y - p)
    se = math.sqrt(g / (g - 1) * float(resid @ resid)) / n
    half = float(stats.t.ppf(1 - alpha / 2, g - 1)) * se / (p * (1 - p))
    centre = math.log(p / (1 - p))
    out["ci_low"], out["ci_high"] = (1 / (1 + math.exp(-(centre - half))),
                                     1 / (1 + math.exp(-(centre + half))))
    return out


def difference_pp(frame: pd.DataFrame, column: str, first, second, alpha: float
                  ) -> dict | None:
    """Rate(first) - Rate(second) of the groups in `column`, in percentage points, CI
    clustered by query (a linear probability model is exactly a difference of means;
    clustering keeps the pairing of the same queries in both groups)."""
    import statsmodels.api as sm

    rows = frame[frame[column].isin([first, second])]
    if rows[column].nunique() < 2:
        return None
    x = sm.add_constant((rows[column] == first).astype(float).rename("d"))
    diff = 100 * float(
        rows.loc[rows[column] == first, "complied"].mean()
        - rows.loc[rows[column] == second, "complied"].mean()
    )
    out = {"difference_pp": diff, "ci_low_pp": None, "ci_high_pp": None}
    if rows["query_id"].nunique() >= 2 and rows["complied"].nunique() > 1:
        res = sm.OLS(rows["complied"].to_numpy(float), x).fit(
            cov_type="cluster", cov_kwds={"groups": cluster_groups(rows, "query")}, use_t=True
        )
        low, high = res.conf_int(alpha=alpha).loc["d"]
        out.update(ci_low_pp=100 * float(low), ci_high_pp=100 * float(high))
    return out

