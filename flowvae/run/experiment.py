"""The experiment behind one run: events to tensors, the flow VAE, training, generation, scoring, outputs.

Seeds: ``data.seed`` makes the events; ``seed`` seeds torch before the model is built (base network first,
flows last), the batch order, and generation (its own generator), so one config gives one set of numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from flowvae import progress, stopping
from flowvae.cores import choose_threads, torch_threads, training_threads
from flowvae.data.events import Events, file_array
from flowvae.data.transforms import FeatureMap
from flowvae.data.units import data_units, model_input
from flowvae.files import RunFiles, replaced
from flowvae.metrics.row import event_metric_columns
from flowvae.models import FlowVAE, build_model
from flowvae.models.sampling import generate_events
from flowvae.run.preflight import checkpoint_key, choose_device, configure_torch, fit_feature_map
from flowvae.run.trial import pruning, validation_objective
from flowvae.run.two_stage import latent_columns, run_prior
from flowvae.training.callbacks import Callback, StopRequests
from flowvae.training.kit import split_validation
from flowvae.training.loop import fit

__all__ = ["train_and_score", "generate_for_scoring", "seeded_model", "model_tensors", "selection", "write_curves",
           "Curves", "Tracker"]

log = logging.getLogger(__name__)


def train_and_score(cfg: DictConfig, events: Events, files: RunFiles, parallel_jobs: int = 1,
                    feature_map: FeatureMap | None = None,
                    on_epoch: Callable[[list[dict]], None] | None = None) -> tuple[str, str, dict]:
    """Train, generate, score; write the run's curves, checkpoint and histogram picture. ``on_epoch`` gets the
    training history after every epoch, after the curves file is written (the experiment tracker; :class:`Tracker`).

    Returns (status, message, values for the result row). A stop request ends training at a step boundary
    (status ``interrupted``) and any later phase by :class:`flowvae.stopping.Interrupted`; in a search's trial
    the pruner may end it after an epoch (status ``pruned``, nothing scored: :mod:`flowvae.search.pruning`).
    """
    device = choose_device(cfg.train.device)
    threads = choose_threads(cfg.train.threads, parallel_jobs)
    configure_torch(threads)
    log.info("device %s, %d threads, %s x %d flows, seed %d", device, threads, cfg.flow.name, cfg.n_flows,
             cfg.seed)
    step_threads = training_threads(cfg.train.threads, threads, cfg.model.name, device.type)
    if step_threads != threads:
        log.info("training on %d thread (model=%s's step is fastest there; generation and scoring use %d; "
                 "train.threads=N sets both)", step_threads, cfg.model.name, threads)

    if feature_map is None:
        feature_map = fit_feature_map(cfg, events)
    train_x, val_x, test_x = model_tensors(cfg, events, feature_map, device)
    model = seeded_model(cfg, events, device)
    callbacks = [Curves(files.curves), Tracker(on_epoch) if on_epoch is not None else None, StopRequests(),
                 pruning(objective=partial(validation_objective, cfg, model, val_x, events, feature_map))]
    with torch_threads(step_threads):
        outcome = fit(model, train_x, test_x, cfg.train, seed=cfg.seed, checkpoint=files.checkpoint,
                      extra_state=checkpoint_key(cfg), val_x=val_x, best=files.best, callbacks=callbacks,
                      select=selection(cfg, model, val_x, events, feature_map))
    if outcome.epochs_run == 0 and outcome.history and on_epoch is not None:
        on_epoch(outcome.history)  # trained before this process (a stacked group): the tracker logs it now
    if outcome.status == "interrupted":
        return outcome.status, outcome.message, {}
    values: dict = {"epochs_run": outcome.epochs_run, "resumed_from": outcome.resumed_from,
                    "epochs_trained": outcome.epochs_trained,
                    # the epoch whose weights are scored: the best by train.select_by, else the last
                    "best_epoch": outcome.epochs_trained if outcome.best_epoch is None else outcome.best_epoch}
    if outcome.status in ("diverged", "pruned"):
        return outcome.status, outcome.message, values

    stopping.check("after training, before generating (training is saved: the rerun only scores)")
    with progress.settings(mode=cfg.train.progress):  # each phase from here on says what it does
        if cfg.prior.name == "two_stage":  # fitted to the training events' codes; generation draws from it
            model.prior = run_prior(model, train_x, cfg, files.prior)
            stopping.check("after fitting the two-stage prior (it is saved: the rerun only scores)")
        generated, gen_mask = generate_for_scoring(model, cfg.eval, test_x, cfg.seed, feature_map, events)
        stopping.check("while generating (training is saved: the rerun only scores)")
        values.update(score_events(cfg, events, generated, gen_mask))
        values.update(final_losses(outcome.history))
        with progress.phase("the latent against the generating prior: latent_gap", logger=log):
            values.update(latent_columns(model, test_x, cfg.seed, files.latent,
                                         title=f"{cfg.flow.name}, n_flows={cfg.n_flows}, prior {cfg.prior.name}"))
        with progress.phase(f"writing {files.histograms.name} and {files.sample.name}", logger=log):
            _write_outputs(cfg, events, generated, gen_mask, values, files)
    return "ok", "", values


def _write_outputs(cfg: DictConfig, events: Events, generated: np.ndarray, gen_mask: np.ndarray | None,
                   values: dict, files: RunFiles) -> None:
    """The run's histogram picture and its first 1000 generated events (``generated_sample.npy``)."""
    from flowvae.results.plots import plot_histograms

    plot_histograms(generated, events.test, events.feature_names, values, files.histograms,
                    title=f"{cfg.flow.name}, n_flows={cfg.n_flows}, seed={cfg.seed}: kl_sum={values['kl_sum']:.4f}",
                    bins=cfg.eval.bins, gen_mask=gen_mask, ref_mask=events.test_mask)
    sample = file_array(generated[:1000], None if gen_mask is None else gen_mask[:1000].astype(generated.dtype),
                        cfg.data.get("mask_feature"), cfg.data.get("layout") or "features_first")
    with replaced(files.sample) as tmp:  # in the data's own units and layout, the mask where the file has it
        np.save(tmp, sample)


def selection(cfg: DictConfig, model: FlowVAE, val_x: torch.Tensor | None, events: Events,
              feature_map: FeatureMap) -> Callable[[], float] | None:
    """What picks the best epoch besides the validation loss: with ``train.select_by`` a per-feature distance, its
    value on the validation events of events generated from the model as it is
    (:func:`~flowvae.run.trial.validation_objective`); None with ``val_loss`` (or without validation events, which
    the config refuses)."""
    select_by = cfg.train.get("select_by", "val_loss")
    if select_by == "val_loss":
        return None
    return validation_objective(cfg, model, val_x, events, feature_map, metric=select_by)


def model_tensors(cfg: DictConfig, events: Events, feature_map: FeatureMap, device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(training, validation or None, held-out) events as the model takes them, on ``device``: the validation
    events split off the training ones by ``data.seed`` (never the scoring set)."""
    train_x = model_input(feature_map.forward(events.train, events.train_mask), device, events.train_mask)
    test_x = model_input(feature_map.forward(events.test, events.test_mask), device, events.test_mask)
    train_x, val_x = split_validation(train_x, cfg.train.val_fraction, cfg.data.seed)
    return train_x, val_x, test_x


def seeded_model(cfg: DictConfig, events: Events, device: torch.device) -> FlowVAE:
    """The run's model on ``device``, initialised from torch's global stream seeded with ``cfg.seed``; training
    draws its noise from that stream next, where building left it."""
    torch.manual_seed(cfg.seed)
    n_mask = events.n_particles if events.train_mask is not None else 0
    return build_model(events.n_features * events.n_particles, cfg.model, cfg.flow, cfg.n_flows, n_mask,
                       events.n_features, cfg.get("prior")).to(device)


def final_losses(history: list[dict]) -> dict:
    """The row's ``final_*`` columns: the last epoch's losses of a training history (blank without one)."""
    last = history[-1] if history else {}
    return {"final_train_loss": last.get("train_loss", ""), "final_test_loss": last.get("test_loss", ""),
            "final_recon": last.get("test_recon", ""), "final_kl_term": last.get("test_kl", "")}


def score_events(cfg: DictConfig, events: Events, generated: np.ndarray, gen_mask: np.ndarray | None) -> dict:
    """The row's metrics of generated against held-out events (:func:`flowvae.metrics.row.score_row`) under
    ``cfg.eval.protocol``; jetnet's floors are the truth row, the held-out events against the run's training
    events (a disjoint real set of the same kind, in the same units)."""
    from threadpoolctl import threadpool_limits

    from flowvae.metrics.protocol import PROTOCOLS
    from flowvae.metrics.row import score_row

    protocol = cfg.eval.protocol
    event_metric_columns(events, protocol)  # a protocol these events cannot have: a ConfigError before the work
    truth = (events.train, events.train_mask) if PROTOCOLS[protocol].floor == "truth" else None
    # numpy's BLAS takes every core by default: beside a sweep's other jobs that made scoring 10x slower
    with threadpool_limits(limits=torch.get_num_threads()):
        return score_row(generated, gen_mask, events.test, events.test_mask, events.kinematics,
                         bins=cfg.eval.bins, eps=cfg.eval.eps, seed=cfg.seed, protocol=protocol, truth=truth)


class Curves(Callback):
    """The run's curves file (:func:`write_curves`) after every epoch."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_epoch_end(self, row: dict, history: list[dict]) -> None:
        write_curves(self.path, history)


class Tracker(Callback):
    """The run's experiment tracker: ``log_epochs`` gets the history so far after every epoch."""

    def __init__(self, log_epochs: Callable[[list[dict]], None]) -> None:
        self.log_epochs = log_epochs

    def on_epoch_end(self, row: dict, history: list[dict]) -> None:
        self.log_epochs(history)


def write_curves(path: Path, history: list[dict]) -> None:
    """The per-epoch losses so far, rewritten whole (temp file + rename) after every epoch."""
    import pandas as pd

    with replaced(path) as tmp:
        pd.DataFrame(history).to_csv(tmp, index=False)


def generate_for_scoring(model: FlowVAE, cfg_eval: DictConfig, test_x: torch.Tensor, seed: int,
                         feature_map: FeatureMap, events: Events) -> tuple[np.ndarray, np.ndarray | None]:
    """What a run scores: ``eval.n_samples`` events (:func:`generate_events`) in the data's units
    (:func:`data_units`) and their mask, as a phase that says how many are done (:mod:`flowvae.progress`)."""
    n = cfg_eval.n_samples
    with progress.phase(f"generating {n} events ({cfg_eval.source}, {cfg_eval.decode})", n, "events",
                        logger=log) as step:
        generated, gen_mask = generate_events(model, cfg_eval, test_x, seed, events.test.shape[1:], step.advance)
        return data_units(feature_map, generated, gen_mask, events.kinematics), gen_mask
