"""Tests of flowvae.flows: log-dets against autograd, invertibility, shapes, the build contract."""

from __future__ import annotations

import math
import operator
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from fractions import Fraction

import pytest
import torch
from torch import Tensor
from torch.autograd.functional import jacobian

from flowvae.flows import FLOWS, IAF, FlowStack, Planar, TriangularSylvester, base, build, iaf, options, sylvester
from flowvae.flows.base import tanh_chain
from flowvae.flows.sylvester import Sylvester, householder_rotation

FAMILIES = ["planar", "orthogonal", "householder", "triangular", "iaf"]
SYLVESTER = ["orthogonal", "householder", "triangular"]
DTYPES = [torch.float32, torch.float64]


def make(
    name: str,
    dim: int,
    n_flows: int,
    dtype: torch.dtype = torch.float64,
    batch: int = 3,
    scale: float = 3.0,
    seed: int = 0,
    **flow_options,
) -> tuple[FlowStack, Tensor, Tensor]:
    """A stack and random z (batch, dim) and params (batch, num_params) * scale."""
    torch.manual_seed(seed)
    stack = build(name, dim, n_flows, **flow_options).to(dtype)
    z = torch.randn(batch, dim, dtype=dtype)
    params = torch.randn(batch, stack.num_params, dtype=dtype) * scale
    return stack, z, params


def jacobians(flow: torch.nn.Module, z: Tensor, params: Tensor) -> Tensor:
    """Per-sample Jacobians ∂f(z_b)/∂z_b, shape (B, D, D)."""
    return torch.stack([jacobian(lambda x, b=b: flow(x[None], params[b : b + 1])[0][0], z[b]) for b in range(len(z))])


def strict_triangles(jac: Tensor) -> tuple[Tensor, Tensor]:
    """The strictly lower and strictly upper entries of jac (..., D, D), each as (..., D(D-1)/2)."""
    lower = torch.ones(jac.shape[-1], jac.shape[-1], dtype=torch.bool).tril(-1)
    return jac[..., lower], jac.mT[..., lower]


def orthonormality_error(q: Tensor) -> float:
    eye = torch.eye(q.shape[-1], dtype=q.dtype)
    return (q.mT @ q - eye).abs().amax().item()


# log-det


@pytest.mark.parametrize("n_flows", [1, 2, 3])
@pytest.mark.parametrize("dim", [2, 3, 5, 8])
@pytest.mark.parametrize("name", FAMILIES)
def test_log_det_matches_autograd(name: str, dim: int, n_flows: int) -> None:
    stack, z, params = make(name, dim, n_flows)
    _, log_det = stack(z, params)
    sign, log_abs_det = torch.linalg.slogdet(jacobians(stack, z, params))
    assert (sign != 0).all()
    torch.testing.assert_close(log_det, log_abs_det, atol=1e-6, rtol=0)


@pytest.mark.parametrize("num_ortho_vecs", [1, 3])
def test_orthogonal_log_det_with_fewer_vectors_than_dim(num_ortho_vecs: int) -> None:
    stack, z, params = make("orthogonal", 5, 2, num_ortho_vecs=num_ortho_vecs)
    _, log_det = stack(z, params)
    torch.testing.assert_close(log_det, torch.linalg.slogdet(jacobians(stack, z, params))[1], atol=1e-6, rtol=0)


def test_iaf_log_det_with_context_smaller_than_hidden() -> None:
    stack, z, params = make("iaf", 4, 2, hidden=16, context=5)
    assert stack.num_params == 2 * 5
    _, log_det = stack(z, params)
    torch.testing.assert_close(log_det, torch.linalg.slogdet(jacobians(stack, z, params))[1], atol=1e-6, rtol=0)


# invertibility


@pytest.mark.parametrize("name", FAMILIES)
def test_invertible_for_large_params(name: str) -> None:
    stack, z, params = make(name, 5, 3, batch=8, scale=10.0)
    _, log_det = stack(z, params)
    sign, log_abs_det = torch.linalg.slogdet(jacobians(stack, z, params))
    assert (sign != 0).all() and torch.isfinite(log_abs_det).all()
    torch.testing.assert_close(log_det, log_abs_det, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", FAMILIES)
def test_log_det_finite_for_extreme_params(name: str, dtype: torch.dtype) -> None:
    stack, z, params = make(name, 4, 2, dtype=dtype, batch=64, scale=1e4)
    z_k, log_det = stack(z, params)
    assert torch.isfinite(z_k).all() and torch.isfinite(log_det).all()


def test_planar_with_zero_w_is_the_identity() -> None:
    flow = Planar(3)
    z = torch.randn(4, 3)
    params = torch.cat([torch.randn(4, 3), torch.zeros(4, 3), torch.randn(4, 1)], dim=1).requires_grad_()
    z_new, log_det = flow(z, params)
    assert torch.equal(z_new, z) and torch.equal(log_det, torch.zeros(4))
    (z_new.sum() + log_det.sum()).backward()
    assert torch.isfinite(params.grad).all()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("name, dim, flow_options", [
    ("orthogonal", 8, {}),
    ("orthogonal", 6, {"num_ortho_vecs": 2}),
    ("orthogonal", 1, {}),
    ("householder", 5, {}),
    ("householder", 8, {"num_householder": 1}),
    ("triangular", 4, {}),
])  # fmt: skip
def test_sylvester_q_is_orthonormal(name: str, dim: int, flow_options: dict, dtype: torch.dtype, tol: float) -> None:
    stack, _, params = make(name, dim, 2, dtype=dtype, batch=500, scale=10.0, **flow_options)
    for flow, flow_params in zip(stack.flows, params.split(stack.sizes, dim=1), strict=True):
        q = flow.orthogonal(flow_params.split(flow.sizes, dim=1)[0])
        assert q.shape == (500, dim, flow.rank) and q.dtype == dtype
        assert orthonormality_error(q) < tol


def test_householder_with_zero_vectors_is_orthonormal_with_finite_gradients() -> None:
    stack, z, params = make("householder", 4, 1, num_householder=3)
    params = params.clone()
    params[:, :8] = 0  # v_1 = v_2 = 0: H_1 = H_2 = I
    params.requires_grad_()
    flow = stack.flows[0]
    q = flow.orthogonal(params[:, : flow.sizes[0]])
    assert orthonormality_error(q) < 1e-12
    z_k, log_det = stack(z, params)
    (z_k.sum() + log_det.sum()).backward()
    assert torch.isfinite(params.grad).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim, reflections", [(8, 8), (10, 8), (5, 1), (16, 24)])
def test_householder_rotation_is_orthogonal_to_its_bound_at_any_scale(dim: int, reflections: int,
                                                                      dtype: torch.dtype) -> None:
    """|log det(Q̄ᵀQ̄)| — all that a rotation's rounding adds to a Sylvester log-det — is within the README's
    bound for vectors of any length: tiny (a guard ε in ‖v‖² would make H no reflection), huge, mixed."""
    torch.manual_seed(0)
    scales = torch.tensor([1e-30, 1e-10, 1e-3, 1.0, 1e3, 1e30], dtype=dtype).repeat_interleave(200)
    v = torch.randn(len(scales), dim, reflections, dtype=dtype) * scales.view(-1, 1, 1)
    v[::7, :, 0] *= 1e-20  # one vector far shorter than the others
    q = householder_rotation(v)
    assert q.dtype == dtype
    log_det = torch.tensor([exact_slogdet([[Fraction(x) for x in row] for row in matrix])[1]
                            for matrix in (q.mT.double() @ q.double())[::50].tolist()])  # a sample, exactly
    assert log_det.abs().max() <= rotation_bound(dim, reflections, dtype)
    assert orthonormality_error(q) < 50 * dim * torch.finfo(dtype).eps


def test_householder_rotation_is_the_product_of_reflections() -> None:
    torch.manual_seed(0)
    v = torch.randn(3, 4, 5, dtype=torch.float64)
    v[1, :, 2] = 0  # H = I there
    expected = torch.eye(4, dtype=torch.float64).expand(3, 4, 4)
    for t in range(5):
        w = v[:, :, t : t + 1]
        norm = (w.mT @ w).clamp(min=1e-300)
        reflection = torch.eye(4, dtype=torch.float64) - 2 * w @ w.mT / norm
        expected = expected @ reflection
    torch.testing.assert_close(householder_rotation(v), expected)


def matmul_loop_rotation(v: Tensor) -> Tensor:
    """householder_rotation as it was written before its own backward: the loop of batched matmuls, under autograd."""
    scale = v.detach().abs().amax(1, keepdim=True)
    nonzero = scale > 0
    v = v / torch.where(nonzero, scale, 1)
    beta = torch.where(nonzero, 2 / torch.where(nonzero, (v * v).sum(1, keepdim=True), 1), 0)
    q = torch.eye(v.shape[1], dtype=v.dtype).expand(v.shape[0], -1, -1)
    for t in reversed(range(v.shape[2])):
        v_t = v[:, :, t : t + 1]
        q = q - (beta[:, :, t : t + 1] * v_t) @ (v_t.mT @ q)
    return q


def small_matmuls_sum_in_order(dim: int, dtype: torch.dtype) -> bool:
    """Whether torch's batched matmul of a (1, D) by a (D, D) adds its products one after the other (its kernel
    for matrices under 400 multiply-adds does, without fused multiply-adds, on x86)."""
    x, y = torch.randn(64, 1, dim, dtype=dtype), torch.randn(64, dim, dim, dtype=dtype)
    terms = x.mT * y
    total = terms[:, 0]
    for i in range(1, dim):
        total = total + terms[:, i]
    return torch.equal((x @ y)[:, 0], total)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("count, dim, reflections", [(300, 8, 8), (40, 5, 3), (40, 8, 1), (20, 1, 4), (30, 19, 9)])
def test_householder_rotation_is_the_matmul_loop_bit_for_bit(count: int, dim: int, reflections: int,
                                                             dtype: torch.dtype) -> None:
    """The written-out product and backward round as the loop of batched matmuls did, so that runs keep their
    numbers: Q̄ and the gradients equal, bit for bit (where torch's small matmuls sum in order, as on x86)."""
    if not small_matmuls_sum_in_order(dim, dtype):
        pytest.skip("this build's small batched matmul does not add its products in order")
    torch.manual_seed(0)
    v = torch.randn(count, dim, reflections, dtype=dtype) * torch.logspace(-20, 20, count, dtype=dtype).view(-1, 1, 1)
    v[::4, :, 0] = 0  # H = I there
    v[1::5, :, -1] *= 1e-30
    grad = torch.randn(count, dim, dim, dtype=dtype)
    results = []
    for rotation in (householder_rotation, matmul_loop_rotation):
        leaf = v.clone().requires_grad_()
        q = rotation(leaf)
        results.append((q.detach(), *torch.autograd.grad(q, leaf, grad)))
    for new, former in zip(*results, strict=True):
        assert torch.equal(new, former)


@pytest.mark.parametrize("reflections", [1, 3])
def test_householder_rotation_backward_matches_finite_differences(reflections: int) -> None:
    torch.manual_seed(0)
    v = torch.randn(4, 4, reflections, dtype=torch.float64)
    v[0, :, 0] = 0  # H = I, whose gradient is 0
    assert torch.autograd.gradcheck(householder_rotation, (v.requires_grad_(),))


def test_householder_rotation_under_vmap_is_each_slice() -> None:
    """A stack of models maps the rotation over its model axis (flowvae.training.stacked): values and gradients
    are each slice's own, bit for bit."""
    torch.manual_seed(0)
    v = torch.randn(3, 10, 5, 4, requires_grad=True)
    grad = torch.randn(3, 10, 5, 5)
    mapped = torch.func.vmap(householder_rotation)(v)
    (mapped_grad,) = torch.autograd.grad(mapped, v, grad)
    for s in range(3):
        leaf = v[s].detach().requires_grad_()
        q = householder_rotation(leaf)
        assert torch.equal(mapped[s], q)
        assert torch.equal(mapped_grad[s], torch.autograd.grad(q, leaf, grad[s])[0])
    with torch.no_grad():
        assert torch.equal(torch.func.vmap(householder_rotation)(v), mapped)
    # what the product keeps for its backward (extra outputs) is each slice's too
    beta = torch.rand(3, 10, 1, 4)
    outputs = torch.func.vmap(lambda x, y: sylvester._ReflectionProduct.apply(x, y, True))(v.detach(), beta)
    for s in range(3):
        for output, expected in zip(outputs, sylvester._ReflectionProduct.apply(v[s].detach(), beta[s], True),
                                    strict=True):
            assert torch.equal(output[s], expected)


@pytest.mark.parametrize("name", SYLVESTER)
def test_sylvester_forward_matches_dense_formula(name: str) -> None:
    """z + Q R1 tanh(R2 Qᵀ z + b), with R1, R2 unpacked here independently of the implementation."""
    stack, z, params = make(name, 5, 2)
    expected = z
    for flow, flow_params in zip(stack.flows, params.split(stack.sizes, dim=1), strict=True):
        assert isinstance(flow, Sylvester)
        q_params, block, diag2, b = flow_params.split(flow.sizes, dim=1)
        block = block.view(-1, flow.rank, flow.rank)
        r1 = block.triu(1) + torch.diag_embed(torch.tanh(block.diagonal(dim1=1, dim2=2)))
        r2 = block.tril(-1).mT + torch.diag_embed(torch.tanh(diag2))
        q = flow.orthogonal(q_params)
        hidden = torch.tanh(r2 @ q.mT @ expected[..., None] + b[..., None])
        expected = expected + (q @ r1 @ hidden)[..., 0]
    torch.testing.assert_close(stack(z, params)[0], expected)


def test_triangular_alternates_upper_and_lower_jacobians() -> None:
    stack, z, params = make("triangular", 4, 2)
    for k, (flow, flow_params) in enumerate(zip(stack.flows, params.split(stack.sizes, dim=1), strict=True)):
        lower, upper = strict_triangles(jacobians(flow, z, flow_params))
        zero, nonzero = (lower, upper) if k == 0 else (upper, lower)
        assert (zero == 0).all() and (nonzero != 0).any()


def test_iaf_jacobian_is_triangular_in_its_variable_order() -> None:
    """Flow 0 is lower triangular; flow 1 reverses the order, so it is upper triangular."""
    stack, z, params = make("iaf", 5, 2, hidden=16)
    for flow in stack.flows:  # make the autoregressive weights large enough to see
        torch.nn.init.normal_(flow.first.weight)
        torch.nn.init.normal_(flow.last.weight)
    for k, (flow, flow_params) in enumerate(zip(stack.flows, params.split(stack.sizes, dim=1), strict=True)):
        lower, upper = strict_triangles(jacobians(flow, z, flow_params))
        zero, nonzero = (upper, lower) if k == 0 else (lower, upper)
        assert (zero == 0).all() and (nonzero != 0).all()


def test_iaf_context_reaches_every_output() -> None:
    stack, z, params = make("iaf", 4, 1, hidden=8)
    rows = jacobian(lambda p: stack(z, p)[0], params)  # (B, D, B, context)
    per_output = rows.diagonal(dim1=0, dim2=2).abs().sum((1, 2))  # (D,)
    assert (per_output > 0).all()


# invertibility in the dtype the flow runs in


SCALES = [1, 10, 100, 1000]


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def gamma(n: int, dtype: torch.dtype) -> float:
    """Higham's γ_n = n u / (1 - n u): the relative error bound of an n-term dot product or sum."""
    return n * unit_roundoff(dtype) / (1 - n * unit_roundoff(dtype))


def exact_matmul(x: Tensor, y: Tensor) -> list[list[list[Fraction]]]:
    """x @ y for (B, M, N) and (B, N, P), exactly: (B, M, P) nested lists of Fractions."""
    out = []
    for matrix, other in zip(x.tolist(), y.mT.tolist(), strict=True):
        columns = [[Fraction(v) for v in column] for column in other]
        out.append([[sum(map(operator.mul, map(Fraction, row), columns[j])) for j in range(len(columns))]
                    for row in matrix])
    return out


def exact_slogdet(matrix: list[list[Fraction]]) -> tuple[float, float]:
    """Sign and log|det| of a square matrix of Fractions, by exact elimination."""
    rows, det = [list(row) for row in matrix], Fraction(1)
    for k in range(len(rows)):
        pivot = next((i for i in range(k, len(rows)) if rows[i][k] != 0), None)
        if pivot is None:
            return 0.0, -math.inf
        if pivot != k:
            rows[k], rows[pivot], det = rows[pivot], rows[k], -det
        det *= rows[k][k]
        for i in range(k + 1, len(rows)):
            ratio = rows[i][k] / rows[k][k]
            rows[i] = [value - ratio * top for value, top in zip(rows[i], rows[k], strict=True)]
    if det == 0:
        return 0.0, -math.inf
    exponent = abs(det.numerator).bit_length() - det.denominator.bit_length()  # |det| = mantissa 2^exponent
    mantissa = float(abs(det) / Fraction(2) ** exponent)
    return float(det > 0) - float(det < 0), math.log(mantissa) + exponent * math.log(2)


@contextmanager
def captured_tanh_chains() -> Iterator[list[tuple[Tensor, ...]]]:
    """Record the (z, A, C, b, Q or None) of every :func:`tanh_chain` a flow module calls: the map it really
    applies."""
    calls: list[tuple[Tensor, ...]] = []

    def spy(z: Tensor, a: Tensor, c: Tensor, b: Tensor, q: Tensor | None = None) -> tuple[Tensor, Tensor]:
        calls.append((z.detach(), a.detach(), c.detach(), b.detach(), None if q is None else q.detach()))
        return tanh_chain(z, a, c, b, q)

    modules = [module for name, module in sys.modules.items()
               if name.startswith("flowvae.flows.") and getattr(module, "tanh_chain", None) is tanh_chain]
    with pytest.MonkeyPatch.context() as patch:
        for module in modules:
            patch.setattr(module, "tanh_chain", spy)
        yield calls


def batch_jacobian(f, z: Tensor) -> Tensor:
    """∂f(z)_b/∂z_b (B, D, D) for a map f acting on each row of z separately, by autograd (D backward passes)."""
    z = z.detach().requires_grad_()
    out = f(z)
    rows = [torch.autograd.grad(out[:, i].sum(), z, retain_graph=True)[0] for i in range(out.shape[1])]
    return torch.stack(rows, 1)


def rotation_bound(dim: int, reflections: int, dtype: torch.dtype) -> float:
    """The README's bound on |log det(Q̄ᵀQ̄)| for a product of ``reflections`` Householder matrices formed in
    ``dtype``: 2D |log(1 - δ)|, δ = T √D γ̃_D (Higham, Lemma 19.3), γ̃_D = γ_{4D} here (c = 4, as measured products
    of D-term dot products and one division need)."""
    delta = reflections * math.sqrt(dim) * gamma(4 * dim, dtype)
    return -2 * dim * math.log1p(-delta)


def exact_log_det(flow: torch.nn.Module, z: Tensor, params: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""The flow's reported log-det, the sign and log|det| of its actual map's Jacobian, and the rounding bound.

    A flow that runs as one :func:`tanh_chain` applies f(z) = z + C tanh(A z + b) with the rounded A, C, b it
    passes, or, with a rotation Q̄, f(z) = Q̄ (u + C tanh(A u + b)), u = Q̄ᵀ z; the D×D Jacobian autograd gives for
    it in its dtype is checked to be this map's. That Jacobian, Q̄ (I + C diag(h'(a)) A) Q̄ᵀ with a = A Q̄ᵀ z + b,
    has det det(Q̄)² det(I_M + diag(h') G), G = A C. Here a is formed exactly and rounded once, and G, det(Q̄) and
    the determinant are exact (Fractions), so only h' is rounded (to float64) however much A z, A C and
    1 + h' G_mm cancel. Any other flow (IAF) must have an exactly triangular Jacobian: its det is the product of
    the diagonal autograd gives in the flow's dtype, exact since nothing cancels.

    The bound, with u the flow's unit roundoff plus float64's (the reference's own rounding):
    - the flow's pre-activation ã is the exact one at a z moved by γ_{D+1} (D products and D sums), so
      |ã_m - a_m| <= γ_{D+1} (|A||z| + |b|)_m (plus |A| γ_D |Q̄ᵀ||z| for the rounded u); the reported term is the
      exact one at some such ã_m, and ℓ_m(ξ) = log(tanh² ξ + sech² ξ (1 + G_mm)) is monotone in |ξ|, so the two
      ends of that interval bound it;
    - its h' is off by ~8 ulps relative (sech² from e^{-2|a|}, or 1 - h̃² near h' = 1), moving ℓ_m by
      8u h' |∂ℓ_m/∂h'| = 8u h' |G_mm| / (1 + h' G_mm), plus, for 1 - h̃² from a rounded tanh, <= 5u absolute, which
      moves ℓ_m by <= 5u since |∂ℓ_m/∂h'| (1 - h') <= 1 when |G_mm| <= 1 (Sylvester's diagonals);
    - each log and product, and the sum over m: 8u per term and (M + 2) u Σ|ℓ_m|;
    - a rotation's log det(Q̄ᵀQ̄), which the flow leaves out: :func:`rotation_bound`.
    The terms are those of the triangular Jacobian the flow's formula assumes; off-triangle entries of G are not
    rounding of the log-det and are not allowed for.
    """
    u = unit_roundoff(params.dtype) + unit_roundoff(torch.float64)
    jac_run = batch_jacobian(lambda x: flow(x, params)[0], z).double()
    with captured_tanh_chains() as calls:
        reported = flow(z, params)[1].double()
    assert len(calls) <= 1, "one flow is one tanh chain"
    if not calls:  # triangular: exactly zero on one side of the diagonal, det = product of the diagonal
        lower, upper = strict_triangles(jac_run)
        assert (lower == 0).all() or (upper == 0).all(), "a flow that is no tanh chain must be triangular"
        diagonal = jac_run.diagonal(dim1=-2, dim2=-1)
        terms = diagonal.abs().log()
        bound = 8 * u * terms.shape[-1] + (terms.shape[-1] + 2) * u * terms.abs().sum(-1)
        return reported, diagonal.sign().prod(-1), terms.sum(-1), bound
    ((z_in, a, c, b, q),) = calls
    assert torch.equal(z_in, z)
    a, c, b = a.squeeze(1), c.squeeze(1), b.squeeze(1)  # one flow: (B, M, D), (B, D, M), (B, M)
    dim, ones = z.shape[1], torch.ones_like(z[:, :1])
    if q is None:
        a_z, q_sign, q_log_det, q_bound, u_shift = a, 1.0, 0.0, 0.0, 0.0
        abs_u = z.abs().double()  # |u| = |z|
    else:
        q = q.squeeze(1)  # (B, D, D)
        a_z = torch.tensor(exact_matmul(a, q.mT), dtype=torch.float64)  # A Q̄ᵀ to within float64's rounding
        q_sign, q_log_det = torch.tensor([exact_slogdet([[Fraction(x) for x in row] for row in matrix])
                                          for matrix in q.tolist()], dtype=torch.float64).T
        q_sign, q_log_det = q_sign * q_sign, 2 * q_log_det  # det(Q̄)²
        q_bound = rotation_bound(dim, getattr(flow, "num_householder", flow.rank), params.dtype)
        abs_u = (q.abs().double().mT @ z.abs().double().unsqueeze(-1)).squeeze(-1)  # |Q̄ᵀ||z| >= |u|
        u_shift = gamma(dim, params.dtype) * (a.abs().double() @ abs_u.unsqueeze(-1)).squeeze(-1)
    with_bias = torch.cat([a_z, b.unsqueeze(-1).to(a_z.dtype)], -1)
    pre = torch.tensor(
        exact_matmul(with_bias, torch.cat([z, ones], -1).to(with_bias.dtype).unsqueeze(-1)), dtype=torch.float64
    )[..., 0]
    gram = exact_matmul(a, c)  # G = A C, exact
    diagonal = torch.tensor([[1 + g[m][m] for m in range(len(g))] for g in gram], dtype=torch.float64)  # 1 + G_mm
    inputs = torch.cat([abs_u, ones.double()], -1)
    shift = gamma(dim + 1, params.dtype) * (torch.cat([a, b.unsqueeze(-1)], -1).abs().double()
                                            @ inputs.unsqueeze(-1)).squeeze(-1) + u_shift  # >= the flow's |ã - a|

    def squares(x: Tensor) -> tuple[Tensor, Tensor]:
        e = torch.exp(-2 * x.abs())
        return ((1 - e) / (1 + e)).square(), 4 * e / (1 + e).square()  # tanh², sech²

    tanh2, slope = squares(pre)
    # autograd's Jacobian in the flow's dtype is this map's: its h' is off by <= min(0.77 shift, 1) + 8u (0.77 the
    # largest |d sech²/da|), and each entry by a few roundings
    inner = torch.eye(dim, dtype=torch.float64) + c.double() @ (slope.unsqueeze(-1) * a.double())
    slope_error = (0.8 * shift).clamp(max=1) + 8 * u
    inner_error = c.double().abs() @ (slope_error.unsqueeze(-1) * a.double().abs()) + 4 * u * (1 + inner.abs())
    if q is None:
        jac_ref, jac_error = inner, inner_error
    else:
        qd = q.double()
        jac_ref = qd @ inner @ qd.mT
        jac_error = qd.abs() @ (inner_error + 2 * gamma(dim, params.dtype) * inner.abs()) @ qd.abs().mT + 4 * u
    assert ((jac_run - jac_ref).abs() <= jac_error).all()
    # det(I_M + diag(h') G) with only h' rounded (to float64)
    sign, log_abs_det = torch.tensor([exact_slogdet([[(i == j) + Fraction(h[i]) * g[i][j] for j in range(len(g))]
                                                     for i in range(len(g))])
                                      for h, g in zip(slope.tolist(), gram, strict=True)], dtype=torch.float64).T

    def term(x: Tensor) -> Tensor:
        tanh2, slope = squares(x)
        return torch.log(tanh2 + slope * diagonal)

    terms = term(pre)
    nearer, further = term((pre.abs() - shift).clamp(min=0)), term(pre.abs() + shift)  # ℓ_m is monotone in |a|
    moved = torch.maximum((nearer - terms).abs(), (further - terms).abs())
    slope_part = 8 * u * slope * (diagonal - 1).abs() / (tanh2 + slope * diagonal)
    bound = (moved + slope_part + 8 * u).sum(-1) + (terms.shape[-1] + 2) * u * terms.abs().sum(-1) + q_bound
    return reported, sign * q_sign, log_abs_det + q_log_det, bound


def probe(flow: torch.nn.Module, z: Tensor, params: Tensor) -> Tensor:
    """z with its second half moved (least squares, in float64) to where a tanh-chain flow's pre-activations
    A z + b are 0 (every other row: there h' = 1 and det = det(I + A C), the flow's worst case) or ~N(0, 1/4):
    with large params they are large at a random z, and the flow is the identity to rounding there."""
    with captured_tanh_chains() as calls:
        flow(z, params)
    if not calls:
        return z
    ((_, a, _, b, q),) = calls
    a, b, half = a[:, 0].double(), b[:, 0].double(), z.shape[0] // 2
    if q is not None:  # the pre-activations are A Q̄ᵀ z + b
        a = a @ q[:, 0].double().mT
    target = torch.randn(b.shape, dtype=torch.float64) / 2 * (torch.arange(len(b)) % 2).unsqueeze(-1)
    miss = (target - b - (a @ z.double().unsqueeze(-1)).squeeze(-1))[half:]
    moved = z.double()[half:] + (torch.linalg.pinv(a[half:]) @ miss.unsqueeze(-1)).squeeze(-1)
    return torch.cat([z[:half], moved.to(z.dtype)])


def per_flow(name: str, dtype: torch.dtype, scale: float, batch: int = 8, dim: int = 4, seed: int = 0):
    """Each flow of a 2-flow stack (both orders for alternating families), params × scale, at a probed input."""
    torch.manual_seed(seed)
    stack = build(name, dim, 2, **({"hidden": 16} if name == "iaf" else {})).to(dtype)
    z = torch.randn(batch, dim, dtype=dtype)
    params = torch.randn(batch, stack.num_params, dtype=dtype) * scale
    for flow, flow_params in zip(stack.flows, params.split(stack.sizes, dim=1), strict=True):
        z = probe(flow, z, flow_params)
        yield flow, z, flow_params
        with torch.no_grad():
            z = flow(z, flow_params)[0]


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", [name for name in FLOWS if name != "none"])
def test_every_flow_is_invertible_in_its_dtype(name: str, dtype: torch.dtype, scale: float) -> None:
    """The actual map's Jacobian (the rounded parameters it uses, exact arithmetic) has det > 0, and the log-det
    the flow reports is its log|det| up to the rounding bound of :func:`exact_log_det`."""
    for flow, z, params in per_flow(name, dtype, scale):
        reported, sign, log_abs_det, bound = exact_log_det(flow, z, params)
        assert (sign > 0).all()
        error = (reported - log_abs_det).abs()
        assert (error <= bound).all(), f"log-det off by {error.max().item():.3g} (bound {bound.max().item():.3g})"


@pytest.mark.parametrize("dtype, draws", [(torch.float32, 200_000), (torch.float64, 2_000)])
def test_planar_constraint_holds_for_the_rounded_u_hat(dtype: torch.dtype, draws: int) -> None:
    """1 + wᵀû > 0 for the rounded û the map uses, by the documented margin, and the reported t is that value.

    The exact dot product of the rounded û and w: in float64 for float32 (products exact, the sum off by at most
    5 ε64 Σ|w_i û_i|, ~1e-9 of the margin), with Fractions for float64.
    """
    torch.manual_seed(0)
    scales = torch.tensor([1.0, 10.0, 100.0, 1000.0], dtype=dtype).repeat_interleave(draws // 4).unsqueeze(-1)
    u, w = torch.randn(2, draws, 5, dtype=dtype) * scales
    w[:8] *= torch.logspace(-12, -3, 8, dtype=dtype).unsqueeze(-1)  # tiny w: r < 1, the guard acts
    u[8:16] = -w[8:16] * torch.logspace(0, 3, 8, dtype=dtype).unsqueeze(-1)  # u = -c w: wᵀu << 0, the floor acts
    u_hat, t = Planar.reparametrize(u, w)
    if dtype == torch.float32:
        exact = 1 + (w.double() * u_hat.double()).sum(-1)
    else:
        exact = torch.tensor([float(1 + sum(map(operator.mul, map(Fraction, row), map(Fraction, other))))
                              for row, other in zip(w.tolist(), u_hat.tolist(), strict=True)], dtype=torch.float64)
    floor = 2 * torch.finfo(dtype).eps * ((5 + 4) * (w * u).abs().sum(-1).double() + 3)
    assert (exact >= floor / 2).all(), f"1 + wᵀû down to {(exact / floor).min().item():.3g} of the floor"
    assert ((t.double() - exact).abs() <= 2 * torch.finfo(dtype).eps * exact).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_planar_log_det_where_tanh_saturates(dtype: torch.dtype) -> None:
    """wᵀû = 1e6 and pre-activations a = b from 0 to 12 (z = 0, so a is exact): sech²(a) wᵀû crosses 1 where
    tanh(a) rounds to within ε of 1, so a log-det read from the rounded h would be off by ~ε wᵀû."""
    torch.manual_seed(0)
    w = torch.randn(64, 4, dtype=dtype)
    u = w * (1e6 / (w * w).sum(-1, keepdim=True))
    b = torch.linspace(0, 12, 64, dtype=dtype).unsqueeze(-1)
    reported, sign, log_abs_det, bound = exact_log_det(Planar(4), torch.zeros(64, 4, dtype=dtype),
                                                       torch.cat([u, w, b], -1))
    assert (sign > 0).all() and ((reported - log_abs_det).abs() <= bound).all()
    assert (log_abs_det > 1).any() and (log_abs_det < 1).any()  # the crossing is in range


def test_iaf_gates_keep_their_margin_with_subnormals_flushed() -> None:
    """Gate logits far below the floor (params x1e4) in float32 with subnormals flushed, as in training: every gate
    σ the map uses (the Jacobian's diagonal) stays at sqrt(eps) or above, and the log-det is Σ log σ."""
    flushing = (torch.tensor([1e-39]) * 1.0).item() == 0.0
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush subnormal floats")
    try:
        stack, z, params = make("iaf", 4, 2, dtype=torch.float32, batch=32, scale=1e4, hidden=16)
        margin = torch.finfo(torch.float32).eps ** 0.5
        for flow, flow_params in zip(stack.flows, params.split(stack.sizes, dim=1), strict=True):
            jac = batch_jacobian(lambda x, flow=flow, p=flow_params: flow(x, p)[0], z)
            gates = jac.diagonal(dim1=-2, dim2=-1)
            assert (gates >= margin * (1 - 1e-5)).all() and (gates <= margin * (1 + 1e-5)).any()
            z_new, log_det = flow(z, flow_params)
            assert torch.isfinite(z_new).all()
            torch.testing.assert_close(log_det.double(), gates.double().log().sum(-1), rtol=0, atol=1e-5)
            z = z_new.detach()
    finally:
        torch.set_flush_denormal(flushing)


def made_gate_logits(stack: FlowStack, z: Tensor, params: Tensor, floored: bool = True) -> Tensor:
    """The gate logits (B, K, D) an IAF stack's MADEs compute, with or without their floor."""
    logits, apply = [], iaf._MadeChain.apply

    def spy(*args: Tensor) -> tuple[Tensor, Tensor]:
        out = apply(*args)
        logits.append(out[1].detach())
        return out

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(iaf._MadeChain, "apply", spy)
        if not floored:
            patch.setattr(iaf, "gate_floor", lambda dtype: -math.inf)
        stack(z, params)
    return torch.cat(logits, 1)


def test_iaf_gradients_with_gates_at_the_floor() -> None:
    """The written-out backward passes no gradient through a floored gate: gradcheck where some gates are far
    below the floor and the rest clear of it."""
    stack, z, params = make("iaf", 3, 2, batch=4, scale=1000.0, hidden=6)
    raw, floor = made_gate_logits(stack, z, params, floored=False), iaf.gate_floor(torch.float64)
    assert (raw < floor - 1).any() and (raw > floor + 1).any() and ((raw - floor).abs() > 1e-3).all()
    assert (made_gate_logits(stack, z, params)[:, 0] == raw[:, 0].clamp(min=floor)).all()  # flow 1's input differs
    assert torch.autograd.gradcheck(stack, (z.requires_grad_(), params.requires_grad_()))


@pytest.mark.parametrize("dtype", DTYPES)
def test_sylvester_diagonal_factors_keep_their_margin(dtype: torch.dtype) -> None:
    """Params x1000 saturate tanh: the diagonals the map uses (R1_mm R2_mm, exactly the diagonal of A C for the
    triangular family) keep 1 + R1_mm R2_mm >= sqrt(eps), far above its rounding, and reach the clamp."""
    stack, z, params = make("triangular", 4, 2, dtype=dtype, batch=64, scale=1000.0)
    margin = torch.finfo(dtype).eps ** 0.5
    for flow, flow_params in zip(stack.flows, params.split(stack.sizes, dim=1), strict=True):
        with captured_tanh_chains() as calls:
            flow(z, flow_params)
        ((_, a, c, _, _),) = calls
        factors = 1 + (a.double() @ c.double()).diagonal(dim1=-2, dim2=-1)  # one product each: within an ulp
        assert (factors >= margin).all() and (factors < 3 * margin).any()


# shapes, dtypes, params


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", FAMILIES)
def test_shapes_and_dtypes(name: str, dtype: torch.dtype) -> None:
    stack, z, params = make(name, 3, 2, dtype=dtype, batch=7)
    z_k, log_det = stack(z, params)
    assert z_k.shape == (7, 3) and log_det.shape == (7,)
    assert z_k.dtype == dtype and log_det.dtype == dtype


@pytest.mark.parametrize("name", FAMILIES)
def test_forward_creates_no_tensor_on_a_fixed_device(name: str) -> None:
    """On the meta device any tensor made on the CPU inside forward would raise."""
    stack = build(name, 4, 2).to("meta")
    z_k, log_det = stack(torch.empty(5, 4, device="meta"), torch.empty(5, stack.num_params, device="meta"))
    assert z_k.shape == (5, 4) and log_det.shape == (5,)


@pytest.mark.parametrize("name, dim, n_flows, flow_options, expected", [
    ("planar", 5, 3, {}, 3 * (2 * 5 + 1)),
    ("orthogonal", 5, 2, {}, 2 * (5 * 5 - 15 + 25 + 10)),
    ("orthogonal", 10, 2, {}, 2 * (10 * 8 - 36 + 64 + 16)),
    ("orthogonal", 6, 1, {"num_ortho_vecs": 2}, 6 * 2 - 3 + 4 + 4),
    ("householder", 4, 2, {}, 2 * (8 * 4 + 16 + 8)),
    ("householder", 4, 1, {"num_householder": 2}, 2 * 4 + 16 + 8),
    ("triangular", 4, 3, {}, 3 * (16 + 8)),
    ("iaf", 4, 3, {}, 3 * 64),
    ("iaf", 4, 3, {"hidden": 32, "context": 8}, 3 * 8),
    ("none", 4, 3, {}, 0),
])  # fmt: skip
def test_num_params(name: str, dim: int, n_flows: int, flow_options: dict, expected: int) -> None:
    stack = build(name, dim, n_flows, **flow_options)
    assert stack.num_params == expected == sum(flow.num_params for flow in stack.flows)


@pytest.mark.parametrize("name", FAMILIES)
def test_every_param_column_is_used(name: str) -> None:
    stack, z, params = make(name, 4, 2, batch=16, scale=1.0)
    params.requires_grad_()
    z_k, log_det = stack(z, params)
    (z_k.sum() + log_det.sum()).backward()
    assert (params.grad.abs().sum(0) > 0).all()


@pytest.mark.parametrize("name", FAMILIES)
def test_stack_is_the_composition_of_its_flows(name: str) -> None:
    stack, z, params = make(name, 3, 3)
    expected_z, expected_log_det, start = z, torch.zeros(3, dtype=z.dtype), 0
    for flow in stack.flows:
        expected_z, log_det = flow(expected_z, params[:, start : start + flow.num_params])
        expected_log_det, start = expected_log_det + log_det, start + flow.num_params
    z_k, log_det = stack(z, params)
    torch.testing.assert_close(z_k, expected_z)
    torch.testing.assert_close(log_det, expected_log_det)


def test_wrong_params_width_raises() -> None:
    stack, z, params = make("planar", 3, 2)
    with pytest.raises(ValueError, match="14 columns"):
        stack(z, params[:, :-1])


# identity: none and n_flows == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, n_flows", [("none", 0), ("none", 4)] + [(name, 0) for name in FAMILIES])
def test_identity_stacks(name: str, n_flows: int, dtype: torch.dtype) -> None:
    stack = build(name, 3, n_flows)
    z = torch.randn(5, 3, dtype=dtype)
    assert stack.num_params == 0 and len(stack) == 0 and not list(stack.parameters())
    for params in (torch.empty(5, 0, dtype=dtype), None):
        z_k, log_det = stack(z, params)
        assert torch.equal(z_k, z)
        assert torch.equal(log_det, torch.zeros(5, dtype=dtype)) and log_det.dtype == dtype


@pytest.mark.parametrize("name, flow_options", [(name, {}) for name in FLOWS] + [
    ("orthogonal", {"num_ortho_vecs": 2}), ("householder", {"num_householder": 3}),
    ("iaf", {"hidden": 8, "context": 4}),
])  # fmt: skip
def test_empty_stack_draws_no_random_numbers(name: str, flow_options: dict) -> None:
    state = torch.get_rng_state()
    build(name, 4, 0, **flow_options)
    assert torch.equal(torch.get_rng_state(), state)


# build errors


def test_unknown_flow_name_lists_allowed_names() -> None:
    with pytest.raises(ValueError, match="'radial'.*none, planar, iaf, householder, triangular, orthogonal"):
        build("radial", 3, 1)


@pytest.mark.parametrize("name, dim, n_flows, flow_options, match", [
    ("planar", 3, 1, {"hidden": 4}, "hidden.*'planar'.*no options"),
    ("iaf", 3, 1, {"hiden": 4}, "hiden.*'iaf'.*allowed: hidden, context"),
    ("orthogonal", 3, 0, {"num_ortho_vecs": 4}, r"num_ortho_vecs.*\[1, 3\].*got 4"),
    ("orthogonal", 3, 1, {"num_ortho_vecs": 0}, r"num_ortho_vecs.*\[1, 3\].*got 0"),
    ("orthogonal", 3, 1, {"num_ortho_vecs": 2.0}, "num_ortho_vecs.*got 2.0"),
    ("householder", 3, 1, {"num_householder": 0}, "num_householder.*>= 1.*got 0"),
    ("householder", 3, 1, {"num_householder": True}, "num_householder.*got True"),
    ("iaf", 3, 0, {"hidden": 0}, "hidden.*>= 1.*got 0"),
    ("iaf", 3, 1, {"context": -2}, "context.*>= 1.*got -2"),
    ("planar", 3, -1, {}, "n_flows.*>= 0.*got -1"),
    ("triangular", 0, 1, {}, "dim.*>= 1.*got 0"),
])  # fmt: skip
def test_bad_options_raise(name: str, dim: int, n_flows: int, flow_options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build(name, dim, n_flows, **flow_options)


def test_options_lists_defaults() -> None:
    assert options("orthogonal") == {"num_ortho_vecs": None}
    assert options("householder") == {"num_householder": 8}
    assert options("iaf") == {"hidden": 64, "context": None}
    assert options("planar") == options("triangular") == options("none") == {}


def test_default_num_ortho_vecs_is_min_8_dim() -> None:
    assert [flow.rank for flow in build("orthogonal", 3, 1).flows] == [3]
    assert [flow.rank for flow in build("orthogonal", 12, 1).flows] == [8]


# gradients


@pytest.mark.parametrize("rotated", [False, True])
def test_tanh_chain_is_its_loop(rotated: bool) -> None:
    torch.manual_seed(0)
    z, a, c, b = torch.randn(4, 3), torch.randn(4, 5, 2, 3), torch.randn(4, 5, 3, 2), torch.randn(4, 5, 2)
    q = torch.randn(4, 5, 3, 3) if rotated else None  # any matrices: the chain must not assume orthogonality
    expected, hidden = z, []
    for k in range(5):
        u = q[:, k].mT @ expected.unsqueeze(-1) if rotated else expected.unsqueeze(-1)
        hidden.append(torch.tanh(a[:, k] @ u + b[:, k].unsqueeze(-1)).squeeze(-1))
        u = u + c[:, k] @ hidden[-1].unsqueeze(-1)
        expected = (q[:, k] @ u if rotated else u).squeeze(-1)
    z_k, h = tanh_chain(z, a, c, b, q)
    torch.testing.assert_close(z_k, expected)
    torch.testing.assert_close(h, torch.stack(hidden, 1))


@pytest.mark.parametrize("rotated", [False, True])
@pytest.mark.parametrize("outputs", ["both", "z", "h"])
def test_tanh_chain_backward_matches_finite_differences(outputs: str, rotated: bool) -> None:
    """The hand-written backward, through z_K, through h (what the log-dets use), and through both; with
    rotations, their gradients too."""
    torch.manual_seed(0)
    shapes = [(3, 4), (3, 5, 2, 4), (3, 5, 4, 2), (3, 5, 2)] + ([(3, 5, 4, 4)] if rotated else [])
    inputs = tuple(torch.randn(shape, dtype=torch.float64, requires_grad=True) for shape in shapes)

    def chain(*args: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        z_k, h = tanh_chain(*args)
        return {"both": (z_k, h), "z": z_k, "h": h}[outputs]

    assert torch.autograd.gradcheck(chain, inputs)


@pytest.mark.parametrize("name", FAMILIES)
def test_stack_gradients_match_finite_differences(name: str) -> None:
    stack, z, params = make(name, 3, 3, batch=4, scale=1.0, **({"hidden": 6} if name == "iaf" else {}))
    assert torch.autograd.gradcheck(stack, (z.requires_grad_(), params.requires_grad_()))


@pytest.mark.parametrize("context", [None, 4])
def test_iaf_weight_gradients_match_finite_differences(context: int | None) -> None:
    """IAF's backward is written out for its MADE weights too: check those against finite differences."""
    stack, z, params = make("iaf", 3, 3, batch=4, scale=1.0, hidden=6, context=context)
    names = [name for name, _ in stack.named_parameters()]
    weights = tuple(w.detach().requires_grad_() for w in stack.parameters())

    def run(z: Tensor, params: Tensor, *weights: Tensor) -> tuple[Tensor, Tensor]:
        return torch.func.functional_call(stack, dict(zip(names, weights, strict=True)), (z, params))

    assert torch.autograd.gradcheck(run, (z.requires_grad_(), params.requires_grad_(), *weights))


@pytest.mark.parametrize("name", FAMILIES)
def test_flows_in_groups_give_the_same_result(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A big batch runs the flows in groups (to stay in cache): values and gradients must not change."""
    stack, z, params = make(name, 4, 7, batch=5, scale=1.0)
    params.requires_grad_()
    results = []
    for matrices in (10**9, 3 * 5):  # all 7 flows at once, then groups of 3, 3, 1
        monkeypatch.setattr(base, "CHAIN_MATRICES", matrices)
        z_k, log_det = stack(z, params)
        (grad,) = torch.autograd.grad((z_k**2).sum() + log_det.sum(), params)
        results.append((z_k, log_det, grad))
    for first, grouped in zip(*results, strict=True):
        torch.testing.assert_close(grouped, first)


def test_mixed_stack_is_the_composition_of_its_flows() -> None:
    torch.manual_seed(0)
    flows = [Planar(3), TriangularSylvester(3, reverse=True), Planar(3)]
    stack = FlowStack(3, flows).double()
    z = torch.randn(4, 3, dtype=torch.float64)
    params = torch.randn(4, stack.num_params, dtype=torch.float64)
    expected_z, expected_log_det = z, 0
    for flow, flow_params in zip(flows, params.split(stack.sizes, dim=1), strict=True):
        expected_z, log_det = flow(expected_z, flow_params)
        expected_log_det = expected_log_det + log_det
    z_k, log_det = stack(z, params)
    torch.testing.assert_close(z_k, expected_z)
    torch.testing.assert_close(log_det, expected_log_det)


@pytest.mark.parametrize("name", FAMILIES)
def test_gradients_are_finite(name: str) -> None:
    stack, z, params = make(name, 4, 3, dtype=torch.float32, batch=32)
    params.requires_grad_()
    z_k, log_det = stack(z, params)
    ((z_k**2).sum() - log_det.sum()).backward()
    assert torch.isfinite(params.grad).all()
    for weight in stack.parameters():
        assert weight.grad is not None and torch.isfinite(weight.grad).all()
    assert isinstance(stack.flows[0], IAF) == bool(list(stack.parameters()))
