"""The experiment behind one run: events to tensors, the flow VAE, training, generation, scoring, outputs.

Seeds: ``data.seed`` makes the events; ``seed`` seeds torch before the model is built (base network first,
flows last), the batch order, and generation (its own generator), so one config gives one set of numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from flowvae import progress, pruning, stopping
from flowvae.config import ConfigError
from flowvae.cores import choose_threads
from flowvae.data import Events, file_array, order_particles
from flowvae.files import RunFiles, replaced
from flowvae.identity import train_hash
from flowvae.models import FlowVAE, build_model
from flowvae.train import CheckpointMismatch, check_checkpoint, fit, split_validation
from flowvae.transforms import FeatureMap

__all__ = ["metric_columns", "event_metric_columns", "preflight", "train_and_score", "generate_blocks", "data_units",
           "generate_events", "generate_for_scoring", "choose_device", "configure_torch", "model_input", "seeded_model",
           "model_tensors", "write_curves", "checkpoint_key"]

log = logging.getLogger(__name__)

GENERATE_BATCH = 2000


def metric_columns(n_features: int, kinematics: bool = False, mask: bool = False, protocol: str = "scaled"
                   ) -> list[str]:
    """The result row's metric columns for events of ``n_features`` features, with jet kinematics and a
    particle mask or not, under metric ``protocol`` (``eval.protocol``), in their order."""
    from flowvae.score import row_columns

    return [*row_columns(n_features, kinematics, mask, protocol=protocol), "final_train_loss", "final_test_loss",
            "final_recon", "final_kl_term", "epochs_run", "resumed_from", "epochs_trained", "best_epoch"]


def event_metric_columns(events: Events, protocol: str) -> list[str]:
    """The metric columns of a row scored on ``events`` under metric ``protocol`` (``cfg.eval.protocol``; the
    events' features, kinematics and mask decide the rest). A protocol the events cannot be scored by (jetnet's
    needs jet kinematics) is a :class:`ConfigError`."""
    try:
        return metric_columns(events.n_features, events.kinematics is not None, events.train_mask is not None,
                              protocol)
    except ValueError as err:
        raise ConfigError("eval.protocol", protocol, f"{err}; use eval.protocol=scaled for these data") from None


def choose_device(name: str) -> torch.device:
    """``train.device`` as a torch device; ``cuda`` without a CUDA device is a :class:`ConfigError`."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device", name, "cpu or auto: torch sees no CUDA device here (a CPU build of "
                                                "torch, or no GPU visible to this process)")
    return torch.device(name)


def checkpoint_key(cfg: DictConfig) -> dict:
    """What a checkpoint records of its run: the hash of what trains the model (not of how it is scored)."""
    return {"train_hash": train_hash(cfg)}


def preflight(cfg: DictConfig, files: RunFiles) -> None:
    """The checks that need torch but no training: the device, and a checkpoint in the run directory that
    belongs to another config. Raises :class:`ConfigError`, so the run is refused before any work."""
    choose_device(cfg.train.device)
    try:
        check_checkpoint(files.checkpoint, checkpoint_key(cfg))
    except CheckpointMismatch as err:
        raise ConfigError("hydra.run.dir", str(files.root), str(err)) from None


def configure_torch(threads: int) -> None:
    """Threads, deterministic kernels, and subnormal floats flushed to zero, before any tensor work.

    Flushing matters: once the unused latent path's gradients and Adam moments decay below 1e-38 (posterior
    collapse, from about epoch 8 of the default run) every operation on them takes a slow microcode path on x86,
    and a training step became twice as slow. Flushed, they are zero, which changes no result beyond rounding.
    It is set before the thread pool exists, because threads inherit the floating-point mode of their creator.
    """
    torch.set_flush_denormal(True)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)


def train_and_score(cfg: DictConfig, events: Events, files: RunFiles, parallel_jobs: int = 1,
                    feature_map: FeatureMap | None = None,
                    on_epoch: Callable[[list[dict]], None] | None = None) -> tuple[str, str, dict]:
    """Train, generate, score; write the run's curves, checkpoint and histogram picture. ``on_epoch`` gets the
    training history after every epoch, after the curves file is written (the experiment tracker).

    Returns (status, message, values for the result row). A stop request ends training at a step boundary
    (status ``interrupted``) and any later phase by :class:`flowvae.stopping.Interrupted`; in a search's trial
    the pruner may end it after an epoch (status ``pruned``, nothing scored: :mod:`flowvae.pruning`).
    """
    device = choose_device(cfg.train.device)
    threads = choose_threads(cfg.train.threads, parallel_jobs)
    configure_torch(threads)
    log.info("device %s, %d threads, %s x %d flows, seed %d", device, threads, cfg.flow.name, cfg.n_flows,
             cfg.seed)

    if feature_map is None:
        feature_map = fit_feature_map(cfg, events)
    train_x, val_x, test_x = model_tensors(cfg, events, feature_map, device)
    model = seeded_model(cfg, events, device)
    outcome = fit(model, train_x, test_x, cfg.train, seed=cfg.seed, checkpoint=files.checkpoint,
                  extra_state=checkpoint_key(cfg),
                  on_epoch=lambda history: _epoch_done(files, history, on_epoch), should_stop=stopping.requested,
                  val_x=val_x, best=files.best, prune=pruning.hook(
                      objective=lambda: pruning.validation_objective(cfg, model, val_x, events, feature_map)))
    if outcome.epochs_run == 0 and outcome.history and on_epoch is not None:
        on_epoch(outcome.history)  # trained before this process (a stacked group): the tracker logs it now
    if outcome.status == "interrupted":
        return outcome.status, outcome.message, {}
    values: dict = {"epochs_run": outcome.epochs_run, "resumed_from": outcome.resumed_from,
                    "epochs_trained": outcome.epochs_trained,
                    # the epoch whose weights are scored: the best by validation loss, else the last
                    "best_epoch": outcome.epochs_trained if outcome.best_epoch is None else outcome.best_epoch}
    if outcome.status in ("diverged", "pruned"):
        return outcome.status, outcome.message, values

    stopping.check("after training, before generating (training is saved: the rerun only scores)")
    with progress.settings(mode=cfg.train.progress):  # each phase from here on says what it does
        generated, gen_mask = generate_for_scoring(model, cfg.eval, test_x, cfg.seed, feature_map, events)
        stopping.check("while generating (training is saved: the rerun only scores)")
        values.update(score_events(cfg, events, generated, gen_mask))
        values.update(final_losses(outcome.history))
        with progress.phase(f"writing {files.histograms.name} and {files.sample.name}", logger=log):
            _write_outputs(cfg, events, generated, gen_mask, values, files)
    return "ok", "", values


def _write_outputs(cfg: DictConfig, events: Events, generated: np.ndarray, gen_mask: np.ndarray | None,
                   values: dict, files: RunFiles) -> None:
    """The run's histogram picture and its first 1000 generated events (``generated_sample.npy``)."""
    from flowvae.report import plot_histograms

    plot_histograms(generated, events.test, events.feature_names, values, files.histograms,
                    title=f"{cfg.flow.name}, n_flows={cfg.n_flows}, seed={cfg.seed}: kl_sum={values['kl_sum']:.4f}",
                    bins=cfg.eval.bins, gen_mask=gen_mask, ref_mask=events.test_mask)
    sample = file_array(generated[:1000], None if gen_mask is None else gen_mask[:1000].astype(generated.dtype),
                        cfg.data.get("mask_feature"), cfg.data.get("layout") or "features_first")
    with replaced(files.sample) as tmp:  # in the data's own units and layout, the mask where the file has it
        np.save(tmp, sample)


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
                       events.n_features).to(device)


def data_units(feature_map: FeatureMap, values: np.ndarray, mask: np.ndarray | None,
               kinematics: tuple[int, int, int] | None) -> np.ndarray:
    """Generated events from model space to what a data file holds: the feature map's inverse, then (with jet
    kinematics) each jet's particles ordered by pT, largest first, as in the data (:func:`order_particles`)."""
    events = feature_map.inverse(values, mask)
    return events if kinematics is None else order_particles(events, mask, kinematics[2])


def final_losses(history: list[dict]) -> dict:
    """The row's ``final_*`` columns: the last epoch's losses of a training history (blank without one)."""
    last = history[-1] if history else {}
    return {"final_train_loss": last.get("train_loss", ""), "final_test_loss": last.get("test_loss", ""),
            "final_recon": last.get("test_recon", ""), "final_kl_term": last.get("test_kl", "")}


def fit_feature_map(cfg: DictConfig, events: Events) -> FeatureMap:
    """The run's per-feature transforms and scaler, fitted on its training events (numpy only: a value outside
    a transform's domain is a ConfigError before any training)."""
    return FeatureMap.fit(events.train, events.train_mask, events.transforms, cfg.data.standardize,
                          events.feature_names)


def score_events(cfg: DictConfig, events: Events, generated: np.ndarray, gen_mask: np.ndarray | None) -> dict:
    """The row's metrics of generated against held-out events (:func:`flowvae.score.score_row`) under
    ``cfg.eval.protocol``; jetnet's floors are the truth row, the held-out events against the run's training
    events (a disjoint real set of the same kind, in the same units)."""
    from threadpoolctl import threadpool_limits

    from flowvae.metrics.protocol import PROTOCOLS
    from flowvae.score import score_row

    protocol = cfg.eval.protocol
    event_metric_columns(events, protocol)  # a protocol these events cannot have: a ConfigError before the work
    truth = (events.train, events.train_mask) if PROTOCOLS[protocol].floor == "truth" else None
    # numpy's BLAS takes every core by default: beside a sweep's other jobs that made scoring 10x slower
    with threadpool_limits(limits=torch.get_num_threads()):
        return score_row(generated, gen_mask, events.test, events.test_mask, events.kinematics,
                         bins=cfg.eval.bins, eps=cfg.eval.eps, seed=cfg.seed, protocol=protocol, truth=truth)


def _epoch_done(files: RunFiles, history: list[dict], then: Callable[[list[dict]], None] | None) -> None:
    """After every epoch: the curves file, then ``then`` (the run's experiment tracker)."""
    write_curves(files.curves, history)
    if then is not None:
        then(history)


def write_curves(path: Path, history: list[dict]) -> None:
    """The per-epoch losses so far, rewritten whole (temp file + rename) after every epoch."""
    import pandas as pd

    with replaced(path) as tmp:
        pd.DataFrame(history).to_csv(tmp, index=False)


def model_input(events: np.ndarray, device: torch.device | str = "cpu", mask: np.ndarray | None = None
                ) -> torch.Tensor:
    """Events (N, F, P) as the flattened (N, F·P) tensor the model takes, on ``device``; with a mask (N, P),
    the mask follows the values: (N, F·P + P)."""
    flat = events.reshape(len(events), -1)
    if mask is not None:
        flat = np.concatenate([flat, mask.astype(flat.dtype)], axis=1)
    return torch.from_numpy(np.ascontiguousarray(flat)).to(device)


def generate_blocks(model: FlowVAE, n: int, source: str, decode: str, test_x: torch.Tensor, seed: int,
                    event_shape: tuple[int, int], block: int | None = None
                    ) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """N events in model space from the prior (``source="prior"``) or the posterior of held-out events
    ``test_x`` (cycled), block by block: (values (b, F, P) float32, mask (b, P) bool or None).

    One generator seeded ``seed + 1`` on the device, so generation never shifts the training's random stream;
    per block of ``block`` (default :data:`GENERATE_BATCH`, read at call time) events it draws the latents,
    then the decoder's sample noise, then the multiplicity. The block size is part of the stream.
    """
    block = GENERATE_BATCH if block is None else block
    if source == "posterior" and n > len(test_x):
        # not wrong, but it bounds what the events can show: the user should know their number is not N
        log.warning("posterior generation: %d events from %d held-out events, each encoded about %.3g times (event i "
                    "from held-out event i mod %d): they are draws from %d posteriors, not %d independent events",
                    n, len(test_x), n / len(test_x), len(test_x), len(test_x), n)
    model.eval()
    device = test_x.device
    generator = torch.Generator(device=device).manual_seed(seed + 1)
    with torch.no_grad():
        for start in range(0, n, block):
            size = min(block, n - start)
            if source == "prior":
                z = torch.randn(size, model.latent_dim, generator=generator, device=device)
            else:
                index = torch.arange(start, start + size, device=device) % len(test_x)
                z = model.posterior_latent(test_x[index], generator)
            flat = model.generate(z, decode, generator).cpu().numpy()
            mask = flat[:, model.n_in:] > 0.5 if model.n_mask else None
            yield flat[:, :model.n_in].reshape(size, *event_shape), mask


def generate_events(model: FlowVAE, cfg_eval: DictConfig, test_x: torch.Tensor, seed: int,
                    event_shape: tuple[int, int], on_block: Callable[[int], None] | None = None
                    ) -> tuple[np.ndarray, np.ndarray | None]:
    """``eval.n_samples`` events (N, F, P) in model space and their mask (N, P) bool or None, all at once
    (:func:`generate_blocks` concatenated); ``on_block`` gets each block's event count once it is generated."""
    blocks = []
    for block in generate_blocks(model, cfg_eval.n_samples, cfg_eval.source, cfg_eval.decode, test_x, seed,
                                 event_shape):
        blocks.append(block)
        if on_block is not None:
            on_block(len(block[0]))
    values = np.concatenate([values for values, _ in blocks])
    mask = None if blocks[0][1] is None else np.concatenate([mask for _, mask in blocks])
    return values, mask


def generate_for_scoring(model: FlowVAE, cfg_eval: DictConfig, test_x: torch.Tensor, seed: int,
                         feature_map: FeatureMap, events: Events) -> tuple[np.ndarray, np.ndarray | None]:
    """What a run scores: ``eval.n_samples`` events (:func:`generate_events`) in the data's units
    (:func:`data_units`) and their mask, as a phase that says how many are done (:mod:`flowvae.progress`)."""
    n = cfg_eval.n_samples
    with progress.phase(f"generating {n} events ({cfg_eval.source}, {cfg_eval.decode})", n, "events",
                        logger=log) as step:
        generated, gen_mask = generate_events(model, cfg_eval, test_x, seed, events.test.shape[1:], step.advance)
        return data_units(feature_map, generated, gen_mask, events.kinematics), gen_mask
