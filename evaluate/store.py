"""The resumable result store: one SQLite row per finished unit, per checkpoint.

Rows are keyed by (checkpoint fingerprint, unit id, sample). The fingerprint hashes every
byte of the weights, the tokenizer files and the chat template actually used, so answers of
two checkpoints (or of one checkpoint rendered with two templates) can never be mixed, even if
a directory is reused or renamed. Each batch is one transaction: a killed sweep loses at most
the batch in flight, and a re-run skips every committed row.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from stagesweep.safeio import atomic_path, write_json

if TYPE_CHECKING:
    import pandas as pd

# The columns of results.parquet, in order (BRIEF: the table `stagesweep analyze` reads).
RESULT_COLUMNS = [
    "unit_id", "checkpoint", "stage", "step", "design", "query_id", "draw", "n_harmful",
    "n_benign", "schedule", "opening", "prompt_tokens", "response", "complied",
    "format_adopted", "judge", "status", "prompt_sha",
]
# Appended to RESULT_COLUMNS when a sweep scores `outcome: logprob` (diff = comply - refuse).
LOGPROB_COLUMNS = ["logprob_comply", "logprob_refuse", "logprob_diff"]
# Status of a row whose answer still awaits its judge; final statuses are ok, overflow, unparsed,
# no_final_answer and failed.
GENERATED = "generated"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    fingerprint TEXT NOT NULL, unit_id TEXT NOT NULL, sample INTEGER NOT NULL,
    checkpoint TEXT, stage TEXT, step INTEGER, design TEXT, query_id TEXT, draw INTEGER,
    n_harmful INTEGER, n_benign INTEGER, schedule TEXT, opening TEXT, prompt_tokens INTEGER,
    request_sha TEXT NOT NULL, response TEXT, reasoning TEXT, finish_reason TEXT,
    complied INTEGER, format_adopted INTEGER, judge TEXT, judge_raw TEXT, status TEXT NOT NULL,
    logprob_comply REAL, logprob_refuse REAL,
    PRIMARY KEY (fingerprint, unit_id, sample)
);
CREATE TABLE IF NOT EXISTS checkpoints (
    fingerprint TEXT PRIMARY KEY, checkpoint TEXT, info TEXT
);
"""
_ROW_COLUMNS = [
    "fingerprint", "unit_id", "sample", "checkpoint", "stage", "step", "design", "query_id",
    "draw", "n_harmful", "n_benign", "schedule", "opening", "prompt_tokens", "request_sha",
    "response", "reasoning", "finish_reason", "complied", "format_adopted", "judge",
    "judge_raw", "status", "logprob_comply", "logprob_refuse",
]
# Columns a store from before `outcome: logprob` lacks; added when first written.
_ADDED_COLUMNS = {"logprob_comply": "REAL", "logprob_refuse": "REAL"}

# Files whose content decides what a checkpoint answers: weights and the small files, all
# hashed in full.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_SMALL_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
    "tokenizer.model", "chat_template.jinja", "chat_template.json",
    "adapter_config.json",  # a LoRA output: names its base model
)
# Training leftovers that do not change the model's answers.
_NOT_WEIGHTS = ("optimizer", "scheduler", "rng_state", "training_args", "trainer_state")
DIGEST_CACHE_NAME = "weights-digests.json"


def weight_files(path: Path) -> list[Path]:
    """The files of a checkpoint dir that hold its weights (training leftovers excluded)."""
    return [f for f in sorted(Path(path).iterdir()) if f.is_file()
            and f.suffix in _WEIGHT_SUFFIXES and not f.name.startswith(_NOT_WEIGHTS)]


class DigestCache:
    """sha256 of every byte of each weights file, remembered by (path, size, mtime, ctime,
    inode) in a JSON file beside the store.

    Sampling blocks of big files is not enough: a LoRA touches only q/v projections, a few MiB
    of a 60 GB file, and an in-place edit of them must give a new fingerprint. Hashing 60 GB
    costs a minute, so an unchanged file is hashed once per out dir. Any write to a file
    changes its ctime (which, unlike mtime, cannot be set back), and a replaced file has a
    new inode, so a stale digest is never reused.
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path else None
        self.entries: dict[str, str] = {}
        self.bytes_hashed, self.seconds = 0, 0.0
        if self.path and self.path.is_file():
            try:
                loaded = json.loads(self.path.read_text())
                self.entries = loaded if isinstance(loaded, dict) else {}
            except (OSError, ValueError):  # a damaged cache is only a slower run
                self.entries = {}

    @staticmethod
    def _key(file: Path) -> str:
        st = file.stat()
        return f"{file.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}"

    def digests(self, files: list[Path]) -> list[str]:
        """The full sha256 of each file, hashing (in parallel threads) only those whose key
        is not cached; saves the cache when anything was hashed."""
        keys = [self._key(f) for f in files]
        todo = [(f, k) for f, k in zip(files, keys, strict=True) if k not in self.entries]
        if todo:
            started = time.perf_counter()
            workers = max(1, min(len(todo), os.cpu_count() or 1, 8))
            with ThreadPoolExecutor(workers) as pool:  # hashlib releases the GIL
                for (f, key), digest in zip(todo, pool.map(_sha256_file, [f for f, _ in todo]),
                                            strict=True):
                    self.entries[key] = digest
                    self.bytes_hashed += f.stat().st_size
            self.seconds += time.perf_counter() - started
            if self.path:
                live = {self._key(f) for f in files}
                prefixes = {str(f.resolve()) + "|" for f in files}
                # Drop superseded entries of these files; keep other checkpoints' ones.
                self.entries = {k: v for k, v in self.entries.items()
                                if k in live or not k.startswith(tuple(prefixes))}
                write_json(self.path, self.entries, sort_keys=True)
        return [self.entries[k] for k in keys]

    def throughput(self) -> str:
        """What hashing cost so far, for the user: `N MB in S s (R MB/s)`."""
        mb = self.bytes_hashed / 1e6
        rate = mb / self.seconds if self.seconds else float("inf")
        return f"{mb:.0f} MB in {self.seconds:.2f} s ({rate:.0f} MB/s)"


def _sha256_file(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def checkpoint_fingerprint(path: Path, chat_template: str, *, hub_revision: str | None = None,
                           digests: DigestCache | None = None) -> str:
    """Hash of a checkpoint's weights (every byte), tokenizer/config files and the chat
    template used. `digests` remembers weight digests across runs (a fresh one hashes all)."""
    h = hashlib.sha256(chat_template.encode())
    if hub_revision:
        # A hub commit pins every file; hashing the commit also keeps the fingerprint the same
        # whether or not the weights were fetched (served backends need only the tokenizer).
        h.update(f"hub:{hub_revision}".encode())
        return h.hexdigest()[:24]
    weights = weight_files(path)
    for file, digest in zip(weights, (digests or DigestCache()).digests(weights), strict=True):
        h.update(f"{file.name}={digest}".encode())
    for file in sorted(Path(path).iterdir()):
        if file.name in _SMALL_FILES and file.is_file():
            h.update(file.name.encode() + hashlib.sha256(file.read_bytes()).digest())
    return h.hexdigest()[:24]


def request_sha(prompt_ids: Iterable[int], settings: str) -> str:
    """What a stored answer was generated from: prompt ids plus decoding and judge settings.
    A resumed sweep whose rendering changed must not count old rows as done."""
    h = hashlib.sha256(settings.encode())
    h.update(json.dumps(list(prompt_ids)).encode())
    return h.hexdigest()[:20]


class ResultStore:
    """One SQLite file; shards of a multi-process sweep each own one."""

    def __init__(self, path: Path, *, readonly: bool = False):
        self.path = Path(path)
        if readonly:
            # Another worker's store: read it without ever taking a write lock on it.
            self.conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: transactions are opened explicitly, one per batch.
        self.conn = sqlite3.connect(self.path, isolation_level=None)
        with self._disk_errors():
            self.conn.executescript(_SCHEMA)

    def _columns(self) -> set[str]:
        return {row[1] for row in self.conn.execute("PRAGMA table_info(results)")}

    def _add_columns(self) -> None:
        """Give a store written before `outcome: logprob` its columns; only a write that needs
        them does this, so a judged sweep's old store stays byte-identical."""
        missing = [c for c in _ADDED_COLUMNS if c not in self._columns()]
        for column in missing:
            with self._disk_errors():
                self.conn.execute(f"ALTER TABLE results ADD COLUMN {column} "
                                  f"{_ADDED_COLUMNS[column]}")

    def close(self) -> None:
        self.conn.close()

    def register_checkpoint(self, fingerprint: str, checkpoint: str, info: dict) -> None:
        row = (fingerprint, checkpoint, json.dumps(info, sort_keys=True))
        # Written only when new: a run that is then refused leaves the store byte-identical.
        if self.conn.execute("SELECT * FROM checkpoints WHERE fingerprint = ?",
                             (fingerprint,)).fetchone() != row:
            self._write("INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?)", [row])

    def existing(self, fingerprint: str) -> dict[tuple[str, int], tuple[str, str]]:
        """(unit_id, sample) -> (status, request_sha) of every stored row of a checkpoint."""
        cur = self.conn.execute(
            "SELECT unit_id, sample, status, request_sha FROM results WHERE fingerprint = ?",
            (fingerprint,),
        )
        return {(u, s): (status, sha) for u, s, status, sha in cur}

    def put(self, rows: list[dict]) -> None:
        """Insert or replace rows in one transaction."""
        columns = _ROW_COLUMNS
        if any(row.get(c) is not None for row in rows for c in _ADDED_COLUMNS):
            self._add_columns()
        elif not set(_ADDED_COLUMNS) <= self._columns():
            columns = [c for c in _ROW_COLUMNS if c not in _ADDED_COLUMNS]
        marks = ", ".join("?" * len(columns))
        self._write(f"INSERT OR REPLACE INTO results ({', '.join(columns)}) VALUES ({marks})",
                    [tuple(row.get(c) for c in columns) for row in rows])

    def scored(self, fingerprint: str) -> set[str]:
        """Unit ids of a checkpoint whose logprob outcome is stored."""
        if "logprob_comply" not in self._columns():
            return set()
        cur = self.conn.execute("SELECT DISTINCT unit_id FROM results WHERE fingerprint = ? AND "
                                "logprob_comply IS NOT NULL", (fingerprint,))
        return {unit for (unit,) in cur}

    def set_logprobs(self, fingerprint: str, scores: list[tuple[str, float, float]]) -> None:
        """Write (unit_id, comply, refuse) onto every sample row of each unit (one
        transaction): the openings are scored on the prompt, whatever was sampled."""
        self._add_columns()
        self._write("UPDATE results SET logprob_comply = ?, logprob_refuse = ? "
                    "WHERE fingerprint = ? AND unit_id = ?",
                    [(comply, refuse, fingerprint, unit) for unit, comply, refuse in scores])

    def awaiting_judge(self, fingerprint: str) -> list[dict]:
        cur = self.conn.execute(
            "SELECT unit_id, sample, response, reasoning, finish_reason, opening, query_id "
            "FROM results WHERE fingerprint = ? AND status = ? ORDER BY unit_id, sample",
            (fingerprint, GENERATED),
        )
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur]

    def set_verdicts(self, fingerprint: str, verdicts: list[dict]) -> None:
        """Write judge labels of one batch (one transaction)."""
        self._write(
            "UPDATE results SET complied = ?, format_adopted = ?, judge = ?, judge_raw = ?, "
            "status = ? WHERE fingerprint = ? AND unit_id = ? AND sample = ?",
            [(v["complied"], v["format_adopted"], v["judge"], v["judge_raw"], v["status"],
              fingerprint, v["unit_id"], v["sample"]) for v in verdicts],
        )

    def _write(self, sql: str, params: list[tuple]) -> None:
        with self._disk_errors(), self.conn:  # commit on success, roll back on error
            self.conn.execute("BEGIN")
            self.conn.executemany(sql, params)

    @contextmanager
    def _disk_errors(self) -> Iterator[None]:
        """A full disk (SQLite says "full", or "disk I/O error" past a size limit) is one line
        naming the store; the failed transaction was rolled back, so nothing stored is lost."""
        try:
            yield
        except sqlite3.OperationalError as err:
            if "full" not in str(err) and "disk I/O" not in str(err):
                raise
            from stagesweep.cli import UserError

            raise UserError(f"cannot write {self.path}: {err}; free space there (or check the "
                            "disk) and re-run the same command: every answer stored so far is "
                            "kept") from None

    def frame(self, fingerprints: list[str]) -> pd.DataFrame:
        import pandas as pd

        marks = ", ".join("?" * len(fingerprints))
        return pd.read_sql_query(
            f"SELECT * FROM results WHERE fingerprint IN ({marks})", self.conn,
            params=fingerprints,
        )


_FULL_CHECK_BELOW = 256 * 1024 * 1024


def check_stores(paths: list[Path]) -> None:
    """Refuse a damaged store (a truncated copy, a file that is not SQLite) with one line
    naming it and how to recover, before any model loads."""
    from stagesweep.cli import UserError

    for path in paths:
        try:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                pages, page_size = (conn.execute(f"PRAGMA {p}").fetchone()[0]
                                    for p in ("page_count", "page_size"))
                if pages * page_size > path.stat().st_size:
                    verdict = "truncated"
                elif path.stat().st_size <= _FULL_CHECK_BELOW:
                    verdict = conn.execute("PRAGMA quick_check").fetchone()[0]
                else:  # reading every page of a paper-sized store costs minutes
                    verdict = "ok"
            finally:
                conn.close()
        except sqlite3.DatabaseError as err:
            verdict = str(err)
        if verdict != "ok":
            raise UserError(f"result store {path} is damaged ({verdict}); restore it from a "
                            "backup, or move it aside and re-run to generate its answers again")


def export_results(stores: list[Path],
                   checkpoints: list[tuple[str, str, str | None, int | None]],
                   unit_ids: set[str], out: Path,
                   labels: dict[str, list[dict]] | None = None, *,
                   logprob: bool = False) -> pd.DataFrame:
    """Write results.parquet from one or more stores (shards), limited to this run's
    checkpoints, given as (fingerprint, name, stage, step), and units, sorted deterministically.

    `labels` (plan.export_labels) exports a stored answer once per design label of its prompt,
    each row with its own unit id and the prompt's `prompt_sha`; without it a row's
    `prompt_sha` is its unit id. `logprob` appends LOGPROB_COLUMNS (`outcome: logprob`).

    Rows are keyed by fingerprint, not name: two lineage nodes with identical weights (a
    `checkpoint-N` saved at a stage's last step and the stage's output) share one set of
    answers, generated once and exported under each name."""
    import pandas as pd

    fingerprints = sorted({fp for fp, *_ in checkpoints})
    frames = []
    for path in stores:
        store = ResultStore(path, readonly=True)
        frames.append(store.frame(fingerprints))
        store.close()
    stored = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=_ROW_COLUMNS)
    stored = stored.drop_duplicates(["fingerprint", "unit_id", "sample"])
    for column in _ADDED_COLUMNS:  # a store from before the logprob outcome
        if column not in stored.columns:
            stored[column] = None
    named = [stored[stored["fingerprint"] == fp].assign(checkpoint=name, stage=stage, step=step)
             for fp, name, stage, step in checkpoints]
    df = pd.concat(named, ignore_index=True) if named else stored
    df = df[df["unit_id"].isin(unit_ids)]
    if labels is None:
        df = df.assign(prompt_sha=df["unit_id"])
    else:
        names = pd.DataFrame([{"stored_id": uid, **row} for uid, rows in labels.items()
                              for row in rows], columns=["stored_id", "unit_id", "design",
                                                         "draw", "schedule", "prompt_sha"])
        df = df.drop(columns=["design", "draw", "schedule"]).rename(
            columns={"unit_id": "stored_id"}).merge(names, on="stored_id")
    # Several samples per unit: each sample is its own row with its own id.
    many = df["sample"] > 0
    for column in ("unit_id", "prompt_sha"):
        df.loc[many, column] = df.loc[many, column] + "/s" + df.loc[many, "sample"].astype(str)
    for column in ("step", "complied", "format_adopted", "draw", "n_harmful", "n_benign",
                   "prompt_tokens"):
        df[column] = df[column].astype("Int64")
    df = df.sort_values(["checkpoint", "design", "query_id", "draw", "n_harmful", "n_benign",
                         "schedule", "opening", "unit_id"], kind="stable")
    columns = RESULT_COLUMNS
    if logprob:
        columns = RESULT_COLUMNS + LOGPROB_COLUMNS
        for column in ("logprob_comply", "logprob_refuse"):
            df[column] = pd.to_numeric(df[column]).astype("Float64")
        df["logprob_diff"] = df["logprob_comply"] - df["logprob_refuse"]
    df = df[columns].reset_index(drop=True)
    with atomic_path(out) as tmp:  # a kill mid-write leaves the previous table whole
        df.to_parquet(tmp, index=False)
    return df


def check_checkpoint_dir(path: Path, *, weights: bool) -> None:
    """Refuse, before anything loads, a dir that holds no model or whose safetensors files
    are damaged (a truncated download or copy), naming the file and the fix."""
    from stagesweep.cli import UserError

    path = Path(path)
    if not any((path / name).is_file() for name in ("config.json", "adapter_config.json")):
        raise UserError(f"checkpoint {path} holds no model (no config.json); pass a dir written "
                        "by save_pretrained or by `stagesweep train`")
    if not weights:
        return
    files = weight_files(path)
    if not files:
        raise UserError(f"checkpoint {path} holds no weights (*.safetensors or *.bin); pass a "
                        "dir written by save_pretrained or by `stagesweep train`")
    for file in files:
        if file.suffix == ".safetensors" and not _safetensors_whole(file):
            raise UserError(f"{file} is not a whole safetensors file (truncated or corrupt); "
                            "re-save or re-download the checkpoint")


def _safetensors_whole(file: Path) -> bool:
    """Whether the header parses and its tensors end exactly at the end of the file."""
    size = file.stat().st_size
    with file.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or n > size - 8:
            return False
        try:
            header = json.loads(f.read(n))
        except ValueError:  # includes bad UTF-8
            return False
    if not isinstance(header, dict):
        return False
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"
            and isinstance(t, dict) and len(t.get("data_offsets", ())) == 2]
    return len(ends) == len(header) - ("__metadata__" in header) and 8 + n + max(ends, default=0) \
        == size


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "fingerprint",
        help="print the sha256 of a checkpoint's weights files and the hashing throughput",
        description="Hash every byte of each weights file of the checkpoint dirs (what a sweep's "
        "checkpoint fingerprint covers) and print the throughput, so you know what the first "
        "sweep of a large checkpoint costs; later sweeps reuse the digests cached in their "
        f"--out dir ({DIGEST_CACHE_NAME}).",
    )
    parser.add_argument("checkpoints", nargs="+", type=Path, metavar="DIR")
    parser.set_defaults(func=_handle_fingerprint)


def _handle_fingerprint(args: argparse.Namespace) -> int:
    from stagesweep.cli import UserError

    cache = DigestCache()
    for directory in args.checkpoints:
        if not directory.is_dir():
            raise UserError(f"{directory} is not a directory")
        files = weight_files(directory)
        if not files:
            raise UserError(f"{directory} holds no weights (*.safetensors, *.bin, *.pt)")
        for file, digest in zip(files, cache.digests(files), strict=True):
            print(f"{digest}  {file}")
    print(f"hashed {cache.throughput()}")
    return 0
