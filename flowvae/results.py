"""The results table: one row per finished run, appended under a file lock.

Many runs (parallel jobs, cluster array tasks, cron reruns) append to one CSV. Each row is formatted in memory
and written with a single ``write`` of whole lines while holding ``<results>.lock``, so rows never interleave,
the header is written once, and a killed writer leaves at most nothing behind. When a row brings a column the
header lacks (another flow family's option, a key a newer flowvae added), the file is rewritten whole, under the
same lock and by an atomic rename, with the wider header and blanks in the old rows.

A run is found again by its config hash (:func:`flowvae.identity.run_hash`), which is what ``skip_existing``
looks up. :func:`check_writable` says before any work whether a row could be appended at all.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from pathlib import Path

from filelock import FileLock, Timeout

from flowvae.files import replaced

__all__ = ["append_row", "read_rows", "ok_row", "has_ok_row", "write_row_file", "check_writable", "ResultsError",
           "LOCK_TIMEOUT", "REQUIRED_COLUMNS"]

log = logging.getLogger(__name__)

# Seconds to wait for another process's append; appends take milliseconds, so a longer wait means a stuck lock.
LOCK_TIMEOUT = 60.0
# Columns every flowvae results table has: how a file is recognised as one.
REQUIRED_COLUMNS = ("flow", "n_flows", "status", "config_hash")


class ResultsError(OSError):
    """The results table cannot be written; the message says which file, why, and what to do."""


def _format(columns: list[str], rows: list[dict], header: bool) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _existing_header(path: Path) -> list[str] | None:
    if not path.exists() or path.stat().st_size == 0:
        return None
    with path.open(newline="") as f:
        return next(csv.reader(f), None)


def _lock(path: Path, timeout: float) -> FileLock:
    return FileLock(str(path) + ".lock", timeout=timeout)


def check_writable(path: str | os.PathLike, timeout: float = LOCK_TIMEOUT) -> None:
    """Raise :class:`ResultsError` unless a row could be appended to ``path`` now: its folder exists or can be
    made and is writable, its lock can be created and taken within ``timeout`` seconds, and an existing file is
    a flowvae results table. Called before a run does any work, so nothing is trained for a row that cannot land.
    """
    path = Path(path)
    if path.is_dir():
        raise ResultsError(f"{path} is a directory; give results_csv a file name, e.g. {path / 'results.csv'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ResultsError(f"cannot make the folder of {path}: {err.strerror or err}") from None
    lock_path = Path(str(path) + ".lock")
    try:  # filelock retries an open that fails, forever: find a lock that can never be made here
        os.close(os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644))
    except OSError as err:
        raise ResultsError(f"cannot create the lock file {lock_path}: {err.strerror or err}") from None
    if path.exists() and not os.access(path, os.W_OK):
        raise ResultsError(f"{path} is not writable")
    if not os.access(path.parent, os.W_OK):
        raise ResultsError(f"the folder {path.parent} is not writable")
    try:
        with _lock(path, timeout):
            header = _existing_header(path)
    except Timeout:
        raise ResultsError(f"could not take the lock {lock_path} within {timeout:.0f} s: another process holds "
                           f"it, or this file system does not support locks; use another results_csv") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ResultsError(f"cannot read {path}: {err}") from None
    if header is not None and not set(REQUIRED_COLUMNS) <= set(header):
        raise ResultsError(f"{path} is not a flowvae results table (its first line has no "
                           f"{', '.join(REQUIRED_COLUMNS)} columns); give results_csv another file")


def append_row(path: str | os.PathLike, row: dict, timeout: float = LOCK_TIMEOUT) -> None:
    """Append ``row`` to the CSV at ``path`` under ``<path>.lock``; write the header when the file is new.

    A row with columns the file lacks widens the file (rewritten whole, atomically, still under the lock).
    Raises :class:`ResultsError` when the lock cannot be taken within ``timeout`` seconds.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _lock(path, timeout):
            header = _existing_header(path)
            if header is not None and any(key not in header for key in row):
                _widen(path, header, row)
            else:
                _append(path, _format(header or list(row), [row], header=header is None))
    except Timeout:
        raise ResultsError(f"could not take the lock {path}.lock within {timeout:.0f} s to append the row; "
                           f"the row is in the run's result.csv") from None


def _append(path: Path, text: str) -> None:
    # One O_APPEND write of whole lines: no partial line from this process, whatever happens after.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        data = text.encode()
        written = os.write(fd, data)
        if written != len(data):  # a full disk: never leave half a row
            os.ftruncate(fd, os.lseek(fd, 0, os.SEEK_END) - written)
            raise ResultsError(f"could not write the whole row to {path} (disk full?)")
        os.fsync(fd)
    finally:
        os.close(fd)


def _widen(path: Path, header: list[str], row: dict) -> None:
    """Rewrite the table with the header's columns plus the row's new ones, then the row (caller holds the lock)."""
    columns = header + [key for key in row if key not in header]
    log.info("%s gets new columns %s", path, [key for key in row if key not in header])
    rows = read_rows(path)
    with replaced(path) as tmp:
        tmp.write_text(_format(columns, [*rows, row], header=True))


def write_row_file(path: str | os.PathLike, row: dict) -> None:
    """A one-row CSV (the run's own ``result.csv``), written to a temporary file and renamed into place."""
    with replaced(path) as tmp:
        tmp.write_text(_format(list(row), [row], header=True))


def read_rows(path: str | os.PathLike) -> list[dict]:
    """All rows of a results table as dicts of strings ([] when the file does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def ok_row(path: str | os.PathLike, run_hash: str) -> dict | None:
    """The newest finished (status ok) row of the config with this hash in the table, or None."""
    rows = [r for r in read_rows(path) if r.get("config_hash") == run_hash and r.get("status") == "ok"]
    return rows[-1] if rows else None


def has_ok_row(path: str | os.PathLike, run_hash: str) -> bool:
    """Whether the table already holds a finished (status ok) row of the config with this hash."""
    return ok_row(path, run_hash) is not None
