"""``hydra/launcher=stacked`` (conf/hydra/launcher/stacked.yaml): a sweep's seeds trained as one model, then
each job run as on the basic launcher.

The jobs of one launch are grouped by their config without ``seed`` (:func:`flowvae.group.group_key`), in the
order their first job comes. For every group, up to ``max_seeds`` seeds at a time train as one stacked model
(:func:`flowvae.group.train_group`), then each of its jobs runs in this process, in its own directory, exactly as
the basic launcher runs it: it finds its training done, generates, scores, and writes its row. Job numbers,
directories, rows and exit codes are the basic launcher's; only the training is shared.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

__all__ = ["StackedLauncher"]

log = logging.getLogger(__name__)


class StackedLauncher(Launcher):
    """Hydra's basic launcher with the training of each group of seeds done together first."""

    def __init__(self, max_seeds: int = 8) -> None:
        super().__init__()
        if int(max_seeds) < 1:
            raise ValueError(f"hydra.launcher.max_seeds={max_seeds}: the seeds stacked in one model must be at "
                             f"least 1 (1 trains every seed alone, as the basic launcher)")
        self.max_seeds = int(max_seeds)
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from flowvae.group import Member, group_key, train_group

        setup_globals()
        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        jobs = [self._job_config(initial_job_idx + i, overrides) for i, overrides in enumerate(job_overrides)]
        groups: dict[str, list[int]] = {}
        for i, config in enumerate(jobs):
            groups.setdefault(group_key(_task_config(config)), []).append(i)
        log.info("Launching %d jobs locally, %d groups of seeds, up to %d seeds stacked", len(jobs), len(groups),
                 self.max_seeds)
        launch_dir = Path(str(self.config.hydra.runtime.cwd))
        returns: dict[int, JobReturn] = {}
        for indices in groups.values():
            for start in range(0, len(indices), self.max_seeds):
                chunk = indices[start:start + self.max_seeds]
                if len(chunk) > 1:
                    members = [Member(_task_config(jobs[i]), _run_dir(jobs[i]), f"{jobs[i].hydra.job.name}.log")
                               for i in chunk]
                    train_group(members, launch_dir, launch_dir / sweep_dir)
                for i in chunk:
                    returns[i] = self._run(jobs[i], job_overrides[i])
        return [returns[i] for i in range(len(jobs))]

    def _job_config(self, idx: int, overrides: Sequence[str]) -> DictConfig:
        """The job's composed config, numbered as the basic launcher numbers it."""
        assert self.hydra_context is not None and self.config is not None
        config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(config):
            config.hydra.job.id = idx
            config.hydra.job.num = idx
        return config

    def _run(self, config: DictConfig, overrides: Sequence[str]) -> JobReturn:
        assert self.hydra_context is not None and self.config is not None and self.task_function is not None
        log.info("\t#%d : %s", config.hydra.job.num, " ".join(filter_overrides(overrides)))
        result = run_job(hydra_context=self.hydra_context, task_function=self.task_function, config=config,
                         job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return result


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
    return Path(str(config.hydra.runtime.cwd)) / folder if not folder.is_absolute() else folder
