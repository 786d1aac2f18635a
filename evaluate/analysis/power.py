"""`stagesweep power`: the probability that the analysis detects a planted benign effect (or a
planted change between two stages), by simulation from a known logistic model, so queries and
draws can be sized before spending GPU hours. Each simulated table goes through the same fit
and test as `stagesweep analyze`.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from stagesweep.safeio import atomic_path


@dataclass(frozen=True)
class PowerRow:
    design: str
    queries: int
    draws: int
    b2: float
    heterogeneity: float
    units_per_checkpoint: int
    sims: int
    power: float
    mc_se: float
    mean_estimate: float | None
    # the planted (conditional, per-query) effect on the population-averaged scale the
    # analysis tests: random intercepts pull a marginal logistic slope toward 0
    population_averaged: float
    contexts: str = "per_query"


def population_averaged(spec, b2: float) -> float:
    """The population-averaged b2 implied by a conditional model: the marginal rate of each cell
    (integrating the query intercept and slope over their normal distributions by Gauss-Hermite
    quadrature) fitted by the same logistic model the analysis uses."""
    import warnings

    import numpy as np
    import statsmodels.api as sm

    from stagesweep.evaluate.analysis.simulate import grid

    cells = np.array(grid(spec.design))
    nodes, weights = np.polynomial.hermite_e.hermegauss(24)
    weights = weights / weights.sum()
    log_nb = np.log1p(cells[:, 1])
    eta = spec.b0 + spec.b1 * np.log1p(cells[:, 0]) + b2 * log_nb
    u = spec.intercept_sd * nodes
    s = spec.slope_sd * nodes
    centred = log_nb - log_nb.mean()
    linear = (eta[:, None, None] + u[None, :, None] + s[None, None, :] * centred[:, None, None])
    rate = (1 / (1 + np.exp(-linear)) * weights[:, None] * weights[None, :]).sum(axis=(1, 2))
    x = sm.add_constant(np.column_stack([np.log1p(cells[:, 0]), log_nb]))
    if len(set(cells[:, 0])) < 2:
        x = x[:, [0, 2]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = sm.GLM(rate, x, family=sm.families.Binomial()).fit()
    return float(fit.params[-1])


def detects(spec, alpha: float) -> tuple[bool, float | None]:
    """Simulate one table and run the analysis test: did it reject in the planted direction
    (or at all, when nothing was planted)?"""
    from stagesweep.evaluate import analysis
    from stagesweep.evaluate.analysis import fits
    from stagesweep.evaluate.analysis.simulate import simulate

    frame = analysis.validate(simulate(spec), "simulation")
    cluster = "query+draw" if spec.contexts == "shared" else "query"
    if spec.design == "stages":
        a, b = (c.name for c in spec.checkpoints)
        truth = spec.checkpoints[1].b2 - spec.checkpoints[0].b2
        result = analysis.stage_difference(frame, a, b, alpha=alpha, cluster=cluster)
        estimate = result["delta_beta"]
    else:
        truth = spec.b2
        result, _ = fits.benign_effect(frame, alpha=alpha, cluster=cluster)
        estimate = result["beta"]
    if estimate is None or result["p_value"] is None or result["p_value"] >= alpha:
        return False, estimate
    return (truth == 0 or (estimate > 0) == (truth > 0)), estimate


def power_table(
    *,
    design: str,
    queries: list[int],
    draws: int,
    b2: list[float],
    heterogeneity: float = 0.0,
    intercept_sd: float = 1.0,
    b0: float = -1.0,
    b1: float = 0.4,
    b2_from: float = 0.0,
    sims: int = 200,
    alpha: float = 0.05,
    seed: int = 0,
    contexts: str = "per_query",
) -> list[PowerRow]:
    """One row per (queries, b2). For `stages`, b2 is the planted change from a stage whose
    slope is `b2_from`; for `joint`/`total_count`, the planted slope itself."""
    from stagesweep.evaluate.analysis.simulate import SimCheckpoint, SimSpec, grid

    rows = []
    for q, effect in itertools.product(queries, b2):
        checkpoints = (
            [SimCheckpoint("from", b2_from, "sft"), SimCheckpoint("to", b2_from + effect, "dpo")]
            if design == "stages" else []
        )
        hits, estimates = 0, []
        for i in range(sims):
            spec = SimSpec(design=design, queries=q, draws=draws, b0=b0, b1=b1, b2=effect,
                           intercept_sd=intercept_sd, slope_sd=heterogeneity,
                           checkpoints=checkpoints, contexts=contexts, seed=seed + i)
            hit, estimate = detects(spec, alpha)
            hits += hit
            if estimate is not None:
                estimates.append(estimate)
        p = hits / sims
        rows.append(PowerRow(
            design=design, queries=q, draws=draws, b2=effect, heterogeneity=heterogeneity,
            units_per_checkpoint=q * draws * len(grid(design)), sims=sims, power=p,
            mc_se=math.sqrt(p * (1 - p) / sims),
            mean_estimate=sum(estimates) / len(estimates) if estimates else None,
            population_averaged=population_averaged(spec, b2_from + effect)
            - (population_averaged(spec, b2_from) if design == "stages" else 0.0),
            contexts=contexts,
        ))
    return rows


def format_table(rows: list[PowerRow]) -> str:
    label = "delta b2" if rows and rows[0].design == "stages" else "b2"
    lines = [f"{'design':<12} {'queries':>7} {'draws':>5} {label:>8} {'hetero':>6} "
             f"{'units/ckpt':>10} {'PA eff.':>8} {'power':>6} {'± MC se':>8} {'mean est':>9}"]
    for r in rows:
        mean = "-" if r.mean_estimate is None else f"{r.mean_estimate:+.3f}"
        lines.append(
            f"{r.design:<12} {r.queries:>7} {r.draws:>5} {r.b2:>+8.3f} {r.heterogeneity:>6.2f} "
            f"{r.units_per_checkpoint:>10} {round(r.population_averaged, 6) + 0.0:>+8.3f} "
            f"{r.power:>6.2f} "
            f"{r.mc_se:>8.3f} {mean:>9}"
        )
    return "\n".join(lines)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "power",
        help="simulate the detection probability of a benign effect or a stage change",
        description="Power by simulation: draw results from a logistic model with a planted "
        "b2 (joint design) or a planted change in b2 between two stages (stages design), run "
        "the analysis test on each, and print the share of simulations that detect it. With "
        "--b2 0 the table shows the false-positive rate.",
    )
    parser.add_argument("--design", choices=("joint", "stages", "total_count"), default="joint")
    parser.add_argument("--queries", type=int, nargs="+", default=[20, 40, 80],
                        help="numbers of target queries to compare (default 20 40 80)")
    parser.add_argument("--draws", type=int, default=2, help="demo draws per query (default 2)")
    parser.add_argument("--b2", type=float, nargs="+", default=[0.1],
                        help="planted benign slope(s); for --design stages the planted change")
    parser.add_argument("--b2-from", type=float, default=0.0,
                        help="stages design: the earlier stage's slope (default 0)")
    parser.add_argument("--heterogeneity", type=float, default=0.0,
                        help="SD of the benign slope between queries (default 0)")
    parser.add_argument("--intercept-sd", type=float, default=1.0,
                        help="SD of query difficulty on the logit scale (default 1)")
    parser.add_argument("--b0", type=float, default=-1.0, help="intercept (logit of baseline)")
    parser.add_argument("--b1", type=float, default=0.4, help="harmful-demo slope")
    parser.add_argument("--sims", type=int, default=200, help="simulations per row (default 200)")
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the table as CSV here")
    parser.add_argument(
        "--validate", action="store_true",
        help="instead of a power table, run the analysis's validation scenarios (the README's "
        "simulation table): --sims per scenario, --heavy-sims for the 1,404-query one")
    parser.add_argument("--heavy-sims", type=int, default=None, metavar="N",
                        help="--validate: simulations of the 1,404-query scenario (default "
                        "--sims)")
    parser.add_argument("--only", nargs="+", metavar="SCENARIO",
                        help="--validate: run only these scenarios")
    parser.add_argument("--timing", action="store_true",
                        help="instead, time `analyze` on a simulated paper-scale table (4 "
                        "checkpoints x 84,240 rows, sensitivity analyses included)")
    parser.set_defaults(func=handler)


def handler(args) -> int:
    from stagesweep.cli import UserError

    if args.sims < 1 or args.draws < 1 or min(args.queries) < 2:
        raise UserError("--sims and --draws must be >= 1 and every --queries value >= 2")
    if args.heterogeneity < 0 or args.intercept_sd < 0:
        raise UserError("--heterogeneity and --intercept-sd are standard deviations: use >= 0")
    start = time.perf_counter()
    if args.validate:
        return validate(args, start)
    if args.timing:
        from stagesweep.evaluate.analysis.validation import paper_scale_seconds

        rows, seconds = paper_scale_seconds(args.seed)
        print(f"analyze on {rows:,} rows (4 checkpoints): {seconds:.0f}s")
        return 0
    rows = power_table(
        design=args.design, queries=args.queries, draws=args.draws, b2=args.b2,
        heterogeneity=args.heterogeneity, intercept_sd=args.intercept_sd, b0=args.b0,
        b1=args.b1, b2_from=args.b2_from, sims=args.sims, alpha=args.alpha, seed=args.seed,
    )
    print(format_table(rows))
    print(f"power = share of {args.sims} simulations rejecting at alpha={args.alpha} in the "
          f"planted direction ({time.perf_counter() - start:.1f}s)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(args.out) as tmp:
            pd.DataFrame([r.__dict__ for r in rows]).to_csv(tmp, index=False)
    return 0


def validate(args, start: float) -> int:
    """`--validate`: every scenario of evaluate/analysis/validation.py as a markdown table."""
    from stagesweep.cli import UserError
    from stagesweep.evaluate.analysis import validation

    unknown = sorted(set(args.only or []) - set(validation.SCENARIOS))
    if unknown:
        raise UserError(f"--only {unknown[0]}: no such scenario (have: "
                        f"{', '.join(validation.SCENARIOS)})")
    rows = validation.run(args.sims, seed=args.seed, only=args.only,
                          heavy_sims=args.heavy_sims)
    print(validation.format_rows(rows))
    print(f"({time.perf_counter() - start:.0f}s)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame([r.__dict__ for r in rows]).to_csv(args.out, index=False)
    return 0
