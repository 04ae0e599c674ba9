"""Planar flow (Rezende & Mohamed, "Variational Inference with Normalizing Flows", ICML 2015)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from flowvae.flows.base import Flow, register, tanh_chain

__all__ = ["Planar"]


@register("planar", table_rank=1)
class Planar(Flow):
    r"""Planar flow :math:`f(z) = z + \hat u\, h(w^\top z + b)` with :math:`h = \tanh`.

    Invertibility needs :math:`w^\top \hat u > -1`, obtained from a free u (Rezende & Mohamed, appendix A):

    .. math:: \hat u = r u + \big(m(w^\top u) - w^\top u\big) \frac{w}{\|w\|^2 + \epsilon}, \qquad
              m(x) = -1 + \max\big(\mathrm{softplus}(x), \phi\big), \qquad r = \frac{\|w\|^2}{\|w\|^2 + \epsilon},

    so that :math:`1 + w^\top \hat u = (1 - r) + r \max(\mathrm{softplus}(w^\top u), \phi) > 0`. The guard
    :math:`\epsilon = \sqrt{\text{tiny}}` (1e-19 in float32) leaves r = 1, the paper's formula, for any
    :math:`\|w\|` above ~2e-6 in float32, and turns the flow into the identity at w = 0 instead of dividing by zero.

    The map uses the rounded :math:`\hat u`, whose :math:`w^\top \hat u` is off the formula's by rounding: at most
    :math:`\tfrac12 \phi` with the floor

    .. math:: \phi = 2 \varepsilon \big((D + 4) \textstyle\sum_i |w_i u_i| + 3\big)

    (ε the dtype's machine epsilon; a first-order bound on the rounding of :math:`w^\top u`, :math:`\|w\|^2` and
    the D entries of :math:`\hat u`), so :math:`1 + w^\top \hat u \ge \tfrac12 \phi > 0` holds for the
    :math:`\hat u` the map really uses. At ordinary params :math:`\phi` is ~1e-5 in float32 and acts only when
    :math:`w^\top u < \log \phi`.

    The log-det is that of the map as computed: with :math:`t = 1 + w^\top \hat u` summed from the rounded
    :math:`\hat u` in doubled working precision (Ogita, Rump & Oishi's Dot2, so t is exact to a few ulps even when
    it is a small difference of large products) and :math:`a = w^\top z + b`,

    .. math:: \log|\det| = \log\big(1 + \mathrm{sech}^2(a)\, (t - 1)\big)
              = \log\big(\tanh^2(a) + \mathrm{sech}^2(a)\, t\big),

    the first form (log1p, exactly 0 at w = 0) where :math:`\mathrm{sech}^2(a) (t - 1) > -\tfrac12`, the second,
    a sum of non-negative terms, where t - 1 would cancel; :math:`\tanh^2` and :math:`\mathrm{sech}^2` come from
    :math:`e^{-2|a|}`, not from the rounded h (whose :math:`1 - h^2` is off by up to ε, which a t of a million
    turns into a tenth of a nat). Any params whose products stay finite thus give an invertible map with a
    finite log-det, the log-det of the map as it runs.

    A stack of K planar flows is one :func:`~flowvae.flows.base.tanh_chain` with M = 1, :math:`A_k = w_k^\top`,
    :math:`C_k = \hat u_k`; the reparametrization and the log-dets are computed for all K flows at once (each
    flow's input, for a, as z plus the previous flows' steps :math:`\hat u_j h_j`).

    Shapes: z (B, D), params (B, 2D + 1) laid out as [u (D), w (D), b (1)].
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.num_params = 2 * dim + 1

    @staticmethod
    def reparametrize(u: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
        r"""Return :math:`\hat u` (..., D) and :math:`t = 1 + w^\top \hat u` (...) for u, w (..., D).

        t is the value for the rounded :math:`\hat u` returned, accurate to a few ulps; its gradient is that of
        the formula :math:`(1 - r) + r \max(\mathrm{softplus}(w^\top u), \phi)`, which it equals up to rounding.
        """
        info = torch.finfo(u.dtype)
        guard = info.tiny ** 0.5
        products = w * u
        w_dot_u = products.sum(-1, keepdim=True)
        w_norm2 = (w * w).sum(-1, keepdim=True)
        denominator = w_norm2 + guard
        with torch.no_grad():  # its gradient, of the order of ε, is rounding
            floor = 2 * info.eps * ((u.shape[-1] + 4) * products.abs().sum(-1, keepdim=True) + 3)
        softplus = torch.maximum(F.softplus(w_dot_u), floor)
        u_hat = w_norm2 / denominator * u + (softplus - 1 - w_dot_u) / denominator * w
        slack = ((guard + w_norm2 * softplus) / denominator).squeeze(-1)
        with torch.no_grad():
            actual = _one_plus_dot(w, u_hat)
        return u_hat, actual + (slack - slack.detach())

    def forward(self, z: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        return self.chain([self], z, params, {})

    @classmethod
    def chain(cls, flows: Sequence[Flow], z: Tensor, params: Tensor,
              constants: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        n_flows, dim = len(flows), flows[0].dim
        u, w, b = params.unflatten(-1, (n_flows, 2 * dim + 1)).split((dim, dim, 1), dim=-1)  # (B, K, ·)
        u_hat, slack = cls.reparametrize(u, w)
        z_k, h = tanh_chain(z, w.unsqueeze(-2), u_hat.unsqueeze(-1), b)
        inputs = [z]  # flow k's input, z + sum_{j<k} û_j h_j (a loop: cumsum is not deterministic on CUDA)
        for step in (u_hat * h).unbind(1)[:-1]:
            inputs.append(inputs[-1] + step)
        pre = (w * torch.stack(inputs, 1)).sum(-1) + b.squeeze(-1)  # (B, K)
        e = torch.exp(-2 * pre.abs())
        e_plus_1 = 1 + e
        tanh2, sech2 = ((1 - e) / e_plus_1).square(), 4 * e / e_plus_1.square()
        # log1p is exact at t = 1 (w = 0 gives exactly 0); the sum of non-negative terms where 1 + sech² (t - 1)
        # is small and forming it from t - 1 would cancel
        change = sech2 * (slack - 1)
        log_det = torch.where(change > -0.5, torch.log1p(change), torch.log(tanh2 + sech2 * slack))
        return z_k, log_det.sum(-1)


def _one_plus_dot(x: Tensor, y: Tensor) -> Tensor:
    r"""1 + Σ x_i y_i over the last dim, to a few ulps of the result plus ~(D ε)² Σ|x_i y_i|, whatever the
    cancellation.

    Float32 and narrower: in float64, where the products are exact. Float64: as if in twice the working precision
    (Ogita, Rump & Oishi's Dot2, "Accurate sum and dot product", SIAM J. Sci. Comput. 2005): products split exactly
    (Veltkamp's splitting, Dekker's TwoProduct), terms summed pairwise with their exact rounding errors (Knuth's
    TwoSum), the errors added at the end.
    """
    bits = round(1 - math.log2(torch.finfo(x.dtype).eps))  # significand bits: 24 in float32, 53 in float64
    if 2 * bits <= 53:
        return (1 + (x.double() * y.double()).sum(-1)).to(x.dtype)
    factor = 2.0 ** math.ceil(bits / 2) + 1

    def split(a: Tensor) -> tuple[Tensor, Tensor]:
        c = factor * a
        high = c - (c - a)
        return high, a - high

    product = x * y
    (x_high, x_low), (y_high, y_low) = split(x), split(y)
    errors = [(x_low * y_low - (((product - x_high * y_high) - x_low * y_high) - x_high * y_low)).sum(-1)]
    terms = torch.cat([torch.ones_like(product[..., :1]), product], dim=-1)
    while terms.shape[-1] > 1:
        if terms.shape[-1] % 2:
            terms = F.pad(terms, (0, 1))
        a, b = terms[..., 0::2], terms[..., 1::2]
        terms = a + b
        b_virtual = terms - a
        errors.append(((a - (terms - b_virtual)) + (b - b_virtual)).sum(-1))
    return terms[..., 0] + sum(errors)
