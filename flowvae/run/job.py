"""One run of the experiment: every check before work (:func:`flowvae.run.preflight.preflight`), then claim,
resume or start, train, generate, score, write its row (:func:`flowvae.run.row.result_row`), and hand back its
:class:`Outcome` (the exit code and the row, whose ``optimize.metric`` a search's task function returns).

Everything a run can get wrong ends here as an exit code, never as an exception through Hydra: a sweep's
other jobs go on, and the command's exit status tells cron what happened (0 ok, skipped, or pruned by a search,
1 failed or diverged, 2 bad configuration, 3 interrupted by SIGTERM with a checkpoint to resume from).
"""

from __future__ import annotations

import json
import logging
import math
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from flowvae import stopping
from flowvae.errors import ConfigError
from flowvae.files import Lock, LockTimeout, RunFiles, replaced
from flowvae.results.store import ResultsError, RunIndex, append_row, write_row_file
from flowvae.results.tracking import Tracker, open_tracker
from flowvae.run.preflight import Checked, Existing, Refused, check_checkpoint_of, preflight, reusable_row
from flowvae.run.row import metric_values, result_row

__all__ = ["run", "execute", "Outcome", "interrupted_run", "EXIT_OK", "EXIT_FAILED", "EXIT_CONFIG",
           "EXIT_INTERRUPTED"]

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_INTERRUPTED = 0, 1, 2, 3
# pruned: a search's pruner stopped the trial's training (flowvae.search.pruning); its row has no metrics
EXIT_CODES = {"ok": EXIT_OK, "skipped": EXIT_OK, "pruned": EXIT_OK, "failed": EXIT_FAILED, "diverged": EXIT_FAILED,
              "invalid": EXIT_CONFIG, "interrupted": EXIT_INTERRUPTED}
RESUME = "rerun the same command to resume this run"


@dataclass(frozen=True)
class Outcome:
    """How a run ended: its exit code, and the row it wrote, or took when skipped (None when it has none:
    refused, interrupted, its directory in use)."""

    code: int
    row: dict | None = None

    def objective(self, metric: str) -> float:
        """The row's ``metric`` for a search to optimize: its value when the run finished ok (or was skipped for an
        ok row), +inf otherwise (failed, diverged, refused, interrupted, pruned, no finite value), so a bad trial
        never stops a study (the sweeper scores it the worst value of its direction)."""
        if self.row is None or self.row.get("status") != "ok":
            return math.inf
        try:
            value = float(self.row[metric])
        except (KeyError, TypeError, ValueError):
            return math.inf
        return value if math.isfinite(value) else math.inf


def run(cfg: DictConfig, run_dir: Path, launch_dir: Path, parallel_jobs: int = 1, sweep_dir: Path | None = None
        ) -> int:
    """The exit code of :func:`execute`."""
    return execute(cfg, run_dir, launch_dir, parallel_jobs, sweep_dir).code


def execute(cfg: DictConfig, run_dir: Path, launch_dir: Path, parallel_jobs: int = 1, sweep_dir: Path | None = None
            ) -> Outcome:
    """Run the experiment ``cfg`` in ``run_dir``; relative paths in the config are relative to ``launch_dir``;
    ``sweep_dir`` is the sweep the run belongs to (for the experiment tracker), if any.

    Returns its outcome (the exit code and the row) and leaves ``status.json`` in the run directory for whoever
    launched it. SIGTERM or Ctrl-C at any point before the row is appended ends the run as ``interrupted`` (exit 3)
    with no row; once the row is in the table the run is done. When this config has an interrupted run and
    ``run_dir`` has nothing to resume (Hydra made it for this command), the run goes on in the interrupted run's
    directory instead (:class:`flowvae.results.store.RunIndex`). A single run that did no work in ``run_dir``
    (refused, skipped, or gone on elsewhere) removes it; a sweep keeps its job directories, whose status files sum
    the sweep up.
    """
    stopping.install()
    files = RunFiles(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = Lock(files.lock)  # its file goes when the run ends
    try:
        lock.acquire(timeout=0)
    except LockTimeout:
        log.error("the run directory %s is in use by another run; give this one its own hydra.run.dir", run_dir)
        return Outcome(EXIT_CONFIG)
    try:
        outcome = _recorded(files, lambda: _run(cfg, files, launch_dir, parallel_jobs, sweep_dir))
    finally:
        lock.release()
    if sweep_dir is None and _did_no_work(files):
        files.discard()
    if outcome.code == EXIT_INTERRUPTED:
        stopping.requeue()  # on a cluster's time-limit warning: submitit requeues the job here and exits
    return outcome


def _recorded(files: RunFiles, work: Callable[[], Outcome]) -> Outcome:
    """``work()``'s outcome; a stop request or a second Ctrl-C during it is recorded in ``files``' status."""
    try:
        return work()
    except stopping.Interrupted as err:
        return _finish(files, "interrupted", f"{err}; {RESUME}")
    except KeyboardInterrupt:
        return _finish(files, "interrupted", f"stopped at once by a second Ctrl-C; the last checkpoint is kept: "
                                             f"{RESUME}")


def _run(cfg: DictConfig, files: RunFiles, launch_dir: Path, parallel_jobs: int, sweep_dir: Path | None
         ) -> Outcome:
    """Every check before work (:func:`flowvae.run.preflight.preflight`); then the work, under the lock of this
    config's runs (:meth:`RunIndex.claim`)."""
    try:
        checked = preflight(cfg, files, launch_dir, sweep_dir, parallel_jobs)
    except Refused as err:
        return _finish(files, "invalid", err.message)
    if isinstance(checked, Existing):
        return _skip(files, checked.row, checked.results_csv)
    with checked.index.claim(checked.identity,
                             lambda: stopping.check("while waiting for the other run of this config")):
        if (existing := reusable_row(cfg, checked.results_csv, checked.identity, sweep_dir)) is not None:
            return _skip(files, existing, checked.results_csv)  # the run it waited for wrote it
        interrupted = interrupted_run(checked.cfg, checked.index, checked.identity, files)
        if interrupted is not None:
            outcome = _resume_in(interrupted, checked, files)
            if outcome is not None:
                return outcome
        return _work(checked, files)


def _skip(files: RunFiles, existing: dict, results_csv: Path) -> Outcome:
    return _finish(files, "skipped", f"skipped: {results_csv} already has an ok row of this config "
                                     f"({existing.get('config_hash')}), from {existing.get('run_dir') or 'a run'}",
                   row=existing)


def interrupted_run(cfg: DictConfig, index: RunIndex, identity: str, files: RunFiles) -> RunFiles | None:
    """This config's interrupted run to go on with, when ``files``' directory has nothing to resume (Hydra made
    it for this command): the results table's ``index`` names it, and it holds a checkpoint of this config."""
    if files.checkpoint.exists():
        return None  # resumed in place: the command named its directory (hydra.run.dir, a fixed sweep dir)
    found = index.unfinished(identity)
    if found is None or found.resolve() == files.root.resolve():
        return None
    other = RunFiles(found)
    try:
        check_checkpoint_of(cfg, other)
    except ConfigError:
        return None
    return other if other.checkpoint.exists() else None


def _resume_in(other: RunFiles, checked: Checked, files: RunFiles) -> Outcome | None:
    """Go on with the interrupted run in ``other``'s directory; its status is copied to ``files`` (a sweep's job
    directory tells the sweep). None when another process holds that directory (the caller starts anew)."""
    lock = Lock(other.lock)
    try:
        lock.acquire(timeout=0)
    except LockTimeout:
        log.info("the interrupted run of this config in %s is in use by another process: starting anew in %s",
                 other.root, files.root)
        return None
    try:
        with _log_also_in(other.root, files.root):
            log.info("resuming the interrupted run of this config in %s", other.root)
            outcome = _recorded(other, lambda: _work(checked, other))
    finally:
        lock.release()
    status = {**json.loads(other.status.read_text()), "run_dir": str(other.root)}
    with replaced(files.status) as tmp:
        tmp.write_text(json.dumps(status))
    return outcome


def _work(checked: Checked, files: RunFiles) -> Outcome:
    """The work of a run in ``files``' directory: open its tracker, record it as unfinished, train and score."""
    try:
        tracker = open_tracker(checked.cfg, files, checked.launch_dir, checked.sweep_dir)  # it creates the run
    except ConfigError as err:
        return _finish(files, "invalid", f"bad configuration: {err}")
    checked.index.started(checked.identity, files.root)
    try:
        return _train(checked, files, tracker)
    except stopping.Interrupted as err:
        tracker.finish("interrupted", None, str(err))
        raise


def _train(checked: Checked, files: RunFiles, tracker: Tracker) -> Outcome:
    """Train, score, append the row, track it. Once the row is in the table the run is no longer unfinished."""
    from flowvae.run import experiment

    cfg, events = checked.cfg, checked.events
    try:
        status, message, values = experiment.train_and_score(cfg, events, files, checked.parallel_jobs,
                                                             checked.feature_map, on_epoch=tracker.log_epochs)
    except (stopping.Interrupted, KeyboardInterrupt):
        raise
    except Exception as err:  # noqa: BLE001 - a failed run is recorded, the sweep goes on
        files.error.write_text(traceback.format_exc())
        status, message, values = "failed", f"{type(err).__name__}: {err}", {}
        log.error("run failed: %s (traceback in %s)", message, files.error)
    if status == "interrupted":
        message = f"stopped by {stopping.received()} {message}; {RESUME}"
        tracker.finish(status, None, message)
        return _finish(files, status, message)
    row = result_row(cfg, events, values, status, message, checked.started, files.root, checked.identity,
                     shared_seconds=_group_share(files))
    stopping.check("before its row was written (training is saved: the rerun only scores)")
    try:
        append_row(checked.results_csv, row)  # the run is done once its row is in the table
        checked.index.finished(checked.identity)
        files.group_training.unlink(missing_ok=True)  # counted in the row
    except ResultsError as err:
        status, message = "failed", str(err)
        row.update(status=status, error=message)
        log.error("run finished but its row is not in the table: %s", message)
    write_row_file(files.result, row)
    tracker.finish(status, metric_values(row, events, cfg.eval.protocol), message)
    log.info("%s: kl_sum=%s, row appended to %s; the run's files are in %s", status, row.get("kl_sum") or "n/a",
             checked.results_csv, files.root)
    return _finish(files, status, message, row=row)


@contextmanager
def _log_also_in(folder: Path, hydra_folder: Path) -> Iterator[None]:
    """While a run works in another directory than Hydra made for it, its log lines go to that directory's log
    too (Hydra's log files in ``hydra_folder``, by the same names)."""
    root, hydra_folder = logging.getLogger(), hydra_folder.resolve()
    added = []
    for handler in root.handlers:
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent.resolve() == hydra_folder:
            copy = logging.FileHandler(folder / Path(handler.baseFilename).name, mode="a")
            copy.setFormatter(handler.formatter)
            copy.setLevel(handler.level)
            added.append(copy)
    for handler in added:
        root.addHandler(handler)
    try:
        yield
    finally:
        for handler in added:
            root.removeHandler(handler)
            handler.close()


def _group_share(files: RunFiles) -> float:
    """The seconds of a stacked group's training that were this run's (:func:`flowvae.sweeps.group.train_group` wrote
    them when it ended the run's training); 0 for a run that trained alone."""
    try:
        seconds = float(json.loads(files.group_training.read_text())["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0
    return seconds if math.isfinite(seconds) and seconds > 0 else 0.0


def _did_no_work(files: RunFiles) -> bool:
    """Whether the run ended without working in ``files``' directory: refused, skipped, or gone on in the
    interrupted run it resumed (its status then names that directory)."""
    try:
        status = json.loads(files.status.read_text())
    except (OSError, ValueError):
        return False
    return status.get("status") in ("invalid", "skipped") or "run_dir" in status


def _finish(files: RunFiles, status: str, message: str, row: dict | None = None) -> Outcome:
    code = EXIT_CODES[status]
    if message and status != "failed":
        (log.error if code else log.info)(message)
    with replaced(files.status) as tmp:
        tmp.write_text(json.dumps({"status": status, "exit_code": code, "message": message}))
    return Outcome(code, row)
