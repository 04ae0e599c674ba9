"""A search trial, seen from the job that trains it: its link to the study (from the environment the sweeper
sets), the objective it reports after each epoch, and the training callback (:class:`Pruning`) that reports it and
ends training when the pruner says so. The Optuna side (pruners, the study's storage) is :mod:`flowvae.search`."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping

from flowvae.search.pruning import (
    ENV,
    REPORTED,
    TrialLink,
    objective_metric,
    open_trial,
    prune_message,
    warn_unreported,
)
from flowvae.training.callbacks import Callback

__all__ = ["Pruning", "from_environment", "pruning", "validation_objective"]


log = logging.getLogger(__name__)


def validation_objective(cfg, model, val_x, events, feature_map, metric: str | None = None
                         ) -> Callable[[], float] | None:
    """``metric`` (by default ``optimize.metric``; ``train.select_by`` when that picks the best epoch) of the model
    as it is now (:func:`objective_metric`), or None without validation events.

    Each call generates min(``eval.n_samples``, validation events) events as a run's scoring does (``eval.source``
    and ``eval.decode``; the posterior encodes the validation events), from a generator of its own seeded afresh
    with ``seed`` (every epoch the same noise, and training's random streams untouched), takes them to data units
    and scores them against the validation events (the training events that
    :func:`flowvae.training.kit.split_validation`
    holds out, in data units). The model is left in the mode it was in. Its ``label`` names it in messages, its
    ``metric`` is the metric's name. Raises :class:`ConfigError` for a metric it cannot compute (:func:`check_report`
    refuses those before a search starts; a ``metric`` given is checked against these events' features here, named
    as ``train.select_by``, before any training)."""
    if val_x is None:
        return None
    import torch
    from omegaconf import OmegaConf

    from flowvae.data.units import data_units
    from flowvae.errors import ConfigError
    from flowvae.models.sampling import generate_events
    from flowvae.training.kit import split_validation

    key, metric = ("optimize.metric", cfg.optimize.metric) if metric is None else ("train.select_by", metric)
    try:
        measure = objective_metric(metric, cfg.eval.bins, cfg.eval.eps)
    except ConfigError as err:
        raise ConfigError(key, metric, err.allowed) from None
    which = str(metric).rpartition("_")[2]
    if key == "train.select_by" and which.isdigit() and int(which) >= events.n_features:
        raise ConfigError(key, metric, f"a feature of these events (0 to {events.n_features - 1}), or a sum")
    # the held-out rows of the training events: the same split applied to their indices
    held = split_validation(torch.arange(len(events.train)), cfg.train.val_fraction, cfg.data.seed)[1].numpy()
    reference = events.train[held]
    ref_mask = None if events.train_mask is None else events.train_mask[held]
    settings = OmegaConf.merge(cfg.eval, {"n_samples": min(cfg.eval.n_samples, len(held))})

    def value() -> float:
        training = model.training
        try:
            generated, gen_mask = generate_events(model, settings, val_x, cfg.seed, events.train.shape[1:])
        finally:
            model.train(training)
        generated = data_units(feature_map, generated, gen_mask, events.kinematics)
        return measure(generated, gen_mask, reference, ref_mask)

    value.label = f"validation {metric}"  # the pruner's messages: "validation kl_sum 0.0123"
    value.metric = metric
    return value


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


def pruning(link: TrialLink | None = None, objective: Callable[[], Callable[[], float] | None] | None = None
            ) -> Pruning | None:
    """The training callback of this job's trial (``link``, else the environment's): :class:`Pruning`; None
    outside a search and with pruner ``none`` (nothing would read what it reports).

    With ``report=objective`` it reports the value of the measure that ``objective()`` makes
    (:func:`validation_objective`; made only here, so an ordinary run never generates a thing), else the validation
    loss of the epoch's history row. Pruning never fails the run: a measure that cannot be made or a study that
    cannot be opened is a warning, and the training goes unreported."""
    link = link if link is not None else from_environment()
    if link is None or link.pruner.get("name") == "none":
        return None
    report = link.pruner.get("report", REPORTED)
    measure = None
    if report == "objective":
        try:
            measure = objective() if objective is not None else None
        except Exception as err:  # noqa: BLE001 - a ConfigError the sweeper refuses first; the run goes on
            warn_unreported(link, "make the objective to report", err)
            return None
    try:
        study, trial = open_trial(link)
    except Exception as err:  # noqa: BLE001 - the storage's errors come in many types; the run goes on
        warn_unreported(link, "open the study", err)
        return None
    return Pruning(link, study, trial, report, measure)


class Pruning(Callback):
    """A search trial's pruner as a training callback (:func:`pruning` makes it): after each epoch that has another
    after it, it reports (step = the epoch) the validation loss of the epoch's row or the objective's value to the
    trial, and returns the message that ends training when the pruner prunes the trial. The first error with the
    storage is a warning, and the rest of the training goes unreported."""

    def __init__(self, link: TrialLink, study, trial, report: str, measure: Callable[[], float] | None) -> None:
        self.link, self.study, self.trial, self.report, self.measure = link, study, trial, report, measure
        self.label = REPORTED if report == REPORTED else getattr(measure, "label", report)  # what messages call it
        self.working, self.missing = True, False

    def should_prune(self, row: dict) -> str | None:
        if not self.working:
            return None
        value = self._value(row)
        if value is None:
            if not self.missing:
                self.missing = True
                log.warning("search: trial %d has no %s to report (train.val_fraction is 0): it is not pruned",
                            self.link.number, self.label)
            return None
        try:
            epoch = int(row["epoch"])
            self.trial.report(float(value), epoch)
            if not self.trial.should_prune():
                return None
            return prune_message(self.study, self.link, epoch, self.label)
        except Exception as err:  # noqa: BLE001 - as above: a warning, never the run's outcome
            self.working = False
            warn_unreported(self.link, "report to the trial", err)
            return None

    def _value(self, row: dict) -> float | None:
        if self.report == REPORTED or self.measure is None:
            return row.get(REPORTED) if self.report == REPORTED else None
        selected = f"val_{getattr(self.measure, 'metric', None)}"
        if selected in row:  # train.select_by measured it already after this epoch, on the same weights and noise
            return row[selected]
        try:
            return self.measure()
        except ValueError as err:  # generated events the metric refuses (non-finite): the run's scoring would too
            log.warning("search: trial %d reports %s inf after epoch %s: %s", self.link.number, self.label,
                        row.get("epoch"), err)
            return math.inf
