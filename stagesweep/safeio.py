"""Safe writing: every file the toolkit writes appears whole or not at all, and no secret
reaches disk.

A kill (or a full disk) while `results.parquet` or `summary.json` is rewritten must leave the
previous file intact, so writers go to a temporary file beside the target and `os.replace` it
in (atomic on POSIX within one filesystem); the temporary file is removed on any failure. A
full disk becomes a one-line `UserError` naming the path instead of a traceback.

Recipes, specs and overrides can carry credentials (`hub_token=...`, `backend_options.api_key`,
`https://user:pass@host`); `redact` and `redact_text` blank them before a manifest, spec copy,
provenance record or log line is written. Keys are read from the environment at run time.
"""

from __future__ import annotations

import errno
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

REDACTED = "<redacted>"

# Key names whose values are secrets. Tokenizer settings (`pad_token`, `max_new_tokens`,
# `stop_token_ids`) and ordinary `*_key` fields (`targets_key`) are not.
_SECRET_KEY = re.compile(
    r"(password|passwd|secret|credential|api_?key|private_?key|access_?key|authorization)s?$"
    r"|(^|[_\-.])(hub|hf|access|auth|api|bearer|refresh|session|id|wandb|github|gh|openai)"
    r"_?token$|^token$",
    re.IGNORECASE,
)
# Credentials recognisable by their value wherever they appear.
_SECRET_VALUES = [
    (re.compile(r"(?<=://)[^/\s:@]+:[^/\s@]+(?=@)"), f"{REDACTED}:{REDACTED}"),  # user:pass@
    (re.compile(r"\bhf_[A-Za-z0-9]{20,}"), REDACTED),  # Hugging Face tokens
    (re.compile(r"\bsk-[A-Za-z0-9_\-]{16,}"), REDACTED),  # OpenAI-style keys
    (re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._\-]{8,}"), f"Bearer {REDACTED}"),
]
# `key=value` / `key: value` pairs in free text (log lines, argv).
_SECRET_PAIR = re.compile(r"([A-Za-z0-9_.\-]+)(\s*[=:]\s*)(\"[^\"]*\"|'[^']*'|[^\s,;&]+)")


def is_secret_key(key: str) -> bool:
    """Whether a field named `key` holds a credential."""
    return bool(_SECRET_KEY.search(key.rsplit(".", 1)[-1]))


def redact_text(text: str) -> str:
    """`text` with credentials blanked: `KEY=VALUE` pairs of secret keys, user:password in
    URLs, and token-shaped values (hf_..., sk-..., Bearer ...)."""
    def pair(match: re.Match) -> str:
        key, sep, _ = match.groups()
        return f"{key}{sep}{REDACTED}" if is_secret_key(key) else match.group(0)

    text = _SECRET_PAIR.sub(pair, text)
    for pattern, replacement in _SECRET_VALUES:
        text = pattern.sub(replacement, text)
    return text


def redact(value: Any) -> Any:
    """A copy of a JSON/YAML-like value with every secret-keyed entry replaced by
    `<redacted>` and credentials blanked inside strings (lists, `KEY=VALUE` overrides)."""
    if isinstance(value, dict):
        return {k: (REDACTED if is_secret_key(str(k)) and v not in (None, "") else redact(v))
                for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact(v) for v in value)
    if isinstance(value, str):
        return redact_text(value)
    return value


def remove_stale_temporaries(directory: Path | str) -> list[Path]:
    """Delete temporary files (`.NAME.PID.tmp`) that a killed writer left in `directory`: a
    SIGKILL cannot be caught, so the next run cleans up. Files of live processes are kept."""
    removed = []
    for tmp in Path(directory).glob(".*.tmp"):
        match = re.fullmatch(r"\..+\.(\d+)\.tmp", tmp.name)
        if match is None or int(match.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
        except PermissionError:  # alive, another user's
            pass
    return removed


def _disk_error(path: Path, err: OSError) -> Exception:
    from stagesweep.cli import UserError

    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES):
        return UserError(f"cannot write {path}: {err.strerror}; free space or fix permissions "
                         "there and re-run (nothing written before was changed)")
    return err


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """A temporary path beside `path` for writers that take a file name (`to_parquet`,
    `savefig`); moved over `path` when the block ends, removed if it raises."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise _disk_error(path, err) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_open(path: Path | str, mode: str = "w") -> Iterator[IO]:
    """`open(path, mode)` that replaces `path` only once the block ends without error; the
    data is flushed to disk first, so a crash after the rename cannot leave an empty file."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files; mode {mode!r} is not 'w' or 'wb'")
    with atomic_path(path) as tmp:
        encoding = None if "b" in mode else "utf-8"
        with open(tmp, mode, encoding=encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())


def write_text(path: Path | str, text: str) -> Path:
    """Write `text` to `path` atomically (UTF-8)."""
    with atomic_open(path) as handle:
        handle.write(text)
    return Path(path)


def write_bytes(path: Path | str, data: bytes) -> Path:
    """Write `data` to `path` atomically."""
    with atomic_open(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def write_json(path: Path | str, data: Any, **dumps: Any) -> Path:
    """Write `data` as indented JSON (secrets redacted) to `path` atomically."""
    return write_text(path, json.dumps(redact(data), **{"indent": 2, "default": str, **dumps})
                      + "\n")


# Set in the environment of workers started by a process that holds an out dir's lock: they
# share it (they inherit its open file, which keeps the lock held while any of them runs).
_HELD_LOCK_ENV = "STAGESWEEP_HELD_LOCK"
LOCK_NAME = ".stagesweep.lock"
_HELD: dict[str, int] = {}  # resolved dir -> descriptor of the lock this process holds


@contextmanager
def dir_lock(directory: Path | str, *, shared: bool = False) -> Iterator[int | None]:
    """Hold the lock of an output dir: exclusive for a whole sweep, shared for the shard
    workers of one multi-node launch. A second sweep into a held dir gets a one-line
    `UserError` naming the holder's pid instead of mixing its answers into the table.

    Yields the lock file's descriptor, or None where this process's parent holds the lock
    for it (see `worker_lock`)."""
    import fcntl

    from stagesweep.cli import UserError

    directory = Path(directory).resolve()
    if os.environ.get(_HELD_LOCK_ENV) == str(directory):
        yield None
        return
    fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holders = os.pread(fd, 4096, 0).decode(errors="replace").split()
            who = f"pid {', '.join(holders[-4:])}" if holders else "another process"
            raise UserError(f"{directory} is in use by another sweep ({who}); wait for it to "
                            "finish or choose another --out") from None
        if not shared:
            os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_END)
        os.write(fd, f"{os.getpid()}\n".encode())
        _HELD[str(directory)] = fd
        try:
            yield fd
        finally:
            _HELD.pop(str(directory), None)
            if not shared:
                os.ftruncate(fd, 0)  # a finished dir's lock file is empty, as before the run
    finally:
        os.close(fd)


def worker_lock(directory: Path | str) -> tuple[dict[str, str], tuple[int, ...]]:
    """Environment entries and `pass_fds` for worker processes that run under this process's
    lock of `directory`: they skip locking, and holding the inherited descriptor keeps the dir
    locked even if this process dies before them."""
    directory = str(Path(directory).resolve())
    fd = _HELD.get(directory)
    return {_HELD_LOCK_ENV: directory}, (fd,) if fd is not None else ()
