"""The results table: one row per finished run, appended under a file lock, never rewritten.

Many runs (parallel jobs, cluster array tasks, cron reruns) append to one CSV. Each row is formatted in memory
and written with a single ``write`` of whole lines while holding ``<results>.lock``, so rows never interleave,
the header is written once, and a killed writer leaves at most nothing behind. A run is identified by the hash
of its composed config (what changes its numbers, not where it writes them), which is what ``skip_existing``
looks up.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
from pathlib import Path

from filelock import FileLock
from omegaconf import DictConfig, OmegaConf

from flowvae.files import replaced

__all__ = ["config_hash", "append_row", "read_rows", "has_ok_row", "write_row_file", "IDENTITY_EXCLUDED"]

log = logging.getLogger(__name__)

# Keys that say where or how a run writes, not what it computes: left out of the run's identity.
# train.eval_every belongs here because the test loss has its own random stream: it changes no trained weight.
IDENTITY_EXCLUDED = ("results_csv", "skip_existing", "train.threads", "train.progress", "train.checkpoint_every",
                     "train.eval_every")


def config_hash(cfg: DictConfig) -> str:
    """12 hex digits of sha256 over the resolved config, without the keys in IDENTITY_EXCLUDED.

    With ``n_flows=0`` the flow type is left out too: every flow type then trains the bit-identical plain VAE,
    so they are one run (``skip_existing`` runs it once, ``flowvae table`` shows it in every column).
    """
    data = OmegaConf.to_container(cfg, resolve=True)
    data.pop("hydra", None)
    if data.get("n_flows") == 0 and "flow" in data:
        data["flow"] = {"name": "none"}
    for key in IDENTITY_EXCLUDED:
        node = data
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node.get(parent, {})
        node.pop(leaf, None)
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


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


def append_row(path: str | os.PathLike, row: dict) -> None:
    """Append ``row`` to the CSV at ``path`` under ``<path>.lock``; write the header when the file is new.

    An existing file keeps its columns: a row with keys the header lacks is written with those left out, and a
    warning says so (the run's own ``result.csv`` keeps them all).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        header = _existing_header(path)
        columns = header or list(row)
        missing = [k for k in row if k not in columns]
        if missing:
            log.warning("%s has no columns %s; the full row is in the run's result.csv", path, missing)
        text = _format(columns, [row], header=header is None)
        # One O_APPEND write of whole lines: no partial line from this process, whatever happens after.
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            data = text.encode()
            written = os.write(fd, data)
            if written != len(data):  # a full disk: never leave half a row
                os.ftruncate(fd, os.lseek(fd, 0, os.SEEK_END) - written)
                raise OSError(f"could not write the whole row to {path} (disk full?)")
            os.fsync(fd)
        finally:
            os.close(fd)


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


def has_ok_row(path: str | os.PathLike, run_hash: str) -> bool:
    """Whether the table already holds a finished (status ok) row of the config with this hash."""
    return any(r.get("config_hash") == run_hash and r.get("status") == "ok" for r in read_rows(path))
