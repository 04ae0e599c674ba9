"""flowvae's Optuna sweeper (``hydra/sweeper=flowvae_optuna``, which ``+search=default`` selects): one study in a
storage that several processes share, its trials asked and told one by one, each trial one flowvae run launched
through Hydra's launcher, and trials that fall behind on their validation events pruned (:mod:`flowvae.search.pruning`).

- ``n_trials`` is the study's total, not this command's: the trials in the storage that finished (complete or
  pruned), run or wait to run count, so two processes on one study share the budget, a search killed and started
  again runs what is left, and the same command once the study is full runs nothing. Each process asks its
  trials under a lock beside a storage file (journal or SQLite), so the total is exact; on a database server
  two processes asking at the same moment can go one trial over.
- A failed, diverged or refused trial, and one whose row has no finite value of the metric (missing, NaN, inf),
  scores the worst value of the direction, +inf when minimizing and -inf when maximizing, and the search goes on:
  the sampler learns to avoid what broke, and it is never the best trial. (Not FAIL: a FAIL trial does not count
  towards ``n_trials``, so a space where every trial fails would never end.) A pruned trial is told PRUNED. A
  trial interrupted (SIGTERM, Ctrl-C, a cluster's time limit) is told FAIL, which does not count, and its
  parameters are queued again: the next process on the study (this command again, or another worker) runs them
  first, and flowvae resumes that run from its checkpoint. A trial left running by a process that died without a
  word (SIGKILL, a crash) on this machine is found at the next start and queued again the same way.
- A trial's job is numbered after the trial (its folder in the sweep folder starts with the trial's number), so
  a search resumed into the same sweep folder (``hydra.sweep.dir=...``) never reuses a run's folder. Each worker
  keeps its own sweep folder (the default one is unique): its summary reads the status files there. A batch of
  ``n_jobs`` trials goes to the launcher at once and waits for its slowest trial; processes on
  one study do not wait for each other.
- The sampler (TPE, or random) is seeded with ``sampler.seed`` and the number of trials the study has when it
  asks: the same search gives the same trials, and a second worker or a resumed search does not repeat the
  first's draws.
- A search that cannot work is refused before anything is made (no sweep folder, no journal): the sweeper's
  config adds a Hydra callback, :class:`SearchCheck`, whose instantiation makes every check of the first trial
  (:func:`check_search`, through ``${flowvae.search_check:}``), and Hydra instantiates its callbacks before any of
  them makes the sweep folder, and before it builds the sweeper.
- The median pruner's ``n_warmup_steps: null`` (the default) is the longest KL warm-up the search can sample (or
  the fixed ``train.warmup_epochs``): no trial is judged while a trial's beta may still be rising, and with the
  default space shortened to the training (:func:`flowvae.search.space.longest_warmup`) a trial can be pruned after
  the last warm-up epoch, before its last epoch.
- ``storage``: ``journal:PATH`` is Optuna's journal file (several processes on one machine or on a shared file
  system, e.g. SLURM array jobs), a relative PATH taken from where the command was launched; any SQLAlchemy URL
  (``sqlite:///outputs/optuna.db``, ``postgresql://...``) is an RDB storage.

Hydra instantiates sweepers only from classes under the ``hydra_plugins`` package: the class Hydra names is
``hydra_plugins.flowvae_plugins.optuna_sweeper.OptunaSweeper``, this class under that name. Optuna is imported
only when a search runs, so Hydra's plugin scan, which imports that module for every command, stays cheap.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
from pathlib import Path
from typing import Any

from hydra.core.plugins import Plugins
from hydra.experimental.callback import Callback
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from flowvae import stopping
from flowvae.errors import ConfigError
from flowvae.files import RunFiles
from flowvae.search.pruning import TrialLink, check_report, make_pruner, with_warmup
from flowvae.search.storage import budget_lock, open_storage, resolve_storage

__all__ = ["OptunaSweeper", "SearchCheck", "check_search", "RESULTS_FILE"]

log = logging.getLogger(__name__)

RESULTS_FILE = "optimization_results.yaml"
SAMPLERS = ("tpe", "random")
DIRECTIONS = ("minimize", "maximize")
# job statuses (flowvae.run.job) whose objective is the run's own value; any other but pruned and interrupted scores
# the worst value
SCORED = ("ok", "skipped")
# the Hydra keys of the sweeper's settings that are not OptunaSweeper's arguments
HYDRA_KEYS = ("_target_",)


class SearchCheck(Callback):
    """The Hydra callback that conf/hydra/sweeper/flowvae_optuna.yaml adds: its one parameter is
    ``${flowvae.search_check:}``, so Hydra's instantiating it (before any callback runs and before the sweeper is
    built) refuses a search that cannot work (:func:`check_search`) while nothing is made yet."""

    def __init__(self, checked: Any = None) -> None:
        self.checked = checked


def check_search(root: DictConfig) -> None:
    """Every check the sweeper makes before its first trial, on the composed config ``root`` (Hydra's node
    included): the study's name (whose resolver refuses a space that contradicts the fixed settings), the
    sweeper's settings, the space and what the pruner needs. Raises :class:`ConfigError`.

    A run's own checks (:func:`flowvae.run.preflight.preflight`: its settings, data, device, objective column) are
    each trial's, made by its job before it trains: a trial they refuse scores the worst value and the search goes
    on (a sampled value may be what it refuses), as the first trial of a bad fixed config does."""
    sweeper = OptunaSweeper.from_config(root)
    space, _, written = sweeper._space(list(OmegaConf.select(root, "hydra.overrides.task") or []))
    sweeper._check(space, written)


class OptunaSweeper(Sweeper):
    """Hydra's sweeper interface over an Optuna study; the settings are ``hydra.sweeper``'s keys
    (conf/hydra/sweeper/flowvae_optuna.yaml says what each does)."""

    def __init__(self, direction: str = "minimize", study_name: str | None = None, storage: str | None = None,
                 n_trials: int = 20, n_jobs: int | None = None, sampler: Any = None, pruner: Any = None,
                 params: Any = None) -> None:
        self.direction, self.study_name, self.storage = direction, study_name, storage
        self.n_trials, self.n_jobs = n_trials, n_jobs
        self.sampler = dict(sampler or {"name": "tpe"})
        self.pruner = dict(pruner or {"name": "none"})
        self.params = params
        self.config: DictConfig | None = None
        self.launcher = None

    @classmethod
    def from_config(cls, root: DictConfig) -> OptunaSweeper:
        """The sweeper of the composed config ``root`` (Hydra's node included), as Hydra builds it, without its
        launcher."""
        settings = OmegaConf.to_container(root.hydra.sweeper, resolve=True)
        for key in HYDRA_KEYS:
            settings.pop(key, None)
        sweeper = cls(**settings)
        sweeper.config = root
        return sweeper

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(config=config, hydra_context=hydra_context,
                                                                task_function=task_function)

    def sweep(self, arguments: list[str]) -> None:
        from flowvae.search.space import refuse

        try:  # checked already (SearchCheck); here too for a config without that callback
            space, fixed, written = self._space(arguments)
            self._check(space, written)
        except ConfigError as err:
            refuse(err)
        self.pruner = self._pruner_settings(space)  # what each trial's job makes its pruner of
        launch_dir = Path(OmegaConf.select(self.config, "hydra.runtime.cwd") or os.getcwd())
        spec = resolve_storage(str(self.storage), launch_dir)
        study = self._study(spec)
        log.info("study %s in %s: %d of %d trials (hydra.sweeper.n_trials) finished, running or queued",
                 study.study_name, self.storage, len(_counted(study)), self.n_trials)
        worker = _worker()
        while not stopping.requested():
            trials = self._next(study, spec, space, worker)
            if not trials:
                break
            link = {"storage": spec, "study": study.study_name, "pruner": self.pruner}
            for group in _numbered_runs(trials):
                overrides = [[*fixed.values(), *(f"{key}={value}" for key, value in trial.params.items()),
                              TrialLink(number=trial.number, **link).override()] for trial in group]
                try:  # job number = trial number: its folder's, unique in the study whatever the sweep folder
                    returns = self.launcher.launch(overrides, initial_job_idx=group[0].number)
                except BaseException as err:
                    stopped = stopping.requested() or isinstance(err, KeyboardInterrupt)
                    for trial in trials:  # they never told how they ended
                        _tell_interrupted(study, trial.number, "its launcher stopped" if stopped else
                                          f"its launcher failed ({type(err).__name__})", again=stopped)
                    raise
                for trial, ret in zip(group, returns, strict=True):
                    self._tell(study, trial, ret)
        self._report(study)

    # --- the steps ----------------------------------------------------------------------------------------------

    def _space(self, arguments: list[str]) -> tuple[dict[str, Any], dict[str, str], dict[str, str]]:
        """(sampled keys and their distributions, fixed overrides, each key's override as its source wrote it) of
        ``hydra.sweeper.params`` and the command line (:func:`flowvae.search.space.parse_space`)."""
        from flowvae.search.space import PARAMS_KEY, parse_space

        params = [f"{key}={value}" for key, value in (self.params or {}).items()]
        sources = [f"{PARAMS_KEY}.{a}" for a in params] + list(arguments)
        written = {argument.partition("=")[0]: source for argument, source in zip([*params, *arguments], sources,
                                                                                 strict=True)}
        return (*parse_space([*params, *arguments], sources=sources), written)

    def _check(self, space: dict[str, Any], written: dict[str, str]) -> None:
        """Every setting of the sweeper, and what the space and the pruner need of the composed config, before
        the first trial."""
        from optuna.distributions import FloatDistribution

        if str(self.direction) not in DIRECTIONS:
            raise ConfigError("hydra.sweeper.direction", self.direction, f"one of {', '.join(DIRECTIONS)}")
        if not self.storage:
            raise ConfigError("hydra.sweeper.storage", self.storage, "a storage for the study, e.g. "
                                                                     "journal:outputs/optuna.journal")
        if not self.study_name:
            raise ConfigError("hydra.sweeper.study_name", self.study_name, "a name for the study")
        for key, least in (("n_trials", 0), ("n_jobs", 1)):
            value = getattr(self, key)
            if not (value is None and key == "n_jobs") and (not isinstance(value, int) or value < least):
                raise ConfigError(f"hydra.sweeper.{key}", value, f"an integer >= {least}")
        if self.sampler.get("name") not in SAMPLERS:
            raise ConfigError("hydra.sweeper.sampler.name", self.sampler.get("name"), f"one of {', '.join(SAMPLERS)}")
        make_pruner(self._pruner_settings(space))
        for name, distribution in space.items():  # a float sampled for an integer key fails every trial
            current = OmegaConf.select(self.config, name.lstrip("+"), default=None)
            if isinstance(distribution, FloatDistribution) and isinstance(current, int) \
                    and not isinstance(current, bool):
                key, _, text = written[name].partition("=")
                raise ConfigError(key, text, "an integer key, sampled from integers: range(a, b) (interval(a, b) "
                                             "samples floats)")
        if self.pruner["name"] == "none":
            return
        if self.direction != "minimize":
            raise ConfigError("hydra.sweeper.pruner.name", self.pruner["name"],
                              "none with direction=maximize: trials are pruned on their validation loss or a "
                              "distance of their generated events, which fall as a model gets better")
        check_report(self.pruner, OmegaConf.select(self.config, "optimize.metric"))
        sampled = space.get("train.val_fraction")
        if sampled is None:
            lowest = OmegaConf.select(self.config, "train.val_fraction", default=0) or 0
        else:
            lowest = min(sampled.choices) if hasattr(sampled, "choices") else sampled.low
        if lowest <= 0:
            raise ConfigError("train.val_fraction", lowest,
                              f"> 0 in every trial of a search with a pruner (hydra.sweeper.pruner.name="
                              f"{self.pruner['name']}): trials are pruned on their validation events; set e.g. "
                              f"train.val_fraction=0.1, or hydra.sweeper.pruner.name=none")

    def _pruner_settings(self, space: dict[str, Any]) -> dict:
        """``hydra.sweeper.pruner`` with the median pruner's ``n_warmup_steps: null`` made the longest KL warm-up of
        the search (:func:`flowvae.search.pruning.with_warmup`)."""
        from flowvae.search.space import WARMUP, bounds

        sampled = next((d for key, d in space.items() if key.lstrip("+") == WARMUP), None)
        fixed = OmegaConf.select(self.config, WARMUP, default=0) or 0
        return with_warmup(self.pruner, int(bounds(sampled, fixed)[1]))

    def _study(self, spec: str):
        import optuna

        storage = open_storage(spec)
        with budget_lock(spec):  # two processes creating one study at once
            return optuna.create_study(study_name=self.study_name, storage=storage, direction=self.direction,
                                       load_if_exists=True)

    def _next(self, study, spec: str, space: dict[str, Any], worker: dict) -> list:
        """The trials this process launches next, counted and asked under the storage's lock (so that no two
        processes take the study's last trial)."""
        with budget_lock(spec):
            _requeue_dead(study, worker)
            return [self._ask(study, space, worker) for _ in range(self._batch(study))]

    def _batch(self, study) -> int:
        """How many trials this process launches now: ``n_jobs`` (default: the launcher's), at most what the
        study's budget leaves (its queued trials run first, inside it)."""
        from optuna.trial import TrialState

        left = self.n_trials - len(_counted(study)) + len(study.get_trials(deepcopy=False,
                                                                           states=(TrialState.WAITING,)))
        return max(0, min(self._n_jobs(), left))

    def _n_jobs(self) -> int:
        if self.n_jobs is not None:
            return self.n_jobs
        n_jobs = OmegaConf.select(self.config, "hydra.launcher.n_jobs", default=None)
        if n_jobs is None:
            return 1
        from flowvae.cores import usable_cores

        return usable_cores() if n_jobs < 0 else max(1, int(n_jobs))

    def _ask(self, study, space: dict[str, Any], worker: dict):
        """A trial of ``space`` (a queued one first), the sampler seeded with ``sampler.seed`` and the study's
        count of trials, its process recorded (:func:`_requeue_dead`)."""
        study.sampler = self._sampler(len(study.get_trials(deepcopy=False)))
        trial = study.ask(fixed_distributions=space)
        trial.set_user_attr("worker", worker)
        return trial

    def _sampler(self, n_trials: int):
        import warnings

        import numpy as np
        import optuna

        seed = self.sampler.get("seed")
        seed = None if seed is None else int(np.random.SeedSequence([int(seed), n_trials]).generate_state(1)[0])
        if self.sampler["name"] == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        with warnings.catch_warnings():  # constant_liar is marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # constant_liar: the running trials (a batch, other workers) count as bad, so no two draw alike
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=int(self.sampler.get("n_startup_trials",
                                                                                                10)),
                                              constant_liar=True)

    def _tell(self, study, trial, ret) -> None:
        """Tell the study how the trial's job ended, read from the job's status file (as the sweep summary
        reads it, on every launcher), and its value: the job's return value, which flowvae's task function makes
        the objective of the run's row for this class and its subclasses (:func:`flowvae.cli.train`)."""
        from hydra.core.utils import JobStatus
        from optuna.trial import TrialState

        output_dir = Path(ret.hydra_cfg.hydra.runtime.output_dir)
        try:
            status = json.loads(RunFiles(output_dir).status.read_text())
        except (OSError, ValueError):
            status = {"status": "failed", "message": "the job wrote no status file"}
        name = status.get("status")
        trial.set_user_attr("status", name)
        trial.set_user_attr("run_dir", status.get("run_dir") or str(output_dir))
        metric = OmegaConf.select(self.config, "optimize.metric") or "objective"
        if name == "pruned":
            study.tell(trial, state=TrialState.PRUNED)
            log.info("trial %d: %s", trial.number, status.get("message"))
            return
        if name == "interrupted":
            _tell_interrupted(study, trial.number, "it was interrupted")
            return
        value = ret.return_value if ret.status == JobStatus.COMPLETED and name in SCORED else None
        # the job's objective is +inf for a row without a finite metric: a failure, whichever the direction
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            why = (status.get("message") or "") if value is None else f"its row has no finite {metric}: {value}"
            value = None
        worst = self.worst()
        study.tell(trial, worst if value is None else float(value))
        if value is None:
            log.info("trial %d: %s, scores %s (%s)", trial.number, name, worst, why)
        else:
            log.info("trial %d: %s = %s", trial.number, metric, value)

    def worst(self) -> float:
        """What a failed trial scores: the worst value of the direction, +inf when minimizing, -inf when
        maximizing."""
        return -math.inf if self.direction == "maximize" else math.inf

    def _report(self, study) -> None:
        """The study's best trial into the sweep folder's optimization_results.yaml (the sweep summary says it
        with the line that reruns it)."""
        from optuna.trial import TrialState

        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        counts = _states(study)
        log.info("study %s: %s", study.study_name, ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
        if not done:
            return
        best = study.best_trial
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create({"name": "optuna", "study": study.study_name, "best_trial": best.number,
                                         "best_params": best.params, "best_value": best.value}),
                       sweep_dir / RESULTS_FILE)
        log.info("study %s: the best is trial %d of %d (%s)", study.study_name, best.number, len(study.trials),
                 best.user_attrs.get("run_dir", ""))


# --- the study's trials ------------------------------------------------------------------------------------------


def _counted(study) -> list:
    """The trials the budget counts: finished (complete, pruned), running, queued. FAIL is a trial that did not
    end, queued again."""
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING,
                                                    TrialState.WAITING))


def _states(study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name.lower()] = counts.get(trial.state.name.lower(), 0) + 1
    return counts


def _tell_interrupted(study, number: int, why: str, again: bool = True) -> None:
    """Trial ``number`` did not end: FAIL (not counted) and, ``again``, its parameters queued again, so that its
    run resumes."""
    from optuna.trial import TrialState

    trial = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
    if trial.state != TrialState.RUNNING:
        return
    study.tell(number, state=TrialState.FAIL)
    if not again:
        log.warning("trial %d: %s", number, why)
        return
    study.enqueue_trial(trial.params, user_attrs={"resumes": number})
    log.warning("trial %d: %s; its parameters are queued again, and the next run of the search resumes it", number,
                why)


def _numbered_runs(trials: list) -> list[list]:
    """``trials`` in runs of consecutive numbers (a batch's new trials are one; a queued trial has its own)."""
    runs: list[list] = []
    for trial in sorted(trials, key=lambda t: t.number):
        if runs and trial.number == runs[-1][-1].number + 1:
            runs[-1].append(trial)
        else:
            runs.append([trial])
    return runs


def _worker() -> dict:
    """This process as a trial records it: host, pid and start time (a pid is reused, a start time is not)."""
    import psutil

    return {"host": platform.node(), "pid": os.getpid(), "started": round(psutil.Process().create_time(), 2)}


def _requeue_dead(study, worker: dict) -> None:
    """Queue again the running trials of processes on this machine that are gone (their runs resume)."""
    import psutil
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.user_attrs.get("worker")
        if not isinstance(owner, dict) or owner.get("host") != worker["host"] or owner == worker:
            continue
        try:
            alive = round(psutil.Process(owner["pid"]).create_time(), 2) == owner.get("started")
        except (psutil.Error, KeyError, TypeError):
            alive = False
        if not alive:
            _tell_interrupted(study, trial.number, f"its process ({owner.get('pid')}) is gone")

