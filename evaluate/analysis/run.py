"""`analyze(results, out) -> summary dict`: every checkpoint, the stage comparisons, and the
files (`summary.json` plus tidy CSVs)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from stagesweep.evaluate.analysis import (
    exclusions,
    fits,
    hypotheses,
    rates,
    recency,
    sensitivity,
    verdicts,
)
from stagesweep.evaluate.analysis.data import (
    choose_cluster,
    count_rows,
    distinct_prompts,
    judge_split,
    load_results,
    logprob_rows,
    usable,
    user_error,
    validate,
)
from stagesweep.evaluate.analysis.designs import format_summary, ordering_summary
from stagesweep.evaluate.analysis.stages import (
    checkpoint_order,
    consecutive_pairs,
    stage_difference,
    stage_difference_logprob,
)
from stagesweep.evaluate.templates import templates_summary
from stagesweep.safeio import atomic_path, write_text

JUDGE_FREE = "judge-free sweep (outcome: logprob): no judged outcome; see benign_effect_logprob"


def analyze_checkpoint(raw: pd.DataFrame, *, alpha: float, cluster: str, sesoi_pp: float,
                       h_total_design: str | None) -> tuple[dict, dict]:
    """Everything the study measures on one checkpoint. Returns (summary, tables)."""
    raw, judge, agreement = judge_split(raw)
    rows, excluded = usable(raw)
    counts = count_rows(rows)
    mode = choose_cluster(rows, cluster)
    overall = rates.rate_row(distinct_prompts(rows), alpha)
    zero = counts[(counts["n_harmful"] == 0) & (counts["n_benign"] == 0)]
    effect, fit = fits.benign_effect(counts, alpha=alpha, cluster=mode, sesoi_pp=sesoi_pp)
    judge_free = "logprob_diff" in raw.columns and raw["complied"].isna().all() and raw[
        "logprob_diff"].notna().any()
    if judge_free:
        effect["skipped"] = JUDGE_FREE
    count_designs = list(rows.loc[rows["_role"] == "count", "design"].dropna().unique())
    by_design = {
        name: fits.benign_effect(distinct_prompts(rows[rows["design"] == name]), alpha=alpha,
                                 cluster=mode, sesoi_pp=sesoi_pp)[0]
        for name in count_designs
    } if len(count_designs) > 1 else None
    # the study tests H_total on its total_count design, at alpha / (its number of N values)
    h_rows = counts[counts["design"] == h_total_design] if h_total_design in set(
        counts["design"].unique()) else counts
    h_total = {**hypotheses.h_total_tests(h_rows, alpha=alpha),
               "designs": list(h_rows["design"].dropna().unique())}
    ordering, ordering_table = ordering_summary(rows, alpha)
    recency_summary, recency_table = recency.summarize(
        rows[rows["_role"] == "ordering"], alpha)
    fmt, format_table = format_summary(rows, alpha)
    dropped, dropped_tables = exclusions.summarize(count_rows(raw), alpha=alpha, cluster=mode)
    sensitivity_summary, fitted = sensitivity.summarize(counts, fit, alpha=alpha, cluster=mode,
                                                        sesoi_pp=sesoi_pp)
    stage = raw["stage"].dropna()
    step = raw["step"].dropna()
    summary = {
        "stage": str(stage.iloc[0]) if len(stage) else None,
        "step": int(step.iloc[0]) if len(step) else None,
        "n_units": int(len(rows)),
        "n_rows": int(len(raw)),
        "n_distinct_prompts": int(overall["n"]),
        "excluded": excluded,
        "exclusions": dropped,
        "judge": judge,
        "compliance_rate": overall["rate"],
        "compliance_ci": [overall["ci_low"], overall["ci_high"]],
        "compliance": overall,
        "baseline": rates.rate_row(zero, alpha) if len(zero) else None,
        "benign_effect": effect,
        "benign_effect_by_design": by_design,
        # clustering read off every row: a judge-free table has no judged rows to read it from
        **({"benign_effect_logprob": fits.benign_effect_logprob(
            logprob_rows(raw), alpha=alpha, cluster=choose_cluster(raw, cluster))}
           if "logprob_diff" in raw.columns and raw["logprob_diff"].notna().any() else {}),
        "fit_designs": list(counts["design"].dropna().unique()),
        "h_total": h_total,
        "model_comparison": hypotheses.model_comparison(counts),
        "sensitivity": sensitivity_summary,
        "ordering": ordering,
        "recency": recency_summary,
        "format": fmt,
        "judge_agreement": agreement,
    }
    if not len(rows):
        summary["compliance_rate"] = None
        summary["note"] = "no usable units: every row was excluded (see `excluded`)"
    cells = []
    for (nh, nb), cell in counts.groupby(["n_harmful", "n_benign"], sort=True):
        cells.append({"n_harmful": nh, "n_benign": nb, "n_total": nh + nb,
                      "phi": nh / (nh + nb) if nh + nb else None,
                      **rates.rate_row(cell, alpha)})
    fitted_by_cell = {(c["n_harmful"], c["n_benign"]): c["fitted"] for c in fitted}
    for cell in cells:
        cell["fitted"] = fitted_by_cell.get((cell["n_harmful"], cell["n_benign"]))
    tables = {"cells": cells, "ordering": ordering_table, "format": format_table,
              "recency": recency_table,
              "exclusions_cells": dropped_tables["cells"],
              "exclusions_queries": dropped_tables["queries"],
              "h_total": [{**{k: v for k, v in t.items()
                              if k not in ("clustered", "largest_difference")},
                           "clustered_test": t["clustered"].get("test"),
                           "clustered_p_value": t["clustered"].get("p_value"),
                           **{f"largest_{k}": v for k, v in t["largest_difference"].items()}}
                          for t in h_total["tests"]]}
    return summary, tables


def analyze(
    results: pd.DataFrame | Path,
    out: Path,
    *,
    alpha: float = 0.05,
    pairs: list[tuple[str, str]] | None = None,
    cluster: str = "auto",
    designs: list[str] | None = None,
    sesoi_pp: float = verdicts.DEFAULT_SESOI_PP,
    primary: tuple[str, str] | None = None,
) -> dict:
    """Analyse every checkpoint in `results`, compare stages, write summary.json + CSVs.

    `cluster`: "auto" (query; plus draw when the table marks contexts as shared), "query", or
    "query+draw" (Cameron-Gelbach-Miller two-way). `designs`: the count designs behind the
    headline b2 (default: all but ablations); H_total is tested on the `total_count` design
    unless `designs` names others. `sesoi_pp`: the smallest effect of interest for the
    verdict. `primary`: the pre-specified stage contrast, marked and always tested."""
    source = str(results) if not isinstance(results, pd.DataFrame) else "results table"
    frame = results if isinstance(results, pd.DataFrame) else load_results(Path(results))
    frame = validate(frame, source, designs)
    if frame.empty:
        raise user_error(f"{source}: the table has no rows")
    if cluster not in ("auto", "query", "query+draw"):
        raise user_error(f"cluster must be auto, query or query+draw (got {cluster!r})")
    order = checkpoint_order(frame)
    checkpoints: dict[str, dict] = {}
    tables: dict[str, list[dict]] = {}
    for name in order:
        summary, parts = analyze_checkpoint(
            frame[frame["checkpoint"] == name], alpha=alpha, cluster=cluster,
            sesoi_pp=sesoi_pp, h_total_design=None if designs else "total_count")
        checkpoints[name] = summary
        for table, rows in parts.items():
            tables.setdefault(table, []).extend({"checkpoint": name, **r} for r in rows)
    adjusted = verdicts.holm([c["benign_effect"].get("p_value") for c in checkpoints.values()])
    for c, p in zip(checkpoints.values(), adjusted, strict=True):
        c["benign_effect"]["p_holm"] = p

    usable_rows = count_rows(usable(judge_split(frame)[0])[0])
    mode = choose_cluster(usable_rows, cluster)
    wanted = consecutive_pairs(frame, order)
    for a, b in [*(pairs or []), *([primary] if primary else [])]:
        for name in (a, b):
            if name not in checkpoints:
                raise user_error(
                    f"--pair {a}:{b}: no checkpoint named {name!r} (have: {', '.join(order)})"
                )
        if (a, b) not in wanted:
            wanted.append((a, b))
    judge_free = "logprob_diff" in frame.columns and frame["complied"].isna().all()
    differences = [{"from": a, "to": b, "delta_beta": None, "ci_low": None, "ci_high": None,
                    "p_value": None, "skipped": JUDGE_FREE} if judge_free else
                   stage_difference(usable_rows, a, b, alpha=alpha, cluster=mode)
                   for a, b in wanted]
    raw_counts = count_rows(judge_split(frame)[0])
    adjusted = verdicts.holm([d["p_value"] for d in differences])
    for (a, b), d, p in zip(wanted, differences, adjusted, strict=True):
        d["p_holm"] = p
        d["primary"] = (a, b) == primary
        d["bounds_excluded"] = None if judge_free else exclusions.difference_bounds(
            raw_counts, a, b, alpha=alpha, cluster=mode)
    scored = any("benign_effect_logprob" in c for c in checkpoints.values())
    lp_rows = logprob_rows(judge_split(frame)[0]) if scored else None
    differences_logprob = [stage_difference_logprob(
        lp_rows, a, b, alpha=alpha, cluster=choose_cluster(frame, cluster))
        for a, b in wanted] if scored else []
    templates = None if isinstance(results, pd.DataFrame) else templates_summary(
        Path(results), differences)  # chat templates the sweep rendered with (provenance)
    b2 = [{"checkpoint": n, "stage": checkpoints[n]["stage"], "step": checkpoints[n]["step"],
           **{k: checkpoints[n]["benign_effect"].get(k)
              for k in ("beta", "ci_low", "ci_high", "p_value", "p_holm", "direction",
                        "verdict")},
           **({"beta_logprob": checkpoints[n]["benign_effect_logprob"].get("beta")}
              if "benign_effect_logprob" in checkpoints[n] else {})}
          for n in order]
    trajectory = [r for r in b2 if r["stage"] is not None] if any(
        r["step"] is not None for r in b2) else []
    summary = rates.clean({
        "checkpoints": checkpoints,
        "stage_differences": differences,
        **({"stage_differences_logprob": differences_logprob} if scored else {}),
        "b2_by_checkpoint": b2,
        "trajectory": trajectory,
        "templates": templates,
        "settings": {"alpha": alpha, "sesoi_pp": sesoi_pp, "clustering": mode, "source": source,
                     "primary": list(primary) if primary else None,
                     "multiplicity": "Holm across checkpoints (benign_effect.p_holm) and "
                     "across stage differences (p_holm)",
                     "order": order, "model": "logit P = b0 + b1 log(N_h+1) + b2 log(N_b+1)",
                     **({"model_logprob": fits.LOGPROB_MODEL} if any(
                         "benign_effect_logprob" in c for c in checkpoints.values()) else {})},
    })
    write_outputs(Path(out), summary, tables)
    return summary


def write_outputs(out: Path, summary: dict, tables: dict[str, list[dict]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "summary.json", json.dumps(summary, indent=2, allow_nan=False) + "\n")
    per_checkpoint = []
    for name, c in summary["checkpoints"].items():
        effect = c["benign_effect"]
        per_checkpoint.append({
            "checkpoint": name, "stage": c["stage"], "step": c["step"], "n_units": c["n_units"],
            "compliance_rate": c["compliance_rate"], "compliance_ci_low": c["compliance_ci"][0],
            "compliance_ci_high": c["compliance_ci"][1],
            "baseline_rate": (c["baseline"] or {}).get("rate"),
            **{f"b2_{k}": effect.get(k) for k in ("beta", "ci_low", "ci_high", "p_value")},
            "direction": effect["direction"],
            "verdict": effect.get("verdict"),
            "effect_pp": (effect.get("effect_pp") or {}).get("change_pp"),
            "b2_skipped": effect.get("skipped"),
            "h_total_rejected": c["h_total"]["rejected"],
            "best_model_aic": c["model_comparison"].get("best_aic"),
            "excluded": sum(c["excluded"].values()),
            **({f"b2_logprob_{k}": c["benign_effect_logprob"].get(k)
                for k in ("beta", "ci_low", "ci_high", "p_value", "n")}
               if "benign_effect_logprob" in c else {}),
        })
    frames = {
        "per_checkpoint": pd.DataFrame(per_checkpoint),
        "cells": pd.DataFrame(tables.get("cells", [])),
        "h_total": pd.DataFrame(tables.get("h_total", [])),
        "ordering": pd.DataFrame(tables.get("ordering", [])),
        "format": pd.DataFrame(tables.get("format", [])),
        "stage_differences": pd.DataFrame(
            [{k: v for k, v in d.items() if not isinstance(v, list | dict)}
             for d in summary["stage_differences"]],
            columns=["from", "to", "delta_beta", "ci_low", "ci_high", "p_value"]
            if not summary["stage_differences"] else None,
        ),
        "trajectory": pd.DataFrame(summary["trajectory"]),
        **{name: pd.DataFrame(tables.get(name, [])) for name in
           ("recency", "exclusions_cells", "exclusions_queries")},
    }
    for name, table in frames.items():
        with atomic_path(out / f"{name}.csv") as tmp:
            table.to_csv(tmp, index=False)

