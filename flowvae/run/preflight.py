"""Every check before a run works, in one place, and the torch set-up of a run.

:func:`preflight` takes a run's config through every check that needs no training, in the order that creates
nothing before a refusal: the settings, the results table, an ok row to take instead of training, the data, the
per-feature transforms on it, the device, a checkpoint in the run directory, and the objective's column. It returns
the checked run (:class:`Checked`, what the work needs) or the row to take (:class:`Existing`), and raises
:class:`Refused` with the message the run's status gives (exit code 2). ``flowvae train``'s job and so each trial
of a search (:mod:`flowvae.run.job`) and each member of a stacked group (:mod:`flowvae.sweeps.group`) call it.

Only numpy is loaded before the data are checked: torch and the metrics' scipy load once the data passed, so a bad
setting or data file is refused at once.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from flowvae import stopping
from flowvae.config import validate
from flowvae.data.events import Events, load_events
from flowvae.data.transforms import FeatureMap
from flowvae.errors import ConfigError
from flowvae.files import RunFiles, resolve_path
from flowvae.identity import run_hash, train_hash
from flowvae.results.store import ResultsError, RunIndex, check_writable, ok_row

if TYPE_CHECKING:
    import torch

__all__ = ["preflight", "Checked", "Existing", "Refused", "reusable_row", "fit_feature_map", "check_checkpoint_of",
           "choose_device", "configure_torch", "checkpoint_key"]


log = logging.getLogger(__name__)


class Refused(Exception):
    """A run refused by :func:`preflight` before any work; the message is what its status file and log say."""

    def __init__(self, message: str):
        self.message = message
        super().__init__(message)


@dataclass(frozen=True)
class Checked:
    """A run whose configuration passed every check: what its work needs besides the directory it works in."""

    cfg: DictConfig
    events: Events
    feature_map: FeatureMap
    results_csv: Path
    identity: str
    started: float
    launch_dir: Path
    parallel_jobs: int
    sweep_dir: Path | None

    @property
    def index(self) -> RunIndex:
        return RunIndex(self.results_csv)


@dataclass(frozen=True)
class Existing:
    """The ok row of a run's config that the run takes instead of training (:func:`reusable_row`)."""

    row: dict
    results_csv: Path


def preflight(cfg: DictConfig, files: RunFiles, launch_dir: Path, sweep_dir: Path | None = None,
              parallel_jobs: int = 1, *, events: Events | None = None, feature_map: FeatureMap | None = None
              ) -> Checked | Existing:
    """Every check of the run ``cfg`` in ``files``' directory that needs no training, in the order that creates
    nothing before a refusal; relative paths are taken from ``launch_dir``, ``sweep_dir`` is the sweep the run
    belongs to. ``events`` and ``feature_map``, when given, are this config's data, loaded and fitted already (a
    stacked group's, shared by its seeds). Raises :class:`Refused` (status ``invalid``, exit code 2) and, on a
    stop request, :class:`flowvae.stopping.Interrupted`."""
    stopping.check("before the run started")
    try:
        validate(cfg)
    except ConfigError as err:
        raise Refused(f"bad configuration: {err}") from None
    results_csv = resolve_path(cfg.results_csv, launch_dir)
    try:
        check_writable(results_csv)
    except ResultsError as err:
        raise Refused(f"bad configuration: results_csv={cfg.results_csv}: {err}") from None
    identity = run_hash(cfg)
    if (existing := reusable_row(cfg, results_csv, identity, sweep_dir)) is not None:
        return Existing(existing, results_csv)
    started = time.time()
    try:
        if events is None:
            events = load_events(cfg.data, launch_dir)  # numpy only: a bad data file is refused at once
            stopping.check("while loading the data")
        if feature_map is None:
            feature_map = fit_feature_map(cfg, events)  # a value outside a transform's domain
        choose_device(cfg.train.device)
        check_checkpoint_of(cfg, files)
        _check_objective(cfg, events)
        stopping.check("before training")
    except ConfigError as err:
        raise Refused(f"bad configuration: {err}") from None
    return Checked(cfg, events, feature_map, results_csv, identity, started, launch_dir, parallel_jobs, sweep_dir)


def reusable_row(cfg: DictConfig, results_csv: Path, identity: str, sweep_dir: Path | None) -> dict | None:
    """The ok row of this config that the run takes instead of training: any, with ``skip_existing``; in a sweep,
    one that a job of the same sweep wrote, whatever ``skip_existing`` says — a sweep never trains one config
    twice (its n_flows = 0 jobs are one plain VAE for every flow family)."""
    if not cfg.skip_existing and sweep_dir is None:
        return None
    row = ok_row(results_csv, identity)
    if row is None or cfg.skip_existing:
        return row
    run_dir = Path(str(row.get("run_dir") or ""))
    return row if run_dir.is_absolute() and run_dir.resolve().is_relative_to(Path(sweep_dir).resolve()) else None


def fit_feature_map(cfg: DictConfig, events: Events) -> FeatureMap:
    """The run's per-feature transforms and scaler, fitted on its training events (numpy only: a value outside
    a transform's domain is a ConfigError before any training)."""
    return FeatureMap.fit(events.train, events.train_mask, events.transforms, cfg.data.standardize,
                          events.feature_names)


def _check_objective(cfg: DictConfig, events: Events) -> None:
    """``optimize.metric`` is a metric column of the rows of these events under ``eval.protocol`` (which these
    events must allow)."""
    from flowvae.metrics.row import event_metric_columns

    columns = event_metric_columns(events, cfg.eval.protocol)
    if cfg.optimize.metric not in columns:
        raise ConfigError("optimize.metric", cfg.optimize.metric, f"a metric column of this data's rows: "
                                                                  f"{', '.join(columns)}")


def check_checkpoint_of(cfg: DictConfig, files: RunFiles) -> None:
    """A checkpoint in ``files``' directory, if any, belongs to this config (:func:`checkpoint_key`); a
    :class:`ConfigError` otherwise."""
    from flowvae.training.kit import CheckpointMismatch, check_checkpoint

    try:
        check_checkpoint(files.checkpoint, checkpoint_key(cfg))
    except CheckpointMismatch as err:
        raise ConfigError("hydra.run.dir", str(files.root), str(err)) from None


def choose_device(name: str) -> torch.device:
    """``train.device`` as a torch device; ``cuda`` without a CUDA device is a :class:`ConfigError`."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device", name, "cpu or auto: torch sees no CUDA device here (a CPU build of "
                                                "torch, or no GPU visible to this process)")
    return torch.device(name)


def checkpoint_key(cfg: DictConfig) -> dict:
    """What a checkpoint records of its run: the hash of what trains the model (not of how it is scored)."""
    return {"train_hash": train_hash(cfg)}


def configure_torch(threads: int) -> None:
    """Threads, deterministic kernels, and subnormal floats flushed to zero, before any tensor work.

    Flushing matters: once the unused latent path's gradients and Adam moments decay below 1e-38 (posterior
    collapse, from about epoch 8 of the default run) every operation on them takes a slow microcode path on x86,
    and a training step became twice as slow. Flushed, they are zero, which changes no result beyond rounding.
    It is set before the thread pool exists, because threads inherit the floating-point mode of their creator.
    """
    import torch

    torch.set_flush_denormal(True)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
