"""``hydra/launcher=stacked`` (conf/hydra/launcher/stacked.yaml): a sweep's seeds trained as one model, then
each job run as on the basic launcher.

The jobs of one launch are grouped by their config without ``seed`` (:func:`flowvae.sweeps.group.group_key`), in the
order their first job comes, and cut into the fewest stacks of at most ``max_seeds``, of even sizes (:func:`cut`).
A stack's seeds train as one model (:func:`flowvae.sweeps.group.train_group`, which leaves a stack too small to
pay to its jobs), then each of its jobs runs in the same process, in its own directory, exactly as the basic
launcher runs it: it finds its training done, generates, scores, and writes its row. Job numbers, directories,
rows and exit codes are the basic launcher's; only the training is shared. Each job's config is composed once.

With ``n_jobs`` > 1 the stacks run in that many worker processes (joblib's loky, as Hydra's joblib launcher), the
cores divided among them (``train.threads=0``): on few cores, one thread per stack and a stack per core uses
them best.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

__all__ = ["StackedLauncher"]

log = logging.getLogger(__name__)


class Job(NamedTuple):
    """A job: its number, its overrides, its composed config, and that config without Hydra's node, resolved (its
    task's config). Each is composed once, when the jobs are grouped (a few tenths of a second each)."""

    idx: int
    overrides: Sequence[str]
    config: DictConfig
    task: DictConfig


# In the sweep folder once the launching process got a stop request: workers started after it stop too.
STOP_FILE = ".stop_requested"


class StackedLauncher(Launcher):
    """Hydra's basic launcher with the training of each stack of seeds done together first."""

    def __init__(self, max_seeds: int = 8, n_jobs: int = 1) -> None:
        super().__init__()
        if int(max_seeds) < 1:
            raise ValueError(f"hydra.launcher.max_seeds={max_seeds}: the seeds stacked in one model must be at "
                             f"least 1 (1 trains every seed alone, as the basic launcher)")
        if int(n_jobs) == 0:
            raise ValueError("hydra.launcher.n_jobs=0: the worker processes must be at least 1, or -1 for one per "
                             "core")
        self.max_seeds, self.n_jobs = int(max_seeds), int(n_jobs)
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from flowvae.cores import usable_cores
        from flowvae.sweeps.group import group_key

        setup_globals()
        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        jobs = [(initial_job_idx + i, overrides) for i, overrides in enumerate(job_overrides)]
        groups: dict[str, list[Job]] = {}
        for idx, overrides in jobs:
            config = _job_config(self.hydra_context, self.config, idx, overrides)
            task = _task_config(config)
            groups.setdefault(group_key(task), []).append(Job(idx, overrides, config, task))
        stacks = [stack for group in groups.values() for stack in cut(group, self.max_seeds)]
        workers = min(len(stacks), usable_cores() if self.n_jobs < 0 else self.n_jobs)
        log.info("Launching %d jobs locally: %d stacks of up to %d seeds, %d at a time", len(jobs), len(stacks),
                 self.max_seeds, max(workers, 1))
        if workers <= 1:
            done = [run_stack(self.hydra_context, self.config, self.task_function, stack) for stack in stacks]
        else:
            done = self._in_workers(stacks, workers)
        returns = {idx: result for stack in done for idx, result in stack}
        return [returns[idx] for idx, _ in jobs]


    def _in_workers(self, stacks: list[list[Job]], workers: int) -> list[list[tuple[int, JobReturn]]]:
        """The stacks in ``workers`` processes. A stop request here reaches the workers as SIGTERM, and the ones
        loky starts afresh (it replaces a worker whose memory grew) through a file in the sweep folder; stacks
        not yet handed out then run here, where each job records itself as interrupted."""
        from joblib import Parallel, delayed

        from flowvae import stopping

        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        stop_file = Path(str(self.config.hydra.sweep.dir)) / STOP_FILE
        stop_file.unlink(missing_ok=True)  # a stop of an earlier launch into this folder is not this one's
        stopping.on_request(stop_file.write_text)
        state, handed_out = Singleton.get_state(), []

        def tasks():
            for stack in stacks:
                if stopping.requested():
                    return
                handed_out.append(stack)
                yield delayed(_run_stack_in_worker)(self.hydra_context, self.config, self.task_function, stack,
                                                    state, stop_file)

        done = Parallel(n_jobs=workers, backend="loky", pre_dispatch="n_jobs")(tasks())
        return [*done, *(run_stack(self.hydra_context, self.config, self.task_function, stack)
                         for stack in stacks[len(handed_out):])]


def cut(group: list, max_seeds: int) -> list[list]:
    """The group's jobs in the fewest stacks of at most ``max_seeds``, as even as can be (10 seeds at 8: 5 and 5,
    not 8 and 2, which would train as a stack too small to pay)."""
    count = math.ceil(len(group) / max_seeds)
    size, more = divmod(len(group), count)
    starts = [i * size + min(i, more) for i in range(count + 1)]  # the first `more` stacks take one more
    return [group[a:b] for a, b in itertools.pairwise(starts)]


def run_stack(hydra_context: HydraContext, config: DictConfig, task_function: TaskFunction, stack: list[Job]
              ) -> list[tuple[int, JobReturn]]:
    """Train the stack's seeds together (when there are several), then run each of its jobs."""
    from flowvae.sweeps.group import Member, train_group

    if len(stack) > 1:
        members = [Member(job.task, _run_dir(job.config), f"{job.config.hydra.job.name}.log") for job in stack]
        launch_dir = Path(str(config.hydra.runtime.cwd))
        train_group(members, launch_dir, launch_dir / str(config.hydra.sweep.dir), _parallel_jobs(config))
    returns = []
    for job in stack:
        log.info("\t#%d : %s", job.idx, " ".join(filter_overrides(job.overrides)))
        returns.append((job.idx, run_job(hydra_context=hydra_context, task_function=task_function,
                                         config=job.config, job_dir_key="hydra.sweep.dir",
                                         job_subdir_key="hydra.sweep.subdir")))
        configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    return returns


def _run_stack_in_worker(hydra_context: HydraContext, config: DictConfig, task_function: TaskFunction,
                         stack: list[Job], singleton_state: dict[Any, Any], stop_file: Path
                         ) -> list[tuple[int, JobReturn]]:
    """:func:`run_stack` in a joblib worker: Hydra's singletons and logging as in the launching process, and stop
    requests caught from the start (the stack trains before any job installs the handlers), the launching
    process's included when this worker started after it got one (``stop_file``)."""
    from flowvae import stopping

    setup_globals()
    Singleton.set_state(singleton_state)
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    stopping.install()
    if stop_file.exists():
        stopping.request(stop_file.read_text().strip() or "SIGTERM")
    return run_stack(hydra_context, config, task_function, stack)


def _parallel_jobs(config: DictConfig) -> int:
    """How many stacks run side by side (the cores are divided among them)."""
    from flowvae.cores import usable_cores

    n_jobs = int(OmegaConf.select(config, "hydra.launcher.n_jobs", default=1) or 1)
    return usable_cores() if n_jobs < 0 else max(1, n_jobs)


def _job_config(hydra_context: HydraContext, config: DictConfig, idx: int, overrides: Sequence[str]) -> DictConfig:
    """The job's composed config, numbered as the basic launcher numbers it."""
    job_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
    with open_dict(job_config):
        job_config.hydra.job.id = idx
        job_config.hydra.job.num = idx
    return job_config


def _task_config(config: DictConfig) -> DictConfig:
    """A job's config without Hydra's node, resolved while the job's Hydra node is current."""
    HydraConfig.instance().set_config(config)
    task = OmegaConf.masked_copy(config, [key for key in config if key != "hydra"])
    OmegaConf.resolve(task)
    return task


def _run_dir(config: DictConfig) -> Path:
    """The directory ``run_job`` gives the job (its sweep dir and subdir, from where the command was launched)."""
    HydraConfig.instance().set_config(config)
    folder = Path(str(OmegaConf.select(config, "hydra.sweep.dir"))) / str(OmegaConf.select(config,
                                                                                           "hydra.sweep.subdir"))
    return folder if folder.is_absolute() else Path(str(config.hydra.runtime.cwd)) / folder
