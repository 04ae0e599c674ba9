"""Experiment tracking: a run's settings, per-epoch losses, row and pictures in MLflow (``logger=mlflow``).

The run directory and the results table stay the record; the tracker is a view of them for browsing and
comparing runs (``mlflow ui``). So tracking never decides a run's outcome: what cannot be checked before
training (MLflow missing, a store that cannot be opened) refuses the run with a clear line, and any later
tracking error is logged once as a warning and the run goes on untracked.

One MLflow run per flowvae run. Its id is kept in the run directory (``tracking.json``), so a run resumed after a
kill or a cluster's requeue continues the same MLflow run (status KILLED in between) and logs only the epochs
not logged yet. MLflow's client API is used, not its global "active run", so a sweep's jobs in one process
(Hydra's basic launcher) never log into each other's run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock
from omegaconf import DictConfig

from flowvae.errors import ConfigError
from flowvae.files import RunFiles, replaced, resolve_path
from flowvae.identity import data_label, run_settings

__all__ = ["Tracker", "open_tracker", "store_uri", "experiment_name", "ARTIFACTS", "END_STATUS"]

log = logging.getLogger(__name__)

# A run's status in the results table -> the MLflow run's end status.
# A pruned trial (a search stopped its training) is KILLED like an interrupted run; its status tag says which.
END_STATUS = {"ok": "FINISHED", "failed": "FAILED", "diverged": "FAILED", "interrupted": "KILLED", "pruned": "KILLED"}
# The run directory's files worth seeing beside the numbers (the checkpoint stays in the run directory).
ARTIFACTS = ("histograms", "curves", "result", "sample")
HYDRA_FILES = ("config", "overrides")  # the run's Hydra files, into the MLflow run's folder hydra/
SQLITE = "sqlite:///"
# MLflow's HTTP settings while a run opens its store (see _few_retries)
OPENING_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
STORE_LOCK_TIMEOUT = 120  # seconds a run waits for another to open a SQLite store (the first creates its tables)


class Tracker:
    """No tracking (``logger=none``): every call does nothing. :class:`MlflowTracker` overrides them."""

    def log_epochs(self, history: list[dict]) -> None:
        """The training history so far (``fit``'s per-epoch rows); called after every epoch."""

    def finish(self, status: str, metrics: dict | None, message: str = "") -> None:
        """The run ended with ``status`` (a results-table status); ``metrics`` are its row's metric columns (None
        when it wrote no row), ``message`` its error."""


def store_uri(uri: str, launch_dir: Path) -> str:
    """``uri`` with a relative SQLite file taken from ``launch_dir`` (where the user launched, also for a sweep's
    workers); other URIs unchanged."""
    database = _sqlite_file(uri)
    return uri if database is None else SQLITE + str(resolve_path(str(database), launch_dir))


def experiment_name(cfg: DictConfig, launch_dir: Path) -> str:
    """``logger.experiment_name``, or when it is null ``flowvae_<data>`` (:func:`flowvae.identity.data_label`):
    each data file its own experiment, the drawn toys one experiment per kind."""
    return cfg.logger.get("experiment_name") or f"flowvae_{data_label(cfg.data, launch_dir)}"


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///FILE`` store, None for any other store."""
    return Path(uri.removeprefix(SQLITE)) if uri.startswith(SQLITE) else None


def open_tracker(cfg: DictConfig, files: RunFiles, launch_dir: Path, sweep_dir: Path | None = None,
                 evaluation: bool = False) -> Tracker:
    """The run's tracker, its MLflow run created (or, after a resume, reopened) and its settings logged. With
    ``evaluation`` (``flowvae evaluate``) it is a new MLflow run of its own, named and tagged after the trained run
    it scores, with no files of its own.

    Raises :class:`ConfigError` before any training when ``logger=mlflow`` cannot work: MLflow not installed, or
    a store that cannot be opened.
    """
    if cfg.logger.name == "none":
        return Tracker()
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise ConfigError("logger", cfg.logger.name, "needs MLflow, which is not installed: pip install -e "
                                                     "\".[tracking]\" (make installs it), or logger=none") from None
    uri = store_uri(cfg.logger.tracking_uri, launch_dir)
    try:
        with _store_lock(uri), _few_retries():
            return MlflowTracker(MlflowClient(tracking_uri=uri), cfg, files, uri, sweep_dir,
                                 experiment_name(cfg, launch_dir), evaluation)
    except Exception as err:  # noqa: BLE001 - MLflow's errors come in many types; the message says what
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError("logger.tracking_uri", cfg.logger.tracking_uri,
                          f"an MLflow store this run can open and write ({first})") from None


@contextmanager
def _few_retries() -> Iterator[None]:
    """While a run opens its store, a tracking server that does not answer is refused in seconds, not after
    MLflow's default retries with back-off (4 minutes); settings the user made in the environment win. Later
    requests, during training, keep MLflow's patient defaults."""
    saved = {key: os.environ.get(key) for key in OPENING_HTTP}
    os.environ.update({key: value for key, value in OPENING_HTTP.items() if saved[key] is None})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)


@contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """For a SQLite store: its folder made, and a lock beside the file while a run opens it. MLflow creates and
    migrates the database's tables on first use; two jobs of a parallel sweep doing that at once broke each
    other's migration (duplicate columns, half-made tables), so one opens the store at a time."""
    database = _sqlite_file(uri)
    if database is None:
        yield
        return
    database.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{database}.lock", timeout=STORE_LOCK_TIMEOUT):
        yield


class MlflowTracker(Tracker):
    """One flowvae run as one MLflow run; see the module's docstring."""

    def __init__(self, client, cfg: DictConfig, files: RunFiles, uri: str, sweep_dir: Path | None,
                 experiment: str, evaluation: bool = False):
        from flowvae import __version__
        from flowvae.identity import run_hash, train_hash

        self.client, self.files, self.uri = client, files, uri
        self.config_hash = run_hash(cfg)
        self.failed = False
        self.logged_epochs = 0
        # (file, folder in the MLflow run): a trained run's own files; an evaluation has none of its own
        self.artifacts = [] if evaluation else [(getattr(files, name), None) for name in ARTIFACTS] + [
            (getattr(files, name), "hydra") for name in HYDRA_FILES]
        self.run_id = None if evaluation else self._resumed_run()
        if self.run_id is not None:
            client.update_run(self.run_id, status="RUNNING")
            history = client.get_metric_history(self.run_id, "train_loss")
            self.logged_epochs = max((m.step for m in history), default=0)
            log.info("tracking: continuing MLflow run %s in %s (%d epochs logged)", self.run_id, uri,
                     self.logged_epochs)
            return
        experiment_id = self._experiment(experiment)
        tags = {"config_hash": self.config_hash, "train_hash": train_hash(cfg), "run_dir": str(files.root),
                "flowvae_version": __version__}
        # a sweep's job folders (0_planar_K10_s0, ...) repeat from sweep to sweep: the sweep's name goes first
        name = files.root.name if sweep_dir is None else f"{sweep_dir.name}/{files.root.name}"
        if sweep_dir is not None:
            tags["sweep"] = str(sweep_dir)
        if evaluation:
            name = f"{name}/eval_{self.config_hash}"
            tags["evaluates"] = self._saved().get("run_id", "")  # the trained run's MLflow run, if it was tracked
        self.run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
        self._log_params(run_settings(cfg))
        if not evaluation:
            with replaced(files.tracking) as tmp:
                tmp.write_text(json.dumps({"tracking_uri": uri, "run_id": self.run_id,
                                           "config_hash": self.config_hash}))
        log.info("tracking in MLflow: %s, run %s", uri, self.run_id)

    def _saved(self) -> dict:
        """The run directory's tracking.json ({} when there is none)."""
        try:
            return json.loads(self.files.tracking.read_text())
        except (OSError, ValueError):
            return {}

    def _resumed_run(self) -> str | None:
        """The MLflow run of an earlier, interrupted attempt of this same run in this directory, if any."""
        saved = self._saved()
        if not saved or saved.get("tracking_uri") != self.uri or saved.get("config_hash") != self.config_hash:
            return None
        try:
            run = self.client.get_run(saved["run_id"])
        except Exception:  # noqa: BLE001 - deleted, or another store: start a new one
            return None
        return run.info.run_id if run.info.lifecycle_stage == "active" else None

    def _experiment(self, name: str) -> str:
        """The experiment's id, created on first use; with SQLite its artifacts go to ``mlartifacts/`` beside the
        file (MLflow would otherwise put them under the working directory)."""
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            if experiment.lifecycle_stage != "active":
                raise ValueError(f"the experiment {name!r} is deleted in this store: restore it "
                                 f"(mlflow experiments restore) or choose logger.experiment_name=...")
            return experiment.experiment_id
        database = _sqlite_file(self.uri)
        location = None if database is None else (database.parent / "mlartifacts").resolve().as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except Exception:  # noqa: BLE001 - a sweep's other job created it at the same moment
            experiment = self.client.get_experiment_by_name(name)
            if experiment is None:
                raise
            return experiment.experiment_id

    def _log_params(self, settings: dict[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(key, str(value)) for key, value in settings.items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters per call
            self.client.log_batch(self.run_id, params=params[start:start + 100])

    def _guarded(self, what: str, action) -> None:
        """Run ``action``; a tracking error is logged once and ends tracking, never the run."""
        if self.failed:
            return
        try:
            action()
        except Exception as err:  # noqa: BLE001 - the run's own record is not at stake
            self.failed = True
            log.warning("tracking: could not %s in MLflow (%s: %s); the run goes on untracked, its directory and "
                        "row are complete", what, type(err).__name__, str(err).splitlines()[0] if str(err) else "")

    def log_epochs(self, history: list[dict]) -> None:
        new = [row for row in history if row.get("epoch", 0) > self.logged_epochs]
        if not new:
            return

        def log_them() -> None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            # NaN in a history means "not measured this epoch" (the test loss between train.eval_every passes)
            values = [(key, _number(value), int(row["epoch"])) for row in new for key, value in row.items()
                      if key != "epoch"]
            metrics = [Metric(key, value, now, step) for key, value, step in values
                       if value is not None and not math.isnan(value)]
            for start in range(0, len(metrics), 1000):
                self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])
            self.logged_epochs = int(new[-1]["epoch"])

        self._guarded("log the epoch's losses", log_them)

    def finish(self, status: str, metrics: dict | None, message: str = "") -> None:
        def end() -> None:
            from mlflow.entities import Metric, RunTag

            now = int(time.time() * 1000)
            # error is set even when empty: a resumed run must not keep its interrupted attempt's message
            tags = [RunTag("status", status), RunTag("error", message[:5000])]
            numbers = {key: _number(value) for key, value in (metrics or {}).items()}
            self.client.log_batch(self.run_id, tags=tags, metrics=[Metric(key, value, now, 0) for key, value
                                                                   in numbers.items() if value is not None])
            for path, folder in self.artifacts:
                if path.exists():
                    self.client.log_artifact(self.run_id, str(path), folder)
            self.client.set_terminated(self.run_id, END_STATUS.get(status, "FAILED"))

        self._guarded("log the run's results", end)


def _number(value: Any) -> float | None:
    """A row or history value as a float for MLflow, or None for blanks and text (NaN and ±inf are kept: a diverged
    epoch's loss is worth seeing)."""
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
