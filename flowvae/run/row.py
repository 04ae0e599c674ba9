"""A result row, assembled in one place: the row ``flowvae train`` appends (a stacked seed's job and a search's
trial are such runs) and the row ``flowvae evaluate`` appends are both :func:`result_row`.

Its columns come from their own homes: the cell and every setting from :func:`flowvae.identity.run_settings`, the
metric columns from :func:`flowvae.metrics.row.metric_columns` (the scores, which ``flowvae score`` writes alone,
then the training's numbers), then the status and the bookkeeping here.
"""

from __future__ import annotations

import platform
import time
from datetime import datetime, timezone
from pathlib import Path

from omegaconf import DictConfig

from flowvae import __version__
from flowvae.data.events import Events
from flowvae.identity import CELL_COLUMNS, SEED_COLUMN, VERSION_COLUMN, run_settings, train_hash

__all__ = ["result_row", "metric_values"]


def result_row(cfg: DictConfig, events: Events, values: dict, status: str, message: str, started: float,
               run_dir: Path, identity: str, shared_seconds: float = 0.0) -> dict:
    """A results row: the cell, the metric columns (blank where a failed run has none), the status, every setting
    column (:func:`flowvae.identity.run_settings`) and the bookkeeping. Every row of one kind of data has the same
    columns, whatever its outcome. ``wall_seconds`` is the time since ``started`` plus ``shared_seconds``, the
    run's share of work done for it elsewhere (a stacked group's training)."""
    from flowvae.metrics.row import event_metric_columns

    columns = event_metric_columns(events, cfg.eval.protocol)
    settings = run_settings(cfg)
    cell = {key: settings.pop(key) for key in (*CELL_COLUMNS, SEED_COLUMN)}
    return {**cell, **{key: values.get(key, "") for key in columns}, "status": status, "error": message,
            **settings, "wall_seconds": round(time.time() - started + shared_seconds, 3),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "run_dir": str(run_dir),
            "config_hash": identity, "train_hash": train_hash(cfg), VERSION_COLUMN: __version__,
            "host": platform.node()}


def metric_values(row: dict, events: Events, protocol: str) -> dict:
    """What a tracker logs of a row scored on ``events`` under metric ``protocol`` (``cfg.eval.protocol``): its
    metric columns and its wall time."""
    from flowvae.metrics.row import event_metric_columns

    return {key: row[key] for key in (*event_metric_columns(events, protocol), "wall_seconds")}
