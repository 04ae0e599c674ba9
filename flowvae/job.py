"""One run of the experiment: validate, make data, train, generate, score, write.

Everything a run can get wrong ends here as an exit code, never as an exception through Hydra: a sweep's
other jobs go on, and the command's exit status tells cron what happened (0 ok or skipped, 1 failed or
diverged, 2 bad configuration, 3 interrupted by SIGTERM with a checkpoint to resume from).
"""

from __future__ import annotations

import json
import logging
import platform
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from flowvae import __version__
from flowvae.config import ConfigError, validate
from flowvae.data import load_events
from flowvae.files import replaced, resolve_path
from flowvae.results import append_row, config_hash, has_ok_row, write_row_file

__all__ = ["run", "EXIT_OK", "EXIT_FAILED", "EXIT_CONFIG", "EXIT_INTERRUPTED"]

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_INTERRUPTED = 0, 1, 2, 3
EXIT_CODES = {"ok": EXIT_OK, "skipped": EXIT_OK, "failed": EXIT_FAILED, "diverged": EXIT_FAILED,
              "invalid": EXIT_CONFIG, "interrupted": EXIT_INTERRUPTED}


def run(cfg: DictConfig, run_dir: Path, launch_dir: Path, parallel_jobs: int = 1) -> int:
    """Run the experiment ``cfg`` in ``run_dir``; relative paths in the config are relative to ``launch_dir``.

    Returns the exit code and leaves ``status.json`` in the run directory for whoever launched it.
    """
    results_csv = resolve_path(cfg.results_csv, launch_dir)
    try:
        validate(cfg)
    except ConfigError as err:
        return _finish(run_dir, "invalid", f"bad configuration: {err}")
    run_hash = config_hash(cfg)
    if cfg.skip_existing and has_ok_row(results_csv, run_hash):
        log.info("skipped: %s already has an ok row for config %s", results_csv, run_hash)
        return _finish(run_dir, "skipped", "")
    started = time.time()
    try:
        events = load_events(cfg.data, launch_dir)  # numpy only: a bad data file is refused at once
    except ConfigError as err:
        return _finish(run_dir, "invalid", f"bad configuration: {err}")
    from flowvae import experiment  # heavy imports (torch) only for real work
    from flowvae.train import StopRequest

    if StopRequest.received:  # an earlier job of this sweep was stopped: stop the sweep, not just that job
        return _finish(run_dir, "interrupted", f"not started: {StopRequest.received} received earlier")
    try:
        status, message, values = experiment.train_and_score(cfg, events, run_dir, run_hash, parallel_jobs)
    except Exception as err:  # noqa: BLE001 - a failed run is recorded, the sweep goes on
        (run_dir / "error.txt").write_text(traceback.format_exc())
        status, message, values = "failed", f"{type(err).__name__}: {err}", {}
        log.error("run failed: %s (traceback in %s)", message, run_dir / "error.txt")
    if status == "interrupted":
        return _finish(run_dir, status, message)
    # Every row has the same columns whatever the outcome: blanks where a failed run has no value.
    metric_values = {key: values.get(key, "") for key in experiment.metric_columns(events.n_features)}
    row = {**_identity_columns(cfg), **metric_values, "status": status, "error": message,
           "wall_seconds": round(time.time() - started, 3),
           "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "run_dir": str(run_dir),
           "config_hash": run_hash, "flowvae_version": __version__, "host": platform.node()}
    write_row_file(run_dir / "result.csv", row)
    append_row(results_csv, row)
    log.info("%s: kl_sum=%s, row appended to %s", status, row.get("kl_sum") or "n/a", results_csv)
    return _finish(run_dir, status, message)


def _finish(run_dir: Path, status: str, message: str) -> int:
    code = EXIT_CODES[status]
    if message and status != "failed":
        (log.error if code else log.info)(message)
    with replaced(run_dir / "status.json") as tmp:
        tmp.write_text(json.dumps({"status": status, "exit_code": code, "message": message}))
    return code


def _identity_columns(cfg: DictConfig) -> dict:
    """The columns that say which experiment a row is: flow, K, seed and the setting it ran in."""
    data = cfg.data

    def plain(value):
        value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        return "" if value is None else json.dumps(value)

    return {
        "flow": cfg.flow.name,
        "n_flows": cfg.n_flows,
        "seed": cfg.seed,
        "data": data.name,
        "data_mu": plain(data.mu),
        "data_sigma": plain(data.sigma),
        "data_offset_sigma": plain(data.offset_sigma),
        "data_scale_sigma": "" if data.scale_sigma is None else data.scale_sigma,
        "data_seed": data.seed,
        "n_particles": data.n_particles or "",
        "n_train": data.n_train or "",
        "data_path": data.path or "",
        "data_key": data.key or "",
        "test_fraction": "" if data.test_fraction is None else data.test_fraction,
        "standardize": data.standardize,
        "likelihood": cfg.model.likelihood,
        "sigma_x": "" if cfg.model.sigma_x is None else cfg.model.sigma_x,
        "latent_dim": cfg.model.latent_dim,
        "decode": cfg.eval.decode,
        "source": cfg.eval.source,
        "epochs": cfg.train.epochs,
        "batch_size": cfg.train.batch_size,
        "lr": cfg.train.lr,
    }
