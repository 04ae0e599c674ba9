"""Sylvester normalizing flows (van den Berg, Hasenclever, Tomczak & Welling, "Sylvester Normalizing Flows for
Variational Inference", UAI 2018): orthogonal, Householder and triangular.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from flowvae.flows.base import Flow, check_int, chunks, register, tanh_chain

__all__ = ["HouseholderSylvester", "OrthogonalSylvester", "Sylvester", "TriangularSylvester", "householder_rotation"]


def householder_rotation(v: Tensor) -> Tensor:
    r"""The product :math:`H_1 \cdots H_T` (N, D, D) of the reflections :math:`H_t = I - 2 v_t v_t^\top /
    \|v_t\|^2`, with :math:`H_t = I` where :math:`v_t = 0`.

    Formed as a product, one reflection at a time (T batched rank-one updates of the identity), so its error is
    the classical one of products of Householder matrices: the result is within
    :math:`\|\Delta\|_F \le T \sqrt{D}\, \tilde\gamma_{D}` of an exactly orthogonal matrix (Higham,
    *Accuracy and Stability of Numerical Algorithms*, 2nd ed., Lemma 19.3), whatever the vectors. Each
    :math:`v_t` is first divided by its largest entry (a reflection does not depend on its vector's length), so
    no length under- or overflows: every nonzero :math:`v_t`, however small or large, gives an exact reflection.
    The product and its gradient are written out (:class:`_ReflectionProduct`), elementwise over all N matrices at
    once and rounded as the batched matmuls they replace.

    Shapes: v (N, D, T) holds the T vectors as columns; returns (N, D, D), a view whose batch axis is the last in
    memory.
    """
    scale = v.detach().abs().amax(1, keepdim=True)  # (N, 1, T); detached: the reflection ignores v's length
    nonzero = scale > 0
    v = v / torch.where(nonzero, scale, 1)
    beta = torch.where(nonzero, 2 / torch.where(nonzero, (v * v).sum(1, keepdim=True), 1), 0)  # 2/|v|², or 0
    return _ReflectionProduct.apply(v, beta, torch.is_grad_enabled())[0]


def _sum_in_order(terms: Sequence[Tensor]) -> Tensor:
    """terms[0] + terms[1] + ..., added one after the other: the order of torch's batched matmul kernel for small
    matrices, which a reduction (pairwise, vectorized) does not keep."""
    if len(terms) == 1:
        return terms[0].clone()
    total = terms[0] + terms[1]
    for term in terms[2:]:
        total += term
    return total


class _ReflectionProduct(torch.autograd.Function):
    r""":math:`\bar Q = H_1 \cdots H_T`, :math:`H_t = I - \beta_t v_t v_t^\top`, one reflection at a time, the batch
    as the last (contiguous) axis, with a written-out backward.

    Reflection t maps the product of the later ones, Q, to :math:`Q - (\beta_t v_t) w_t` with
    :math:`w_t = v_t^\top Q`, rounded as the batched matmuls ``q - (beta_t v_t) @ (v_t.mT @ q)`` round it: each
    product once, every sum added in order (torch's kernel for matrices this small, under 400 multiply-adds, does
    the same), so :math:`\bar Q` and its gradients are that loop's bit for bit (D ≤ 19). Those matmuls cost
    per-matrix overhead: at N = 1000, D = 8 a batched outer product of (D, 1) by (1, D) took 20x the elementwise
    product of the same numbers laid out batch last, which every step here is (forward and backward 2.7x faster
    at D = T = 8).

    Written for torch.func (forward without ctx, :meth:`setup_context`): what the backward needs comes out of
    forward as extra outputs (none when no backward will run); under ``vmap`` the mapped axis is folded into the
    batch. One scratch tensor per pass is reused for every step's products, which keeps them in cache.

    Shapes: v (N, D, T) scaled vectors, beta (N, 1, T) -> Q̄ (N, D, D) (a view, the batch last in memory), then for
    the backward the vectors and :math:`\beta_t v_t` (T, D, N), the partial products :math:`H_{t+1} \cdots H_T`
    (D, D, N) for t = 1 … T - 1 and the :math:`w_t` (D, N) for t = 1 … T.
    """

    @staticmethod
    def forward(v: Tensor, beta: Tensor, for_backward: bool) -> tuple[Tensor, ...]:
        vectors = v.permute(2, 1, 0).contiguous()  # (T, D, N)
        scaled = vectors * beta.permute(2, 1, 0)  # β_t v_t
        columns, scaled_columns = vectors.unsqueeze(2), scaled.unsqueeze(2)  # (T, D, 1, N)
        # the last reflection acts on I, whose w = vᵀ I is v exactly
        eye = torch.eye(v.shape[1], dtype=v.dtype, device=v.device).unsqueeze(-1)
        work = scaled_columns[-1] * vectors[-1]  # (D, D, N) scratch, reused: it stays in cache
        rows = work.unbind(0)
        q = eye - work
        products, projections = [], [vectors[-1]]
        for t in reversed(range(v.shape[2] - 1)):
            torch.mul(columns[t], q, out=work)
            w = _sum_in_order(rows)  # w_j = Σ_i v_i Q_ij
            products.append(q)
            projections.append(w)
            q = q - torch.mul(scaled_columns[t], w, out=work)
        saved = (vectors, scaled, *products[::-1], *projections[::-1]) if for_backward else ()
        return q.permute(2, 0, 1), *saved  # a view, batch last in memory

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: tuple[Tensor, ...]) -> None:
        _, beta, for_backward = inputs
        _, *saved = output
        ctx.mark_non_differentiable(*saved)
        ctx.set_materialize_grads(False)  # no zeros made for the saved outputs' (absent) gradients
        if for_backward:
            ctx.save_for_backward(beta, *saved)

    @staticmethod
    def vmap(info, in_dims: tuple, v: Tensor, beta: Tensor, for_backward: bool
             ) -> tuple[tuple[Tensor, ...], tuple[int, ...]]:
        """The mapped axis folded into the batch (every matrix is its own): one product for all of it."""

        def fold(tensor: Tensor, dim: int | None) -> Tensor:
            tensor = tensor.movedim(dim, 0) if dim is not None else tensor.expand(info.batch_size, *tensor.shape)
            return tensor.flatten(0, 1)

        q, *saved = _ReflectionProduct.apply(fold(v, in_dims[0]), fold(beta, in_dims[1]), for_backward)
        saved = [tensor.unflatten(-1, (info.batch_size, -1)) for tensor in saved]  # batch last: (..., S, N)
        return (q.unflatten(0, (info.batch_size, -1)), *saved), (0, *[-2] * len(saved))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_q: Tensor | None, *_):
        if grad_q is None:
            return None, None, None
        beta, vectors, scaled, *saved = ctx.saved_tensors
        count, dim, n = vectors.shape
        products, projections = saved[: count - 1], saved[count - 1:]
        # The autograd loop's operations, in its roundings. minus = -dL/d(H_t ⋯ H_T); per reflection three sums,
        # added in order in one pass over a scratch (3, D, D, N) that stays in cache: dL/d(β_t v_t) = Σ_j -G_ij w_j,
        # dL/dw_t = Σ_i β_t v_ti (-G)_ij (stored transposed), and the previous reflection's Σ_k dL/dw_k Q_ik.
        minus = torch.neg(grad_q.permute(1, 2, 0).contiguous())  # no copy when it comes batch last (tanh_chain)
        columns, scaled_columns = vectors.unsqueeze(2), scaled.unsqueeze(2)  # (T, D, 1, N)
        work = minus.new_empty(3, dim, dim, n)
        by_row, by_column, previous = work[0], work[1].transpose(0, 1), work[2]
        terms = work.unbind(2)
        torch.mul(minus, projections[0], out=by_row)
        torch.mul(scaled_columns[0], minus, out=by_column)
        sums = _sum_in_order(work[:2].unbind(2))
        grad_scaled, grad_vectors = [sums[0]], []
        for t in range(count - 1):
            grad_w = sums[1]
            # dL/d(H_{t+1} ⋯ H_T) = G + v_t ⊗ dL/dw_t, and dL/dv_t through w_t
            minus -= torch.mul(columns[t], grad_w, out=previous)
            torch.mul(products[t], grad_w, out=previous)
            torch.mul(minus, projections[t + 1], out=by_row)
            torch.mul(scaled_columns[t + 1], minus, out=by_column)
            sums = _sum_in_order(terms)
            grad_scaled.append(sums[0])
            grad_vectors.append(sums[2])
        grad_vectors.append(sums[1])  # the last acted on I: Σ_k dL/dw_k I_ik = dL/dw_i
        grad_scaled = torch.stack(grad_scaled)  # (T, D, N)
        grad_v = (grad_scaled * beta.permute(2, 1, 0) + torch.stack(grad_vectors)).permute(2, 1, 0).contiguous()
        # dL/dβ_t as autograd reduces it for the loop: a sum over each contiguous (N, D) product's D
        grad_beta = (grad_scaled * vectors).transpose(1, 2).contiguous().sum(-1, keepdim=True)
        return grad_v, grad_beta.permute(1, 2, 0), None


class Sylvester(Flow):
    r"""Sylvester flow :math:`f(z) = z + Q R_1 h(R_2 Q^\top z + b)` with :math:`h = \tanh`.

    Q (D, M) has orthonormal columns (how it is made is the subclass's business); :math:`R_1, R_2` (M, M)
    are upper triangular with diagonals :math:`\tanh(\cdot)`, clamped to :math:`\pm(1 - \sqrt\varepsilon)` (ε the
    dtype's machine epsilon), so :math:`1 + R_{1,mm} R_{2,mm} \ge 2\sqrt\varepsilon - \varepsilon` (7e-4 in float32),
    a margin far above the few ulps by which the rounded products and h' move it. With :math:`h' \in [0, 1]` every
    diagonal entry of the triangular Jacobian :math:`I + \mathrm{diag}(h') R_2 R_1` is positive, hence

    .. math:: \log|\det| = \sum_m \log\big(1 + h'(R_2 Q^\top z + b)_m R_{1,mm} R_{2,mm}\big).

    **Exact in the dtype it runs in.** Q is the first M columns of a full D×D rotation :math:`\bar Q` (a product
    of reflections), and the map is evaluated in :math:`\bar Q`'s frame, as the paper's formula reads once
    :math:`\bar Q^\top \bar Q = I` is used:

    .. math:: u = \bar Q^\top z, \qquad u_{1:M} \mathrel{+}= R_1 h(R_2 u_{1:M} + b), \qquad f(z) = \bar Q u.

    Its Jacobian is :math:`\bar Q\, T\, \bar Q^\top` with T exactly triangular whatever :math:`\bar Q` holds, so
    :math:`\log|\det| = \log\det T + \log\det(\bar Q^\top \bar Q)`: the rounding of :math:`\bar Q` enters once,
    as :math:`|\log\det(\bar Q^\top\bar Q)| \le 2D\,|\log(1 - \|\Delta\|_2)|` with :math:`\|\Delta\|_2` the
    bound of :func:`householder_rotation` (~1e-5 nats in float32 at D = T = 8; 1e-6 measured), and never through
    :math:`R_1, R_2` — however large they are, the determinant is positive and the map invertible (T is, and
    :math:`\bar Q` is within :math:`\|\Delta\|_2 \ll 1` of orthogonal). Written the paper's way,
    :math:`z + (Q R_1) h((R_2 Q^\top) z + b)` with products formed in floating point, the Jacobian leaves the
    triangular form by :math:`O(\varepsilon |R_1| |R_2|)`, to which the determinant is sensitive as the inverse of
    T: that form's log-det was off by nats, with determinants of either sign, once R's strict triangles reach ~10.

    :math:`R_1` and :math:`R_2` are packed in one (M, M) block as in van den Berg's code: its strict upper
    triangle is :math:`R_1`'s, its strict lower triangle transposed is :math:`R_2`'s, its diagonal is
    :math:`R_1`'s pre-tanh diagonal; :math:`R_2`'s pre-tanh diagonal follows.

    A stack of K flows is one :func:`~flowvae.flows.base.tanh_chain` with :math:`A_k = [R_{2,k}\ 0]`,
    :math:`C_k = [R_{1,k};\ 0]` and the rotations :math:`\bar Q_k`, built for all K flows at once: one gather
    lays out every :math:`R_1` and :math:`R_2` (diagonals and zeros included) from the params.

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
    def rotation(self, q_params: Tensor) -> Tensor:
        """Return the full rotation (B, D, D) from its params (B, P_Q): Q is its first M columns."""

    def orthogonal(self, q_params: Tensor) -> Tensor:
        """Return Q (B, D, M), orthonormal columns, from its params (B, P_Q)."""
        return self.rotation(q_params)[..., : self.rank]

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
            a, c, q = cls.chain_weights(flows[start:stop], q_params[:, start:stop], r2, r1)
            z, h = tanh_chain(z, a, c, b[:, start:stop], q)
            hidden.append(h)
        h = torch.cat(hidden, 1) if len(hidden) > 1 else hidden[0]
        return z, torch.log1p((1 - h * h) * diag1 * diag2).sum((-2, -1))

    @classmethod
    def chain_weights(cls, flows: Sequence[Flow], q_params: Tensor, r2: Tensor,
                      r1: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        r""":math:`A = [R_2\ 0]` (B, K, M, D), :math:`C = [R_1;\ 0]` (B, K, D, M) and the rotations
        :math:`\bar Q` (B, K, D, D) for every flow, from :math:`R_2, R_1` (B, K, M, M) and the Q params
        (B, K, P_Q)."""
        q = flows[0].rotation(q_params.flatten(0, 1)).unflatten(0, q_params.shape[:2])
        pad = flows[0].dim - flows[0].rank
        if not pad:  # M = D: A = R2 and C = R1 as they are (a pad of 0 would copy them)
            return r2, r1, q
        return F.pad(r2, (0, pad)), F.pad(r1, (0, 0, 0, pad)), q


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
    :math:`v_m = e_m + (\text{column } m \text{ below the diagonal})`, :math:`\bar Q = H_1 \cdots H_M` and
    :math:`Q = \bar Q_{:, :M}`. Every params value gives an orthonormal Q (:math:`\|v_m\| \ge 1`, no singular
    point, gradients bounded), and the chart reaches every Q up to column signs, which the flow absorbs into
    :math:`R_1, R_2, b`. The entries on and above the diagonal would be unused and are not taken, so
    :math:`P_Q = DM - M(M+1)/2`.

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

    @classmethod
    def check_options(cls, dim: int, **options: Any) -> None:
        if options.get("num_ortho_vecs") is not None:
            check_int(
                "num_ortho_vecs", options["num_ortho_vecs"], 1, dim, f" (at most dim={dim}), or None for min(8, dim)"
            )

    def rotation(self, q_params: Tensor) -> Tensor:
        v = F.pad(q_params, (1, 0)).index_select(1, self.index).view(-1, self.dim, self.rank) + self.eye
        return householder_rotation(v)


@register("householder", table_rank=3)
class HouseholderSylvester(Sylvester):
    r"""Householder Sylvester flow: :math:`Q = H_1 \cdots H_T` (D, D), T = ``num_householder``, M = D.

    :math:`H_t = I - 2 v_t v_t^\top / \|v_t\|^2` with free :math:`v_t` (D): an exact reflection for every
    nonzero :math:`v_t` however small (see :func:`householder_rotation`), and I at :math:`v_t = 0`.

    Shapes: params (B, TD + D² + 2D) with :math:`v_1, \dots, v_T` first.
    """

    def __init__(self, dim: int, *, num_householder: int = 8) -> None:
        self.check_options(dim, num_householder=num_householder)
        super().__init__(dim, dim, num_householder * dim)
        self.num_householder = num_householder

    @classmethod
    def check_options(cls, dim: int, **options: Any) -> None:
        if "num_householder" in options:
            check_int("num_householder", options["num_householder"], 1)

    def rotation(self, q_params: Tensor) -> Tensor:
        return householder_rotation(q_params.view(-1, self.num_householder, self.dim).mT)


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

    def rotation(self, q_params: Tensor) -> Tensor:
        """Return the permutation Q (B, D, D) as a matrix, for inspection; forward does not use it."""
        eye = torch.eye(self.dim, dtype=q_params.dtype, device=q_params.device)
        return (eye.flip(-1) if self.reverse else eye).expand(q_params.shape[0], -1, -1)

    @classmethod
    def chain_weights(cls, flows: Sequence[Flow], q_params: Tensor, r2: Tensor,
                      r1: Tensor) -> tuple[Tensor, Tensor, None]:
        """A = R2 Q^T and C = Q R1 need no product and no rotation: a reversed flow's gather already gave R2 J and
        J R1, and J, a permutation, is exact."""
        return r2, r1, None
