"""Hydra callbacks that make a sweep observable: job i of n with the time left, and one exit code at the end.

Each job leaves ``status.json`` in its directory (see flowvae.run.job); these callbacks read those files instead of
Hydra's return values, so they work the same with the basic, joblib and submitit launchers. Hydra skips
``on_multirun_end`` when a job raised; flowvae's jobs record their failures instead of raising.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from flowvae.files import RunFiles

__all__ = ["SweepSummary", "count_jobs", "SWEEP_EXIT_CODE"]

log = logging.getLogger("flowvae.sweep")

# Set by on_multirun_end in the launching process: the sweep's exit code (the worst of its jobs').
SWEEP_EXIT_CODE: int | None = None
SWEEP_FILE = "sweep.json"
STATUS_FILE = RunFiles(Path()).status.name


def count_jobs(config: DictConfig) -> int:
    """How many jobs the basic sweeper makes of the sweep params and the command line's overrides."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    arguments = [f"{k}={v}" for k, v in params.items()]
    arguments += list(OmegaConf.select(config, "hydra.overrides.task") or [])
    overrides = OverridesParser.create().parse_overrides(arguments)
    return sum(len(batch) for batch in BasicSweeper.split_arguments(overrides, None))


def _statuses(sweep_dir: Path) -> list[dict[str, Any]]:
    found = []
    for path in sorted(sweep_dir.glob(f"*/{STATUS_FILE}")):
        try:
            found.append({**json.loads(path.read_text()), "dir": path.parent.name})
        except (OSError, ValueError):  # a job writing it right now
            continue
    return found


class SweepSummary(Callback):
    """Logs the sweep's progress from every job and sums the jobs' outcomes up when the sweep ends."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global SWEEP_EXIT_CODE
        SWEEP_EXIT_CODE = None
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        storage = str(OmegaConf.select(config, "hydra.sweeper.storage", default=None) or "")
        if storage.startswith("sqlite:///"):  # an Optuna study's file: SQLite makes the file, not its folder
            Path(storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        for stale in sweep_dir.glob(f"*/{STATUS_FILE}"):  # a rerun of the sweep in the same directory
            stale.unlink()
        try:
            total = count_jobs(config)
        except Exception:  # noqa: BLE001 - a sweeper this cannot count: progress without a total
            total = None
        (sweep_dir / SWEEP_FILE).write_text(json.dumps({"total": total, "started": time.time()}))
        log.info("sweep of %s jobs in %s", total if total is not None else "?", sweep_dir)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        hydra_cfg = config.hydra
        sweep_file = Path(hydra_cfg.sweep.dir) / SWEEP_FILE
        if hydra_cfg.mode.name != "MULTIRUN" or not sweep_file.exists():
            return
        info = json.loads(sweep_file.read_text())
        total, started = info["total"], info["started"]
        done = _statuses(Path(hydra_cfg.sweep.dir))
        elapsed = time.time() - started
        left = ""
        if done and total:
            rate = elapsed / len(done)  # wall seconds per finished job, parallelism included
            left = f", about {_duration(rate * (total - len(done)))} left"
        log.info("job %d of %s (%d done, %s elapsed%s): %s", hydra_cfg.job.num + 1, total or "?", len(done),
                 _duration(elapsed), left, " ".join(hydra_cfg.overrides.task))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        global SWEEP_EXIT_CODE
        sweep_dir = Path(config.hydra.sweep.dir)
        statuses = _statuses(sweep_dir)
        counts: dict[str, int] = {}
        for s in statuses:
            counts[s["status"]] = counts.get(s["status"], 0) + 1
        SWEEP_EXIT_CODE = max((s["exit_code"] for s in statuses), default=0)
        summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "no jobs"
        log.info("sweep finished: %s (exit code %d)", summary, SWEEP_EXIT_CODE)
        for s in statuses:
            if s["exit_code"] != 0:
                log.error("  %s: %s %s", s["dir"], s["status"], s.get("message", ""))
        _report_search(config, sweep_dir)


def _report_search(config: DictConfig, sweep_dir: Path) -> None:
    """After an Optuna search: the best trial's value and the command line that reruns it."""
    results = sweep_dir / "optimization_results.yaml"
    if not results.exists():
        return
    best = OmegaConf.load(results)
    metric = OmegaConf.select(config, "optimize.metric") or "objective"
    # +search=... stays: its settings (train.val_fraction) are the trial's, and a single run ignores its sweeper
    fixed = [o for o in OmegaConf.select(config, "hydra.overrides.task") or [] if o.partition("=")[0]
             not in best.best_params]
    found = [f"{key}={value}" for key, value in best.best_params.items()]
    log.info("best trial: %s = %s; rerun it with: flowvae train %s", metric, best.best_value,
             " ".join([*fixed, *found]))


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
