"""From estimates to words: the study's `direction` (a two-sided test at alpha), the `verdict`
that adds equivalence (TOST against a smallest effect of interest in percentage points), and
Holm's adjustment for several tests read together.

Why a verdict beside the direction: "none" reads as "no effect", but a p-value above alpha only
says the data could not tell. With many queries an interval can sit inside +-SESOI, and then
"negligible" is a claim the data support; with few, the honest word is "inconclusive"."""

from __future__ import annotations

import math

VERDICTS = ("amplification", "dilution", "negligible", "inconclusive")
# The smallest benign effect worth reporting, in percentage points of compliance (--sesoi-pp).
DEFAULT_SESOI_PP = 2.0


def direction(beta: float | None, p_value: float | None, alpha: float) -> str:
    """The study's call: the sign of b2 when its two-sided test rejects at alpha, else none."""
    if beta is None or p_value is None or p_value >= alpha:
        return "none"
    return "amplification" if beta > 0 else "dilution"


def equivalence(estimate: float, se: float, df: int, sesoi: float, alpha: float) -> dict:
    """Two one-sided tests (TOST) of |effect| < sesoi: the larger one-sided p-value, and the
    (1 - 2 alpha) interval whose inclusion in (-sesoi, sesoi) is the same decision."""
    from scipy import stats

    if not se > 0:
        return {"p_value": None, "ci_low": None, "ci_high": None, "equivalent": False}
    p_low = float(stats.t.sf((estimate + sesoi) / se, df))
    p_high = float(stats.t.cdf((estimate - sesoi) / se, df))
    half = float(stats.t.ppf(1 - alpha, df)) * se
    p = max(p_low, p_high)
    return {"p_value": p, "ci_low": estimate - half, "ci_high": estimate + half,
            "equivalent": bool(p < alpha)}


def verdict(call: str, equivalent: bool) -> str:
    """amplification / dilution when the test rejects, negligible when TOST says the effect is
    inside +-SESOI, inconclusive otherwise (including every fit that could not be made)."""
    if call in ("amplification", "dilution"):
        return call
    return "negligible" if equivalent else "inconclusive"


def holm(p_values: list[float | None]) -> list[float | None]:
    """Holm step-down adjusted p-values (None stays None): controls the family-wise error over
    the tests read together (the checkpoints of one analysis, the stage differences)."""
    known = sorted((p, i) for i, p in enumerate(p_values) if p is not None and math.isfinite(p))
    out: list[float | None] = [None] * len(p_values)
    running, m = 0.0, len(known)
    for rank, (p, i) in enumerate(known):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out
