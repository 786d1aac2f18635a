"""`stagesweep power --validate`: the README's simulation table. Each scenario draws datasets
from a known model in the situations where real sweeps differ from textbook data (informative
exclusions, designs that share prompts, few shared contexts, skewed query difficulty, a null
effect with many queries, heterogeneous slopes) and runs the analysis's own code on each; a
row is the share of datasets meeting the scenario's criterion with its Monte Carlo standard
error sqrt(p (1 - p) / n)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd

from stagesweep.evaluate.analysis import exclusions, fits, hypotheses, mixed, rates
from stagesweep.evaluate.analysis.data import count_rows, logprob_rows, usable, validate
from stagesweep.evaluate.analysis.simulate import SimSpec, design_grids, simulate

ALPHA = 0.05


@dataclass(frozen=True)
class Row:
    scenario: str
    criterion: str
    target: str
    sims: int
    rate: float
    mc_se: float
    mean_estimate: float | None = None  # the scenario's mean estimate, where it has one


def table(spec: SimSpec) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A simulated checkpoint as `analyze` sees it: (every headline row, usable rows)."""
    frame = validate(simulate(spec), "simulation")
    return count_rows(frame), count_rows(usable(frame)[0])


def marginal_rates(spec: SimSpec) -> dict[tuple[int, int], float]:
    """True population rate of each cell: the model's probability integrated over the query
    intercept (Gauss-Hermite quadrature)."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(60)
    weights = weights / weights.sum()
    out = {}
    for cells in design_grids(spec.design).values():
        for nh, nb in cells:
            eta = spec.b0 + spec.b1 * math.log1p(nh) + spec.b2 * math.log1p(nb)
            out[nh, nb] = float(weights @ (1 / (1 + np.exp(-(eta + spec.intercept_sd * nodes)))))
    return out


def share(hits: list[bool]) -> tuple[float, float]:
    p = float(np.mean(hits))
    return p, math.sqrt(p * (1 - p) / len(hits))


def exclusions_scenario(sims: int, seed: int) -> Iterator[Row]:
    """~8% of rows excluded, more at large N_b and when the answer would have complied (long
    compliant answers overflow); no benign effect (b2 = 0, so the population-averaged truth
    is 0)."""
    flagged, bounded, called = [], [], []
    for i in range(sims):
        spec = SimSpec(design="joint", queries=40, b2=0.0, intercept_sd=1.0,
                       exclusion=(-4.3, 0.35, 1.2), seed=seed + i)
        raw, rows = table(spec)
        effect, _ = fits.benign_effect(rows, alpha=ALPHA, cluster="query")
        block, _ = exclusions.summarize(raw, alpha=ALPHA, cluster="query")
        flagged.append("warning" in block)
        bounds = block["b2_bounds"]
        bounded.append(bounds["outer_ci_low"] <= 0.0 <= bounds["outer_ci_high"])
        called.append(effect["direction"] != "none")
    name = "informative exclusions (8%), b2 = 0, 40 queries x 2 draws"
    yield Row(name, "exclusion flagged (dependence test)", ">= 0.95", sims, *share(flagged))
    yield Row(name, "b2 bounds (outer 95% interval) contain the truth", ">= 0.95", sims,
              *share(bounded))
    yield Row(name, "complete-case b2 direction called (for reference)", "-", sims,
              *share(called))


def h_total_scenario(sims: int, seed: int) -> Iterator[Row]:
    """A true counting model (H_total holds) on paper.yaml's total_count + joint designs,
    whose 10 shared cells are one prompt each: the test on total_count at alpha / 6."""
    rejected = []
    for i in range(sims):
        spec = SimSpec(design="paper", queries=40, counting=True, intercept_sd=1.0,
                       seed=seed + i)
        _, rows = table(spec)
        rejected.append(hypotheses.h_total_tests(
            rows[rows["design"] == "total_count"], alpha=ALPHA)["rejected"])
    yield Row("H_total holds, paper.yaml designs, 40 queries x 2 draws",
              "H_total rejected (size)", "<= 0.07", sims, *share(rejected))


def coverage_scenario(sims: int, seed: int, intercept_sd: float) -> Iterator[Row]:
    """Query-clustered intervals of the overall and per-cell rates against the population
    rates of the generating model."""
    overall, cells = [], []
    for i in range(sims):
        spec = SimSpec(design="joint", queries=30, b2=0.1, intercept_sd=intercept_sd,
                       seed=seed + i)
        truth = marginal_rates(spec)
        _, rows = table(spec)
        # the overall rate weighs each distinct prompt once: the zero-demo cell once per query
        weights = rows.groupby(["n_harmful", "n_benign"]).size()
        true_overall = sum(truth[c] * w for c, w in weights.items()) / weights.sum()
        r = rates.rate_row(rows, ALPHA)
        overall.append(r["ci_low"] <= true_overall <= r["ci_high"])
        covered = []
        for cell, part in rows.groupby(["n_harmful", "n_benign"]):
            r = rates.rate_row(part, ALPHA)
            covered.append(r["ci_low"] <= truth[cell] <= r["ci_high"])
        cells.append(float(np.mean(covered)))
    name = f"rates, query intercept SD {intercept_sd:g}, 30 queries x 2 draws"
    yield Row(name, "overall rate: 95% interval covers", "0.93-0.97", sims, *share(overall))
    # the 16 cells of one dataset are correlated: the MC error uses per-dataset shares
    yield Row(name, "per-cell rates (16 cells): 95% interval covers", "0.93-0.97", sims,
              float(np.mean(cells)), float(np.std(cells, ddof=1) / math.sqrt(sims)))


def shared_scenario(sims: int, seed: int) -> Iterator[Row]:
    """Contexts shared by every query, 2 draws, a real effect (b2 = 0.3): no direction call."""
    silent = []
    for i in range(sims):
        spec = SimSpec(design="joint", queries=40, draws=2, b2=0.3, intercept_sd=1.0,
                       draw_slope_sd=0.2, contexts="shared", seed=seed + i)
        _, rows = table(spec)
        effect, _ = fits.benign_effect(rows, alpha=ALPHA, cluster="query+draw")
        silent.append(effect["direction"] == "none" and effect["verdict"] == "inconclusive")
    yield Row("shared contexts, 2 draws, b2 = 0.3, 40 queries", "no direction call",
              "1.00", sims, *share(silent))


def equivalence_scenario(sims: int, seed: int) -> Iterator[Row]:
    """No effect, the study's 1,404 queries x 2 draws: the verdict should be `negligible`."""
    negligible = []
    for i in range(sims):
        spec = SimSpec(design="joint", queries=1404, b2=0.0, intercept_sd=1.0, seed=seed + i)
        _, rows = table(spec)
        effect, _ = fits.benign_effect(rows, alpha=ALPHA, cluster="query")
        negligible.append(effect["verdict"] == "negligible")
    yield Row("b2 = 0, 1,404 queries x 2 draws, SESOI 2 pp", "verdict negligible", ">= 0.90",
              sims, *share(negligible))


def mixed_scenario(sims: int, seed: int) -> Iterator[Row]:
    """Conditional b2 = 0.2, slope SD 0.3, intercept SD 1 (60 queries x 2 draws, joint grid):
    the mixed model's interval for b2 and for the slope SD should cover the planted values."""
    b2_hit, sd_hit, b2s, sds = [], [], [], []
    for i in range(sims):
        spec = SimSpec(design="joint", queries=60, b2=0.2, slope_sd=0.3, intercept_sd=1.0,
                       seed=seed + i)
        _, rows = table(spec)
        fit = mixed.fit_mixed(rows, alpha=ALPHA)
        b2s.append(fit["beta"])
        sds.append(fit["slope_sd"])
        b2_hit.append(fit["ci_low"] <= 0.2 <= fit["ci_high"])
        low, high = fit["slope_sd_ci"]
        sd_hit.append(low is not None and high is not None and low <= 0.3 <= high)
    name = "mixed model: conditional b2 = 0.2, slope SD 0.3, 60 queries x 2 draws"
    yield Row(f"{name} (mean b2 {np.mean(b2s):.3f})", "b2 95% interval covers 0.2",
              "0.93-0.97", sims, *share(b2_hit), float(np.mean(b2s)))
    yield Row(f"{name} (mean slope SD {np.mean(sds):.3f})", "slope SD interval covers 0.3",
              "0.93-0.97", sims, *share(sd_hit), float(np.mean(sds)))


def logprob_scenario(sims: int, seed: int) -> Iterator[Row]:
    """The judge-free outcome's linear b2 (query-clustered OLS on logprob_diff) when benign
    slopes differ between queries (SD 0.5) and query intercepts are wide (SD 2): interval
    coverage of a planted b2 = 0.3 and the false-positive rate at b2 = 0."""
    covered, called, estimates = [], [], []
    for i in range(sims):
        for b2, hits in ((0.3, covered), (0.0, called)):
            spec = SimSpec(design="joint", queries=30, b2=b2, slope_sd=0.5, intercept_sd=2.0,
                           logprob_sd=1.0, seed=seed + i)
            rows = logprob_rows(validate(simulate(spec), "simulation"))
            effect = fits.benign_effect_logprob(rows, alpha=ALPHA, cluster="query")
            if b2:
                estimates.append(effect["beta"])
                hits.append(effect["ci_low"] <= b2 <= effect["ci_high"])
            else:
                hits.append(not effect["ci_low"] <= 0.0 <= effect["ci_high"])
    name = "logprob outcome, query slope SD 0.5, intercept SD 2, 30 queries x 2 draws"
    yield Row(f"{name}, b2 = 0.3 (mean b2 {np.mean(estimates):.3f})",
              "b2 95% interval covers 0.3", "0.93-0.97", sims, *share(covered),
              float(np.mean(estimates)))
    yield Row(f"{name}, b2 = 0", "b2 interval excludes 0 (false positive)", "<= 0.07", sims,
              *share(called))


SCENARIOS: dict[str, Callable[[int, int], Iterator[Row]]] = {
    "exclusions": exclusions_scenario,
    "h_total": h_total_scenario,
    "coverage_sd1": lambda sims, seed: coverage_scenario(sims, seed, 1.0),
    "coverage_sd2": lambda sims, seed: coverage_scenario(sims, seed, 2.0),
    "shared_contexts": shared_scenario,
    "equivalence": equivalence_scenario,
    "mixed_model": mixed_scenario,
    "logprob": logprob_scenario,
}


def run(sims: int, *, seed: int = 0, only: list[str] | None = None,
        heavy_sims: int | None = None) -> list[Row]:
    """Every scenario (or those in `only`); `heavy_sims` for the 1,404-query one."""
    rows = []
    for name, scenario in SCENARIOS.items():
        if only and name not in only:
            continue
        count = heavy_sims or sims if name == "equivalence" else sims
        start = time.perf_counter()
        rows += list(scenario(count, seed))
        print(f"  {name}: {count} simulations in {time.perf_counter() - start:.0f}s",
              flush=True)
    return rows


def format_rows(rows: list[Row]) -> str:
    """The README's markdown table."""
    lines = ["| scenario | criterion | target | simulations | rate | MC error |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r.scenario} | {r.criterion} | {r.target} | {r.sims} | {r.rate:.3f} | "
              f"{r.mc_se:.3f} |" for r in rows]
    return "\n".join(lines)


def paper_scale_seconds(seed: int = 0) -> tuple[int, float]:
    """Rows and seconds of `analyze` (sensitivity analyses included) on the paper's scale: 4
    checkpoints x 84,240 rows (1,404 queries x 2 draws x the 30 total_count cells with
    demos), 5% of rows excluded (so every bound is computed)."""
    import tempfile
    from pathlib import Path

    from stagesweep.evaluate.analysis import analyze
    from stagesweep.evaluate.analysis.simulate import SimCheckpoint

    spec = SimSpec(design="paper", queries=1404, intercept_sd=1.0, slope_sd=0.2,
                   exclusion=(-4.0, 0.3, 0.5), seed=seed, checkpoints=[
                       SimCheckpoint("base", 0.0, "base"), SimCheckpoint("sft", 0.1, "sft"),
                       SimCheckpoint("dpo", 0.0, "dpo"), SimCheckpoint("rlvr", -0.05, "rlvr")])
    frame = simulate(spec)
    frame = frame[(frame["design"] == "total_count")
                  & (frame["n_harmful"] + frame["n_benign"] > 0)]
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        analyze(frame, Path(out))
        return len(frame), time.perf_counter() - start
