"""A run's prior after training: the two-stage fit (``prior=two_stage``, ``flowvae fit-prior``), the file that
carries it, and the latent's picture and gap, for every prior.

The codes a two-stage prior is fitted to are one posterior draw z_K ~ q_K(z|x) per training event (its
validation events excluded when the run held some out), drawn from their own generator; the prior's initial
weights come from torch's stream seeded by the run's seed: the same run fits the same prior, bit for bit.
``latent_gap`` compares one posterior draw per held-out event with as many draws of the prior that generates
(:mod:`flowvae.metrics.latent`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from flowvae.files import replaced
from flowvae.metrics.latent import latent_gap, latent_gap_floor
from flowvae.models import FlowVAE
from flowvae.models.priors import Prior, build_flow_prior
from flowvae.progress import phase
from flowvae.training.prior_fit import PriorFit, fit_prior

__all__ = ["posterior_codes", "fit_two_stage", "run_prior", "save_prior", "load_prior", "latent_columns",
           "PRIOR_SEED_OFFSET"]

log = logging.getLogger(__name__)

PRIOR_SEED_OFFSET = 7  # the codes' generator and the prior's initial weights: seed + this (training uses 0-3)
CODE_BLOCK = 5000


def posterior_codes(model: FlowVAE, x: torch.Tensor, seed: int) -> torch.Tensor:
    """One posterior draw z_K per event of ``x`` (the model's input), (N, D) on the CPU, from a generator of its own."""
    generator = torch.Generator(device=x.device).manual_seed(seed)
    model.eval()
    with torch.no_grad():
        return torch.cat([model.posterior_latent(x[i:i + CODE_BLOCK], generator).cpu()
                          for i in range(0, len(x), CODE_BLOCK)])


def fit_two_stage(model: FlowVAE, train_x: torch.Tensor, cfg_prior: DictConfig, seed: int) -> tuple[Prior, PriorFit]:
    """The two-stage prior of ``prior.*`` fitted to ``train_x``'s codes; the model keeps its own prior."""
    codes = posterior_codes(model, train_x, seed + PRIOR_SEED_OFFSET)
    torch.manual_seed(seed + PRIOR_SEED_OFFSET)
    prior = build_flow_prior(model.latent_dim, cfg_prior)
    with phase(f"fitting a {cfg_prior.family} prior ({cfg_prior.n_layers} layers) to {len(codes)} latent codes",
               logger=log):
        fit = fit_prior(prior, codes, epochs=cfg_prior.epochs, lr=cfg_prior.lr, batch_size=cfg_prior.batch_size,
                        val_fraction=cfg_prior.val_fraction, patience=cfg_prior.patience, seed=seed)
    log.info("two-stage prior: best epoch %d of %d, validation nll %.4f", fit.best_epoch, len(fit.history),
             fit.best_val_nll)
    return prior, fit


def run_prior(model: FlowVAE, train_x: torch.Tensor, cfg: DictConfig, path: Path) -> Prior:
    """The run's two-stage prior (``prior=two_stage``): the one in ``path`` when it holds this config's fit (a rerun
    after a kill, or a finished run scored again), else fitted now and written there."""
    settings = OmegaConf.to_container(cfg.prior, resolve=True)
    if path.exists():
        prior, record = load_prior(path, train_x.device)
        if record["config"] == settings:
            log.info("two-stage prior from %s (best epoch %d)", path, record["best_epoch"])
            return prior
    prior, fit = fit_two_stage(model, train_x, cfg.prior, cfg.seed)
    save_prior(path, prior, cfg.prior, fit)
    return prior


def save_prior(path: Path, prior: Prior, cfg_prior: DictConfig, fit: PriorFit) -> None:
    """The prior's weights, the settings that rebuild it and its fit, written atomically."""
    record = {"config": OmegaConf.to_container(cfg_prior, resolve=True), "state": prior.state_dict(),
              "history": fit.history, "best_epoch": fit.best_epoch, "dim": prior.dim}
    with replaced(path) as tmp:
        torch.save(record, tmp)


def load_prior(path: Path, device: torch.device | str = "cpu") -> tuple[Prior, dict]:
    """The prior :func:`save_prior` wrote, on ``device``, in eval mode, and its record (config, history)."""
    record = torch.load(path, map_location=device, weights_only=False)
    prior = build_flow_prior(record["dim"], OmegaConf.create(record["config"])).to(device)
    prior.load_state_dict(record["state"])
    prior.eval()
    return prior, record


def latent_columns(model: FlowVAE, test_x: torch.Tensor, seed: int, plot: Path | None = None,
                   title: str = "") -> dict:
    """``latent_gap`` and ``latent_gap_floor`` of the model's generating prior against the held-out events'
    codes (``test_x``, the model's input); with ``plot`` its picture per latent dimension."""
    codes = posterior_codes(model, test_x, seed + PRIOR_SEED_OFFSET + 1).numpy().astype(np.float64)
    generator = torch.Generator(device=test_x.device).manual_seed(seed + PRIOR_SEED_OFFSET + 2)
    with torch.no_grad():
        samples = model.prior.sample(len(codes), generator, test_x.device).cpu().numpy().astype(np.float64)
    columns = {"latent_gap": latent_gap(codes, samples), "latent_gap_floor": latent_gap_floor(codes, seed)}
    if plot is not None:
        from flowvae.results.plots import plot_latent

        plot_latent(codes, samples, plot, columns["latent_gap"], columns["latent_gap_floor"], title)
    return columns
