"""The two-stage prior's fit: it learns a non-Gaussian latent, keeps its best epoch, and is reproducible bit for bit."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from flowvae.metrics.latent import latent_gap
from flowvae.models.priors import StandardNormal, build_flow_prior
from flowvae.training.prior_fit import fit_prior


def _codes(n: int = 3000) -> torch.Tensor:
    """A latent that is manifestly not N(0, I): a shifted, narrow first dimension, a bimodal second one."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, generator=g) * 0.4 + 1.0
    b = torch.randn(n, generator=g) * 0.3 + torch.where(torch.rand(n, generator=g) < 0.5, -1.5, 1.5)
    return torch.stack([a, b], dim=1)


def _fit(family: str, seed: int = 0, epochs: int = 30, lr: float = 1e-2):
    torch.manual_seed(seed)
    cfg = OmegaConf.create({"name": "two_stage", "family": family, "n_layers": 4, "hidden": [32, 32], "bins": 8})
    prior = build_flow_prior(2, cfg)
    outcome = fit_prior(prior, _codes(), epochs=epochs, lr=lr, batch_size=256, val_fraction=0.2, patience=8,
                        seed=seed)
    return prior, outcome


def test_the_fitted_prior_closes_the_latent_gap():
    codes = _codes()
    prior, outcome = _fit("nsf")
    with torch.no_grad():
        fitted = prior.sample(len(codes), torch.Generator().manual_seed(1))
    standard = StandardNormal(2).sample(len(codes), torch.Generator().manual_seed(1))
    assert latent_gap(codes, fitted) < latent_gap(codes, standard) / 4
    assert outcome.history[0]["val_nll"] > outcome.best_val_nll


def test_the_prior_keeps_its_best_epochs_weights():
    prior, outcome = _fit("planar", epochs=12)
    codes = _codes()
    order = torch.randperm(len(codes), generator=torch.Generator().manual_seed(0))
    val = codes[order[:600]]
    with torch.no_grad():
        assert -prior.log_prob(val).mean().item() == outcome.best_val_nll or abs(
            -prior.log_prob(val).mean().item() - outcome.best_val_nll) < 1e-5
    assert outcome.best_val_nll == min(row["val_nll"] for row in outcome.history)


def test_the_fit_is_reproducible_bit_for_bit():
    one, _ = _fit("maf", epochs=3)
    two, _ = _fit("maf", epochs=3)
    for a, b in zip(one.state_dict().values(), two.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_a_stop_request_ends_the_fit_at_the_epochs_end(monkeypatch):
    """Ctrl-C or SIGTERM during a two-stage fit: it stops after the epoch, nothing returned (the caller saves
    nothing)."""
    import pytest

    from flowvae import stopping

    monkeypatch.setattr(stopping, "_received", "SIGINT")
    with pytest.raises(stopping.Interrupted, match="SIGINT while fitting the prior"):
        _fit("planar", epochs=3)
