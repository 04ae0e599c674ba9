"""Planar flow (Rezende & Mohamed, "Variational Inference with Normalizing Flows", ICML 2015)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from flowvae.flows.base import Flow, tanh_chain

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

    A stack of K planar flows is one :func:`~flowvae.flows.base.tanh_chain` with M = 1, :math:`A_k = w_k^\top`,
    :math:`C_k = \hat u_k`; the reparametrization and the log-dets are computed for all K flows at once.

    Shapes: z (B, D), params (B, 2D + 1) laid out as [u (D), w (D), b (1)].
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.num_params = 2 * dim + 1

    @staticmethod
    def reparametrize(u: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
        r"""Return :math:`\hat u` (..., D) and the slack :math:`1 + w^\top \hat u` (...) for u, w (..., D)."""
        eps = torch.finfo(u.dtype).tiny ** 0.5
        w_dot_u = (w * u).sum(-1, keepdim=True)
        w_norm2 = (w * w).sum(-1, keepdim=True)
        denominator = w_norm2 + eps
        softplus = F.softplus(w_dot_u).clamp_min(torch.finfo(u.dtype).eps)
        u_hat = w_norm2 / denominator * u + (softplus - 1 - w_dot_u) / denominator * w
        slack = (eps + w_norm2 * softplus) / denominator
        return u_hat, slack.squeeze(-1)

    def forward(self, z: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        return self.chain([self], z, params, {})

    @classmethod
    def chain(cls, flows: Sequence[Flow], z: Tensor, params: Tensor,
              constants: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        dim = flows[0].dim
        u, w, b = params.unflatten(-1, (len(flows), 2 * dim + 1)).split((dim, dim, 1), dim=-1)  # (B, K, ·)
        u_hat, slack = cls.reparametrize(u, w)
        z, h = tanh_chain(z, w.unsqueeze(-2), u_hat.unsqueeze(-1), b)
        h2 = (h * h).squeeze(-1)
        return z, torch.log(h2 + (1 - h2) * slack).sum(-1)
