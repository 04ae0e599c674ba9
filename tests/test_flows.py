"""Tests of flowvae.flows: log-dets against autograd, invertibility, shapes, the build contract."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torch.autograd.functional import jacobian

from flowvae.flows import FLOWS, IAF, FlowStack, Planar, TriangularSylvester, base, build, options
from flowvae.flows.base import tanh_chain
from flowvae.flows.sylvester import Sylvester

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


def test_planar_constraint_holds_for_random_params() -> None:
    torch.manual_seed(0)
    u, w = torch.randn(2, 10_000, 5, dtype=torch.float64) * 10
    u_hat, slack = Planar.reparametrize(u, w)
    assert (slack > 0).all()
    # w·û = slack - 1 > -1 up to rounding of the sum w·u + (…) ‖w‖², whose terms reach ~1e3 here
    assert ((w * u_hat).sum(-1) >= -1 - 1e-12).all()
    torch.testing.assert_close((w * u_hat).sum(-1), slack - 1, atol=1e-12, rtol=0)


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
    with pytest.raises(ValueError, match="'radial'.*none, planar, orthogonal, householder, triangular, iaf"):
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


def test_tanh_chain_is_its_loop() -> None:
    torch.manual_seed(0)
    z, a, c, b = torch.randn(4, 3), torch.randn(4, 5, 2, 3), torch.randn(4, 5, 3, 2), torch.randn(4, 5, 2)
    expected, hidden = z, []
    for k in range(5):
        hidden.append(torch.tanh(a[:, k] @ expected.unsqueeze(-1) + b[:, k].unsqueeze(-1)).squeeze(-1))
        expected = expected + (c[:, k] @ hidden[-1].unsqueeze(-1)).squeeze(-1)
    z_k, h = tanh_chain(z, a, c, b)
    torch.testing.assert_close(z_k, expected)
    torch.testing.assert_close(h, torch.stack(hidden, 1))


@pytest.mark.parametrize("outputs", ["both", "z", "h"])
def test_tanh_chain_backward_matches_finite_differences(outputs: str) -> None:
    """The hand-written backward, through z_K, through h (what the log-dets use), and through both."""
    torch.manual_seed(0)
    shapes = [(3, 4), (3, 5, 2, 4), (3, 5, 4, 2), (3, 5, 2)]
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
