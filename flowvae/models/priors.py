"""The prior p(z) that a VAE's KL term is measured against and that generation draws latents from.

* ``standard``: N(0, I), the VAE's classic prior (every number of flowvae before priors existed).
* a flow prior: z = f(ε), ε ~ N(0, I), with an exact density by the change of variables

      log p(z) = log N(g(z); 0, I) + log|det ∂g/∂z|,   g = f⁻¹,

  written in the normalizing direction g (data → noise), as a flow fitted by maximum likelihood is. Families:

  - ``planar`` — the user's own prior flows (ConVAE+NF, Orzari et al. 2023): K planar layers
    g_k(z) = z + û_k tanh(w_kᵀz + b_k) (Rezende & Mohamed 2015) with û reparametrised so that w_kᵀû_k ≥ −1 and
    each layer is invertible. The inverse has no closed form; it is exact to the dtype's precision: with
    a = wᵀz, wᵀy = a + wᵀû tanh(a + b) is monotone in a and a lies within |wᵀû| of wᵀy, so bisection in float64
    finds it to the last bit of float32, and z = y − û tanh(a + b).
  - ``nsf`` and ``maf`` — zuko's neural spline flow (Durkan et al. 2019) and masked autoregressive flow
    (Papamakarios et al. 2017): exact densities, and exact sampling through their inverses.

A prior's ``log_prob(z)`` is (B,) for z (B, D); ``sample(n, generator)`` draws ε from ``generator`` and maps it,
(n, D), so a seeded generator gives the same latents. The model holds its prior as ``model.prior``: a learned
one (``prior=flow``) trains with the ELBO, a two-stage one (``prior=two_stage``) is fitted to the training
events' latent codes after training (:mod:`flowvae.training.prior_fit`) and replaces the standard one for
generation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Prior", "StandardNormal", "PlanarPrior", "ZukoPrior", "PRIORS", "FAMILIES", "build_prior"]

LOG_2PI = math.log(2 * math.pi)
# prior.name: what generation draws z from (conf/prior/<name>.yaml)
PRIORS = {"standard": "N(0, I)", "flow": "a flow prior learned jointly with the ELBO",
          "two_stage": "a flow fitted to the training events' latent codes after training"}
# prior.family: the flow of a flow prior
FAMILIES = ("planar", "nsf", "maf")
BISECTION_STEPS = 80  # float64 bisection: the bracket (width ≤ 2|wᵀû|) shrinks below the last bit of float32


def standard_log_prob(z: Tensor) -> Tensor:
    """log N(z; 0, I) summed over the last dimension: (B,)."""
    return -0.5 * (z.pow(2) + LOG_2PI).sum(-1)


class Prior(nn.Module):
    """p(z) over ``dim`` latent dimensions: :meth:`log_prob` and :meth:`sample`."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def log_prob(self, z: Tensor) -> Tensor:
        raise NotImplementedError

    def sample(self, n: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
               ) -> Tensor:
        raise NotImplementedError

    def noise(self, n: int, generator: torch.Generator | None, device=None) -> Tensor:
        """ε ~ N(0, I), (n, D), from ``generator`` (float32, as generation always drew it) in the prior's dtype, on
        ``device`` or the prior's: the draw every prior starts from."""
        parameter = next(self.parameters(), None)
        if device is None and parameter is not None:
            device = parameter.device
        eps = torch.randn(n, self.dim, generator=generator, device=device)
        return eps if parameter is None else eps.to(parameter.dtype)


class StandardNormal(Prior):
    """N(0, I): the draw is the latent."""

    def log_prob(self, z: Tensor) -> Tensor:
        return standard_log_prob(z)

    def sample(self, n, generator=None, device=None):
        return self.noise(n, generator, device)


class PlanarPrior(Prior):
    """K planar layers in the normalizing direction, g = g_K ∘ … ∘ g_1, g_k(z) = z + û_k tanh(w_kᵀz + b_k).

    log|det ∂g_k/∂z| = log|1 + û_kᵀw_k (1 − tanh²(w_kᵀz + b_k))|, > 0 inside the log since w_kᵀû_k ≥ −1.
    """

    def __init__(self, dim: int, n_layers: int):
        super().__init__(dim)
        self.u = nn.Parameter(torch.randn(n_layers, dim) * 0.01)
        self.w = nn.Parameter(torch.randn(n_layers, dim) * 0.01)
        self.b = nn.Parameter(torch.zeros(n_layers))

    def _u_hat(self) -> Tensor:
        """û = u + (m(wᵀu) − wᵀu) w / |w|², m(a) = −1 + softplus(a): wᵀû = m(wᵀu) > −1 (Rezende & Mohamed)."""
        wu = (self.w * self.u).sum(-1, keepdim=True)
        return self.u + (F.softplus(wu) - 1 - wu) * self.w / self.w.pow(2).sum(-1, keepdim=True).clamp_min(1e-12)

    def normalize(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """g(z) and log|det ∂g/∂z|: (B, D), (B,)."""
        u_hat, log_det = self._u_hat(), z.new_zeros(z.shape[0])
        for u, w, b in zip(u_hat, self.w, self.b, strict=True):
            t = torch.tanh(z @ w + b)
            log_det = log_det + torch.log((1 + (u @ w) * (1 - t.pow(2))).abs())
            z = z + t[:, None] * u
        return z, log_det

    def log_prob(self, z: Tensor) -> Tensor:
        eps, log_det = self.normalize(z)
        return standard_log_prob(eps) + log_det

    @torch.no_grad()
    def invert(self, y: Tensor) -> Tensor:
        """g⁻¹(y), layer by layer from the last, each by bisection on a = wᵀz in float64 (see the module)."""
        u_hat = self._u_hat().double()
        w, b = self.w.double(), self.b.double()
        z = y.double()
        for k in reversed(range(len(w))):
            c, target = u_hat[k] @ w[k], z @ w[k]
            low, high = target - c.abs(), target + c.abs()
            for _ in range(BISECTION_STEPS):
                mid = 0.5 * (low + high)
                above = mid + c * torch.tanh(mid + b[k]) > target
                high, low = torch.where(above, mid, high), torch.where(above, low, mid)
            a = 0.5 * (low + high)
            z = z - torch.tanh(a + b[k])[:, None] * u_hat[k]
        return z.to(y.dtype)

    def sample(self, n, generator=None, device=None):
        return self.invert(self.noise(n, generator, device))


class ZukoPrior(Prior):
    """A zuko flow without context (``nsf`` or ``maf``): its distribution's transform maps z to the noise."""

    def __init__(self, dim: int, family: str, n_layers: int, hidden: list[int], bins: int = 8):
        super().__init__(dim)
        import zuko

        options = {"transforms": n_layers, "hidden_features": list(hidden)}
        if family == "nsf":
            self.flow = zuko.flows.NSF(features=dim, bins=bins, **options)
        else:
            self.flow = zuko.flows.MAF(features=dim, **options)

    def log_prob(self, z: Tensor) -> Tensor:
        return self.flow().log_prob(z)

    @torch.no_grad()
    def sample(self, n, generator=None, device=None):
        return self.flow().transform.inv(self.noise(n, generator, device))


def build_prior(dim: int, cfg_prior=None) -> Prior:
    """The prior of the ``prior.*`` config for ``dim`` latent dimensions: N(0, I) for ``standard`` (and for
    ``two_stage``, whose flow is fitted after training), else the family of ``prior.family``."""
    name = "standard" if cfg_prior is None else cfg_prior.get("name", "standard")
    if name not in PRIORS:
        raise ValueError(f"unknown prior {name!r}: one of {', '.join(PRIORS)}")
    if name != "flow":
        return StandardNormal(dim)
    return build_flow_prior(dim, cfg_prior)


def build_flow_prior(dim: int, cfg_prior) -> Prior:
    """The flow of ``prior.family`` with ``prior.n_layers`` layers (``prior.hidden``, ``prior.bins`` for zuko's)."""
    family = cfg_prior.get("family", "nsf")
    if family not in FAMILIES:
        raise ValueError(f"unknown prior family {family!r}: one of {', '.join(FAMILIES)}")
    if family == "planar":
        return PlanarPrior(dim, int(cfg_prior.n_layers))
    return ZukoPrior(dim, family, int(cfg_prior.n_layers), list(cfg_prior.hidden), int(cfg_prior.get("bins", 8)))
