"""Files a run writes whole or not at all, and where a user's path points. Standard library only."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["replaced", "resolve_path"]


@contextmanager
def replaced(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed onto ``path`` when the block ends, removed if it raises.

    The rename is atomic, so a reader (or a rerun after a kill) sees the old file or the new one, never half of
    one. The temporary name keeps the suffix (np.save and savefig read it) and has the process id in it, so two
    processes writing the same file do not share a temporary.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def resolve_path(path: str, launch_dir: Path | None = None) -> Path:
    """``path`` with ``~`` expanded; a relative one is taken from ``launch_dir`` (default: the working directory)."""
    resolved = Path(os.path.expanduser(path))
    return resolved if resolved.is_absolute() else (launch_dir or Path.cwd()) / resolved
