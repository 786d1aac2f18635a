"""Recency, position by position: in the ordering design, compliance as a function of where the
harmful demos sit relative to the target, beside the five schedule means.

Two position measures per unit: `distance`, the number of benign demos between the last harmful
demo and the target (0 when the last demo is harmful), and `harmful_last_k`, how many of the
last k demos are harmful. Both follow from (N_h, N_b, schedule) through the sweep's own
`order_demos`; a `random` schedule's order depends on the draw's seed and is not in the table,
so random units enter the schedule means but not the position fits (unless the table carries
`distance` / `harmful_last_k` columns)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from stagesweep.evaluate.analysis import fits

LAST_K = 8


def positions(n_harmful: int, n_benign: int, schedule: str, k: int = LAST_K
              ) -> tuple[float, float]:
    """(distance, harmful among the last k) of a deterministic schedule, NaN for `random`."""
    from stagesweep.evaluate.plan import order_demos

    if schedule == "random" or n_harmful == 0:
        return np.nan, np.nan
    order = order_demos(["h"] * n_harmful, ["b"] * n_benign, schedule, np.zeros(n_harmful),
                        np.zeros(n_benign))
    last = max(i for i, d in enumerate(order) if d == "h")
    return float(len(order) - 1 - last), float(order[-k:].count("h"))


def with_positions(rows: pd.DataFrame) -> pd.DataFrame:
    if {"distance", "harmful_last_k"} <= set(rows.columns):
        return rows
    keys = rows[["n_harmful", "n_benign", "schedule"]].drop_duplicates()
    table = pd.DataFrame([(*key, *positions(*key)) for key in keys.itertuples(index=False)],
                         columns=["n_harmful", "n_benign", "schedule", "distance",
                                  "harmful_last_k"])
    return rows.merge(table, on=["n_harmful", "n_benign", "schedule"], how="left")


def position_fit(rows: pd.DataFrame, column: str, covariate: pd.Series, alpha: float) -> dict:
    """Slope of compliance on one position measure (logit), clustered by query, with the
    phi of each unit as a covariate so the mix does not stand in for position."""
    phi = rows["n_harmful"] / (rows["n_harmful"] + rows["n_benign"])
    x = pd.DataFrame({column: covariate, "phi": phi}, index=rows.index)
    x = x.loc[:, x.nunique() > 1]
    if column not in x or rows["query_id"].nunique() < 2 or rows["complied"].nunique() < 2:
        return {"skipped": f"{column} does not vary among the units with known positions"}
    try:
        fit = fits.fit_logit(rows["complied"], x, fits.cluster_groups(rows, "query"),
                             alpha=alpha)
    except ValueError as err:
        return {"skipped": str(err)}
    low, high = fit.ci(column, alpha)
    return {"covariate": column, "slope": float(fit.params[column]), "ci_low": low,
            "ci_high": high, "p_value": float(fit.pvalues[column]), "n": fit.n_obs}


def summarize(rows: pd.DataFrame, alpha: float) -> tuple[dict, list[dict]]:
    """The `recency` block (per distance: rate with a clustered interval; the two position
    fits) and its table for the plot."""
    from stagesweep.evaluate.analysis import rates

    rows = with_positions(rows)
    known = rows[rows["distance"].notna()]
    if known.empty or known["distance"].nunique() < 2:
        return {"skipped": "fewer than two distinct positions of the harmful demos"}, []
    table = []
    for distance, part in known.groupby("distance", sort=True):
        table.append({"distance": int(distance), **rates.rate_row(part, alpha)})
    return {
        "last_k": LAST_K,
        "by_distance": table,
        "distance_fit": position_fit(known, "log_distance",
                                     np.log1p(known["distance"]), alpha),
        "last_k_fit": position_fit(known, "harmful_last_k", known["harmful_last_k"], alpha),
        "n_random_units_without_positions": int(rows["distance"].isna().sum()),
    }, table
