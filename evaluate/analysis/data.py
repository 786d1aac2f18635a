"""Reading and checking a results table: files, sweep dirs, required columns, design roles,
excluded rows, unit identity and the clustering mode. Everything downstream sees a validated
frame with the optional columns present."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from stagesweep.evaluate.analysis import hypotheses

REQUIRED = ("checkpoint", "query_id", "n_harmful", "n_benign", "complied")
# A judge-free table (`outcome: logprob`) may carry this instead of `complied`.
LOGPROB = "logprob_diff"


OPTIONAL = ("unit_id", "draw", "stage", "step", "design", "schedule", "opening",
            "format_adopted", "judge", "status", "contexts", "prompt_sha")


# Opening values that mean "demo answers left as they were" (no format manipulation).
NO_OPENING = frozenset({"", "unchanged", "none"})


# Columns of the unit identity when no unit_id is stored (pairs prompts across checkpoints).
PAIR_KEY = ("design", "query_id", "draw", "n_harmful", "n_benign", "schedule", "opening")


def user_error(message: str) -> Exception:
    from stagesweep.cli import UserError

    return UserError(message)


def load_results(path: Path) -> pd.DataFrame:
    """Read a results table from a file, a sweep dir, or a dir of sweep dirs."""
    path = Path(path)
    if path.is_dir():
        direct = path / "results.parquet"
        files = [direct] if direct.exists() else sorted(path.glob("**/results.parquet"))
        if not files:
            raise user_error(
                f"{path}: no results.parquet in this dir or below it; pass a sweep output dir "
                "or a CSV/Parquet table"
            )
        frames = [read_sweep(f) for f in files]
        refuse_copies(frames, files)
        return pd.concat(frames, ignore_index=True)
    if not path.exists():
        raise user_error(f"{path}: no such file or directory")
    if path.suffix.lower() in (".csv", ".parquet", ".pq"):
        return read_table(path)
    raise user_error(f"{path}: unsupported table type {path.suffix!r}; use .csv or .parquet")


def read_table(path: Path) -> pd.DataFrame:
    """A CSV or Parquet file; an empty, truncated or foreign one is a one-line error."""
    try:
        return pd.read_csv(path) if path.suffix.lower() == ".csv" else pd.read_parquet(path)
    except (ValueError, OSError) as err:  # pandas' and arrow's parse errors are ValueErrors
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise user_error(f"{path}: not a readable table ({reason}); re-export it (a sweep's "
                         "results.parquet is rebuilt from its store by re-running the sweep)"
                         ) from None


def unit_identity(frame: pd.DataFrame) -> pd.Series | None:
    """(checkpoint, unit id, judge) joined: a unit is answered once per checkpoint and judged
    once per judge, so a repeat is a copy, never more data. None without unit ids."""
    if "unit_id" not in frame.columns or frame["unit_id"].isna().all():
        return None
    judge = frame["judge"] if "judge" in frame.columns else pd.Series("", index=frame.index)
    return (frame["checkpoint"].astype(str) + "\0" + frame["unit_id"].astype(str) + "\0"
            + judge.fillna("").astype(str))


def refuse_copies(frames: list[pd.DataFrame], files: list[Path]) -> None:
    """Two results files holding the same units (a sweep copied into the folder twice) would
    double every count and shrink every interval: refuse, naming both files."""
    seen: dict[str, Path] = {}
    for frame, file in zip(frames, files, strict=True):
        ids = unit_identity(frame)
        if ids is None:
            continue
        for key in ids.drop_duplicates():
            if key in seen:
                checkpoint, unit, _ = key.split("\0")
                raise user_error(
                    f"{seen[key]} and {file} both hold unit {unit!r} of checkpoint "
                    f"{checkpoint!r}: the folder holds two copies of one sweep; move one out "
                    "or analyse each file on its own"
                )
            seen[key] = file


def read_sweep(results: Path) -> pd.DataFrame:
    """One sweep's results, with its spec's `contexts` mode (from the `spec.yaml` the sweep
    writes beside them) so `auto` clustering knows whether draws are shared across queries."""
    import yaml

    frame = read_table(results)
    spec = results.parent / "spec.yaml"
    if "contexts" not in frame.columns and spec.exists():
        contexts = (yaml.safe_load(spec.read_text()) or {}).get("contexts")
        frame["contexts"] = str(contexts) if contexts else None
    return frame


def validate(frame: pd.DataFrame, source: str, designs: list[str] | None = None) -> pd.DataFrame:
    """Check the minimal columns and value ranges; normalise types. One-line errors."""
    if {"logprob_comply", "logprob_refuse"} <= set(frame.columns) and LOGPROB not in frame:
        frame = frame.assign(**{LOGPROB: pd.to_numeric(frame["logprob_comply"])
                                - pd.to_numeric(frame["logprob_refuse"])})
    if LOGPROB in frame.columns and "complied" not in frame.columns:
        frame = frame.assign(complied=None)  # judge-free: only the logprob outcome is fitted
    missing = [c for c in REQUIRED if c not in frame.columns]
    if missing:
        raise user_error(
            f"{source}: missing required column {missing[0]!r} (have: "
            f"{', '.join(map(str, frame.columns))}); required: {', '.join(REQUIRED)}"
        )
    for col in ("checkpoint", "query_id", "n_harmful", "n_benign"):
        if frame[col].isna().any():
            row = int(np.flatnonzero(frame[col].isna().to_numpy())[0])
            raise user_error(f"{source}: column {col!r} is empty in row {row}; fill it in")
    frame = frame.reset_index(drop=True)  # row labels must be unique for the key joins
    ids = unit_identity(frame)
    if ids is not None and ids.duplicated().any():
        row = frame.loc[ids.duplicated()].iloc[0]
        raise user_error(
            f"{source}: unit_id {row['unit_id']!r} appears more than once for checkpoint "
            f"{row['checkpoint']!r}" + (f" and judge {row['judge']!r}" if "judge" in frame
                                        and pd.notna(row["judge"]) else "")
            + "; each unit is answered once per checkpoint: drop the repeated rows"
        )
    for col in OPTIONAL:
        if col not in frame.columns:
            frame[col] = None
    for col in ("n_harmful", "n_benign"):
        values = pd.to_numeric(frame[col], errors="coerce")
        if values.isna().any() or (values < 0).any() or (values % 1 != 0).any():
            bad = frame.loc[values.isna() | (values < 0) | (values % 1 != 0), col].iloc[0]
            raise user_error(
                f"{source}: column {col!r} must hold non-negative integers (found {bad!r})"
            )
        frame[col] = values.astype(int)
    for col in ("complied", "format_adopted"):
        column = frame[col]
        if column.dtype == bool or column.dtype == object:
            column = column.map(lambda v: int(v) if isinstance(v, bool | np.bool_) else v)
        values = pd.to_numeric(column, errors="coerce")
        bad = frame.loc[frame[col].notna() & ~values.isin([0, 1]), col]
        if len(bad):
            raise user_error(
                f"{source}: column {col!r} must be 0/1 or empty (found {bad.iloc[0]!r})"
            )
        frame[col] = values.astype("Int64")
    if LOGPROB in frame.columns:
        values = pd.to_numeric(frame[LOGPROB], errors="coerce")
        if (frame[LOGPROB].notna() & values.isna()).any() or np.isinf(values).any():
            bad = frame.loc[(frame[LOGPROB].notna() & values.isna()) | np.isinf(values), LOGPROB]
            raise user_error(f"{source}: column {LOGPROB!r} must hold finite numbers or be "
                             f"empty (found {bad.iloc[0]!r})")
        frame[LOGPROB] = values.astype(float)
    frame["checkpoint"] = frame["checkpoint"].astype(str)
    frame["query_id"] = frame["query_id"].astype(str)
    frame["draw"] = frame["draw"].fillna(0).astype(str)
    # an empty hash names no prompt (it would merge every row into one)
    frame["prompt_sha"] = frame["prompt_sha"].where(frame["prompt_sha"].astype(str) != "")
    frame["step"] = pd.to_numeric(frame["step"], errors="coerce")
    return assign_roles(frame, designs, source)


def assign_roles(frame: pd.DataFrame, designs: list[str] | None, source: str) -> pd.DataFrame:
    """Tag each row with its design's role, judged from the table itself so custom design names
    work: `ordering` (the design varies the schedule), `format` (it sets an opening line),
    else `count`. `headline` marks the count rows behind b2 and H_total: the designs named in
    `designs`, by default every count design except ablations (names starting `ablation`, whose
    benign pool differs and which get their own b2 under `benign_effect_by_design`)."""
    names = frame["design"].fillna("").astype(str)
    roles = {}
    for name, part in frame.groupby(names, sort=False):
        openings = set(part["opening"].dropna().astype(str).str.lower()) - NO_OPENING
        if name == "ordering" or part["schedule"].dropna().nunique() > 1:
            roles[name] = "ordering"
        elif name == "format" or openings:
            roles[name] = "format"
        else:
            roles[name] = "count"
    count = [n for n, r in roles.items() if r == "count"]
    if designs:
        unknown = [d for d in designs if d not in count]
        if unknown:
            raise user_error(
                f"{source}: design {unknown[0]!r} is not a count design in this table (count "
                f"designs: {', '.join(count) or 'none'})"
            )
        headline = list(designs)
    else:
        headline = [n for n in count if not n.startswith("ablation")] or count
    return frame.assign(_role=names.map(roles), _headline=names.isin(headline))


def usable(frame: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """Rows that enter the fits (status ok, complied labelled) and a count of the rest."""
    status = frame["status"].fillna("ok").astype(str)
    excluded = {k: int(v) for k, v in status[status != "ok"].value_counts().items()}
    ok = status == "ok"
    no_label = ok & frame["complied"].isna()
    if no_label.any():
        excluded["complied_missing"] = int(no_label.sum())
    rows = frame[ok & ~no_label].copy()
    rows["complied"] = rows["complied"].astype(int)
    return rows, excluded


def logprob_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows behind the logprob b2: the headline count rows with a logprob_diff, each prompt
    once (its samples carry the same scores: the openings are scored on the prompt)."""
    if LOGPROB not in frame.columns:
        return frame.iloc[:0]
    status = frame["status"].fillna("ok").astype(str)
    rows = frame[(status == "ok") & frame[LOGPROB].notna()]
    sha = rows["prompt_sha"].astype(object)
    rows = rows.assign(prompt_sha=sha.where(sha.isna(), sha.astype(str).str.replace(
        r"/s\d+$", "", regex=True)))
    return count_rows(rows)


def distinct_prompts(frame: pd.DataFrame) -> pd.DataFrame:
    """Each distinct prompt once. A sweep exports a prompt shared by several designs (same
    demos, order and target) under each design's label, with one `prompt_sha`; counting it once
    per label would double its weight in a pooled fit. Without `prompt_sha`, the zero-demo
    prompt (the bare target, the same in every draw and design) is kept once per query."""
    if frame["prompt_sha"].notna().any():
        sha = frame["prompt_sha"].astype(object).where(frame["prompt_sha"].notna(),
                                                       frame.index.astype(str))
        return frame[~(frame["checkpoint"].astype(str) + "\0" + sha.astype(str)).duplicated()]
    zero = (frame["n_harmful"] == 0) & (frame["n_benign"] == 0)
    repeat = zero & frame[["checkpoint", "query_id", "opening"]].astype(str).assign(
        z=zero).duplicated()
    return frame[~repeat]


def count_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows behind the headline b2 and H_total fits (see `assign_roles`); ordering and format
    rows are analysed on their own so a schedule or opening effect never leaks into b2."""
    return distinct_prompts(frame[frame["_headline"]])


def choose_cluster(frame: pd.DataFrame, cluster: str) -> str:
    """`auto`: two-way (query, draw) only when the table says contexts are shared across queries
    (the sweep's `contexts` column); with per-query draws, each draw sits inside its query's
    cluster already, and clustering on a handful of draw ids would only add noise. Shared
    contexts with a single draw stay two-way too: one draw's effect is no more estimable than
    two draws', and the fits then decline a direction call (`fits.shared_draws_problem`)."""
    if cluster != "auto":
        return cluster
    return "query+draw" if frame["contexts"].astype(str).eq("shared").any() else "query"


def judge_split(frame: pd.DataFrame) -> tuple[pd.DataFrame, str | None, dict | None]:
    """With several judges, fit on the first one listed and report pairwise Cohen's kappa on
    the units they both labelled."""
    judges = list(frame["judge"].dropna().astype(str).unique())
    if len(judges) < 2:
        return frame, (judges[0] if judges else None), None
    key = unit_key(frame)
    agreement = []
    for i, a in enumerate(judges):
        for b in judges[i + 1:]:
            left = frame[frame["judge"] == a].assign(_k=key).drop_duplicates("_k")
            right = frame[frame["judge"] == b].assign(_k=key).drop_duplicates("_k")
            both = left.merge(right, on="_k", suffixes=("_a", "_b"))
            if both.empty:
                continue
            agreement.append({"judge_a": a, "judge_b": b,
                              **hypotheses.cohens_kappa(both["complied_a"], both["complied_b"])})
    primary = frame[frame["judge"].astype(str) == judges[0]]
    return primary, judges[0], {"judges": judges, "used_for_fits": judges[0], "pairs": agreement}


def unit_key(frame: pd.DataFrame) -> pd.Series:
    """Identity of a prompt, independent of the checkpoint that answered it: its hash when the
    sweep wrote one (one prompt, several designs' labels), else its unit id."""
    if frame["prompt_sha"].notna().all():
        return frame["prompt_sha"].astype(str)
    if frame["unit_id"].notna().all():
        return frame["unit_id"].astype(str)
    return prompt_key(frame)


def prompt_key(frame: pd.DataFrame) -> pd.Series:
    """The prompt's coordinates joined into one string (missing values as empty fields)."""
    key = pd.Series("", index=frame.index, dtype=object)
    for col in PAIR_KEY:
        key = key + "|" + frame[col].astype(object).where(frame[col].notna(), "").map(str)
    return key

