"""Seeds of one config trained as one stacked model before their jobs run (``hydra/launcher=stacked``,
:mod:`flowvae.sweeps.stacked_launcher`).

A group is the jobs of a sweep whose configs differ in ``seed`` alone (:func:`group_key`). :func:`train_group`
checks each member with its job's own checks (:func:`flowvae.run.preflight.preflight`: configuration, an ok row to
take instead, the data, the device, a checkpoint of another config, the objective), trains the members that need
training together with :func:`flowvae.training.stacked.fit_stacked`, and leaves in each run directory what a run
of its own would have left there after training: the checkpoint (recording the finished training), ``best.pt``,
the curves. Each member's job then runs as on the basic launcher and finds its training done: it generates,
scores and writes its row, so a stacked seed's row, status file, tracking and exit code are a single run's. A
member that cannot join (refused, skipped, its directory in use) or a group whose training raises is left to its
job, which trains it alone or says why; so is every member of a group whose seeds train too few steps to pay for a
stack (:data:`MIN_STEPS`, measured), or whose model a run trains on one thread by flowvae's choice (the conditional
flow on a CPU with ``train.threads=0``: seed after seed was faster there), which then trains seed after seed as on
the basic launcher.

A seed's row counts its share of the group's wall time in ``wall_seconds`` (its job adds it, from the run
directory's :attr:`~flowvae.files.RunFiles.group_training`): the time from the group's start (its data, its
checks, its models) to the end of its training, divided among the seeds it trained by the epochs each trained,
so the rows of a group sum to its wall time as the rows of seeds trained one by one sum to theirs.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from flowvae import stopping
from flowvae.config import validate
from flowvae.data.events import Events, load_events
from flowvae.errors import ConfigError
from flowvae.files import Lock, LockTimeout, RunFiles, replaced
from flowvae.results.store import RunIndex

if TYPE_CHECKING:
    from flowvae.data.transforms import FeatureMap

__all__ = ["Member", "group_key", "train_group", "steps_per_seed", "MIN_STEPS"]

log = logging.getLogger(__name__)

# What may differ between the members of one group: the model's seed, and nothing else.
STACKED_KEY = "seed"
# The clock of the group's wall time (a module attribute, so a test can stand in for it).
_clock = time.monotonic
# The fewest optimisation steps each seed must train for a stack to pay for itself (scripts/bench_stacked.py
# --end-to-end; docs/sweeps.md): besides training, a stack costs each seed 15-45 ms (the group's checks and models,
# the job reloading its checkpoint), and it saves 0.2-2 ms of every step (one thread, 3 seeds; the tests' tiny
# model least). Measured end to end on 2 cores, 3 tiny seeds of 8 steps each were 0.5-2 % slower stacked, of 50
# steps even; 4 seeds of 80 steps (model=conditional_flow on 320 jets) and of 2000 (the defaults) faster.
MIN_STEPS = 50


@dataclass(frozen=True)
class Member:
    """One job of a group: its composed config (without Hydra's node) and the directory Hydra gives it."""

    cfg: DictConfig
    run_dir: Path
    log_name: str = "train.log"  # the job's log file in its directory (hydra.job.name)


def group_key(cfg: DictConfig) -> str:
    """The config without its seed, resolved, as text: jobs with equal keys train models of one shape on one data
    set and can be stacked."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop(STACKED_KEY, None)
    plain.pop("hydra", None)
    return json.dumps(plain, sort_keys=True, default=str)


@dataclass
class _Joined:
    """A member that trains in the group: where it works and what its checkpoint records."""

    member: Member
    files: RunFiles
    identity: str
    index: RunIndex


def train_group(members: list[Member], launch_dir: Path, sweep_dir: Path | None, parallel_jobs: int = 1) -> int:
    """Train the members of one group that need training as one stacked model; returns how many trained.
    ``parallel_jobs`` stacks train side by side on this machine (``train.threads=0`` divides the cores).

    Never raises for a member's or the group's failure (each job reports its own); a stop request ends the
    training with every member's checkpoint written, and the jobs then record themselves as interrupted.
    """
    if stopping.requested():
        return 0
    started = _clock()
    cfg = members[0].cfg
    if (cfg.get("prior") or {}).get("name") == "flow":  # a learned prior trains inside each model: not stacked
        log.info("stacked training skipped (prior=flow trains its prior with each model): each job runs alone")
        return 0
    select_by = cfg.train.get("select_by", "val_loss")
    if select_by != "val_loss":  # the group does not build each seed's measure of generated events (fit_stacked's
        # selects): each job picks its best epoch by it alone
        log.info("stacked training skipped (train.select_by=%s generates events after every epoch for each model): "
                 "each job runs alone", select_by)
        return 0
    try:
        validate(cfg)
        if _trains_on_one_thread(cfg):
            log.info("stacked training skipped (model=%s trains on one thread on this CPU, where seed after seed was "
                     "faster than a stack: 4 seeds stacked took 1.05-1.12x their time end to end; train.threads=N "
                     "stacks them on N threads): each job runs alone", cfg.model.name)
            return 0
        events = load_events(cfg.data, launch_dir)
        if (steps := steps_per_seed(cfg, events)) < MIN_STEPS:
            log.info("stacked training skipped (each seed trains %d steps, fewer than the %d that pay for a stack): "
                     "the seeds train one after the other, each in its own job", steps, MIN_STEPS)
            return 0
        from flowvae.run.preflight import fit_feature_map

        feature_map = fit_feature_map(cfg, events)
    except (ConfigError, ValueError, OSError) as err:
        log.info("stacked training skipped (%s): each job runs alone and reports it", err)
        return 0
    with ExitStack() as held:
        joined = [j for m in members
                  if (j := _join(m, launch_dir, sweep_dir, held, events=events, feature_map=feature_map)) is not None]
        if len(joined) < 2:
            return 0  # one seed trains in its own job, exactly as on the basic launcher
        try:
            with _logs_in([j.files.root / j.member.log_name for j in joined]):
                trained = _train(joined, events, feature_map, parallel_jobs)
        except stopping.Interrupted:
            pass  # the jobs record it
        except Exception as err:  # noqa: BLE001 - the jobs train alone and report what fails
            log.warning("stacked training of %d seeds failed (%s: %s); each seed's job trains it alone",
                        len(joined), type(err).__name__, err)
            return 0
        else:
            _record_shares(trained, _clock() - started)
    return len(joined)


def _trains_on_one_thread(cfg: DictConfig) -> bool:
    """Whether a run of ``cfg`` (validated) trains on one thread by flowvae's choice
    (:func:`flowvae.cores.trains_on_one_thread`); a device torch does not have is a :class:`ConfigError`."""
    from flowvae.cores import trains_on_one_thread
    from flowvae.run.preflight import choose_device

    return trains_on_one_thread(cfg.train.threads, cfg.model.name, choose_device(cfg.train.device).type)


def steps_per_seed(cfg: DictConfig, events: Events) -> int:
    """The optimisation steps a seed of ``cfg`` trains from scratch: its epochs times the batches of the training
    events the validation split leaves (fit's own split and plan, on the events' indices)."""
    import torch

    from flowvae.training.kit import Plan, split_validation

    train, _ = split_validation(torch.arange(len(events.train)), cfg.train.val_fraction, cfg.data.seed)
    return Plan(cfg.train, train).total_steps


def _join(member: Member, launch_dir: Path, sweep_dir: Path | None, held: ExitStack, *, events: Events | None = None,
          feature_map: FeatureMap | None = None) -> _Joined | None:
    """The member's place in the group, its locks held in ``held``; None when its job must run alone: refused, an
    ok row to take, stopped, its directory or config in use by another process. Its checks are its job's
    (:func:`flowvae.run.preflight.preflight`), on the group's ``events`` and ``feature_map`` when given (else on
    its own): a member the group takes is one its job would train."""
    from flowvae.run.job import interrupted_run
    from flowvae.run.preflight import Checked, preflight

    files = RunFiles(member.run_dir)
    try:
        checked = preflight(member.cfg, files, launch_dir, sweep_dir, events=events, feature_map=feature_map)
    except Exception:  # noqa: BLE001 - refused, stopped, data it cannot load: its job's own preflight says why
        return None
    if not isinstance(checked, Checked):
        return None  # an ok row to take: its job skips
    member.run_dir.mkdir(parents=True, exist_ok=True)
    index, identity = checked.index, checked.identity
    try:
        held.enter_context(index.claim(identity, check=_give_up))
    except _Busy:
        return None  # another process trains this config: the job waits for it and takes its row
    files = interrupted_run(member.cfg, index, identity, files) or files  # where its job will go on
    lock = Lock(files.lock)
    try:
        lock.acquire(timeout=0)
    except LockTimeout:
        return None
    held.callback(lock.release)
    index.started(identity, files.root)
    return _Joined(member, files, identity, index)


class _Busy(Exception):
    """Another process holds the member's config (:meth:`RunIndex.claim`)."""


def _give_up() -> None:
    raise _Busy


def _train(joined: list[_Joined], events: Events, feature_map, parallel_jobs: int) -> list[tuple[_Joined, object]]:
    """The stacked training itself: models seeded as their runs seed them, each member's files as fit writes.
    Returns the members it trained (not those whose checkpoint recorded a training that had ended) with their
    outcomes."""
    import torch

    from flowvae.cores import choose_threads
    from flowvae.run import experiment
    from flowvae.run.preflight import checkpoint_key, choose_device, configure_torch
    from flowvae.training.kit import TRAINED_KEY
    from flowvae.training.stacked import fit_stacked

    cfg = joined[0].member.cfg
    device = choose_device(cfg.train.device)
    configure_torch(choose_threads(cfg.train.threads, parallel_jobs))
    train_x, val_x, test_x = experiment.model_tensors(cfg, events, feature_map, device)
    models, rng_states = [], []
    for j in joined:
        models.append(experiment.seeded_model(j.member.cfg, events, device))
        rng_states.append(torch.get_rng_state())
    seeds = [int(j.member.cfg.seed) for j in joined]
    ended_before = [j.files.checkpoint.exists() and torch.load(j.files.checkpoint, map_location="cpu",
                                                               weights_only=False).get(TRAINED_KEY) is not None
                    for j in joined]
    log.info("training %d seeds (%s) of %s x %d flows as one stacked model", len(joined),
             ", ".join(map(str, seeds)), cfg.flow.name, cfg.n_flows)
    outcomes = fit_stacked(models, train_x, test_x, cfg.train, seeds=seeds, rng_states=rng_states,
                           checkpoints=[j.files.checkpoint for j in joined],
                           extra_states=[checkpoint_key(j.member.cfg) for j in joined],
                           callbacks=[_seed_callbacks(j.files) for j in joined],
                           val_x=val_x, bests=[j.files.best for j in joined])
    return [(j, outcome) for j, outcome, before in zip(joined, outcomes, ended_before, strict=True) if not before]


def _record_shares(trained: list[tuple[_Joined, object]], seconds: float) -> None:
    """Each seed the group trained gets its share of the group's ``seconds``, by the epochs it trained here
    (equal shares when none did), written for its job when its training ended (an interrupted seed's rerun
    counts its own time; a stale share of an earlier group is removed)."""
    epochs = [max(int(outcome.epochs_run), 0) for _, outcome in trained]
    total = sum(epochs)
    for (j, outcome), epochs_here in zip(trained, epochs, strict=True):
        share = seconds * (epochs_here / total if total else 1 / len(trained))
        if outcome.status == "interrupted":
            j.files.group_training.unlink(missing_ok=True)
            continue
        with replaced(j.files.group_training) as tmp:
            tmp.write_text(json.dumps({"seconds": round(share, 3), "group_seconds": round(seconds, 3),
                                       "seeds": len(trained)}))


def _seed_callbacks(files: RunFiles) -> list:
    """A seed's training callbacks in the group: its curves file and the process's stop requests (its job tracks
    the history it finds)."""
    from flowvae.run.experiment import Curves
    from flowvae.training.callbacks import StopRequests

    return [Curves(files.curves), StopRequests()]


@contextmanager
def _logs_in(paths: list[Path]) -> Iterator[None]:
    """The group's log lines also in every member's log file (appended; the job's own lines follow)."""
    root = logging.getLogger()
    formatter = next((h.formatter for h in root.handlers if h.formatter is not None), None)
    handlers = []
    for path in paths:
        handler = logging.FileHandler(path, mode="a")
        if formatter is not None:
            handler.setFormatter(formatter)
        handlers.append(handler)
        root.addHandler(handler)
    try:
        yield
    finally:
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()
