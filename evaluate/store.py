"""The resumable result store: one SQLite row per finished unit, per checkpoint.

Rows are keyed by (checkpoint fingerprint, unit id, sample). The fingerprint hashes the
weights, tokenizer files and the chat template actually used, so answers of two checkpoints
(or of one checkpoint rendered with two templates) can never be mixed, even if a directory is
reused or renamed. Each batch is one transaction: a killed sweep loses at most the batch in
flight, and a re-run skips every committed row.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

# The columns of results.parquet, in order (BRIEF: the table `stagesweep analyze` reads).
RESULT_COLUMNS = [
    "unit_id", "checkpoint", "stage", "step", "design", "query_id", "draw", "n_harmful",
    "n_benign", "schedule", "opening", "prompt_tokens", "response", "complied",
    "format_adopted", "judge", "status", "prompt_sha",
]
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
    "judge_raw", "status",
]

# Files whose content decides what a checkpoint answers. Weights are hashed by sampling (see
# `_weights_digest`); the small files in full.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_SMALL_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
    "tokenizer.model", "chat_template.jinja", "chat_template.json",
)
# Training leftovers that do not change the model's answers.
_NOT_WEIGHTS = ("optimizer", "scheduler", "rng_state", "training_args", "trainer_state")
_SAMPLES, _SAMPLE_BYTES, _FULL_HASH_BELOW = 32, 256 * 1024, 64 * 1024 * 1024


def _weights_digest(path: Path) -> str:
    """Size, safetensors header and content of a weights file.

    Size and header alone are NOT enough: an SFT and a DPO checkpoint of one model have the
    same shapes, dtypes and offsets, hence the same header and size. A full sha256 of a 64 GB
    32B checkpoint costs minutes on every resume, so files over 64 MiB are hashed on 32
    evenly spaced 256 KiB blocks (8 MiB per file): training moves nearly every weight, so two
    checkpoints of a lineage differ in every block. The weak spot is a deliberate edit of
    unsampled bytes, which is not the threat here (mixing up one's own checkpoints is).
    """
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with path.open("rb") as f:
        if size <= _FULL_HASH_BELOW:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
            return h.hexdigest()
        if path.suffix == ".safetensors":
            header_len = int.from_bytes(f.read(8), "little")
            h.update(f.read(min(header_len, 100 * 1024 * 1024)))
        step = (size - _SAMPLE_BYTES) // (_SAMPLES - 1)
        for i in range(_SAMPLES):
            f.seek(i * step)
            h.update(f.read(_SAMPLE_BYTES))
    return h.hexdigest()


def checkpoint_fingerprint(path: Path, chat_template: str, *, hub_revision: str | None = None,
                           ) -> str:
    """Hash of a checkpoint's weights, tokenizer/config files and the chat template used."""
    h = hashlib.sha256(chat_template.encode())
    if hub_revision:
        # A hub commit pins every file; hashing the commit also keeps the fingerprint the same
        # whether or not the weights were fetched (served backends need only the tokenizer).
        h.update(f"hub:{hub_revision}".encode())
        return h.hexdigest()[:24]
    for file in sorted(Path(path).iterdir()):
        if not file.is_file():
            continue
        if file.suffix in _WEIGHT_SUFFIXES and not file.name.startswith(_NOT_WEIGHTS):
            h.update(f"{file.name}={_weights_digest(file)}".encode())
        elif file.name in _SMALL_FILES:
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
        self.conn.executescript(_SCHEMA)

    def close(self) -> None:
        self.conn.close()

    def register_checkpoint(self, fingerprint: str, checkpoint: str, info: dict) -> None:
        self._write("INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?)",
                    [(fingerprint, checkpoint, json.dumps(info, sort_keys=True))])

    def existing(self, fingerprint: str) -> dict[tuple[str, int], tuple[str, str]]:
        """(unit_id, sample) -> (status, request_sha) of every stored row of a checkpoint."""
        cur = self.conn.execute(
            "SELECT unit_id, sample, status, request_sha FROM results WHERE fingerprint = ?",
            (fingerprint,),
        )
        return {(u, s): (status, sha) for u, s, status, sha in cur}

    def put(self, rows: list[dict]) -> None:
        """Insert or replace rows in one transaction."""
        marks = ", ".join("?" * len(_ROW_COLUMNS))
        self._write(f"INSERT OR REPLACE INTO results ({', '.join(_ROW_COLUMNS)}) VALUES ({marks})",
                    [tuple(row.get(c) for c in _ROW_COLUMNS) for row in rows])

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
        with self.conn:  # commit on success, roll back on error
            self.conn.execute("BEGIN")
            self.conn.executemany(sql, params)

    def frame(self, fingerprints: list[str]) -> pd.DataFrame:
        marks = ", ".join("?" * len(fingerprints))
        return pd.read_sql_query(
            f"SELECT * FROM results WHERE fingerprint IN ({marks})", self.conn,
            params=fingerprints,
        )


def export_results(stores: list[Path],
                   checkpoints: list[tuple[str, str, str | None, int | None]],
                   unit_ids: set[str], out: Path,
                   labels: dict[str, list[dict]] | None = None) -> pd.DataFrame:
    """Write results.parquet from one or more stores (shards), limited to this run's
    checkpoints, given as (fingerprint, name, stage, step), and units, sorted deterministically.

    `labels` (plan.export_labels) exports a stored answer once per design label of its prompt,
    each row with its own unit id and the prompt's `prompt_sha`; without it a row's
    `prompt_sha` is its unit id.

    Rows are keyed by fingerprint, not name: two lineage nodes with identical weights (a
    `checkpoint-N` saved at a stage's last step and the stage's output) share one set of
    answers, generated once and exported under each name."""
    fingerprints = sorted({fp for fp, *_ in checkpoints})
    frames = []
    for path in stores:
        store = ResultStore(path, readonly=True)
        frames.append(store.frame(fingerprints))
        store.close()
    stored = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=_ROW_COLUMNS)
    stored = stored.drop_duplicates(["fingerprint", "unit_id", "sample"])
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
    df = df[RESULT_COLUMNS].reset_index(drop=True)
    df.to_parquet(out, index=False)
    return df
