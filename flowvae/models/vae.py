"""The flow VAE: an MLP encoder gives q0(z0|x) and the flows' per-sample parameters, K flows map z0 to z_K,
an MLP decoder gives p(x|z_K).

Loss (the slides', after Rezende & Mohamed 2015), per event, averaged over the batch:

    L = -log p(x|z_K) + beta * [log q0(z0|x) - log p(z_K) - sum_k log|det df_k/dz_{k-1}|],  z0 ~ q0(z0|x)

The bracket is a one-sample estimate of KL(q_K(z_K|x) || p(z)); ``beta`` is the KL warm-up weight.

Events with a particle mask (jets with fewer particles than slots, padded slots last): the model's input is the
flattened event followed by its mask (P values of 0/1), the encoder sees both, and the decoder also gives
logits of a categorical over the multiplicity n = 0 … P. Then

    -log p(x|z_K) = -sum over real particles of log N(x; mean, var) - log Cat(n; softmax(logits)),

padded particles enter no term, and a generated event has n ~ Cat(softmax(logits)) real particles (the first n
slots), n ≥ 1: a jet has at least one particle.

With ``coupling_layers`` > 0 (the ``conditional_flow`` model) the Gaussian is the base of a coupling flow
conditioned on z and the mask (:class:`flowvae.models.conditional_flow.CouplingFlow`), and log N(x; mean, var) above
becomes log N(g⁻¹(x); mean, var) + log|det ∂g⁻¹/∂x|, over the real particles' values: their exact density given z
and n, now with the particles correlated given z.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowvae import flows
from flowvae.models.conditional_flow import CouplingFlow
from flowvae.models.priors import Prior, StandardNormal

__all__ = ["FlowVAE", "LossTerms", "MSE_SIGMA"]

LOG_2PI = math.log(2 * math.pi)
# The MSE-sum loss sum (x - mean)^2 is -log N(x; mean, 1/2) up to a constant: its implied noise has variance 1/2.
MSE_SIGMA = math.sqrt(0.5)


@dataclass
class LossTerms:
    """Batch means of the loss and its parts (tensors, so the training step never syncs with the host)."""

    loss: Tensor
    recon: Tensor
    kl: Tensor

    def stacked(self) -> Tensor:
        """The terms as one tensor (3,), in the fields' order: what :data:`flowvae.training.kit.LOSS_TERMS` names."""
        return torch.stack([self.loss, self.recon, self.kl])


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(n_in, n_out), nn.ReLU()]
    return nn.Sequential(*layers)


def _sum(terms: Tensor, weight: Tensor | None) -> Tensor:
    """Sum over the last dimension, of the entries where ``weight`` (0/1) is 1 when given: shape (B,)."""
    return terms.sum(-1) if weight is None else (terms * weight).sum(-1)


def _gaussian_log_prob(x: Tensor, mean: Tensor, log_var: Tensor | float, weight: Tensor | None = None) -> Tensor:
    """log N(x; mean, exp(log_var)) summed over the last dimension (over the entries ``weight`` keeps): (B,)."""
    if isinstance(log_var, float):
        return -0.5 * _sum((x - mean).pow(2) * math.exp(-log_var) + log_var + LOG_2PI, weight)
    return -0.5 * _sum((x - mean).pow(2) * torch.exp(-log_var) + log_var + LOG_2PI, weight)


class FlowVAE(nn.Module):
    """A VAE whose posterior q_K(z_K|x) is q0 = N(mean(x), diag var(x)) pushed through a flow stack.

    Events enter flattened, shape (B, n_in) with n_in = features * particles. ``likelihood`` is ``mse`` (the sum
    of squared errors), or ``gaussian`` with a learned per-element variance (``sigma_x=None``) or a fixed one.
    ``coupling_layers`` > 0 pushes that Gaussian through a coupling flow conditioned on z (and the mask) with
    ``coupling_hidden`` conditioner widths, each moving a value by ``coupling_transform`` (``affine`` or a
    ``spline`` of ``coupling_bins`` bins); it needs ``n_features`` to lay the event out as (F, P). ``prior`` is
    p(z) (:mod:`flowvae.models.priors`), N(0, I) when not given.
    """

    def __init__(self, n_in: int, hidden: list[int], latent_dim: int, flow: str = "none", n_flows: int = 0,
                 flow_options: dict | None = None, likelihood: str = "gaussian", sigma_x: float | None = None,
                 n_mask: int = 0, coupling_layers: int = 0, coupling_hidden: list[int] | None = None,
                 n_features: int | None = None, coupling_transform: str = "affine", coupling_bins: int = 8,
                 prior: Prior | None = None):
        super().__init__()
        self.n_in, self.latent_dim, self.likelihood = n_in, latent_dim, likelihood
        self.n_mask = n_mask  # P when events carry a particle mask (appended to the input), else 0
        self.learned_variance = likelihood == "gaussian" and sigma_x is None
        if likelihood == "mse":
            sigma_x = MSE_SIGMA
        self.fixed_log_var = None if self.learned_variance else 2 * math.log(sigma_x)
        # Base network first, flows last: with K = 0 the flows draw nothing from the RNG, so every flow type
        # starts from the bit-identical plain VAE.
        self.encoder = _mlp([n_in + n_mask, *hidden])
        self.q0_head = nn.Linear(hidden[-1], 2 * latent_dim)
        self.decoder = _mlp([latent_dim, *reversed(hidden)])
        self.decoder_head = nn.Linear(hidden[0], 2 * n_in if self.learned_variance else n_in)
        self.multiplicity_head = nn.Linear(hidden[0], n_mask + 1) if n_mask else None
        self.likelihood_flow = None
        if coupling_layers:
            if not n_features or n_in % n_features:
                raise ValueError(f"a coupling likelihood needs the event's feature count dividing n_in={n_in}, "
                                 f"got n_features={n_features}")
            self.likelihood_flow = CouplingFlow(n_features, n_in // n_features, coupling_layers,
                                                list(coupling_hidden or hidden), latent_dim + n_mask,
                                                coupling_transform, coupling_bins)
        self.flows = flows.build(flow, latent_dim, n_flows, **(flow_options or {}))
        # One matmul gives every flow's amortized parameters at once.
        n_params = self.flows.num_params
        self.flow_head = nn.Linear(hidden[-1], n_params) if n_params > 0 else None
        # p(z), built by the caller after everything above (a learned prior draws its weights last): N(0, I) has
        # no weights, so a standard-prior model's weights, stream and checkpoint are those it always had.
        self.prior = prior if prior is not None else StandardNormal(latent_dim)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """q0's mean and log-variance, each (B, D), and the flows' parameters (B, num_params) or None."""
        h = self.encoder(x)
        mean, log_var = self.q0_head(h).chunk(2, dim=-1)
        params = self.flow_head(h) if self.flow_head is not None else None
        return mean, log_var, params

    def posterior_sample(self, x: Tensor, generator: torch.Generator | None = None, noise: Tensor | None = None
                         ) -> tuple[Tensor, Tensor, Tensor]:
        """z0 ~ q0(z0|x), z_K = flows(z0) and log q0(z0|x) - sum log|det|, i.e. log q_K(z_K|x): each (B, ...).

        The noise comes from ``generator`` when given (generation), else from torch's global stream (training);
        ``noise`` (B, D) is the standard normal draw itself, drawn by the caller (a stack of models trained under
        ``vmap``, each with its own stream: :mod:`flowvae.training.stacked`).
        """
        mean, log_var, params = self.encode(x)
        eps = noise if noise is not None else torch.randn(mean.shape, generator=generator, device=mean.device,
                                                          dtype=mean.dtype)
        z0 = mean + torch.exp(0.5 * log_var) * eps
        log_q0 = -0.5 * (eps.pow(2) + log_var + LOG_2PI).sum(-1)
        if params is None:
            return z0, z0, log_q0
        z_k, log_det = self.flows(z0, params)
        return z0, z_k, log_q0 - log_det

    @torch.no_grad()
    def posterior_latent(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """z_K for events x: one draw of q0(z0|x) (from ``generator``) pushed through the flows, (B, D)."""
        return self.posterior_sample(x, generator)[1]

    def decode(self, z: Tensor) -> tuple[Tensor, Tensor | float]:
        """p(x|z)'s mean (B, n_in) and log-variance (a tensor, or one float when it is fixed)."""
        return self._decode(self.decoder(z))

    def _decode(self, h: Tensor) -> tuple[Tensor, Tensor | float]:
        out = self.decoder_head(h)
        if self.learned_variance:
            mean, log_var = out.chunk(2, dim=-1)
            if self.likelihood_flow is not None:
                # The base of a coupling flow has std <= 1, the data's own (standardized): a spline layer is the
                # identity beyond ±B, so mass a wider base put out there would reach the events unreshaped
                # (measured: one seed in three generated jets with dozens of particles at ptrel ≈ 1).
                log_var = -F.softplus(-log_var)
            return mean, log_var
        return out, self.fixed_log_var

    def split_input(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """The model's input (B, n_in + n_mask) as the flattened event (B, n_in) and its mask (B, P) or None."""
        if not self.n_mask:
            return x, None
        return x[:, :self.n_in], x[:, self.n_in:]

    def loss(self, x: Tensor, beta: float = 1.0, generator: torch.Generator | None = None,
             noise: Tensor | None = None) -> LossTerms:
        """The negative ELBO with a beta-weighted KL term, averaged over the batch.

        z0's noise comes from ``generator`` when given (evaluation), else from the global stream (training), or is
        ``noise`` (B, latent_dim) itself when given (see :meth:`posterior_sample`).
        """
        _, z_k, log_q_k = self.posterior_sample(x, generator, noise)
        h = self.decoder(z_k)
        mean, log_var = self._decode(h)
        values, mask = self.split_input(x)
        weight = None if mask is None else mask.repeat(1, self.n_in // self.n_mask)  # (B, F·P), features first
        log_det = 0.0
        if self.likelihood_flow is not None:  # the base value u = g⁻¹(x) and log|det ∂g⁻¹/∂x|
            values, log_det = self.likelihood_flow.inverse(values, self._context(z_k, mask), weight)
        if self.likelihood == "mse":
            recon = _sum((values - mean).pow(2), weight)
        else:
            recon = -_gaussian_log_prob(values, mean, log_var, weight)
        recon = recon - log_det
        if mask is not None:
            multiplicity = mask.sum(-1).round().long()
            recon = recon + F.cross_entropy(self.multiplicity_head(h), multiplicity, reduction="none")
        kl = log_q_k - self.prior.log_prob(z_k)  # with a flow prior: the same sample's log p(z_K) under the flow
        recon, kl = recon.mean(), kl.mean()
        return LossTerms(recon + beta * kl, recon, kl)

    @torch.no_grad()
    def generate(self, z: Tensor, decode: str, generator: torch.Generator | None = None) -> Tensor:
        """Events (B, n_in) from latents z: the decoder mean, or one sample of p(x|z) (``decode='sample'``).

        With a mask, (B, n_in + P): the multiplicity is drawn from its categorical (its mode when
        ``decode='mean'``), the first n slots are real and the padded ones 0.
        """
        h = self.decoder(z)
        mean, log_var = self._decode(h)
        if decode == "mean":
            events = mean
        else:
            std = torch.exp(0.5 * log_var) if isinstance(log_var, Tensor) else math.exp(0.5 * log_var)
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            events = mean + std * noise
        if not self.n_mask:
            return self._through_flow(events, z, None, None)
        logits = self.multiplicity_head(h)[:, 1:]  # n = 1 … P: a jet has at least one particle
        if decode == "mean":
            multiplicity = logits.argmax(-1) + 1
        else:
            multiplicity = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(-1) + 1
        slots = torch.arange(self.n_mask, device=z.device)
        mask = (slots < multiplicity[:, None]).to(events.dtype)
        weight = mask.repeat(1, self.n_in // self.n_mask)
        return torch.cat([self._through_flow(events * weight, z, mask, weight), mask], dim=-1)

    def _context(self, z: Tensor, mask: Tensor | None) -> Tensor:
        """What the likelihood's coupling layers are conditioned on: z, and the mask when events have one."""
        return z if mask is None else torch.cat([z, mask], dim=-1)

    def _through_flow(self, base: Tensor, z: Tensor, mask: Tensor | None, weight: Tensor | None) -> Tensor:
        """Base values u (B, n_in) as events x = g(u; z, mask); u itself without a likelihood flow."""
        if self.likelihood_flow is None:
            return base
        return self.likelihood_flow(base, self._context(z, mask), weight)[0]
