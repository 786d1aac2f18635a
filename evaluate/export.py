"""`stagesweep export OUT --to DIR`: a sweep's answers as a Hugging Face `datasets` dataset.

Evaluation data travels in the field as datasets (`load_from_disk`, or the hub), so the export
holds every column of `results.parquet` plus what only the sweep's SQLite store keeps (the
stripped reasoning, the judge's raw output, the finish reason, the checkpoint fingerprint, the
sample index) and the demo ids of each prompt from `plan.parquet`: with the spec and the pools
that is enough to rebuild every prompt. The answer viewer reads sweeps through `load_sweep`.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stagesweep.cli import UserError

# Columns kept only in the sweep's store, joined onto results.parquet by (checkpoint, prompt).
STORE_COLUMNS = ["sample", "fingerprint", "reasoning", "judge_raw", "finish_reason"]


@dataclass
class Sweep:
    """One sweep dir read back: its answers, and what rebuilds its prompts.

    `plan` is plan.parquet indexed by prompt_sha (see `_plan`); `pools` are the spec's pools
    as the sweep loaded them. Either is empty, with `problem` saying why, when the spec's pool
    files are gone or the dir holds only a table.
    """

    dir: Path
    frame: pd.DataFrame
    spec: Any = None
    pools: dict | None = None
    plan: pd.DataFrame | None = None
    problem: str | None = None


def find_sweeps(path: Path) -> list[Path]:
    """Sweep dirs under `path`: itself, every dir below holding a results.parquet, or, for an
    analysis dir, the sweep its summary.json was computed from."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: not a directory (pass a sweep output dir, a dir of sweeps or "
                        "an analysis dir)")
    if (path / "results.parquet").is_file():
        return [path]
    found = sorted(p.parent for p in path.glob("**/results.parquet"))
    summary = path / "summary.json"
    if not found and summary.is_file():
        source = json.loads(summary.read_text()).get("settings", {}).get("source")
        if source and Path(source).exists():
            source = Path(source)
            return find_sweeps(source if source.is_dir() else source.parent)
    if not found:
        raise UserError(f"{path}: no results.parquet in this dir or below it; pass the --out dir "
                        "of `stagesweep sweep`")
    return found


def _plan(dir: Path) -> pd.DataFrame | None:
    """plan.parquet indexed by prompt: `stored_id` (the unit id answers are stored under) and
    `demos`. Sweeps from before prompts were shared between designs key both by unit id."""
    path = dir / "plan.parquet"
    if not path.is_file():
        return None
    plan = pd.read_parquet(path)
    sha = plan["prompt_sha"] if "prompt_sha" in plan.columns else plan["unit_id"]
    return pd.DataFrame({"stored_id": plan["unit_id"].to_numpy(),
                         "demos": plan["demos"].to_numpy()}, index=sha.to_numpy())


def _with_sample(ids: pd.Series, sample: pd.Series) -> pd.Series:
    """Ids as results.parquet writes them: a sample after the first gets a `/sN` suffix."""
    return ids.where(sample == 0, ids + "/s" + sample.astype(str))


def _store_rows(dir: Path, plan: pd.DataFrame | None) -> pd.DataFrame:
    """Store-only columns of every row, keyed as results.parquet keys an answer: checkpoint
    name and prompt_sha."""
    provenance = dir / "provenance.json"
    stores = sorted(dir.glob("sweep*.sqlite"))
    if not provenance.is_file() or not stores:
        return pd.DataFrame(columns=["checkpoint", "prompt_sha", *STORE_COLUMNS])
    names = pd.DataFrame([(c["fingerprint"], c["name"]) for c in
                          json.loads(provenance.read_text()).get("checkpoints", [])],
                         columns=["fingerprint", "checkpoint"])
    frames = []
    for path in stores:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            frames.append(pd.read_sql_query(
                "SELECT fingerprint, unit_id, sample, reasoning, judge_raw, finish_reason "
                "FROM results", conn))
        except (sqlite3.OperationalError, pd.errors.DatabaseError):
            pass  # a worker's store that never got its table
        finally:
            conn.close()
    rows = pd.concat(frames, ignore_index=True).drop_duplicates(["fingerprint", "unit_id",
                                                                  "sample"])
    sha = rows["unit_id"]
    if plan is not None:
        sha = rows["unit_id"].map(pd.Series(plan.index, index=plan["stored_id"])).fillna(sha)
    rows["prompt_sha"] = _with_sample(sha, rows["sample"])
    return rows.drop(columns="unit_id").merge(names, on="fingerprint")


def load_sweep(dir: Path, *, pools: bool = True) -> Sweep:
    """A sweep's answers with their store-only columns; with `pools`, also its spec and pools
    (loaded through `datasets`, as the sweep did) so prompts can be rebuilt."""
    dir = Path(dir)
    frame = pd.read_parquet(dir / "results.parquet")
    if "prompt_sha" not in frame.columns:
        frame["prompt_sha"] = frame["unit_id"]
    plan = _plan(dir)
    frame = frame.merge(_store_rows(dir, plan), on=["checkpoint", "prompt_sha"], how="left")
    frame["sample"] = frame["sample"].fillna(0).astype("int64")
    sweep = Sweep(dir, frame, plan=plan)
    if plan is None:
        sweep.problem = f"{dir} has no plan.parquet: demos are unknown"
    if not pools:
        return sweep
    spec_path = dir / "spec.yaml"
    if not spec_path.is_file():
        sweep.problem = f"{dir} has no spec.yaml: prompts cannot be rebuilt"
        return sweep
    from stagesweep.evaluate.pools import load_pools
    from stagesweep.evaluate.spec import load_spec

    try:
        sweep.spec = load_spec(spec_path)
        sweep.pools = load_pools(sweep.spec)
    except UserError as err:
        sweep.problem = f"prompts cannot be rebuilt: {err}"
    return sweep


def prompt_demos(sweep: Sweep, prompt_sha: pd.Series) -> pd.Series:
    """Each row's demos ("pool:row id" in prompt order) found through its prompt; NaN where
    the plan does not know the prompt."""
    base = prompt_sha.str.replace(r"/s\d+$", "", regex=True)
    return base.map(sweep.plan["demos"])


def export_frame(sweeps: list[Sweep]) -> pd.DataFrame:
    """Every row of every sweep with every column; `demos` lists "pool:row id" in prompt order
    and `query` is the target request's text (empty lists and nulls where unknown)."""
    frames = []
    for sweep in sweeps:
        frame = sweep.frame.copy()
        demos = (prompt_demos(sweep, frame["prompt_sha"]) if sweep.plan is not None
                 else pd.Series(index=frame.index))
        frame["demos"] = [list(d) if isinstance(d, np.ndarray | list) else [] for d in demos]
        query = None
        if sweep.pools is not None:
            targets = sweep.pools[sweep.spec.targets_key]
            texts = dict(zip(targets.ids, targets.requests, strict=True))
            query = frame["query_id"].astype(str).map(texts)
        frame["query"] = query
        frame["sweep"] = str(sweep.dir)
        frames.append(frame)
    frame = pd.concat(frames, ignore_index=True)
    for column in ("reasoning", "judge_raw", "finish_reason", "fingerprint", "query"):
        frame[column] = frame[column].astype("string")
    return frame


def export(sources: list[Path], to: Path, *, push_to_hub: str | None = None) -> Any:
    """Write the dataset to `to` (datasets' `save_to_disk` layout) and optionally push it."""
    import datasets

    sweeps = [load_sweep(d) for src in sources for d in find_sweeps(src)]
    frame = export_frame(sweeps)
    dataset = datasets.Dataset.from_pandas(frame, preserve_index=False)
    to = Path(to)
    if to.exists() and any(to.iterdir()) and not (to / "dataset_info.json").exists():
        raise UserError(f"--to {to}: exists and is not an exported dataset; pick a new dir")
    dataset.save_to_disk(str(to))
    if push_to_hub:
        from huggingface_hub import get_token

        token = os.environ.get("HF_TOKEN") or get_token()
        if not token:
            raise UserError("--push-to-hub needs a Hugging Face token: run `hf auth login` or "
                            "set HF_TOKEN (the dataset was saved to --to)")
        dataset.push_to_hub(push_to_hub, token=token, private=True)
    return dataset


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a sweep's answers as a Hugging Face dataset (load_from_disk / the hub)",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("out", type=Path, nargs="+",
                        help="sweep output dir(s), a dir of sweeps, or an analysis dir")
    parser.add_argument("--to", type=Path, required=True, help="dir to save the dataset to")
    parser.add_argument("--push-to-hub", metavar="REPO",
                        help="also push it to this (private) hub dataset repo; needs a token")
    parser.set_defaults(func=_handle)


def _handle(args: argparse.Namespace) -> int:
    dataset = export(args.out, args.to, push_to_hub=args.push_to_hub)
    print(f"exported {dataset.num_rows} rows x {len(dataset.column_names)} columns -> {args.to}"
          + (f" and hub dataset {args.push_to_hub}" if args.push_to_hub else ""))
    return 0
