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


def rate_row(y: pd.Series, alpha: float) -> dict:
    n, k = int(len(y)), int(y.sum())
    low, high = wilson(k, n, alpha)
    return {"n": n, "successes": k, "rate": k / n if n else None, "ci_low": low, "ci_high": high}


def difference_pp(frame: pd.DataFrame, first: str, second: str, alpha: float) -> dict | None:
    """Rate(first) - Rate(second) in percentage points, CI clustered by query (a linear
    probability model is exactly a difference of means; clustering keeps the pairing)."""
    import statsmodels.api as sm

    rows = frame[frame["schedule"].isin([first, second])]
    if set(rows["schedule"]) != {first, second}:
        return None
    x = sm.add_constant((rows["schedule"] == first).astype(float).rename("d"))
    diff = 100 * float(
        rows.loc[rows["schedule"] == first, "complied"].mean()
        - rows.loc[rows["schedule"] == second, "complied"].mean()
    )
    out = {"difference_pp": diff, "ci_low_pp": None, "ci_high_pp": None}
    if rows["query_id"].nunique() >= 2 and rows["complied"].nunique() > 1:
        res = sm.OLS(rows["complied"].to_numpy(float), x).fit(
            cov_type="cluster", cov_kwds={"groups": cluster_groups(rows, "query")}, use_t=True
        )
        low, high = res.conf_int(alpha=alpha).loc["d"]
        out.update(ci_low_pp=100 * float(low), ci_high_pp=100 * float(high))
    return out

