"""Across checkpoints: lineage order, which stages are compared, and the pooled, paired model
of the change in b2 between two checkpoints."""

from __future__ import annotations

import numpy as np
import pandas as pd

from stagesweep.evaluate.analysis import fits
from stagesweep.evaluate.analysis.data import prompt_key, unit_key

# Known training stages, in lineage order; preference methods share a rank, so with a branching
# lineage (sft -> dpo, sft -> kto) both are compared with sft, not with each other.
STAGE_RANK = {
    "base": 0, "pretrain": 0,
    "sft": 1,
    "dpo": 2, "ipo": 2, "simpo": 2, "kto": 2, "orpo": 2, "cpo": 2, "preference": 2,
    "rlvr": 3, "grpo": 3, "rl": 3, "ppo": 3, "instruct": 3, "final": 3,
}


def checkpoint_order(frame: pd.DataFrame) -> list[str]:
    """Stages in lineage order (known stage names by rank, others by first appearance), steps
    ascending within a stage with the stage's final checkpoint (no step) last."""
    first = {c: i for i, c in enumerate(frame["checkpoint"].unique())}
    meta = frame.groupby("checkpoint", sort=False).agg(stage=("stage", "first"),
                                                       step=("step", "first"))
    stages = list(meta["stage"].dropna().astype(str).unique())
    ranked = all(s.lower() in STAGE_RANK for s in stages)

    def key(name: str):
        stage, step = meta.loc[name, "stage"], meta.loc[name, "step"]
        if pd.isna(stage):
            return (len(stages), first[name], 0, False, 0)
        s = str(stage)
        major = STAGE_RANK[s.lower()] if ranked else stages.index(s)
        # at equal steps the stage's own output (named by the stage) comes after checkpoint-N
        return (major, stages.index(s), np.inf if pd.isna(step) else step, name == s,
                first[name])

    return sorted(first, key=key)


def consecutive_pairs(frame: pd.DataFrame, order: list[str]) -> list[tuple[str, str]]:
    """One representative per stage (its final checkpoint, else its last step), each compared
    with the stage before it; without stage labels, consecutive checkpoints."""
    meta = frame.groupby("checkpoint", sort=False).agg(stage=("stage", "first"))
    if meta["stage"].isna().all():
        return list(zip(order, order[1:], strict=False))
    representative: dict[str, str] = {}
    for name in order:  # later steps overwrite earlier ones; the stage's final comes last
        stage = meta.loc[name, "stage"]
        representative[str(stage) if pd.notna(stage) else name] = name
    stages = list(representative)
    ranks = [STAGE_RANK.get(s.lower()) for s in stages]
    pairs = []
    for i in range(1, len(stages)):
        if all(r is not None for r in ranks):
            earlier = [j for j in range(i) if ranks[j] < ranks[i]]
            if not earlier:
                continue
            # the nearest earlier rank; with a tie (two preference stages) the later one
            j = max(j for j in earlier if ranks[j] == max(ranks[k] for k in earlier))
        else:
            j = i - 1
        pairs.append((representative[stages[j]], representative[stages[i]]))
    return pairs


def paired_rows(rows: pd.DataFrame, a: str, b: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The rows of checkpoints `a` and `b` keyed by prompt (`_k`), and those of the prompts
    both checkpoints answered."""
    keyed = rows[rows["checkpoint"].isin([a, b])].assign(_k=lambda f: unit_key(f))

    def in_both(frame: pd.DataFrame) -> np.ndarray:
        codes = pd.factorize(frame["_k"])[0]
        is_a = (frame["checkpoint"] == a).to_numpy()
        seen_a, seen_b = (np.bincount(codes[m], minlength=len(codes) and codes.max() + 1) > 0
                          for m in (is_a, ~is_a))
        return seen_a[codes] & seen_b[codes]

    both = in_both(keyed)
    if not both.any() and rows["unit_id"].notna().all():
        # unit ids may embed the checkpoint; fall back to the prompt's own coordinates
        keyed = keyed.assign(_k=prompt_key(keyed))
        both = in_both(keyed)
    return keyed, keyed[both]


def stage_difference_logprob(rows: pd.DataFrame, a: str, b: str, *, alpha: float,
                             cluster: str) -> dict:
    """Change in the logprob b2 from `a` to `b`: `stage_difference`'s pooled, paired,
    interacted model made linear (OLS of logprob_diff, clustered across both checkpoints)."""
    import statsmodels.api as sm
    from scipy import stats

    base = {"from": a, "to": b, "delta_beta": None, "ci_low": None, "ci_high": None,
            "p_value": None}
    keyed, paired = paired_rows(rows, a, b)
    base["n_paired_units"] = int(paired["_k"].nunique())
    reason = None if len(paired) else "no prompts with a logprob_diff in common"
    if not reason and paired["n_benign"].nunique() < 2:
        reason = "a single N_b value: the benign slope needs at least two"
    reason = reason or fits.shared_draws_problem(paired, cluster)
    if reason:
        return {**base, "skipped": reason}
    exog = sm.add_constant(interacted_design(paired, b), has_constant="add")
    try:
        res = sm.OLS(paired["logprob_diff"].to_numpy(float), exog).fit(
            cov_type="cluster", cov_kwds={"groups": fits.cluster_groups(paired, cluster)},
            use_t=True)
    except (ZeroDivisionError, np.linalg.LinAlgError, ValueError) as err:
        return {**base, "skipped": f"cluster-robust variance cannot be computed ({err})"}
    params, bse, pvalues = (pd.Series(np.asarray(v), index=exog.columns)
                            for v in (res.params, res.bse, res.pvalues))
    delta, se = float(params["to:log_nb"]), float(bse["to:log_nb"])
    half = float(stats.t.ppf(1 - alpha / 2, res.df_resid_inference)) * se
    return {**base, "delta_beta": delta, "ci_low": delta - half, "ci_high": delta + half,
            "p_value": float(pvalues["to:log_nb"]), "se": se}


def interacted_design(paired: pd.DataFrame, b: str) -> pd.DataFrame:
    """The pooled stage model's columns: log counts (N_h only when it varies), an indicator of
    checkpoint `b` and its interactions, whose `to:log_nb` coefficient is the change in b2."""
    x = fits.design_columns(paired)[["log_nh", "log_nb"]]
    if paired["n_harmful"].nunique() < 2:
        x = x[["log_nb"]]
    d = (paired["checkpoint"] == b).astype(float)
    return x.assign(to=d, **{f"to:{c}": x[c] * d for c in x.columns})


def stage_difference(rows: pd.DataFrame, a: str, b: str, *, alpha: float, cluster: str) -> dict:
    """Change in b2 from checkpoint `a` to `b` in one pooled, fully interacted logistic model,
    restricted to prompts both checkpoints answered and clustered by query (and draw) across
    both: the shared clusters carry the pairing, so the positive correlation between the two
    checkpoints' answers to the same prompt tightens the interval for the difference."""
    base = {"from": a, "to": b, "delta_beta": None, "ci_low": None, "ci_high": None,
            "p_value": None}
    keyed, paired = paired_rows(rows, a, b)
    common = paired["_k"].nunique()
    base["n_paired_units"] = int(common)

    def problem(part: pd.DataFrame) -> str | None:
        for name in (a, b):
            reason = fits.slope_problem(part[part["checkpoint"] == name])
            if reason:
                return f"{name}: {reason}"
        return None

    # a checkpoint's own problem (no usable rows, separation) explains more than "no pairs"
    reason = (problem(keyed) or (None if common else "no prompts in common between the two "
                                 "checkpoints") or problem(paired))
    reason = reason or fits.shared_draws_problem(paired, cluster)
    if reason:
        return {**base, "skipped": reason}
    exog = interacted_design(paired, b)
    try:
        fit = fits.fit_logit(paired["complied"], exog,
                              fits.cluster_groups(paired, cluster), alpha=alpha)
    except ValueError as err:
        return {**base, "skipped": str(err)}

    def change(term: str) -> dict | None:
        if term not in fit.params:
            return None
        low, high = fit.ci(term, alpha)
        return {"delta": float(fit.params[term]), "ci_low": low, "ci_high": high,
                "p_value": float(fit.pvalues[term]), "se": float(fit.bse[term])}

    b2 = change("to:log_nb")
    return {**base, "delta_beta": b2["delta"], "ci_low": b2["ci_low"], "ci_high": b2["ci_high"],
            "p_value": b2["p_value"], "se": b2["se"], "n_clusters": fit.n_clusters,
            "clustering": fit.clustering, "notes": fit.notes,
            # does the stage move the intercept or the harmful slope rather than b2?
            "b0_difference": change("to"), "b1_difference": change("to:log_nh")}

