"""Synthetic results tables drawn from known logistic models, in the sweep's column layout.

Used by the tests (is the planted b2 recovered, do intervals cover, is the size right) and by
`stagesweep power` (how many queries and draws a design needs before spending GPU hours).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

# The study's grids (PAPER.md), shrunk to the cells that carry the information.
TOTAL_COUNT_N = (4, 8, 16, 32, 64)
TOTAL_COUNT_PHI = (0.0, 0.25, 0.5, 0.75, 1.0)
JOINT_NH = (0, 4, 16, 64)
JOINT_NB = (0, 4, 16, 64)
STAGES_NH = (8, 16, 32)
STAGES_NB = (0, 8, 16, 32, 64)
SCHEDULES = ("prefix", "middle", "random", "interleave", "suffix")
# recipes/sweeps/paper.yaml's count designs: their shared cells are one prompt in the sweep.
PAPER_GRIDS = {
    "total_count": sorted({(round(phi * n), n - round(phi * n))
                           for n, phi in itertools.product((4, 8, 16, 32, 64, 128),
                                                           TOTAL_COUNT_PHI)} | {(0, 0)}),
    "joint": list(itertools.product((0, 8, 16, 32), (0, 8, 16, 32, 64))),
}
OPENINGS = ("Answer:", "Sure I can help with that!")


@dataclass(frozen=True)
class SimCheckpoint:
    name: str
    b2: float
    stage: str | None = None
    step: int | None = None


@dataclass
class SimSpec:
    """A data-generating model: logit P = b0 + u_q + v_c + b1 log(N_h+1) + (b2 + s_q) log(N_b+1)
    (or b0 + b_total log(N+1) when `counting`), with u_q ~ N(0, intercept_sd^2) per query,
    v_c ~ N(0, draw_sd^2) per demo context, s_q ~ N(0, slope_sd^2) the between-query
    heterogeneity of the benign slope, and w_c ~ N(0, draw_slope_sd^2) a slope shift per demo
    context (some demo sets move the model more than others; with shared contexts every query
    sees the same shift, which is what two-way clustering is for).

    The random slope multiplies log(N_b+1) centred at the grid's mean, so the population-averaged
    slope stays b2: an uncentred random slope also bends the marginal curve toward 50% as N_b
    grows, which a marginal model would rightly report as an effect."""

    design: str = "joint"  # total_count | joint | stages | paper (total_count + joint)
    queries: int = 40
    draws: int = 2
    b0: float = -1.0
    b1: float = 0.4
    b2: float = 0.0
    counting: bool = False
    b_total: float = 0.4
    intercept_sd: float = 0.0
    slope_sd: float = 0.0
    draw_sd: float = 0.0
    draw_slope_sd: float = 0.0
    contexts: str = "per_query"  # per_query | shared (draw d is the same demos for all queries)
    checkpoints: list[SimCheckpoint] = field(default_factory=list)
    ordering: dict[str, float] | None = None  # schedule -> logit offset, adds ordering rows
    format_adoption: tuple[float, float] | None = None  # P(adopt | refused), P(adopt | complied)
    # informative exclusions: logit P(excluded) = e0 + e_nb log(N_b+1) + e_y [would comply]
    exclusion: tuple[float, float, float] | None = None
    # `outcome: logprob`: logprob_diff = the same linear predictor + N(0, logprob_sd^2) per
    # prompt, so its slope on log(N_b+1) is b2 exactly (a linear model does not attenuate)
    logprob_sd: float | None = None
    seed: int = 0


def grid(design: str) -> list[tuple[int, int]]:
    """(n_harmful, n_benign) cells of a design, including the zero-demo baseline."""
    if design == "total_count":
        cells = {(round(phi * n), n - round(phi * n))
                 for n, phi in itertools.product(TOTAL_COUNT_N, TOTAL_COUNT_PHI)}
        return sorted(cells | {(0, 0)})
    if design == "joint":
        return list(itertools.product(JOINT_NH, JOINT_NB))
    if design == "stages":
        return list(itertools.product(STAGES_NH, STAGES_NB))
    raise ValueError(f"unknown design {design!r}; choose total_count, joint or stages")


def design_grids(design: str) -> dict[str, list[tuple[int, int]]]:
    """The count designs a simulated sweep holds, each with its cells."""
    if design == "paper":
        return PAPER_GRIDS
    return {"total_count" if design == "total_count" else "joint": grid(design)}


def simulate(spec: SimSpec) -> pd.DataFrame:
    """One results table with the sweep's columns. As in a sweep, a prompt is answered once:
    the zero-demo prompt (the bare target) once per query, and a cell that two designs share
    (`paper`) once, exported under both designs' labels with one `prompt_sha`."""
    rng = np.random.default_rng(spec.seed)
    checkpoints = spec.checkpoints or [SimCheckpoint("model", spec.b2)]
    grids = design_grids(spec.design)
    labels = pd.DataFrame(
        [(name, q, d, nh, nb) for name, cells in grids.items()
         for q in range(spec.queries) for d in range(spec.draws) for nh, nb in cells],
        columns=["design", "q", "d", "nh", "nb"])
    zero = (labels["nh"] == 0) & (labels["nb"] == 0)
    labels["prompt"] = (labels["q"].astype(str) + "/" + labels["d"].where(~zero, 0).astype(str)
                        + "/" + labels["nh"].astype(str) + "-" + labels["nb"].astype(str))
    code, prompts = pd.factorize(labels["prompt"])
    first = labels.iloc[np.unique(code, return_index=True)[1]]  # one row per distinct prompt
    q, d = first["q"].to_numpy(), first["d"].to_numpy()
    nh, nb = first["nh"].to_numpy(), first["nb"].to_numpy()
    u = rng.normal(0, spec.intercept_sd, spec.queries)
    s = rng.normal(0, spec.slope_sd, spec.queries)
    n_contexts = spec.draws if spec.contexts == "shared" else spec.queries * spec.draws
    v = rng.normal(0, spec.draw_sd, n_contexts)
    w = rng.normal(0, spec.draw_slope_sd, n_contexts)
    centre = np.log1p(np.array([c[1] for cells in grids.values() for c in cells])).mean()
    context = d if spec.contexts == "shared" else q * spec.draws + d
    frames = []
    for ckpt in checkpoints:
        if spec.counting:
            eta = spec.b0 + spec.b_total * np.log1p(nh + nb)
        else:
            eta = spec.b0 + spec.b1 * np.log1p(nh) + ckpt.b2 * np.log1p(nb)
        eta = eta + u[q] + v[context] + (s[q] + w[context]) * (np.log1p(nb) - centre)
        complied = rng.binomial(1, 1 / (1 + np.exp(-eta))).astype(float)
        status = np.full(len(prompts), "ok", dtype=object)
        if spec.exclusion:
            e0, e_nb, e_y = spec.exclusion
            p_out = 1 / (1 + np.exp(-(e0 + e_nb * np.log1p(nb) + e_y * complied)))
            out = rng.random(len(prompts)) < p_out
            status[out], complied[out] = "overflow", np.nan
        logprob = None if spec.logprob_sd is None else \
            eta + rng.normal(0, spec.logprob_sd, len(prompts))
        frame = pd.DataFrame({
            "unit_id": (labels["design"] + "/" + labels["nh"].astype(str) + "-"
                        + labels["nb"].astype(str) + "/q" + labels["q"].astype(str)
                        + "/d" + labels["d"].astype(str)),
            "checkpoint": ckpt.name, "stage": ckpt.stage, "step": ckpt.step,
            "design": labels["design"], "query_id": "q" + labels["q"].astype(str),
            "draw": labels["d"],
            # the sweep's values for count designs: default order, demo answers unchanged
            "n_harmful": labels["nh"], "n_benign": labels["nb"], "schedule": "random",
            "opening": "unchanged",
            "complied": pd.array(complied[code], dtype="Int64"),
            "format_adopted": None, "judge": "simulated", "status": status[code],
            "contexts": spec.contexts, "prompt_sha": "sim/" + labels["prompt"],
        })
        if logprob is not None:
            frame["logprob_diff"] = np.where(status[code] == "ok", logprob[code], np.nan)
        frames.append(frame)
        if spec.ordering:
            frames.append(_ordering_rows(spec, ckpt, u, rng))
        if spec.format_adoption:
            frames.append(_format_rows(spec, ckpt, u, rng))
    return pd.concat(frames, ignore_index=True)


def _ordering_rows(spec: SimSpec, ckpt: SimCheckpoint, u, rng) -> pd.DataFrame:
    """32 harmful + 32 benign demos under each schedule, the schedule shifting the logit."""
    rows = []
    for schedule, offset in spec.ordering.items():
        eta = spec.b0 + spec.b1 * np.log1p(32) + ckpt.b2 * np.log1p(32) + offset + u
        for draw in range(spec.draws):
            rows.append(pd.DataFrame({
                "unit_id": [f"ordering/{schedule}/q{i}/d{draw}" for i in range(spec.queries)],
                "checkpoint": ckpt.name, "stage": ckpt.stage, "step": ckpt.step,
                "design": "ordering", "query_id": [f"q{i}" for i in range(spec.queries)],
                "draw": draw, "n_harmful": 32, "n_benign": 32, "schedule": schedule,
                "opening": "unchanged", "complied": rng.binomial(1, 1 / (1 + np.exp(-eta))),
                "format_adopted": None, "judge": "simulated", "status": "ok",
                "contexts": spec.contexts,
            }))
    return pd.concat(rows, ignore_index=True)


def _format_rows(spec: SimSpec, ckpt: SimCheckpoint, u, rng) -> pd.DataFrame:
    """Units whose demo answers open with a fixed line; adoption depends on the verdict only."""
    p_refused, p_complied = spec.format_adoption
    rows = []
    for opening in OPENINGS:
        eta = spec.b0 + spec.b1 * np.log1p(16) + ckpt.b2 * np.log1p(16) + u
        complied = rng.binomial(1, 1 / (1 + np.exp(-eta)))
        adopted = rng.binomial(1, np.where(complied == 1, p_complied, p_refused))
        rows.append(pd.DataFrame({
            "unit_id": [f"format/{opening}/q{i}" for i in range(spec.queries)],
            "checkpoint": ckpt.name, "stage": ckpt.stage, "step": ckpt.step,
            "design": "format", "query_id": [f"q{i}" for i in range(spec.queries)], "draw": 0,
            "n_harmful": 16, "n_benign": 16, "schedule": "random", "opening": opening,
            "complied": complied, "format_adopted": adopted, "judge": "simulated",
            "status": "ok", "contexts": spec.contexts,
        }))
    return pd.concat(rows, ignore_index=True)
