"""Sylvester normalizing flows (van den Berg, Hasenclever, Tomczak & Welling, "Sylvester Normalizing Flows for
Variational Inference", UAI 2018): orthogonal, Householder and triangular.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowvae.flows.base import Flow, check_int, chunks, register, tanh_chain

__all__ = ["HouseholderProduct", "HouseholderSylvester", "OrthogonalSylvester", "Sylvester", "TriangularSylvester"]


class HouseholderProduct(nn.Module):
    r"""First C columns of :math:`H_1 \cdots H_T`, :math:`H_t = I - 2 v_t v_t^\top / (\|v_t\|^2 + \epsilon)`.

    Uses the compact WY ("UT") form (Joffrain, Low, Quintana-Ortí, van de Geijn & Van Zee, "Accumulating
    Householder transformations, revisited", ACM TOMS 2006):

    .. math:: H_1 \cdots H_T = I - V S^{-1} V^\top, \qquad
              S = \mathrm{striu}(V^\top V) + \tfrac12 \mathrm{diag}(\|v_t\|^2 + \epsilon),

    with S upper triangular, so the product costs two batched matmuls and one batched triangular solve, with
    no loop over t, and is orthogonal to rounding. A guard :math:`\epsilon > 0` makes
    :math:`H_t = I` when :math:`v_t = 0`.

    Shapes: v (B, D, T) holds the T vectors as columns; returns (B, D, C).
    """

    def __init__(self, dim: int, num_vectors: int, columns: int) -> None:
        super().__init__()
        eye = torch.eye(num_vectors)
        self.register_buffer("eye", eye, persistent=False)
        self.register_buffer("weight", torch.ones_like(eye).triu(1) + 0.5 * eye, persistent=False)
        self.register_buffer("columns", torch.eye(dim, columns), persistent=False)

    def forward(self, v: Tensor, eps: float = 0.0) -> Tensor:
        s = torch.baddbmm(self.eye.to(v.dtype), v.mT, v, beta=eps) * self.weight.to(v.dtype)
        s_inv_v_t = torch.linalg.solve_triangular(s, v[:, : self.columns.shape[1]].mT, upper=True)
        return torch.baddbmm(self.columns.to(v.dtype), v, s_inv_v_t, alpha=-1)


class Sylvester(Flow):
    r"""Sylvester flow :math:`f(z) = z + Q R_1 h(R_2 Q^\top z + b)` with :math:`h = \tanh`.

    Q (D, M) has orthonormal columns (how it is made is the subclass's business); :math:`R_1, R_2` (M, M)
    are upper triangular with diagonals :math:`\tanh(\cdot)`, clamped to :math:`\pm(1 - \sqrt\varepsilon)` (ε the
    dtype's machine epsilon), so :math:`1 + R_{1,mm} R_{2,mm} \ge 2\sqrt\varepsilon - \varepsilon` (7e-4 in float32),
    a margin far above the few ulps by which the rounded products and h' move it. With :math:`h' \in [0, 1]` every
    diagonal entry of the triangular Jacobian :math:`I + \mathrm{diag}(h') R_2 R_1` is positive, hence

    .. math:: \log|\det| = \sum_m \log\big(1 + h'(R_2 Q^\top z + b)_m R_{1,mm} R_{2,mm}\big)

    is finite and the flow is invertible for any finite params, exactly so when Q is a permutation (triangular
    flows). A Q made in floating point is orthonormal only to rounding, :math:`Q^\top Q = I + O(\varepsilon)`, and
    the Jacobian the map really has, :math:`I + Q R_1 \mathrm{diag}(h') R_2 Q^\top`, leaves the triangular form by
    :math:`O(\varepsilon |R_1| |R_2|)`, to which the determinant is sensitive as :math:`|R|^2` over the diagonal
    factors: in float32 the log-det is off by up to ~3e-4 nats at ordinary params (1e-13 in float64), and once the
    strict triangles of :math:`R_1, R_2` reach ~10 it can be off by nats, with determinants of either sign, in
    float64 too (its margin is smaller).

    :math:`R_1` and :math:`R_2` are packed in one (M, M) block as in van den Berg's code: its strict upper
    triangle is :math:`R_1`'s, its strict lower triangle transposed is :math:`R_2`'s, its diagonal is
    :math:`R_1`'s pre-tanh diagonal; :math:`R_2`'s pre-tanh diagonal follows.

    A stack of K flows is one :func:`~flowvae.flows.base.tanh_chain` with :math:`A_k = R_{2,k} Q_k^\top` and
    :math:`C_k = Q_k R_{1,k}`, built for all K flows at once: one gather lays out every :math:`R_1` and
    :math:`R_2` (diagonals and zeros included) from the params, then two batched products apply Q.

    Shapes: z (B, D), params (B, P) laid out as [Q params (P_Q), R block (M²), diag R_2 (M), b (M)].
    """

    def __init__(self, dim: int, rank: int, num_q_params: int, reverse: bool = False) -> None:
        super().__init__()
        self.dim = dim
        self.rank = rank
        self.sizes = (num_q_params, rank * rank, rank, rank)
        self.num_params = sum(self.sizes)
        r1_index, r2_index = _r_indices(rank)
        if reverse:  # Q = J, the reversal, which only triangular flows use: store R2 J and J R1 instead
            r2_index, r1_index = r2_index.flip(-1), r1_index.flip(-2)
        self.register_buffer("r1_index", r1_index, persistent=False)
        self.register_buffer("r2_index", r2_index, persistent=False)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, rank={self.rank}, num_params={self.num_params}"

    @abstractmethod
    def orthogonal(self, q_params: Tensor) -> Tensor:
        """Return Q (B, D, M), orthonormal columns, from its params (B, P_Q)."""

    def forward(self, z: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        return self.chain([self], z, params, self.chain_constants([self]))

    @classmethod
    def chain_constants(cls, flows: Sequence[Flow]) -> dict[str, Tensor]:
        """Where each entry of every flow's R1 and R2 sits in the (B, K (M² + 2M + 1)) gather source."""
        rank = flows[0].rank
        width = rank * rank + 2 * rank + 1
        offsets = torch.arange(len(flows), device=flows[0].r1_index.device).view(-1, 1, 1) * width
        return {name: (torch.stack([getattr(flow, name) for flow in flows]) + offsets).flatten()
                for name in ("r1_index", "r2_index")}

    @classmethod
    def chain(cls, flows: Sequence[Flow], z: Tensor, params: Tensor,
              constants: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        first, n_flows = flows[0], len(flows)
        rank = first.rank
        q_params, block, diag2, b = params.unflatten(-1, (n_flows, first.num_params)).split(first.sizes, dim=-1)
        bound = 1 - torch.finfo(z.dtype).eps ** 0.5  # 1 + diag1 diag2 >= 2 sqrt(eps) - eps, well above rounding
        diag1 = torch.tanh(block.unflatten(-1, (rank, rank)).diagonal(dim1=-2, dim2=-1)).clamp(-bound, bound)
        diag2 = torch.tanh(diag2).clamp(-bound, bound)
        # per flow [block, diag R1, diag R2, 0]: every entry of R1 and R2 is one of these
        source = torch.cat([block, diag1, F.pad(diag2, (0, 1))], dim=-1).flatten(1)
        hidden = []
        for start, stop in chunks(n_flows, z.shape[0]):
            r2, r1 = (source.index_select(1, constants[name][start * rank * rank:stop * rank * rank])
                      .unflatten(1, (stop - start, rank, rank)) for name in ("r2_index", "r1_index"))
            a, c = cls.chain_weights(flows[start:stop], q_params[:, start:stop], r2, r1)
            z, h = tanh_chain(z, a, c, b[:, start:stop])
            hidden.append(h)
        h = torch.cat(hidden, 1) if len(hidden) > 1 else hidden[0]
        return z, torch.log1p((1 - h * h) * diag1 * diag2).sum((-2, -1))

    @classmethod
    def chain_weights(cls, flows: Sequence[Flow], q_params: Tensor, r2: Tensor, r1: Tensor) -> tuple[Tensor, Tensor]:
        """:math:`A = R_2 Q^\top` (B, K, M, D) and :math:`C = Q R_1` (B, K, D, M) for every flow, from
        :math:`R_2, R_1` (B, K, M, M) and the Q params (B, K, P_Q)."""
        q = flows[0].orthogonal(q_params.flatten(0, 1)).unflatten(0, q_params.shape[:2])
        return r2 @ q.mT, q @ r1


def _r_indices(rank: int) -> tuple[Tensor, Tensor]:
    """Positions of R1's and R2's entries (M, M) in one flow's [block (M²), diag R1 (M), diag R2 (M), 0]."""
    i, j = torch.meshgrid(torch.arange(rank), torch.arange(rank), indexing="ij")
    zero = rank * rank + 2 * rank
    r1 = torch.where(i < j, i * rank + j, torch.where(i == j, rank * rank + i, zero))
    r2 = torch.where(i < j, j * rank + i, torch.where(i == j, rank * rank + rank + i, zero))
    return r1, r2


@register("orthogonal", table_rank=5)
class OrthogonalSylvester(Sylvester):
    r"""Orthogonal Sylvester flow: Q (D, M) with M = ``num_ortho_vecs`` orthonormal columns.

    Q is exact by construction rather than by iteration: the D×M free matrix is read as the compact
    Householder form that QR factorizations return (LAPACK ``geqrf``), its strict lower triangle giving
    :math:`v_m = e_m + (\text{column } m \text{ below the diagonal})` and
    :math:`Q = (H_1 \cdots H_M)_{:, :M}`. Every params value gives an orthonormal Q (:math:`\|v_m\| \ge 1`,
    no singular point, gradients bounded), and the chart reaches every Q up to column signs, which the flow
    absorbs into :math:`R_1, R_2, b`. The entries on and above the diagonal would be unused and are not
    taken, so :math:`P_Q = DM - M(M+1)/2`.

    Shapes: params (B, DM - M(M+1)/2 + M² + 2M).
    """

    def __init__(self, dim: int, *, num_ortho_vecs: int | None = None) -> None:
        self.check_options(dim, num_ortho_vecs=num_ortho_vecs)
        rank = min(8, dim) if num_ortho_vecs is None else num_ortho_vecs
        lower = torch.ones(dim, rank, dtype=torch.bool).tril(-1)
        super().__init__(dim, rank, int(lower.sum()))
        # V[i, m] = [0, q_params][index[i * M + m]]: the prepended zero fills the entries on and above the diagonal
        index = torch.zeros(dim * rank, dtype=torch.long)
        index[lower.flatten()] = torch.arange(1, self.sizes[0] + 1)
        self.register_buffer("index", index, persistent=False)
        self.register_buffer("eye", torch.eye(dim, rank, dtype=torch.bool), persistent=False)
        self.householder_product = HouseholderProduct(dim, rank, rank)

    @classmethod
    def check_options(cls, dim: int, **options: Any) -> None:
        if options.get("num_ortho_vecs") is not None:
            check_int(
                "num_ortho_vecs", options["num_ortho_vecs"], 1, dim, f" (at most dim={dim}), or None for min(8, dim)"
            )

    def orthogonal(self, q_params: Tensor) -> Tensor:
        v = F.pad(q_params, (1, 0)).index_select(1, self.index).view(-1, self.dim, self.rank) + self.eye
        return self.householder_product(v)


@register("householder", table_rank=3)
class HouseholderSylvester(Sylvester):
    r"""Householder Sylvester flow: :math:`Q = H_1 \cdots H_T` (D, D), T = ``num_householder``, M = D.

    :math:`H_t = I - 2 v_t v_t^\top / \|v_t\|^2` with free :math:`v_t` (D); :math:`\|v_t\|^2` gets
    :math:`\sqrt{\text{tiny}}` added (1e-19 in float32), so :math:`v_t = 0` gives :math:`H_t = I` and
    finite gradients, while any :math:`\|v_t\|` above ~2e-6 in float32 (1e-69 in float64) gives a
    reflection exact to rounding.

    Shapes: params (B, TD + D² + 2D) with :math:`v_1, \dots, v_T` first.
    """

    def __init__(self, dim: int, *, num_householder: int = 8) -> None:
        self.check_options(dim, num_householder=num_householder)
        super().__init__(dim, dim, num_householder * dim)
        self.num_householder = num_householder
        self.householder_product = HouseholderProduct(dim, num_householder, dim)

    @classmethod
    def check_options(cls, dim: int, **options: Any) -> None:
        if "num_householder" in options:
            check_int("num_householder", options["num_householder"], 1)

    def orthogonal(self, q_params: Tensor) -> Tensor:
        v = q_params.view(-1, self.num_householder, self.dim).mT
        return self.householder_product(v, eps=torch.finfo(v.dtype).tiny ** 0.5)


@register("triangular", table_rank=4)
class TriangularSylvester(Sylvester):
    r"""Triangular Sylvester flow: Q is the identity, or the reversal permutation when ``reverse``.

    In a stack the k-th flow has reverse = (k odd), so consecutive flows alternate between upper and lower
    triangular Jacobians. The permutation is applied by flipping z, never as a matrix product.

    Shapes: params (B, D² + 2D).
    """

    alternates = True

    def __init__(self, dim: int, reverse: bool = False) -> None:
        super().__init__(dim, dim, 0, reverse)
        self.reverse = reverse

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, reverse={self.reverse}"

    def orthogonal(self, q_params: Tensor) -> Tensor:
        """Return the permutation Q (B, D, D) as a matrix, for inspection; forward does not use it."""
        eye = torch.eye(self.dim, dtype=q_params.dtype, device=q_params.device)
        return (eye.flip(-1) if self.reverse else eye).expand(q_params.shape[0], -1, -1)

    @classmethod
    def chain_weights(cls, flows: Sequence[Flow], q_params: Tensor, r2: Tensor, r1: Tensor) -> tuple[Tensor, Tensor]:
        """A = R2 Q^T and C = Q R1 need no product: a reversed flow's gather already gave R2 J and J R1."""
        return r2, r1
