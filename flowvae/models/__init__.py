"""The VAE family: one module per architecture, chosen by ``model.name`` (the ``model=`` config group).

* ``default`` (:mod:`flowvae.models.vae`): MLP encoder and decoder, p(x|z) a Gaussian per element (independent
  given z), a categorical over the multiplicity for masked events.
* ``conditional_flow`` (:mod:`flowvae.models.conditional_flow`): the default's Gaussian pushed through spline (or
  affine) coupling layers conditioned on z and the mask, so a jet's particles are correlated given z.

Every architecture shares the encoder, the posterior flows (``flow=``, ``n_flows``) and the loss.
"""

from __future__ import annotations

from flowvae.models.priors import build_prior
from flowvae.models.vae import MSE_SIGMA, FlowVAE, LossTerms

__all__ = ["FlowVAE", "LossTerms", "MSE_SIGMA", "MODELS", "build_model"]

# model.name -> what it is, for errors and --help; the one list of architectures.
MODELS = {
    "default": "Gaussian per element given z (independent particles)",
    "conditional_flow": "Gaussian pushed through coupling layers conditioned on z (correlated particles)",
}


def build_model(n_in: int, cfg_model, cfg_flow, n_flows: int, n_mask: int = 0, n_features: int | None = None,
                cfg_prior=None) -> FlowVAE:
    """The VAE of the ``model.*`` config with the flow stack of ``flow.*`` and ``n_flows``; ``n_mask`` = P for
    events with a particle mask; ``n_features`` = F (events of F × P values, n_in = F·P), which
    ``conditional_flow`` needs to lay an event out; ``cfg_prior`` (``prior.*``) a learned flow prior for
    ``prior=flow``, built after the rest of the model (N(0, I) otherwise: a two-stage prior is fitted after
    training)."""
    options = {k: v for k, v in cfg_flow.items() if k != "name" and v is not None}
    name = cfg_model.get("name", "default")
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: one of {', '.join(MODELS)}")
    coupling = {}
    if name == "conditional_flow":
        hidden = cfg_model.get("coupling_hidden")
        coupling = {"coupling_layers": cfg_model.coupling_layers, "n_features": n_features,
                    "coupling_hidden": list(hidden) if hidden is not None else None,
                    "coupling_transform": cfg_model.coupling_transform, "coupling_bins": cfg_model.coupling_bins}
    model = FlowVAE(n_in, list(cfg_model.hidden), cfg_model.latent_dim, cfg_flow.name, n_flows, options,
                    cfg_model.likelihood, cfg_model.sigma_x, n_mask, **coupling)
    if cfg_prior is not None and cfg_prior.get("name", "standard") == "flow":
        model.prior = build_prior(cfg_model.latent_dim, cfg_prior)  # its weights drawn last
    return model
