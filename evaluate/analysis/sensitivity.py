"""Sensitivity analyses of the headline b2: does the answer hold when the model's choices
change? A binomial mixed model (the conditional slope and how much queries differ in it), N_b as
categories (no log(N_b+1) shape imposed), the fit without the zero-demo cells (the bare target
is a different kind of prompt, and it anchors log(N_b+1) = 0), and the fitted rate of every cell
beside the observed one."""

from __future__ import annotations

import numpy as np
import pandas as pd

from stagesweep.evaluate.analysis import fits, mixed


def categorical_nb(frame: pd.DataFrame, *, alpha: float, cluster: str) -> dict:
    """logit P = b0 + b1 log(N_h+1) + sum_k g_k [N_b = k], clustered: one log-odds shift per
    N_b value against the smallest, so a curve the log shape misses shows up."""
    levels = sorted(frame["n_benign"].unique())
    if len(levels) < 2:
        return {"skipped": "a single N_b value"}
    dummies = pd.get_dummies(frame["n_benign"], prefix="nb", dtype=float).iloc[:, 1:]
    x = pd.concat([fits.design_columns(frame)[["log_nh"]], dummies], axis=1)
    if frame["n_harmful"].nunique() < 2:
        x = x.drop(columns="log_nh")
    try:
        fit = fits.fit_logit(frame["complied"], x, fits.cluster_groups(frame, cluster),
                             alpha=alpha)
    except ValueError as err:
        return {"skipped": str(err)}
    shifts = [{"n_benign": int(levels[0]), "log_odds": 0.0, "ci_low": None, "ci_high": None}]
    for level in levels[1:]:
        term = f"nb_{level}"
        low, high = fit.ci(term, alpha)
        shifts.append({"n_benign": int(level), "log_odds": float(fit.params[term]),
                       "ci_low": low, "ci_high": high, "p_value": float(fit.pvalues[term])})
    return {"reference_n_benign": int(levels[0]), "shifts": shifts, "aic": fit.aic,
            "clustering": fit.clustering}


def observed_vs_fitted(frame: pd.DataFrame, fit: fits.LogitFit | None) -> list[dict]:
    """Per cell: the observed rate and the headline model's fitted rate (their gap is what the
    log(N+1) shape misses)."""
    if fit is None:
        return []
    x = fits.design_columns(frame).assign(const=1.0)[list(fit.params.index)]
    fitted = 1 / (1 + np.exp(-(x.to_numpy() @ fit.params.to_numpy())))
    table = frame.assign(_fitted=fitted).groupby(["n_harmful", "n_benign"]).agg(
        n=("complied", "size"), observed=("complied", "mean"), fitted=("_fitted", "mean"))
    return [{"n_harmful": int(nh), "n_benign": int(nb), "n": int(r["n"]),
             "observed": float(r["observed"]), "fitted": float(r["fitted"])}
            for (nh, nb), r in table.iterrows()]


def summarize(frame: pd.DataFrame, fit: fits.LogitFit | None, *, alpha: float,
              cluster: str, sesoi_pp: float) -> tuple[dict, list[dict]]:
    """The `sensitivity` block of one checkpoint (headline count rows) and the per-cell
    observed-vs-fitted table."""
    if fits.slope_problem(frame):
        return {"skipped": fits.slope_problem(frame)}, []
    if fits.shared_draws_problem(frame, cluster):
        cluster = "query"  # conditional on the few shared draws, as `benign_effect` says
    nonzero = frame[(frame["n_harmful"] + frame["n_benign"]) > 0]
    without_zero, _ = fits.benign_effect(nonzero, alpha=alpha, cluster=cluster,
                                         sesoi_pp=sesoi_pp)
    keep = ("beta", "ci_low", "ci_high", "p_value", "direction", "verdict", "skipped")
    cells = observed_vs_fitted(frame, fit)
    gaps = [abs(c["observed"] - c["fitted"]) for c in cells]
    return {
        "mixed_model": mixed.fit_mixed(frame, alpha=alpha),
        "categorical_nb": categorical_nb(frame, alpha=alpha, cluster=cluster),
        "without_zero_demo_cells": {k: without_zero.get(k) for k in keep},
        "largest_cell_gap_pp": 100 * max(gaps) if gaps else None,
    }, cells
