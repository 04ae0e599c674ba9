"""``hydra/launcher=stacked`` (conf/hydra/launcher/stacked.yaml): a sweep's seeds trained as one model, then
each job run as on the basic launcher.

The jobs of one launch are grouped by their config without ``seed`` (:func:`flowvae.sweeps.group.group_key`), in the
order their first job comes, and cut into stacks of at most ``max_seeds``. A stack's seeds train as one model
(:func:`flowvae.sweeps.group.train_group`), then each of its jobs runs in the same process, in its own directory,
exactly
as the basic launcher runs it: it finds its training done, generates, scores, and writes its row. Job numbers,
directories, rows and exit codes are the basic launcher's; only the training is shared.

With ``n_jobs`` > 1 the stacks run in that many worker processes (joblib's loky, as Hydra's joblib launcher), the
cores divided among them (``train.threads=0``): on few cores, one thread per stack and a stack per core uses
them best.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

__all__ = ["StackedLauncher"]

log = logging.getLogger(__name__)

# A job: its number and its overrides.
Job = tuple[int, Sequence[str]]
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
        for job in jobs:
            config = _job_config(self.hydra_context, self.config, job)
            groups.setdefault(group_key(_task_config(config)), []).append(job)
        stacks = [group[start:start + self.max_seeds] for group in groups.values()
                  for start in range(0, len(group), self.max_seeds)]
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


def run_stack(hydra_context: HydraContext, config: DictConfig, task_function: TaskFunction, stack: list[Job]
              ) -> list[tuple[int, JobReturn]]:
    """Train the stack's seeds together (when there are several), then run each of its jobs."""
    from flowvae.sweeps.group import Member, train_group

    configs = [_job_config(hydra_context, config, job) for job in stack]
    if len(stack) > 1:
        members = [Member(_task_config(c), _run_dir(c), f"{c.hydra.job.name}.log") for c in configs]
        launch_dir = Path(str(config.hydra.runtime.cwd))
        train_group(members, launch_dir, launch_dir / str(config.hydra.sweep.dir), _parallel_jobs(config))
    returns = []
    for (idx, overrides), job_config in zip(stack, configs, strict=True):
        log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
        returns.append((idx, run_job(hydra_context=hydra_context, task_function=task_function, config=job_config,
                                     job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")))
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


def _job_config(hydra_context: HydraContext, config: DictConfig, job: Job) -> DictConfig:
    """The job's composed config, numbered as the basic launcher numbers it."""
    idx, overrides = job
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
