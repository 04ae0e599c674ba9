"""Planar flow (Rezende & Mohamed, "Variational Inference with Normalizing Flows", ICML 2015)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from flowvae.flows.base import Flow

__all__ = ["Planar"]


class Planar(Flow):
    r"""Planar flow :math:`f(z) = z + \hat u\, h(w^\top z + b)` with :math:`h = \tanh`.

    Invertibility needs :math:`w^\top \hat u > -1`, obtained from a free u (Rezende & Mohamed, appendix A):

    .. math:: \hat u = r u + \big(m(w^\top u) - w^\top u\big) \frac{w}{\|w\|^2 + \epsilon}, \qquad
              m(x) = -1 + \mathrm{softplus}(x), \qquad r = \frac{\|w\|^2}{\|w\|^2 + \epsilon},

    so that :math:`1 + w^\top \hat u = (1 - r) + r\,\mathrm{softplus}(w^\top u) > 0`, and
    :math:`\log|\det| = \log(1 + h'(w^\top z + b)\, w^\top \hat u)`, computed as
    :math:`\log(h^2 + (1 - h^2)(1 + w^\top \hat u))`, a sum of non-negative terms. The guard
    :math:`\epsilon = \sqrt{\text{tiny}}` (1e-19 in float32) leaves r = 1, the paper's formula, for any
    :math:`\|w\|` above ~2e-6 in float32, and turns the flow into the identity at w = 0 instead of dividing by zero; the
    softplus is kept above the dtype's machine epsilon. Any finite params thus give an invertible map with
    a finite log-det.

    Shapes: z (B, D), params (B, 2D + 1) laid out as [u (D), w (D), b (1)].
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.num_params = 2 * dim + 1

    @staticmethod
    def reparametrize(u: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
        r"""Return :math:`\hat u` (B, D) and the slack :math:`1 + w^\top \hat u` (B,) for u, w (B, D)."""
        eps = torch.finfo(u.dtype).tiny ** 0.5
        w_dot_u = (w * u).sum(-1, keepdim=True)
        w_norm2 = (w * w).sum(-1, keepdim=True)
        denominator = w_norm2 + eps
        softplus = F.softplus(w_dot_u).clamp_min(torch.finfo(u.dtype).eps)
        u_hat = w_norm2 / denominator * u + (softplus - 1 - w_dot_u) / denominator * w
        slack = (eps + w_norm2 * softplus) / denominator
        return u_hat, slack.squeeze(-1)

    def forward(self, z: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        u, w, b = params.split((self.dim, self.dim, 1), dim=1)
        u_hat, slack = self.reparametrize(u, w)
        h = torch.tanh((w * z).sum(-1, keepdim=True) + b)
        h2 = (h * h).squeeze(-1)
        return z + u_hat * h, torch.log(h2 + (1 - h2) * slack)
