"""The results table: one row per finished run, appended under a file lock.

Many runs (parallel jobs, cluster array tasks, cron reruns) append to one CSV. Each row is formatted in memory
and written with a single ``write`` of whole lines while holding ``<results>.lock``, so rows never interleave,
the header is written once, and a killed writer leaves at most nothing behind. The lock file is there only
while an append holds it (:class:`flowvae.files.Lock`). When a row brings a column the
header lacks (another flow family's option, a key a newer flowvae added), the file is rewritten whole, under the
same lock and by an atomic rename, with the wider header and blanks in the old rows.

A run is found again by its config hash (:func:`flowvae.identity.run_hash`), which is what ``skip_existing``
looks up; a run that started and has no row yet is found in :class:`RunIndex`, which also keeps two runs of one
config from working at once. :func:`check_writable` says before any work, and without creating anything, whether
a row could be appended at all.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from flowvae.files import Lock, LockTimeout, locked, replaced

__all__ = ["append_row", "read_rows", "ok_row", "has_ok_row", "write_row_file", "check_writable", "ResultsError",
           "RunIndex", "LOCK_TIMEOUT", "REQUIRED_COLUMNS"]

log = logging.getLogger(__name__)

# Seconds to wait for another process's append; appends take milliseconds, so a longer wait means a stuck lock.
LOCK_TIMEOUT = 60.0
# Columns every flowvae results table has: how a file is recognised as one.
REQUIRED_COLUMNS = ("flow", "n_flows", "status", "config_hash")
# How much of a file's first line is read to decide whether it is a results table (a header is a few KiB).
HEADER_BYTES = 1 << 20
# Seconds to lock a fresh probe file nobody else knows: longer means the file system has no working locks.
PROBE_TIMEOUT = 5.0


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
    """The first line of an existing, non-empty file as CSV fields (at most :data:`HEADER_BYTES` of it), or None.
    Raises UnicodeDecodeError for a binary file (an .npz, a picture, a checkpoint)."""
    if not path.exists() or path.stat().st_size == 0:
        return None
    with path.open("rb") as f:
        first = f.readline(HEADER_BYTES)
    return next(csv.reader([first.decode("utf-8").rstrip("\r\n")]), [])


def _lock_path(path: Path) -> Path:
    return Path(str(path) + ".lock")


def check_writable(path: str | os.PathLike, timeout: float = LOCK_TIMEOUT) -> None:
    """Raise :class:`ResultsError` unless a row could be appended to ``path`` now: an existing file is a flowvae
    results table, its folder exists or can be made, a lock file can be made and locked there, and a lock another
    process holds is released within ``timeout`` seconds. Called before a run does any work, so nothing is trained
    for a row that cannot land; it creates nothing, so a refused run leaves no folder and no lock behind (and a
    file that is not a table, e.g. a user's data, gets nothing beside it).
    """
    path = Path(path)
    if path.is_dir():
        raise ResultsError(f"{path} is a directory; give results_csv a file name, e.g. {path / 'results.csv'}")
    _check_table(path)
    if path.exists() and not os.access(path, os.W_OK):
        raise ResultsError(f"{path} is not writable")
    folder = path.parent
    while not folder.exists():  # the nearest folder that exists: append_row makes the rest
        folder = folder.parent
    if not folder.is_dir():
        raise ResultsError(f"cannot make the folder of {path}: {folder} is a file")
    lock_path = _lock_path(path)
    _probe_lock(folder, lock_path)
    if lock_path.exists():  # an append now, or one that holds the lock for good
        try:
            with locked(lock_path, timeout):
                pass
        except LockTimeout:
            raise ResultsError(f"could not take the lock {lock_path} within {timeout:.0f} s: another process holds "
                               f"it; use another results_csv") from None


def _check_table(path: Path) -> None:
    """Refuse an existing, non-empty file whose first line is not a results table's header (a data file, a
    typo'd name), naming the file and the fix. Reads the first line only, without the lock: appends write whole
    lines and a widened table is renamed into place, so the header read is always whole."""
    try:
        header = _existing_header(path)
    except OSError as err:
        raise ResultsError(f"cannot read {path}: {err.strerror or err}") from None
    except UnicodeDecodeError:  # binary: an .npz, a picture, a checkpoint
        header = []
    if header is not None and not set(REQUIRED_COLUMNS) <= set(header):
        raise ResultsError(f"{path} is not a flowvae results table (its first line is not a CSV header with the "
                           f"columns {', '.join(REQUIRED_COLUMNS)}); rows go to a new file or to an existing "
                           f"results table: give another file name, e.g. results.csv")


def _probe_lock(folder: Path, lock_path: Path) -> None:
    """Make, lock and remove a temporary file in ``folder``: what appending needs there (a lock file that can be
    made, on a file system with locks), found out without leaving anything behind. filelock would retry an open
    that fails forever, so a lock that can never be made must be found here."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".flowvae-probe-", suffix=".lock", dir=folder)
    except OSError as err:
        raise ResultsError(f"cannot create the lock file {lock_path}: {err.strerror or err}") from None
    os.close(fd)
    try:
        with locked(probe, PROBE_TIMEOUT):  # removes the probe when it works
            pass
    except (LockTimeout, OSError, NotImplementedError):
        raise ResultsError(f"cannot lock files in {folder}: this file system does not support locks; use a "
                           f"results_csv on a local disk") from None
    finally:
        Path(probe).unlink(missing_ok=True)


def append_row(path: str | os.PathLike, row: dict, timeout: float = LOCK_TIMEOUT) -> None:
    """Append ``row`` to the CSV at ``path`` under ``<path>.lock``; write the header when the file is new.

    A row with columns the file lacks widens the file (rewritten whole, atomically, still under the lock).
    Raises :class:`ResultsError` when the lock cannot be taken within ``timeout`` seconds.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with locked(_lock_path(path), timeout):
            header = _existing_header(path)
            if header is not None and any(key not in header for key in row):
                _widen(path, header, row)
            else:
                _append(path, _format(header or list(row), [row], header=header is None))
    except LockTimeout:
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


class RunIndex:
    """The runs of one results table that have started and have no row in it yet, by config hash, in the folder
    ``<results_csv>.runs/`` beside the table.

    Hydra gives every command a new directory, so a rerun of an interrupted command (cron typing the same line,
    a user after Ctrl-C) finds its interrupted run here: ``<hash>.json`` names its directory until its row is in
    the table. ``<hash>.lock`` is held while a run of that config works, so two runs of one
    config never work at once (a sweep's n_flows = 0 jobs of every flow family are one config): the second waits,
    then finds the first's row (skipped, with ``skip_existing``) or its directory (resumed), never a half-done one.
    The lock file is there only while it is held, and the folder only while it holds a lock or an entry: once
    every run of the table has its row, nothing is left of it.
    """

    def __init__(self, results_csv: str | os.PathLike):
        self.folder = Path(f"{results_csv}.runs")

    def _entry(self, config_hash: str) -> Path:
        return self.folder / f"{config_hash}.json"

    @contextmanager
    def claim(self, config_hash: str, check: Callable[[], None] = lambda: None, poll: float = 1.0
              ) -> Iterator[bool]:
        """Hold the lock of runs of ``config_hash`` for the block; yields whether it had to wait for another run.
        While waiting, ``check()`` is called every ``poll`` seconds (it raises to stop waiting)."""
        lock = Lock(self.folder / f"{config_hash}.lock", remove_folder=True)
        waited = False
        try:
            lock.acquire(timeout=0)
        except LockTimeout:
            waited = True
            log.info("waiting: another run of this config (%s) works now; this one goes on when it ends", config_hash)
            lock.acquire(poll=poll, check=check)
        try:
            yield waited
        finally:
            lock.release()

    def unfinished(self, config_hash: str) -> Path | None:
        """The directory of the run of ``config_hash`` that started and has no row yet, if it still exists."""
        try:
            run_dir = Path(json.loads(self._entry(config_hash).read_text())["run_dir"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return run_dir if run_dir.is_dir() else None

    def started(self, config_hash: str, run_dir: Path) -> None:
        """Record that the run of ``config_hash`` works in ``run_dir`` (call while holding :meth:`claim`)."""
        with replaced(self._entry(config_hash)) as tmp:
            tmp.write_text(json.dumps({"run_dir": str(Path(run_dir).absolute())}))

    def finished(self, config_hash: str) -> None:
        """Forget the run of ``config_hash``: its row is in the table (call while holding :meth:`claim`)."""
        self._entry(config_hash).unlink(missing_ok=True)
