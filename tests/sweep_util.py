"""Shared by the kill-and-resume tests: wait until a running sweep has stored enough rows."""

from __future__ import annotations

import sqlite3
import subprocess
import time
from pathlib import Path


def wait_for_rows(proc: subprocess.Popen, db: Path, at_least: int, timeout: float) -> int:
    """Poll the store's row count until it reaches `at_least`, the process ends or `timeout`
    seconds pass; the count is returned so the test can check the kill landed mid-way."""
    rows, deadline = 0, time.monotonic() + timeout
    while rows < at_least and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
                rows = conn.execute("SELECT COUNT(*) FROM results").fetchone()[0]
        except sqlite3.OperationalError:  # not created yet, schema not written, or locked
            pass
    return rows
