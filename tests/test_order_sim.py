"""Does `order: prefix_nested` keep the analysis valid? Outcomes are simulated on the demo
orders the planner really produces, under both orders, and run through the analysis's own
b2 fit, H_total chi-squares and ordering test.

The model gives every demo a potency (a random effect per pool row, the same demo moving every
query alike) that acts with a weight that decays with its distance from the target (1, 1/2,
1/4, 1/8 for the last four), so the order of the demos matters for every unit:

    logit P = b0 + u_q + b1 log(N_h+1) + b2 log(N_b+1) + sum_j w_j (a_{d_j} + r [d_j harmful])

`r` adds recency of the harmful type. Scenarios: the global null b1 = b2 = 0 (size of the b2,
H_total and schedule tests), a counting model b0 + b log(N+1) (size of H_total with an effect
of N), b2 = -0.3 (coverage of the population-averaged b2, taken from one large simulation of
each order), and r = 0.5 (how much a type-specific recency effect moves the estimand between
the orders).

`python tests/test_order_sim.py --sims 100` prints the README's table; the test runs fewer.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math

import numpy as np
import pandas as pd
import pytest

from stagesweep.evaluate.plan import build_plan
from stagesweep.evaluate.pools import DemoPool
from stagesweep.evaluate.spec import parse_spec

N_TOTAL = [4, 8, 16, 32]
PHI = [0, 0.25, 0.5, 0.75, 1]
WEIGHTS = np.array([1, 0.5, 0.25, 0.125])
PLANS = 4
# Rows per demo pool. Study-sized pools (1,492 and 5,000) keep a demo's reuse across queries
# low; with 64-row pools the demos' shared potency correlates queries, and query-clustered
# errors then reject a true b2 = 0 in 10.5% +- 2.2% of 200 sims (fresh shuffle).
POOL_ROWS = 1000
POOL = {"path": "in-memory", "columns": {"id": "id", "request": "request", "response": "response"}}


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    b1: float = 0.4
    b2: float = 0.0
    counting: float | None = None  # b in b0 + b log(N+1), replacing b1 and b2
    recency: float = 0.0
    b0: float = -1.0
    intercept_sd: float = 1.0
    demo_sd: float = 0.7


SCENARIOS = {
    "null": Scenario("global null (b1 = b2 = 0)", b1=0.0),
    "counting": Scenario("counting model (H_total true)", counting=0.3),
    "b2": Scenario("b2 = -0.3", b2=-0.3),
    "recency": Scenario("b2 = -0.3, harmful recency r = 0.5", b2=-0.3, recency=0.5),
}


def _pools(queries: int) -> dict[str, DemoPool]:
    def pool(name: str, n: int, answers: bool = True) -> DemoPool:
        ids = tuple(f"{name[0]}{i}" for i in range(n))
        return DemoPool(name, ids, ids, ids if answers else None)

    return {"harmful": pool("harmful", POOL_ROWS), "benign": pool("benign", POOL_ROWS),
            "targets": pool("targets", queries, answers=False)}


@functools.lru_cache(maxsize=16)
def planned(order: str, queries: int, seed: int) -> pd.DataFrame:
    """The plan's rows, with the index of each of the last four demos (-1: none) and whether
    it is harmful."""
    spec = parse_spec({
        "pools": {"harmful": POOL, "benign": POOL, "targets": POOL}, "draws": 2,
        "order": order, "seed": seed,
        "designs": [{"type": "total_count", "n": N_TOTAL, "phi": PHI},
                    {"type": "ordering", "n": [32], "phi": [0.5],
                     "schedules": ["prefix", "suffix", "random"]}]})
    units = build_plan(spec, _pools(queries))
    last = np.full((len(units), 4), -1)
    harmful = np.zeros((len(units), 4))
    for i, u in enumerate(units):
        for j, (pool, row) in enumerate(reversed(u.demos[-4:])):
            last[i, j] = int(row[1:]) + (POOL_ROWS if pool == "benign" else 0)
            harmful[i, j] = pool == "harmful"
    # one row per design label, as the sweep exports them (a prompt shared by the ordering
    # design's random schedule and the total-count design is one answer in both)
    rows = [(i, lab) for i, u in enumerate(units) for lab in u.labels]
    index = np.array([i for i, _ in rows])
    return pd.DataFrame({
        "unit_id": [lab.unit_id for _, lab in rows], "checkpoint": "sim",
        "design": [lab.design for _, lab in rows], "draw": [lab.draw for _, lab in rows],
        "schedule": [lab.schedule for _, lab in rows], "prompt": index,
        "query_id": [units[i].query_id for i in index],
        "n_harmful": [units[i].n_harmful for i in index],
        "n_benign": [units[i].n_benign for i in index],
        "opening": "unchanged", "status": "ok", "judge": "simulated", "contexts": "per_query",
    }).assign(**{f"last{j}": last[index, j] for j in range(4)},
              **{f"harm{j}": harmful[index, j] for j in range(4)})


def outcomes(rows: pd.DataFrame, s: Scenario, rng: np.random.Generator) -> pd.DataFrame:
    queries = rows["query_id"].astype("category").cat.codes.to_numpy()
    u = rng.normal(0, s.intercept_sd, queries.max() + 1)[queries]
    potency = np.append(rng.normal(0, s.demo_sd, 2 * POOL_ROWS), 0.0)  # index -1: no demo
    nh, nb = rows["n_harmful"].to_numpy(), rows["n_benign"].to_numpy()
    eta = s.b0 + u + (s.counting * np.log1p(nh + nb) if s.counting is not None
                      else s.b1 * np.log1p(nh) + s.b2 * np.log1p(nb))
    for j in range(4):
        eta += WEIGHTS[j] * (potency[rows[f"last{j}"].to_numpy()]
                             + s.recency * rows[f"harm{j}"].to_numpy())
    draw = rng.random(rows["prompt"].max() + 1)[rows["prompt"].to_numpy()]  # one per prompt
    return rows.assign(complied=(draw < 1 / (1 + np.exp(-eta))).astype(int))


def analysed(frame: pd.DataFrame, alpha: float = 0.05) -> dict:
    from stagesweep.evaluate import analysis
    from stagesweep.evaluate.analysis import fits, hypotheses

    frame = analysis.validate(frame, "simulation")
    counts = frame[frame["design"] == "total_count"]
    effect, _ = fits.benign_effect(counts, alpha=alpha, cluster="query")
    ordering = frame[frame["design"] == "ordering"]
    schedule = hypotheses.group_test(ordering, "schedule")
    return {"beta": effect["beta"], "ci": (effect["ci_low"], effect["ci_high"]),
            "b2_rejected": effect["p_value"] is not None and effect["p_value"] < alpha,
            "h_total_rejected": hypotheses.h_total_tests(counts, alpha=alpha)["rejected"],
            "schedule_rejected": schedule["p_value"] is not None and schedule["p_value"] < alpha,
            "random_rate": float(ordering.loc[ordering["schedule"] == "random",
                                              "complied"].mean())}


def truth(order: str, s: Scenario, queries: int = 3000) -> float:
    """The population-averaged b2 of an order: the estimate from one very large table."""
    rows = planned(order, queries, seed=10_000)
    return analysed(outcomes(rows, s, np.random.default_rng(10_000)))["beta"]


def run(scenario: str, order: str, sims: int, queries: int = 40, seed: int = 0,
        target: float | None = None) -> dict:
    s = SCENARIOS[scenario]
    # a few plans (seeds) reused with fresh demo potencies and outcomes: each plan holds
    # 2 x `queries` demo contexts, so the orders are averaged over many contexts already
    results = [analysed(outcomes(planned(order, queries, seed + i % PLANS), s,
                                 np.random.default_rng(seed + i))) for i in range(sims)]

    def share(key: str) -> tuple[float, float]:
        p = float(np.mean([r[key] for r in results]))
        return p, math.sqrt(p * (1 - p) / sims)

    out = {"scenario": s.name, "order": order, "sims": sims, "queries": queries,
           "b2_rejects": share("b2_rejected"), "h_total_rejects": share("h_total_rejected"),
           "schedule_rejects": share("schedule_rejected"),
           "mean_beta": float(np.mean([r["beta"] for r in results])),
           "random_rate": float(np.mean([r["random_rate"] for r in results]))}
    if target is not None:
        covered = [r["ci"][0] <= target <= r["ci"][1] for r in results]
        p = float(np.mean(covered))
        out["coverage"] = (p, math.sqrt(p * (1 - p) / sims))
    return out


@pytest.mark.slow
def test_prefix_nested_keeps_size_and_coverage():
    """Under the global null every test's rejection rate, and under b2 = -0.3 the coverage of
    the b2 interval, match the fresh shuffle's within Monte Carlo error (few simulations here;
    the README's table has 100 a row)."""
    sims = 24
    null = {o: run("null", o, sims) for o in ("shuffle", "prefix_nested")}
    for key in ("b2_rejects", "h_total_rejects", "schedule_rejects"):
        (fresh, se_f), (nested, se_n) = null["shuffle"][key], null["prefix_nested"][key]
        assert abs(fresh - nested) <= 3 * max(math.hypot(se_f, se_n), 0.06)
        assert nested <= 0.05 + 3 * max(se_n, 0.045)
    target = truth("shuffle", SCENARIOS["b2"], queries=1500)
    for order in ("shuffle", "prefix_nested"):
        coverage, se = run("b2", order, sims, target=target)["coverage"]
        assert coverage >= 0.95 - 3 * max(se, 0.045)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sims", type=int, default=100)
    parser.add_argument("--queries", type=int, default=40)
    args = parser.parse_args()
    print("| scenario | order | sims | b2 test rejects | H_total rejects | schedule test "
          "rejects | mean b2 | b2 truth | coverage of truth | random-schedule rate |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for scenario in SCENARIOS:
        for order in ("shuffle", "prefix_nested"):
            # b2 is 0 in the population under both nulls; the counting model has no b2 truth
            target = {"null": 0.0, "counting": None}.get(
                scenario, truth(order, SCENARIOS[scenario], queries=1500))
            r = run(scenario, order, args.sims, args.queries, target=target)

            def fmt(pair: tuple[float, float]) -> str:
                return f"{pair[0]:.3f} ± {pair[1]:.3f}"

            covered = fmt(r["coverage"]) if target is not None else "-"
            print(f"| {r['scenario']} | {order} | {r['sims']} | {fmt(r['b2_rejects'])} | "
                  f"{fmt(r['h_total_rejects'])} | {fmt(r['schedule_rejects'])} | "
                  f"{r['mean_beta']:+.3f} | {'-' if target is None else f'{target:+.3f}'} | "
                  f"{covered} | {r['random_rate']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
