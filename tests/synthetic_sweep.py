"""A sweep output dir with synthetic answers, in the sweep's own formats: pools as JSONL, the
spec copy, the plan (from `build_plan`), a SQLite store written through `ResultStore` and
`results.parquet` exported from it by `export_results`. Only the model is missing: answers and
labels are drawn at random. It lets the viewer and the export be tested at paper size
(4 checkpoints x 84,240 units) in seconds, without a GPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

from stagesweep.evaluate.plan import build_plan, export_labels
from stagesweep.evaluate.pools import load_pools
from stagesweep.evaluate.spec import parse_spec
from stagesweep.evaluate.store import ResultStore, export_results

# The study's total-count grid: 6 N x 5 phi = 30 cells; with 1,404 queries x 2 draws that is
# 84,240 units per checkpoint.
PAPER_GRID = {"n": [4, 8, 16, 32, 64, 128], "phi": [0, 0.25, 0.5, 0.75, 1]}
CHECKPOINTS = [("sft", "sft"), ("dpo", "dpo"), ("dpo-step500", "dpo"), ("instruct", "instruct")]


def _pool(path: Path, kind: str, rows: int, with_response: bool) -> None:
    with path.open("w") as f:
        for i in range(rows):
            row = {"id": f"{kind}{i}", "request": f"{kind} request {i}: [REDACTED] " * 3}
            if with_response:
                row["response"] = f"Sure. {kind} answer {i}. " * 8
            f.write(json.dumps(row) + "\n")


def synthetic_sweep(out: Path, *, queries: int = 1404, draws: int = 2, grid: dict | None = None,
                    harmful: int = 1492, benign: int = 5000,
                    checkpoints: list[tuple[str, str]] = CHECKPOINTS, seed: int = 0) -> Path:
    """Write a sweep dir at `out` and return it."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "pools").mkdir(exist_ok=True)
    _pool(out / "pools" / "harmful.jsonl", "harmful", harmful, True)
    _pool(out / "pools" / "benign.jsonl", "benign", benign, True)
    _pool(out / "pools" / "targets.jsonl", "target", queries, False)
    raw = {
        "pools": {name: {"path": str(out / "pools" / f"{name}.jsonl"),
                         "columns": {"id": "id", "request": "request", "response": "response"}
                         if name != "targets" else {"id": "id", "request": "request"}}
                  for name in ("harmful", "benign", "targets")},
        "targets": "targets", "draws": draws, "seed": seed,
        "designs": [{"type": "total_count", **(grid or PAPER_GRID)}],
    }
    (out / "spec.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    spec = parse_spec(raw, source=out / "spec.yaml")
    units = build_plan(spec, load_pools(spec))
    rng = np.random.default_rng(seed)
    store = ResultStore(out / "sweep.sqlite")
    named = []
    for name, stage in checkpoints:
        fingerprint = f"fp-{name}"
        store.register_checkpoint(fingerprint, name, {})
        complied = rng.random(len(units)) < 0.3
        adopted = rng.random(len(units)) < 0.5
        store.put([{
            "fingerprint": fingerprint, "unit_id": u.unit_id, "sample": 0, "checkpoint": name,
            "stage": stage, "design": u.design, "query_id": u.query_id, "draw": u.draw,
            "n_harmful": u.n_harmful, "n_benign": u.n_benign, "schedule": u.schedule,
            "opening": u.opening, "prompt_tokens": 40 * (u.n_harmful + u.n_benign) + 30,
            "request_sha": "synthetic",
            "response": "Sure. Step 1: [REDACTED]." if c else "I'm sorry, but I can't help.",
            "reasoning": f"thinking about {u.query_id}", "finish_reason": "stop",
            "complied": int(c), "format_adopted": int(a), "judge": "synthetic",
            "judge_raw": "complied" if c else "refused", "status": "ok",
        } for u, c, a in zip(units, complied, adopted, strict=True)])
        named.append((fingerprint, name, stage, None))
    store.close()
    export_results([out / "sweep.sqlite"], named, {u.unit_id for u in units},
                   out / "results.parquet", labels=export_labels(units))
    (out / "provenance.json").write_text(json.dumps(
        {"checkpoints": [{"name": n, "fingerprint": fp} for fp, n, *_ in named]}))
    import pandas as pd

    pd.DataFrame({"unit_id": [u.unit_id for u in units],
                  "prompt_sha": [u.prompt_sha for u in units],
                  "demos": [[f"{p}:{i}" for p, i in u.demos] for u in units]}
                 ).to_parquet(out / "plan.parquet", index=False)
    return out
