"""The coupling flow's written-out spline (flowvae.models.spline.rqs) against zuko's MonotonicRQSTransform as the
flow used it: the same values, inverses, log|det|s and gradients (with respect to the values and to every logit,
by autograd) in float64 and float32, inside and outside [-B, B], on and next to the knots."""

from __future__ import annotations

import math

import pytest
import torch
from zuko.transforms import MonotonicRQSTransform

from flowvae.models import spline
from flowvae.models.spline import rqs

BINS, BOUND = 8, 5.0


def _zuko(x: torch.Tensor, params: torch.Tensor, bound: float, inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """zuko's spline exactly as CouplingFlow called it: logits on the last axis, call_and_ladj of it or its inverse."""
    k = (params.shape[-1] + 1) // 3
    spline = MonotonicRQSTransform(params[..., :k], params[..., k:2 * k], params[..., 2 * k:], bound)
    return (spline.inv if inverse else spline).call_and_ladj(x)


def _knots(params: torch.Tensor, bound: float, vertical: bool) -> torch.Tensor:
    """zuko's knots (N, K+1) for each row of logits, horizontal or vertical."""
    k = (params.shape[-1] + 1) // 3
    spline = MonotonicRQSTransform(params[..., :k], params[..., k:2 * k], params[..., 2 * k:], bound)
    return (spline.vertical if vertical else spline.horizontal).detach()


MODERATE = (0.05, 0.5, 1.5, 3.0)  # logit scales: from near the identity to well into the soft clamps
EXTREME = (30.0,)  # every logit saturated: bins 10⁻³ of another's width, slopes from 10⁻⁸ to 10⁸


def _cases(dtype: torch.dtype, bins: int = BINS, bound: float = BOUND, n: int = 600, seed: int = 0,
           scales: tuple[float, ...] = MODERATE) -> tuple[torch.Tensor, torch.Tensor]:
    """(x (N,), logits (N, 3K-1)): logits of each scale, values inside, outside, at ±B exactly and at 0."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor(scales).repeat_interleave(n // len(scales))[:, None]
    params = scale * torch.randn(n, 3 * bins - 1, generator=g, dtype=torch.float64)
    x = 1.2 * bound * (2 * torch.rand(n, generator=g, dtype=torch.float64) - 1)  # a sixth outside
    x[:8] = torch.tensor([-bound, bound, 0.0, -2 * bound, 3 * bound, 1e6, -1e6, bound * (1 - 1e-12)])
    return x.to(dtype), params.to(dtype)


def _grads(fn, x: torch.Tensor, params: torch.Tensor, seed: int = 1):
    """y, ladj and the gradients of a random combination of them with respect to x and the logits."""
    x, params = x.clone().requires_grad_(), params.clone().requires_grad_()
    y, ladj = fn(x, params)
    g = torch.Generator().manual_seed(seed)
    weights = torch.randn(2, *y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    gx, gp = torch.autograd.grad((weights[0] * y + weights[1] * ladj).sum(), (x, params))
    return y.detach(), ladj.detach(), gx, gp


def _close(ours: torch.Tensor, theirs: torch.Tensor, rel: float, name: str) -> None:
    """Equal to ``rel`` of the quantity's scale, element by element (a gradient's scale: its largest entry)."""
    scale = theirs.abs().amax().clamp_min(1.0)
    error = (ours - theirs).abs().amax().item()
    assert error <= rel * scale.item(), f"{name}: max error {error:.3g} > {rel:.1g} × {scale.item():.3g}"


@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
@pytest.mark.parametrize(("bins", "bound"), [(8, 5.0), (4, 3.0)])
def test_values_log_dets_and_gradients_are_zukos_in_float64(inverse, bins, bound):
    x, params = _cases(torch.float64, bins, bound)
    theirs = _grads(lambda x, p: _zuko(x, p, bound, inverse), x, params)
    ours = _grads(lambda x, p: rqs(x, p, bound, inverse), x, params)
    for a, b, name in zip(ours, theirs, ["y", "ladj", "d/dx", "d/dlogits"], strict=True):
        _close(a, b, 1e-9, name)


@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
def test_float32_is_as_close_to_float64_as_zukos_own_float32(inverse):
    """In float32 both implementations round; ours may be no further from the float64 result than zuko's is."""
    x, params = _cases(torch.float64, n=2000, seed=3)
    exact = _grads(lambda x, p: _zuko(x, p, BOUND, inverse), x, params)
    theirs = _grads(lambda x, p: _zuko(x, p, BOUND, inverse), x.float(), params.float())
    ours = _grads(lambda x, p: rqs(x, p, BOUND, inverse), x.float(), params.float())
    for a, b, e, name in zip(ours, theirs, exact, ["y", "ladj", "d/dx", "d/dlogits"], strict=True):
        scale = e.abs().amax().clamp_min(1.0)
        ours_error = ((a.double() - e).abs().amax() / scale).item()
        zukos_error = ((b.double() - e).abs().amax() / scale).item()
        assert ours_error <= 2 * zukos_error + 1e-6, f"{name}: ours {ours_error:.3g}, zuko's {zukos_error:.3g}"


@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_on_and_next_to_the_knots(inverse, dtype):
    """On each of zuko's knots (the horizontal ones for the map, the vertical ones for the inverse) and one ulp to
    either side. Which bin a value on a knot falls in is a matter of rounding — zuko's knots and ours are computed
    differently —, but the value, the log|det| and the value's gradients are continuous across a knot (the spline
    is C¹ in x and in its knots): against float64, ours are as close as zuko's own in ``dtype``. The log|det|'s
    gradient is one-sided on a knot: ours is the float64 one from the left or from the right."""
    _, params = _cases(dtype, n=200, seed=5)
    knots = _knots(params, BOUND, vertical=inverse)  # (N, K+1), -B … B: every knot of every row, in dtype
    params = params.repeat_interleave(BINS + 1, 0)
    at = knots.reshape(-1)
    infinity = torch.tensor(math.inf, dtype=dtype)
    rel = 1e-9 if dtype == torch.float64 else 1e-5

    def ours(x, p):
        return rqs(x, p, BOUND, inverse)

    def zukos(x, p):
        return _zuko(x, p, BOUND, inverse)

    for x in (at, torch.nextafter(at, infinity), torch.nextafter(at, -infinity)):
        for fn, names in ((_values, ["y", "ladj"]), (_value_grads, ["dy/dx", "dy/dlogits"])):
            results = [fn(spline, x, params) for spline in (ours, zukos)]
            results.append(fn(zukos, x.double(), params.double()))  # float64 at the very same inputs
            for a, b, e, name in zip(*results, names, strict=True):
                scale = e.abs().amax().clamp_min(1.0).item()
                zukos_error = (b.double() - e).abs().amax().item()
                error = (a.double() - e).abs().amax().item()
                assert error <= 2 * zukos_error + rel * scale, f"{name}: {error:.3g} (zuko's: {zukos_error:.3g})"
    # the log|det|'s gradients on the knots: each row's is float64's just left or just right of the knot
    mine = _value_grads(lambda x, p: ours(x, p)[1], at, params)[1].double()
    theirs = _value_grads(lambda x, p: zukos(x, p)[1], at, params)[1].double()  # zuko's, in dtype, on its side
    # the one-sided gradients, taken at ±offset (and ±2 offset, for how fast they move there) in float64: beyond
    # where dtype's knots can lie and where zuko's inverse, which searches the bins again at the root it solved
    # for, can round onto the knot's other side; well inside a bin
    offset = 1e-9 if dtype == torch.float64 else 1e-5
    mine_error = torch.full((len(at),), math.inf, dtype=torch.float64)
    zukos_error = torch.full((len(at),), math.inf, dtype=torch.float64)
    allowed = torch.zeros(len(at), dtype=torch.float64)
    scale = torch.zeros(len(at), dtype=torch.float64)
    for step in (-offset, offset):
        near, far = (_value_grads(lambda x, p: zukos(x, p)[1], at.double() + k * step, params.double())[1]
                     for k in (1, 2))
        mine_error = torch.minimum(mine_error, (mine - near).abs().amax(1))
        zukos_error = torch.minimum(zukos_error, (theirs - near).abs().amax(1))
        allowed = torch.maximum(allowed, 2 * (far - near).abs().amax(1) + 10 * rel * (1 + near.abs().amax(1)))
        scale = torch.maximum(scale, near.abs().amax(1))
    bad = mine_error > 2 * zukos_error + allowed
    if dtype == torch.float32:  # leave out the few knots where float32 cannot pin a one-sided gradient down: it
        # moves by over a tenth of itself within 1e-5 of the knot (steep bins of the largest logits)
        steep = allowed > 0.1 * (1 + scale)
        assert steep.float().mean() < 0.05
        bad &= ~steep
    assert not bad.any(), f"{int(bad.sum())} of {len(at)} knots match neither side"


@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
def test_a_value_exactly_on_a_knot_is_in_the_bin_on_its_left(inverse):
    """zuko's convention, pinned where rounding cannot blur it: equal widths and heights (logits 0) on [-4, 4] put
    the knots at -4, -3, …, 4 exactly, in zuko's arithmetic and in ours. The knot derivatives differ, so the
    log|det|'s gradient differs from one side of a knot to the other: ours on the knot is zuko's just left of it."""
    g = torch.Generator().manual_seed(23)
    params = torch.zeros(7, 3 * BINS - 1, dtype=torch.float64)
    params[:, 2 * BINS:] = torch.randn(7, BINS - 1, generator=g, dtype=torch.float64)
    x = torch.arange(-3.0, 4.0, dtype=torch.float64)  # the interior knots

    def ladj_grads(spline, x):
        return _value_grads(lambda x, p: spline(x, p, 4.0, inverse)[1], x, params)

    left, right = ladj_grads(_zuko, x - 1e-9), ladj_grads(_zuko, x + 1e-9)
    assert ((left[1] - right[1]).abs().amax(1) > 1e-2).all()  # the sides do differ
    for ours, theirs in zip(ladj_grads(rqs, x), left, strict=True):
        assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-6)


def _values(fn, x, params):
    with torch.no_grad():
        return fn(x, params)


@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
def test_saturated_logits_in_float32_stay_finite_and_closer_than_zukos(inverse):
    """With every logit deep in the soft clamps (slopes 10⁻⁸ … 10⁸ within a bin) float32 is ill-conditioned:
    zuko's root of the inverse's quadratic cancels (its log|det| off by up to 1) and its discriminant can round
    below 0 (NaN). Ours takes the root that does not cancel and clamps the discriminant: finite everywhere, and
    at each value no further from float64 than zuko's."""
    x, params = _cases(torch.float64, n=2000, seed=21, scales=EXTREME)
    knots = _knots(params[:200], BOUND, vertical=inverse).reshape(-1)
    x, params = torch.cat([x, knots]), torch.cat([params, params[:200].repeat_interleave(BINS + 1, 0)])
    exact_y, exact_ladj = _zuko(x, params, BOUND, inverse)
    zuko_y, zuko_ladj = _zuko(x.float(), params.float(), BOUND, inverse)
    y, ladj = rqs(x.float(), params.float(), BOUND, inverse)
    assert torch.isfinite(y).all() and torch.isfinite(ladj).all()
    finite = torch.isfinite(zuko_y) & torch.isfinite(zuko_ladj)
    for ours, theirs, exact in ((y, zuko_y, exact_y), (ladj, zuko_ladj, exact_ladj)):
        ours_error = (ours.double() - exact).abs()[finite]
        zukos_error = (theirs.double() - exact).abs()[finite]
        assert ours_error.max() <= 2 * zukos_error.max() + 1e-4
        assert ours_error.mean() <= 2 * zukos_error.mean() + 1e-6


def _value_grads(fn, x, params):
    """The gradients of the sum of ``fn``'s output (of its first, if it returns two) with respect to x and the
    logits."""
    x, params = x.clone().requires_grad_(), params.clone().requires_grad_()
    out = fn(x, params)
    return torch.autograd.grad((out[0] if isinstance(out, tuple) else out).sum(), (x, params))


@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
def test_outside_the_bound_and_where_not_real_it_is_the_identity(inverse):
    x, params = _cases(torch.float64, n=400, seed=7)
    x[::2] = torch.where(x[::2] > 0, BOUND + 1 + x[::2].abs(), -BOUND - x[::2].abs())  # outside: |x| > B or = -B
    x[1] = -BOUND
    real = torch.ones_like(x)
    real[1::4] = 0.0
    left_alone = (x <= -BOUND) | (x > BOUND) | (real == 0)
    x, params = x.requires_grad_(), params.requires_grad_()
    y, ladj = rqs(x, params, BOUND, inverse, real)
    assert torch.equal(y[left_alone], x[left_alone]) and (ladj[left_alone] == 0).all()
    gx, gp = torch.autograd.grad((y + ladj).sum(), (x, params))
    assert (gx[left_alone] == 1).all() and (gp[left_alone] == 0).all()
    # and where real, it is zuko's, which knows no mask
    zy, zladj = _zuko(x.detach(), params.detach(), BOUND, inverse)
    real = real == 1
    _close(y.detach()[real], zy[real], 1e-9, "y")
    _close(ladj.detach()[real], zladj[real], 1e-9, "ladj")


def test_the_inverse_undoes_the_map_with_the_opposite_log_det():
    x, params = _cases(torch.float64, n=400, seed=9)
    y, ladj = rqs(x, params, BOUND)
    back, inverse_ladj = rqs(y, params, BOUND, inverse=True)
    assert torch.allclose(back, x, rtol=0, atol=1e-9) and torch.allclose(inverse_ladj, -ladj, rtol=0, atol=1e-8)


def test_the_logits_axis_is_a_layout_only():
    """Logits bins first (dim=0, as the flow's conditioner writes them for a large batch), in the middle or last (as
    zuko takes them): the same numbers, bit for bit, values and gradients."""
    x, params = _cases(torch.float64, n=600, seed=11)
    x, params = x.view(20, 30), params.view(20, 30, -1)
    last = _grads(lambda x, p: rqs(x, p, BOUND, True), x, params)
    first = _grads(lambda x, p: rqs(x, p.movedim(-1, 0), BOUND, True, dim=0), x, params)
    middle = _grads(lambda x, p: rqs(x, p.movedim(-1, 1), BOUND, True, dim=1), x, params)
    for a, b, c in zip(last, first, middle, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
def test_without_gradients_the_torch_path_gives_the_same_numbers(monkeypatch, inverse):
    """Without gradients, where the compiled pass does not apply (here: switched off; float64, a GPU), the torch
    path that skips what the backward pass needs: bit for bit what the path with gradients gives."""
    monkeypatch.setattr(spline, "COMPILED", False)
    x, params = _cases(torch.float32, n=400, seed=13)
    with torch.no_grad():
        fast = rqs(x, params, BOUND, inverse)
    slow = rqs(x, params.clone().requires_grad_(), BOUND, inverse)
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1].detach())


def test_gradcheck_against_finite_differences():
    """The written-out backward pass against central differences, independently of zuko (values away from knots)."""
    g = torch.Generator().manual_seed(17)
    params = torch.randn(12, 11, generator=g, dtype=torch.float64, requires_grad=True)  # K = 4
    x = (2.5 * torch.rand(12, generator=g, dtype=torch.float64) - 1.25).requires_grad_()
    for inverse in (False, True):
        assert torch.autograd.gradcheck(lambda x, p, inverse=inverse: rqs(x, p, 1.5, inverse), (x, params))


def test_it_maps_the_bound_onto_itself_and_is_increasing_however_large_the_logits():
    g = torch.Generator().manual_seed(19)
    params = 200 * torch.randn(1, 3 * BINS - 1, generator=g, dtype=torch.float64).expand(2001, -1)
    x = torch.linspace(-BOUND, BOUND, 2001, dtype=torch.float64)
    y, ladj = rqs(x, params, BOUND)
    assert torch.isfinite(ladj).all() and (torch.diff(y) > 0).all()
    assert y.abs().max().item() <= BOUND + 1e-12


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="3K-1"):
        rqs(torch.zeros(5), torch.zeros(5, 22), BOUND)
    with pytest.raises(ValueError, match="3K-1"):
        rqs(torch.zeros(5), torch.zeros(4, 23), BOUND)


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_no_values_no_work_and_no_error(dim):
    """A batch of no values (a last batch that came out empty): empty outputs, and empty gradients back."""
    x = torch.zeros(0, 4, requires_grad=True)
    params = torch.zeros(0, 4, 23).movedim(-1, dim).requires_grad_()
    y, ladj = rqs(x, params, BOUND, True, dim=dim)
    assert y.shape == ladj.shape == (0, 4)
    gx, gp = torch.autograd.grad((y + ladj).sum(), (x, params))
    assert gx.shape == x.shape and gp.shape == params.shape
    with torch.no_grad():
        assert rqs(x.detach(), params.detach(), BOUND, dim=dim)[0].shape == (0, 4)


@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
@pytest.mark.parametrize("dim", [0, -1])
def test_under_vmap_each_parameter_set_is_its_own_call(inverse, dim):
    """torch.func.vmap over 3 parameter sets (a stack of models, as stacked training runs them): values, log|det|s
    and gradients (by autograd through vmap) are each slice's own call's, bit for bit."""
    x, params = _cases(torch.float32, n=600, seed=23)
    x, params = x.view(3, 10, 20), params.view(3, 10, 20, -1)
    real = (torch.arange(600).view(3, 10, 20) % 7 != 0).float()  # some values padding
    if dim == 0:
        params = params.movedim(-1, 1)  # each set's logits bins first

    def spline(x, p, real):
        return rqs(x, p, BOUND, inverse, real, dim)

    stacked = _grads(lambda x, p: torch.func.vmap(spline)(x, p, real), x, params)
    g = torch.Generator().manual_seed(1)  # the weights of y and ladj that _grads drew for the stack
    weights = torch.randn(2, *x.shape, generator=g, dtype=torch.float64).float()
    for i in range(3):
        x_i, p_i = x[i].clone().requires_grad_(), params[i].clone().requires_grad_()
        y, ladj = spline(x_i, p_i, real[i])
        gx, gp = torch.autograd.grad((weights[0, i] * y + weights[1, i] * ladj).sum(), (x_i, p_i))
        assert torch.equal(y, stacked[0][i]) and torch.equal(ladj, stacked[1][i])
        assert torch.equal(gx, stacked[2][i]) and torch.equal(gp, stacked[3][i])
