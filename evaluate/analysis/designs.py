"""Summaries of the non-count designs: ordering (schedules at fixed counts) and format
(adoption of a demonstrated opening line)."""

from __future__ import annotations

import pandas as pd

from stagesweep.evaluate.analysis import hypotheses, rates
from stagesweep.evaluate.analysis.data import NO_OPENING


def ordering_summary(frame: pd.DataFrame, alpha: float) -> tuple[dict, list[dict]]:
    rows = frame[(frame["_role"] == "ordering") & frame["schedule"].notna()]
    if rows["schedule"].nunique() < 2:
        return {"skipped": "no ordering design (fewer than two schedules)"}, []
    total = rows["n_harmful"] + rows["n_benign"]
    rows = rows.assign(phi=(rows["n_harmful"] / total.where(total > 0)).round(4))
    by_phi, table = [], []
    for phi, part in rows.groupby("phi", sort=True):
        schedule_rates = []
        for schedule, cell in part.groupby("schedule", sort=True):
            rate = rates.rate_row(cell, alpha)
            schedule_rates.append({"schedule": schedule, **rate})
            table.append({"phi": phi, "schedule": schedule, **rate})
        entry = {"phi": phi, "rates": schedule_rates,
                 "schedule_test": hypotheses.group_test(part, "schedule")}
        entry["suffix_minus_prefix"] = rates.difference_pp(part, "schedule", "suffix", "prefix",
                                                           alpha)
        by_phi.append(entry)
    return {"by_phi": by_phi}, table


def format_summary(frame: pd.DataFrame, alpha: float) -> tuple[dict, list[dict]]:
    """Adoption of the demonstrated opening line, separately within refusals and within
    compliant answers: the study's point is that these are different behaviours."""
    opening = frame["opening"].astype(str).str.lower()
    rows = frame[frame["opening"].notna() & ~opening.isin(NO_OPENING)
                 & frame["format_adopted"].notna()]
    if rows.empty:
        return {"skipped": "no units with a demonstrated opening line and a format label"}, []
    table = []
    for (opening, complied), cell in rows.groupby(["opening", "complied"], sort=True):
        within = "compliant" if complied else "refusals"
        rate = rates.rate_row(cell, alpha, "format_adopted")
        table.append({"opening": opening, "within": within, **rate})
    by_opening: dict[str, dict] = {}
    for row in table:
        by_opening.setdefault(row["opening"], {})[row["within"]] = {
            k: row[k] for k in ("n", "rate", "ci_low", "ci_high")
        }
    return {"by_opening": by_opening}, table

