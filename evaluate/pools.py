"""Demonstration and target pools, loaded through `datasets`.

Every source (a hub dataset or a local JSONL/CSV/Parquet file) goes through
`datasets.load_dataset`, then the pool is cut to the columns the sweep uses, filtered,
truncated and de-duplicated. Rows get stable ids (an id column, else a content hash) so a
draw refers to the same demonstration even when the source file is reordered.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from stagesweep.cli import UserError
from stagesweep.evaluate.spec import PoolSpec, SweepSpec

_LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass(frozen=True)
class DemoPool:
    """Rows of one pool; `responses` is None for a pool of target requests only."""

    name: str
    ids: tuple[str, ...]
    requests: tuple[str, ...]
    responses: tuple[str, ...] | None

    def __len__(self) -> int:
        return len(self.ids)

    def index(self) -> dict[str, int]:
        return {row_id: i for i, row_id in enumerate(self.ids)}

    def fingerprint(self) -> str:
        """Content hash: two runs drawing from pools with the same rows agree."""
        h = hashlib.sha256()
        for i, row_id in enumerate(self.ids):
            h.update(f"{row_id}\0{self.requests[i]}\0".encode())
            if self.responses is not None:
                h.update(self.responses[i].encode() + b"\0")
        return h.hexdigest()[:16]


def _resolve_path(spec: PoolSpec, base: Path | None) -> Path:
    if spec.path.startswith("SET-ME"):
        raise UserError(f"pool {spec.name!r} is a placeholder ({spec.path}): point its `path` at "
                        "your own file (see the comment above it in the spec)")
    path = Path(spec.path).expanduser()
    if not path.is_absolute() and base is not None and (base / path).exists():
        path = base / path
    if not path.exists():
        raise UserError(f"pool {spec.name!r}: file {spec.path} not found (relative paths are "
                        f"read from the spec's folder {base or '.'})")
    return path


def _load_dataset(spec: PoolSpec, base: Path | None):
    import datasets

    datasets.disable_progress_bars()
    try:
        if spec.path is not None:
            path = _resolve_path(spec, base)
            if path.stat().st_size == 0:
                raise UserError(f"pool {spec.name!r} is empty: {path} has no rows")
            fmt = _LOCAL_FORMATS.get(path.suffix.lower())
            if fmt is None:
                raise UserError(f"pool {spec.name!r}: {path} must end in one of "
                                f"{', '.join(_LOCAL_FORMATS)}")
            if fmt != "parquet":
                _check_utf8(path, spec.name)
            return datasets.load_dataset(fmt, data_files=str(path), split="train")
        return datasets.load_dataset(
            spec.hub, spec.config, split=spec.split, revision=spec.revision,
            data_files=spec.data_files,
        )
    except UserError:
        raise
    except (FileNotFoundError, ValueError, ConnectionError, StopIteration) as err:
        # datasets says "corresponds to no data" (or stops iterating) for a header-only file
        where = spec.path or f"{spec.hub} (config {spec.config}, split {spec.split})"
        raise UserError(f"pool {spec.name!r}: cannot load rows from {where}: "
                        f"{err or 'no rows'}") from None


def _check_utf8(path: Path, pool: str) -> None:
    """A text pool must be UTF-8; arrow would read another encoding and fail only when a row
    is first used, with a traceback."""
    with path.open("rb") as f:
        for number, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"pool {pool!r}: {path} line {number} is not UTF-8 text; "
                                "re-save the file as UTF-8") from None


def load_pool(spec: PoolSpec, *, needs_response: bool, base: Path | None = None,
              seed: int = 0) -> DemoPool:
    """Load, filter, truncate and de-duplicate one pool."""
    ds = _load_dataset(spec, base)
    present = list(ds.column_names)
    roles = ["request", "response"] if needs_response else ["request"]
    if needs_response and "response" not in spec.columns:
        raise UserError(f"pool {spec.name!r} is used for demonstrations, so its `columns` "
                        f"must map `response` to the answer column (columns present: "
                        f"{', '.join(present)})")
    wanted = {role: spec.columns[role] for role in roles + ["id"] if role in spec.columns}
    for column in [*(c.split(".")[0] for c in wanted.values()), *spec.filter]:
        if column not in present:
            raise UserError(f"pool {spec.name!r}: column {column!r} not found; columns "
                            f"present: {', '.join(present)} (fix `columns`/`filter` in the spec)")
    for column, value in spec.filter.items():
        allowed = set(value) if isinstance(value, list) else {value}
        ds = ds.filter(lambda row, c=column, a=allowed: row[c] in a)

    def clip(text: object) -> str:
        text = "" if text is None else str(text)
        return text[: spec.max_chars] if spec.max_chars else text

    ids, requests, responses, seen = [], [], [], set()
    columns = {role: _values(ds, column, spec.name) for role, column in wanted.items()}
    for i in range(len(ds)):
        request = clip(columns["request"][i])
        if not request.strip() or (spec.dedupe and request in seen):
            continue
        seen.add(request)
        requests.append(request)
        if needs_response:
            responses.append(clip(columns["response"][i]))
        if "id" in columns:
            ids.append(str(columns["id"][i]))
        else:
            ids.append(hashlib.sha256(request.encode()).hexdigest()[:12])
    if len(set(ids)) != len(ids):
        raise UserError(f"pool {spec.name!r}: id column {wanted.get('id')!r} has duplicate "
                        "values; map `id` to a unique column or drop it to use content hashes")
    if not ids:
        raise UserError(f"pool {spec.name!r} is empty after filtering and de-duplication "
                        f"({len(ds)} rows read); check its source and `filter`")
    if spec.max_rows is not None and spec.max_rows < len(ids):
        import numpy as np

        keep = sorted(np.random.default_rng(seed).choice(len(ids), spec.max_rows, replace=False))
        ids = [ids[i] for i in keep]
        requests = [requests[i] for i in keep]
        responses = [responses[i] for i in keep] if needs_response else []
    return DemoPool(spec.name, tuple(ids), tuple(requests),
                    tuple(responses) if needs_response else None)


def _values(ds, column: str, pool: str) -> list:
    """A column's values; `a.1.b` reaches into nested data (a list's item 1, a dict's key b),
    e.g. UltraChat's `messages.1.content` or SORRY-Bench's `turns.0`."""
    root, *path = column.split(".")
    values = ds[root]
    if not path:
        return list(values)
    out = []
    for value in values:
        for step in path:
            try:
                value = value[int(step)] if isinstance(value, list) else value[step]
            except (IndexError, KeyError, TypeError, ValueError):
                raise UserError(f"pool {pool!r}: column path {column!r} does not reach into a "
                                f"row's value ({type(value).__name__} at {step!r})") from None
        out.append(value)
    return out


def merge_targets(pools: list[DemoPool]) -> DemoPool:
    """Several target pools as one (the study pools HarmBench, SORRY-Bench and WildGuardTest);
    ids are prefixed by their pool so they stay unique and traceable."""
    if len(pools) == 1:
        return pools[0]
    seen, ids, requests = set(), [], []
    for pool in pools:
        for row_id, request in zip(pool.ids, pool.requests, strict=True):
            if request not in seen:  # the same request in two benchmarks counts once
                seen.add(request)
                ids.append(f"{pool.name}:{row_id}")
                requests.append(request)
    return DemoPool("+".join(p.name for p in pools), tuple(ids), tuple(requests), None)


def load_pools(spec: SweepSpec) -> dict[str, DemoPool]:
    """Load every pool a design or the targets use (unused pools are not read); the targets
    are under `spec.targets_key`."""
    demo_pools = {d.harmful_pool for d in spec.designs} | {d.benign_pool for d in spec.designs}
    base = spec.source.parent if spec.source else None
    used = sorted(demo_pools | set(spec.target_pools))
    pools = {
        name: load_pool(spec.pools[name], needs_response=name in demo_pools, base=base,
                        seed=spec.seed)
        for name in used
    }
    pools[spec.targets_key] = merge_targets([pools[name] for name in spec.target_pools])
    return pools
