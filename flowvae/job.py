"""One run of the experiment: validate, make data, train, generate, score, write.

Everything a run can get wrong ends here as an exit code, never as an exception through Hydra: a sweep's
other jobs go on, and the command's exit status tells cron what happened (0 ok or skipped, 1 failed or
diverged, 2 bad configuration, 3 interrupted by SIGTERM with a checkpoint to resume from).
"""

from __future__ import annotations

import json
import logging
import math
import platform
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock, Timeout
from omegaconf import DictConfig

from flowvae import __version__, stopping
from flowvae.config import ConfigError, validate
from flowvae.data import load_events
from flowvae.files import RunFiles, replaced, resolve_path
from flowvae.identity import run_hash, run_settings, train_hash
from flowvae.results import ResultsError, append_row, check_writable, ok_row, write_row_file
from flowvae.tracking import Tracker, open_tracker

__all__ = ["run", "objective", "result_row", "metric_values", "EXIT_OK", "EXIT_FAILED", "EXIT_CONFIG",
           "EXIT_INTERRUPTED"]

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_INTERRUPTED = 0, 1, 2, 3
EXIT_CODES = {"ok": EXIT_OK, "skipped": EXIT_OK, "failed": EXIT_FAILED, "diverged": EXIT_FAILED,
              "invalid": EXIT_CONFIG, "interrupted": EXIT_INTERRUPTED}
RESUME = "rerun the same command in the same run directory to resume"

# The row of the last run in this process, or None when it wrote none: what a search's objective reads.
_last_row: dict | None = None


def objective(metric: str) -> float:
    """The last run's ``metric`` for a search to minimize: its row's value when the run finished ok (or was
    skipped for an ok row), +inf otherwise (failed, diverged, refused, interrupted), so a bad trial never stops
    a study."""
    if _last_row is None or _last_row.get("status") != "ok":
        return math.inf
    try:
        value = float(_last_row[metric])
    except (KeyError, TypeError, ValueError):
        return math.inf
    return value if math.isfinite(value) else math.inf


def run(cfg: DictConfig, run_dir: Path, launch_dir: Path, parallel_jobs: int = 1, sweep_dir: Path | None = None
        ) -> int:
    """Run the experiment ``cfg`` in ``run_dir``; relative paths in the config are relative to ``launch_dir``;
    ``sweep_dir`` is the sweep the run belongs to (for the experiment tracker), if any.

    Returns the exit code and leaves ``status.json`` in the run directory for whoever launched it. SIGTERM or
    Ctrl-C at any point before the row is appended ends the run as ``interrupted`` (exit 3) with no row; once
    the row is in the table the run is done.
    """
    global _last_row
    _last_row = None
    stopping.install()
    files = RunFiles(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(files.lock, timeout=0):
            code = _run(cfg, files, launch_dir, parallel_jobs, sweep_dir)
    except Timeout:
        log.error("the run directory %s is in use by another run; give this one its own hydra.run.dir", run_dir)
        return EXIT_CONFIG
    except stopping.Interrupted as err:
        code = _finish(files, "interrupted", f"{err}; {RESUME}")
    except KeyboardInterrupt:
        return _finish(files, "interrupted", f"stopped at once by a second Ctrl-C; the last checkpoint is kept: "
                                             f"{RESUME}")
    if code == EXIT_INTERRUPTED:
        stopping.requeue()  # on a cluster's time-limit warning: submitit requeues the job here and exits
    return code


def _run(cfg: DictConfig, files: RunFiles, launch_dir: Path, parallel_jobs: int, sweep_dir: Path | None) -> int:
    stopping.check("before the run started")
    try:
        validate(cfg)
    except ConfigError as err:
        return _finish(files, "invalid", f"bad configuration: {err}")
    results_csv = resolve_path(cfg.results_csv, launch_dir)
    try:
        check_writable(results_csv)
    except ResultsError as err:
        return _finish(files, "invalid", f"bad configuration: results_csv={cfg.results_csv}: {err}")
    identity = run_hash(cfg)
    existing = ok_row(results_csv, identity) if cfg.skip_existing else None
    if existing is not None:
        log.info("skipped: %s already has an ok row for config %s", results_csv, identity)
        _remember(existing)
        return _finish(files, "skipped", "")
    started = time.time()
    try:
        events = load_events(cfg.data, launch_dir)  # numpy only: a bad data file is refused at once
        stopping.check("while loading the data")
        from flowvae import experiment  # heavy imports (torch) only for real work

        feature_map = experiment.fit_feature_map(cfg, events)  # a value outside a transform's domain
        experiment.preflight(cfg, files)
        columns = experiment.event_metric_columns(events)
        if cfg.optimize.metric not in columns:
            raise ConfigError("optimize.metric", cfg.optimize.metric, f"a metric column of this data's rows: "
                                                                      f"{', '.join(columns)}")
        stopping.check("before training")
        tracker = open_tracker(cfg, files, launch_dir, sweep_dir)  # last: it creates the tracked run
    except ConfigError as err:
        return _finish(files, "invalid", f"bad configuration: {err}")
    try:
        return _train(cfg, events, files, parallel_jobs, feature_map, tracker, results_csv, identity, started)
    except stopping.Interrupted as err:
        tracker.finish("interrupted", None, str(err))
        raise


def _train(cfg: DictConfig, events, files: RunFiles, parallel_jobs: int, feature_map, tracker: Tracker,
           results_csv: Path, identity: str, started: float) -> int:
    """The work of a run whose configuration passed every check: train, score, append the row, track it."""
    from flowvae import experiment

    try:
        status, message, values = experiment.train_and_score(cfg, events, files, parallel_jobs, feature_map,
                                                             on_epoch=tracker.log_epochs)
    except (stopping.Interrupted, KeyboardInterrupt):
        raise
    except Exception as err:  # noqa: BLE001 - a failed run is recorded, the sweep goes on
        files.error.write_text(traceback.format_exc())
        status, message, values = "failed", f"{type(err).__name__}: {err}", {}
        log.error("run failed: %s (traceback in %s)", message, files.error)
    if status == "interrupted":
        message = f"stopped by {stopping.received()} {message}"
        tracker.finish(status, None, message)
        return _finish(files, status, message)
    row = result_row(cfg, events, values, status, message, started, files.root, identity)
    stopping.check("before its row was written (training is saved: the rerun only scores)")
    try:
        append_row(results_csv, row)  # the run is done once its row is in the table
    except ResultsError as err:
        status, message = "failed", str(err)
        row.update(status=status, error=message)
        log.error("run finished but its row is not in the table: %s", message)
    write_row_file(files.result, row)
    _remember(row)
    tracker.finish(status, metric_values(row, events), message)
    log.info("%s: kl_sum=%s, row appended to %s; the run's files are in %s", status, row.get("kl_sum") or "n/a",
             results_csv, files.root)
    return _finish(files, status, message)


def result_row(cfg: DictConfig, events, values: dict, status: str, message: str, started: float, run_dir: Path,
               identity: str) -> dict:
    """A results row: the cell, the metric columns (blank where a failed run has none), the status, every setting
    column (:func:`flowvae.identity.run_settings`) and the bookkeeping. Every row of one kind of data has the same
    columns, whatever its outcome."""
    from flowvae.experiment import event_metric_columns

    columns = event_metric_columns(events)
    settings = run_settings(cfg)
    cell = {key: settings.pop(key) for key in ("flow", "n_flows", "seed")}
    return {**cell, **{key: values.get(key, "") for key in columns}, "status": status, "error": message,
            **settings, "wall_seconds": round(time.time() - started, 3),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "run_dir": str(run_dir),
            "config_hash": identity, "train_hash": train_hash(cfg), "flowvae_version": __version__,
            "host": platform.node()}


def metric_values(row: dict, events) -> dict:
    """What a tracker logs of a row scored on ``events``: its metric columns and its wall time."""
    from flowvae.experiment import event_metric_columns

    return {key: row[key] for key in (*event_metric_columns(events), "wall_seconds")}


def _remember(row: dict) -> None:
    global _last_row
    _last_row = row


def _finish(files: RunFiles, status: str, message: str) -> int:
    code = EXIT_CODES[status]
    if message and status != "failed":
        (log.error if code else log.info)(message)
    with replaced(files.status) as tmp:
        tmp.write_text(json.dumps({"status": status, "exit_code": code, "message": message}))
    return code
