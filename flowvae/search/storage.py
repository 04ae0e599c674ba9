"""Where a study lives: Optuna's journal file (the default, shared by processes on one file system), SQLite or a
database server; relative files taken from the launch directory; and the lock beside a file that lets one
process at a time count the study's trials and ask its own."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flowvae.files import resolve_path

__all__ = ["JOURNAL", "SQLITE", "resolve_storage", "storage_file", "open_storage"]


log = logging.getLogger(__name__)


JOURNAL = "journal:"


SQLITE = "sqlite:///"


def resolve_storage(spec: str, launch_dir: Path) -> str:
    """``spec`` with a relative journal or SQLite file taken from ``launch_dir`` (a job opens the same file
    wherever it runs)."""
    if spec.startswith(JOURNAL):
        return JOURNAL + str(resolve_path(spec.removeprefix(JOURNAL), launch_dir))
    if spec.startswith(SQLITE):
        return SQLITE + str(resolve_path(spec.removeprefix(SQLITE), launch_dir))
    return spec


def storage_file(spec: str) -> Path | None:
    """The file of a journal or SQLite storage; None for a database server."""
    for prefix in (JOURNAL, SQLITE):
        if spec.startswith(prefix):
            return Path(spec.removeprefix(prefix))
    return None


def open_storage(spec: str):
    """The Optuna storage of ``spec`` (see the module's docstring), its file's folder made."""
    import optuna

    path = storage_file(spec)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    if spec.startswith(JOURNAL):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(str(path)))
    return optuna.storages.RDBStorage(spec)


@contextmanager
def budget_lock(spec: str) -> Iterator[None]:
    """While a process counts the study's trials and asks its own: a lock beside a storage file, the kind that
    Optuna's journal uses (a symbolic link, which works on NFS too); no lock for a database server."""
    path = storage_file(spec)
    if path is None:
        yield
        return
    from optuna.storages.journal import JournalFileSymlinkLock

    lock = JournalFileSymlinkLock(f"{path}.ask")
    lock.acquire()
    try:
        yield
    finally:
        lock.release()
