"""A search's pruning, in the job that trains a trial: each epoch's validation loss reported to the trial, and
training ended where the pruner says so (:func:`flowvae.train.fit`'s ``prune`` hook; the row then says
``pruned``).

The sweeper (:mod:`flowvae.sweeper`) tells a job its trial through the environment variable ``FLOWVAE_TRIAL``,
set for that job alone by the override ``hydra.job.env_set.FLOWVAE_TRIAL=...``: Hydra sets it while the job runs
and restores the environment after it, in the launching process (basic launcher) and in joblib's and submitit's
workers alike, and ``hydra.*`` overrides are no part of a run's settings, so the trial is not part of the run's
identity (its config hash): a trial's run is the run of its settings, skipped or resumed like any other. The
value is JSON: the study's storage, its name, the trial's number and the pruner's settings. The job opens the
study itself because an Optuna pruner lives in the process that asks it, not in the storage.

Pruning never decides a run's outcome by accident: a storage that cannot be opened or written is a warning, and
the run trains on unpruned.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["TrialLink", "ENV", "PRUNERS", "make_pruner", "from_environment", "hook", "REPORTED"]

log = logging.getLogger(__name__)

ENV = "FLOWVAE_TRIAL"
# hydra.sweeper.pruner.name: what each one needs besides its name
PRUNERS = {"median": ("n_startup_trials", "n_warmup_steps"),
           "successive_halving": ("min_resource", "reduction_factor"),
           "none": ()}
LEAST = {"min_resource": 1, "reduction_factor": 2}  # the smallest value of a pruner's setting (others: 0)
REPORTED = "val_loss"  # the history row's value a trial reports each epoch: lower is better


@dataclass(frozen=True)
class TrialLink:
    """What a job needs to report to its trial: the storage (:func:`flowvae.sweeper.open_storage`'s syntax, file
    paths absolute), the study's name, the trial's number, the pruner's settings (``hydra.sweeper.pruner``)."""

    storage: str
    study: str
    number: int
    pruner: dict

    def override(self) -> str:
        """The job's override that sets ``FLOWVAE_TRIAL`` to this link, in Hydra's grammar: the JSON single-quoted,
        with ' and $ written as JSON's \\u escapes so that neither Hydra's quoting nor OmegaConf's ``${...}``
        interpolation touches it."""
        text = json.dumps(asdict(self), sort_keys=True).replace("'", "\\u0027").replace("$", "\\u0024")
        return f"++hydra.job.env_set.{ENV}='{text}'"

    @classmethod
    def parse(cls, text: str) -> TrialLink:
        return cls(**json.loads(text))


def make_pruner(settings: Mapping[str, Any]):
    """The Optuna pruner of ``hydra.sweeper.pruner``: ``median`` (a trial whose best validation loss so far is
    worse than the median of the finished trials at the same epoch, once ``n_startup_trials`` have finished and
    after ``n_warmup_steps`` epochs), ``successive_halving`` (rungs at ``min_resource`` x ``reduction_factor``^k
    epochs, where only the best 1/``reduction_factor`` of the trials that reached the rung go on) or ``none``.
    Raises :class:`ConfigError` for a setting that is wrong."""
    import optuna

    from flowvae.config import ConfigError

    name = settings.get("name")
    if name not in PRUNERS:
        raise ConfigError("hydra.sweeper.pruner.name", name, f"one of {', '.join(PRUNERS)}")
    for key in PRUNERS[name]:
        value, least = settings.get(key), LEAST.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ConfigError(f"hydra.sweeper.pruner.{key}", value, f"an integer >= {least} for the {name} pruner")
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=settings["n_startup_trials"],
                                           n_warmup_steps=settings["n_warmup_steps"])
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=settings["min_resource"],
                                                      reduction_factor=settings["reduction_factor"])
    return optuna.pruners.NopPruner()


def from_environment(environ: Mapping[str, str] = os.environ) -> TrialLink | None:
    """This job's trial, when a search's sweeper launched it; None otherwise (or for a value that is not a link,
    with a warning)."""
    text = environ.get(ENV)
    if not text:
        return None
    try:
        return TrialLink.parse(text)
    except (TypeError, ValueError) as err:
        log.warning("search: %s is not a trial (%s); this run trains unpruned", ENV, err)
        return None


def hook(link: TrialLink | None = None) -> Callable[[dict], str | None] | None:
    """``fit``'s ``prune`` hook for this job's trial (``link``, else the environment's), or None outside a search.

    It reports each finished epoch's validation loss to the trial (step = the epoch) and returns the message
    that ends training when the pruner prunes the trial. Pruning never fails the run: the first error with the
    storage is a warning and the rest of the training goes unreported."""
    link = link if link is not None else from_environment()
    if link is None:
        return None
    try:
        study, trial = _open(link)
    except Exception as err:  # noqa: BLE001 - the storage's errors come in many types; the run goes on
        _warn(link, "open the study", err)
        return None
    state = {"working": True, "missing": False}

    def prune(row: dict) -> str | None:
        value = row.get(REPORTED)
        if not state["working"]:
            return None
        if value is None:
            if not state["missing"]:
                state["missing"] = True
                log.warning("search: trial %d has no %s to report (train.val_fraction is 0): it is not pruned",
                            link.number, REPORTED)
            return None
        try:
            epoch = int(row["epoch"])
            trial.report(float(value), epoch)
            if not trial.should_prune():
                return None
            return _message(study, link, epoch)
        except Exception as err:  # noqa: BLE001 - as above: a warning, never the run's outcome
            state["working"] = False
            _warn(link, "report to the trial", err)
            return None

    return prune


def _open(link: TrialLink):
    """(the study with the link's pruner, the trial as an Optuna Trial to report to)."""
    import optuna

    from flowvae.sweeper import open_storage

    storage = open_storage(link.storage)
    study = optuna.load_study(study_name=link.study, storage=storage, pruner=make_pruner(link.pruner))
    trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(link.study),
                                                               link.number)
    return study, optuna.trial.Trial(study, trial_id)


def _message(study, link: TrialLink, epoch: int) -> str:
    """Why the pruner stopped the trial, with the numbers it compared."""
    import numpy as np
    from optuna.trial import TrialState

    frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == link.number)
    values = [v for v in frozen.intermediate_values.values() if not math.isnan(v)]
    best = min(values) if values else math.nan
    name = link.pruner.get("name")
    if name == "median":
        finished = [t.intermediate_values[epoch] for t in study.get_trials(deepcopy=False, states=(
            TrialState.COMPLETE,)) if epoch in t.intermediate_values]
        median = float(np.nanmedian(finished)) if finished else math.nan
        return (f"pruned by the search after epoch {epoch} ({REPORTED} {best:.6g}, its best so far; the median of "
                f"{len(finished)} finished trials at that epoch was {median:.6g})")
    if name == "successive_halving":
        rungs = sorted(int(key.rpartition("_")[2]) for key in frozen.system_attrs if key.startswith("completed_rung_"))
        rung = f"completed_rung_{rungs[-1]}" if rungs else None
        reached = sum(rung in t.system_attrs for t in study.get_trials(deepcopy=False)) if rung else 0
        return (f"pruned by the search after epoch {epoch} ({REPORTED} {frozen.intermediate_values[epoch]:.6g}: not "
                f"in the best 1/{link.pruner.get('reduction_factor')} of the {reached} trials that reached this "
                f"rung)")
    return f"pruned by the search after epoch {epoch} ({REPORTED} {best:.6g})"


def _warn(link: TrialLink, what: str, err: Exception) -> None:
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    log.warning("search: could not %s (trial %d of study %s in %s: %s: %s); this run trains on unpruned",
                what, link.number, link.study, link.storage, type(err).__name__, first)
