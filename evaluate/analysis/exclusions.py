"""Rows left out of the fits (overflow, unparsed, no final answer, failed, no label): where they
fall, whether they depend on the demo counts, and how far they could move b2.

Why: exclusions that grow with N_b (longer prompts overflow; compliant answers run long and go
unparsed) remove outcomes selectively, and a complete-case fit then reports a slope the model
does not have (with 8% informative exclusions and no true effect, "dilution" in 86% of
datasets). The dependence test flags it, the bounds say how much it could matter, and the fit
on queries with no exclusion at all is a check that needs no imputation."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from stagesweep.evaluate.analysis import fits


def excluded_mask(frame: pd.DataFrame) -> pd.Series:
    """Rows that `usable` drops: a status other than ok, or no compliance label."""
    status = frame["status"].fillna("ok").astype(str)
    return (status != "ok") | frame["complied"].isna()


def reasons(frame: pd.DataFrame) -> pd.Series:
    status = frame["status"].fillna("ok").astype(str)
    return status.where(status != "ok", "complied_missing")


def counts_by(frame: pd.DataFrame, keys: list[str]) -> list[dict]:
    """Per group: rows, excluded rows, and the count of each excluded status."""
    mask = excluded_mask(frame)
    table = pd.crosstab([frame.loc[mask, k] for k in keys], reasons(frame[mask]))
    totals = frame.groupby(keys).size().rename("n_rows")
    table = table.reindex(totals.index, fill_value=0)
    out = []
    for key, row in table.iterrows():
        key = key if isinstance(key, tuple) else (key,)
        by_status = {str(s): int(v) for s, v in row.items() if v}
        out.append({**{k: (v.item() if isinstance(v, np.generic) else v)
                       for k, v in zip(keys, key, strict=True)},
                    "n_rows": int(totals[key if len(key) > 1 else key[0]]),
                    "n_excluded": int(sum(by_status.values())), **by_status})
    return out


def dependence(frame: pd.DataFrame, alpha: float) -> dict:
    """Does exclusion depend on N_h or N_b? A logistic model of the excluded flag on
    log(N_h+1) and log(N_b+1), clustered by query, and its joint Wald test."""
    import statsmodels.api as sm

    flag = excluded_mask(frame).astype(float)
    x = fits.design_columns(frame)[["log_nh", "log_nb"]]
    x = x.loc[:, x.nunique() > 1]
    if flag.nunique() < 2 or x.empty or frame["query_id"].nunique() < 2:
        return {"test": None, "p_value": None,
                "skipped": "exclusion does not vary, or the counts do not"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = sm.GLM(flag.to_numpy(), sm.add_constant(x, has_constant="add"),
                     family=sm.families.Binomial()).fit(
            cov_type="cluster", cov_kwds={"groups": fits.cluster_groups(frame, "query")},
            use_t=True)
    wald = res.wald_test(np.eye(len(res.params))[1:], scalar=True)
    p = float(wald.pvalue)
    return {"test": "clustered Wald (F) of log(N_h+1), log(N_b+1) on the excluded flag",
            "p_value": p if np.isfinite(p) else None,
            "slopes": {c: float(res.params[c]) for c in x.columns},
            "depends": bool(np.isfinite(p) and p < alpha)}


def imputed(frame: pd.DataFrame, value: int) -> pd.DataFrame:
    """Every row, the excluded ones counted as complied (1) or refused (0)."""
    mask = excluded_mask(frame)
    out = frame.copy()
    out["complied"] = out["complied"].astype("Int64").where(~mask, value).astype(int)
    return out


def b2_bounds(frame: pd.DataFrame, alpha: float, cluster: str) -> dict:
    """b2 with the excluded rows counted as complied and as refused: where the truth lies if
    the excluded answers could have gone either way (the outer interval adds sampling error)."""
    ends = {}
    for name, value in (("as_complied", 1), ("as_refused", 0)):
        effect, _ = fits.benign_effect(imputed(frame, value), alpha=alpha, cluster=cluster)
        ends[name] = {k: effect.get(k) for k in ("beta", "ci_low", "ci_high", "skipped")}
    return {**ends, **envelope([ends["as_complied"], ends["as_refused"]], "beta")}


def envelope(fits_: list[dict], key: str) -> dict:
    """The range of the estimates and the outer interval over several imputations."""
    values = [f[key] for f in fits_ if f.get(key) is not None]
    lows = [f["ci_low"] for f in fits_ if f.get("ci_low") is not None]
    highs = [f["ci_high"] for f in fits_ if f.get("ci_high") is not None]
    return {"low": min(values, default=None), "high": max(values, default=None),
            "outer_ci_low": min(lows, default=None), "outer_ci_high": max(highs, default=None)}


def complete_queries(frame: pd.DataFrame, alpha: float, cluster: str) -> dict:
    """b2 on the queries with no excluded row at all: no imputation, but fewer queries and,
    if exclusion tracks difficulty, a different population of queries."""
    mask = excluded_mask(frame)
    bad = frame.assign(_x=mask).groupby("query_id")["_x"].transform("any")
    rows = frame[~bad].astype({"complied": int})
    effect, _ = fits.benign_effect(rows, alpha=alpha, cluster=cluster)
    return {"n_queries": int(rows["query_id"].nunique()),
            **{k: effect.get(k) for k in ("beta", "ci_low", "ci_high", "p_value", "direction",
                                          "skipped")}}


def summarize(frame: pd.DataFrame, *, alpha: float, cluster: str) -> tuple[dict, dict]:
    """The `exclusions` block of one checkpoint (headline count rows, before exclusion) and its
    per-cell and per-query tables."""
    mask = excluded_mask(frame)
    if not mask.any():
        return {"n_excluded": 0, "share": 0.0}, {"cells": [], "queries": []}
    cells = counts_by(frame, ["n_harmful", "n_benign"])
    queries = [q for q in counts_by(frame, ["query_id"]) if q["n_excluded"]]
    test = dependence(frame, alpha)
    out = {
        "n_excluded": int(mask.sum()),
        "share": float(mask.mean()),
        "by_status": {str(k): int(v) for k, v in reasons(frame[mask]).value_counts().items()},
        "by_cell": cells,
        "by_query": {q["query_id"]: {k: v for k, v in q.items() if k not in ("query_id",)}
                     for q in queries},
        "dependence": test,
        "b2_bounds": b2_bounds(frame, alpha, cluster),
        "complete_queries": complete_queries(frame, alpha, cluster),
    }
    if test.get("depends"):
        out["warning"] = (
            f"exclusion depends on the demo counts (p = {test['p_value']:.2g}): the b2 fit "
            "drops outcomes selectively; read b2 with `b2_bounds` and `complete_queries`")
    return out, {"cells": cells, "queries": queries}


def difference_bounds(frame: pd.DataFrame, a: str, b: str, *, alpha: float,
                      cluster: str) -> dict | None:
    """The stage difference in b2 with each checkpoint's excluded rows counted as complied or
    refused (four imputations): its range and outer interval. None without exclusions."""
    from stagesweep.evaluate.analysis.stages import stage_difference

    rows = frame[frame["checkpoint"].isin([a, b])]
    if not excluded_mask(rows).any():
        return None
    ends = []
    for va in (0, 1):
        for vb in (0, 1):
            both = pd.concat([imputed(rows[rows["checkpoint"] == a], va),
                              imputed(rows[rows["checkpoint"] == b], vb)])
            ends.append(stage_difference(both, a, b, alpha=alpha, cluster=cluster))
    return envelope(ends, "delta_beta")
