"""The spline's compiled pass (flowvae.models.spline_compiled), which rqs takes without gradients for float32 on a
CPU, against rqs's torch path and float64: the same values and log|det|s to float32 rounding, forward and inverse,
inside and outside [-B, B], masked, with saturated logits; its values independent of where a batch is cut; its exp
within 2 ulps; and when it is taken, when not, and what happens without numba."""

from __future__ import annotations

import logging
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import pytest
import torch

import flowvae.models
from flowvae.models import spline, spline_compiled
from flowvae.models.conditional_flow import CouplingFlow
from flowvae.models.spline import MIN_SLOPE, rqs
from tests.models.test_spline import BINS, BOUND, EXTREME, _cases, _knots


def _torch_path(monkeypatch, *args, **kwargs):
    with monkeypatch.context() as patch, torch.no_grad():
        patch.setattr(spline, "COMPILED", False)
        return rqs(*args, **kwargs)


def _compiled(*args, **kwargs):
    with torch.no_grad():
        return rqs(*args, **kwargs)


def _errors(got: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    error = (got.double() - exact).abs()
    return error.max().item(), error.mean().item()


@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
@pytest.mark.parametrize("scales", [(0.05, 0.5, 1.5, 3.0), EXTREME], ids=["moderate", "saturated"])
def test_as_close_to_float64_as_the_torch_path(monkeypatch, inverse, scales):
    """Values inside, outside, on ±B and on the knots, with moderate and saturated logits: the compiled pass is as
    close to the float64 spline as the torch path's float32 (within 2× its error, plus a few ulps), and finite."""
    x, params = _cases(torch.float64, n=2000, seed=31, scales=scales)
    knots = _knots(params[:100], BOUND, vertical=inverse).reshape(-1)
    x, params = torch.cat([x, knots]), torch.cat([params, params[:100].repeat_interleave(BINS + 1, 0)])
    exact = rqs(x, params, BOUND, inverse)
    fast = _compiled(x.float(), params.float(), BOUND, inverse)
    slow = _torch_path(monkeypatch, x.float(), params.float(), BOUND, inverse)
    assert all(torch.isfinite(t).all() for t in fast)
    for got, torch_path, truth, name in zip(fast, slow, exact, ("y", "ladj"), strict=True):
        (worst, mean), (torch_worst, torch_mean) = _errors(got, truth), _errors(torch_path, truth)
        assert worst <= 2 * torch_worst + 4e-6, f"{name}: max error {worst:.3g}, the torch path's {torch_worst:.3g}"
        assert mean <= 2 * torch_mean + 1e-7, f"{name}: mean error {mean:.3g}, the torch path's {torch_mean:.3g}"


@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
def test_with_moderate_logits_it_is_the_torch_path_to_float32_rounding(monkeypatch, inverse):
    """Element by element: both float32 paths are a few 10⁻⁵ from float64 in steep bins (the spline's own
    conditioning), so they agree to that."""
    x, params = _cases(torch.float32, n=3000, seed=32)
    fast = _compiled(x, params, BOUND, inverse)
    slow = _torch_path(monkeypatch, x, params, BOUND, inverse)
    assert torch.allclose(fast[0], slow[0], rtol=0, atol=5e-5)
    assert torch.allclose(fast[1], slow[1], rtol=0, atol=1e-4)
    # leaves that want gradients, under no_grad: nothing is recorded, so the same compiled pass
    leaves = _compiled(x.clone().requires_grad_(), params.clone().requires_grad_(), BOUND, inverse)
    assert torch.equal(leaves[0], fast[0]) and torch.equal(leaves[1], fast[1])


@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
def test_outside_the_bound_and_where_not_real_it_is_the_identity(monkeypatch, inverse):
    x, params = _cases(torch.float32, n=800, seed=33)
    x[::2] = torch.where(x[::2] > 0, BOUND + 1 + x[::2].abs(), -BOUND - x[::2].abs())
    x[1] = -BOUND
    real = torch.ones_like(x)
    real[1::4] = 0.0
    left_alone = (x <= -BOUND) | (x > BOUND) | (real == 0)
    y, ladj = _compiled(x, params, BOUND, inverse, real)
    assert torch.equal(y[left_alone], x[left_alone]) and (ladj[left_alone] == 0).all()
    slow = _torch_path(monkeypatch, x, params, BOUND, inverse, real)
    assert torch.allclose(y, slow[0], rtol=1e-5, atol=1e-5) and torch.allclose(ladj, slow[1], rtol=1e-4, atol=1e-5)


def test_the_values_do_not_depend_on_where_the_batch_is_cut():
    """Blocks and threads' parts of a batch must reproduce one pass bit for bit: pieces that end inside and on the
    pass's own blocks of 256 values, in vector loops and their scalar remainders, give the same numbers."""
    x, params = _cases(torch.float32, n=1500, seed=34)
    for inverse in (False, True):
        whole = _compiled(x, params, BOUND, inverse)
        edges = [0, 1, 256, 257, 600, 1023, 1500]
        pieces = [_compiled(x[a:b], params[a:b], BOUND, inverse) for a, b in zip(edges[:-1], edges[1:], strict=True)]
        for i in range(2):
            assert torch.equal(whole[i], torch.cat([piece[i] for piece in pieces]))


@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
def test_a_coupling_layers_columns_in_one_call(inverse):
    """rqs_columns moves the chosen columns of x (B, D) with bins-first logits (3K - 1, n, B): those columns are
    what rqs gives for their values, bit for bit, the other columns x itself; the log|det| is rqs's summed over
    the moved values of each row."""
    g = torch.Generator().manual_seed(35)
    rows, columns = 700, torch.tensor([0, 3, 4, 8, 9])
    x = 4 * torch.randn(rows, 10, generator=g)
    real = (torch.rand(rows, 10, generator=g) > 0.25).float()
    params = 2 * torch.randn(3 * BINS - 1, len(columns), rows, generator=g)
    out, ladj = spline_compiled.rqs_columns(x, columns, params, BOUND, inverse, real, MIN_SLOPE)
    values = x[:, columns].t().contiguous()
    y, value_ladj = _compiled(values, params, BOUND, inverse, real[:, columns].t().contiguous(), dim=0)
    assert torch.equal(out[:, columns], y.t())
    others = torch.ones(10, dtype=torch.bool)
    others[columns] = False
    assert torch.equal(out[:, others], x[:, others])
    assert torch.allclose(ladj, value_ladj.sum(0), rtol=1e-6, atol=1e-5)


@numba.njit
def _soft_exps(a, alpha, out):
    for i in range(a.shape[0]):
        out[i] = spline_compiled._soft_exp(a[i], alpha)


def test_its_exp_is_within_two_ulps_over_the_soft_clamps_range():
    """exp(a / (1 + |a| alpha)) written out for vector loops, for logits from 0 to 10⁶ in size and both clamps' alpha:
    within 2 float32 ulps of the float64 exp of the same float32 exponent."""
    a = np.concatenate([np.linspace(-50, 50, 200_001), np.geomspace(1e-8, 1e6, 10_000),
                        -np.geomspace(1e-8, 1e6, 10_000), [0.0]]).astype(np.float32)
    for alpha in (np.float32(2 / abs(np.log(MIN_SLOPE))), np.float32(1 / abs(np.log(MIN_SLOPE)))):
        got = np.empty_like(a)
        _soft_exps(a, alpha, got)
        exponent = a / (np.float32(1) + np.abs(a) * alpha)  # float32, as the kernel computes it
        exact = np.exp(exponent.astype(np.float64))
        ulp = np.spacing(exact.astype(np.float32)).astype(np.float64)
        assert (np.abs(got - exact) <= 2 * ulp).all(), np.max(np.abs(got - exact) / ulp)
    assert got[-1] == 1.0  # a logit of 0: exactly 1, the fixed derivative at ±B
    _soft_exps(np.full(1, np.nan, np.float32), np.float32(0.3), got[:1])
    assert np.isnan(got[0])


def test_it_is_taken_without_gradients_for_float32_on_a_cpu_and_only_then(monkeypatch):
    calls = []
    monkeypatch.setattr(spline_compiled, "rqs_no_grad", lambda *args: calls.append(args[0].dtype) or
                        (args[0].clone(), torch.zeros_like(args[0])))
    x, params = _cases(torch.float32, n=40, seed=36)
    _compiled(x, params, BOUND)
    _compiled(x.clone().requires_grad_(), params, BOUND)  # a leaf that wants gradients, where none are recorded
    assert calls == [torch.float32] * 2
    _compiled(x.double(), params.double(), BOUND)  # float64: the torch path
    rqs(x, params.clone().requires_grad_(), BOUND)  # gradients: the torch path
    _torch_path(monkeypatch, x, params, BOUND)  # switched off
    assert calls == [torch.float32] * 2


def test_a_coupling_flow_generates_through_it(monkeypatch):
    """A generation batch (wider than the conditioner: logits bins first) without gradients moves each layer's
    columns in one compiled call."""
    calls = []
    original = spline_compiled.rqs_columns
    monkeypatch.setattr(spline_compiled, "rqs_columns", lambda *args: calls.append(len(args[1])) or original(*args))
    torch.manual_seed(0)
    flow = CouplingFlow(3, 30, 5, [32], 38, "spline")
    with torch.no_grad():
        flow(torch.randn(300, 90), torch.randn(300, 38))
    assert calls == [30, 30, 30, 45, 45]


def test_without_numba_the_torch_path_and_a_warning_that_says_how_to_restore_it(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "flowvae.models.spline_compiled", None)  # the import fails, as without numba
    monkeypatch.delattr(flowvae.models, "spline_compiled")
    monkeypatch.setattr(spline, "_COMPILED_MODULE", [])
    x, params = _cases(torch.float32, n=300, seed=37)
    with caplog.at_level(logging.WARNING, logger="flowvae.models.spline"):
        y, ladj = _compiled(x, params, BOUND)
    assert "compiled spline is unavailable" in caplog.text and "pip install numba" in caplog.text
    expected = _torch_path(monkeypatch, x, params, BOUND)
    assert torch.equal(y, expected[0]) and torch.equal(ladj, expected[1])


def test_with_numba_told_not_to_compile_the_torch_path_rather_than_python_loops(monkeypatch, caplog):
    """NUMBA_DISABLE_JIT would run the kernel as Python, thousands of times slower: the torch path instead."""
    monkeypatch.setattr(numba.config, "DISABLE_JIT", True)
    monkeypatch.delitem(sys.modules, "flowvae.models.spline_compiled")  # imported afresh under that setting
    monkeypatch.delattr(flowvae.models, "spline_compiled")
    monkeypatch.setattr(spline, "_COMPILED_MODULE", [])
    with caplog.at_level(logging.WARNING, logger="flowvae.models.spline"):
        assert spline.compiled_path(torch.zeros(3)) is None
    assert "NUMBA_DISABLE_JIT is set" in caplog.text and "NUMBA_DISABLE_JIT unset restores it" in caplog.text


def test_the_first_call_from_several_threads_imports_once(monkeypatch):
    """A batch's parts start on several threads at once: one import, one warning if it fails."""
    calls = []

    def slow_failing_import():
        calls.append(threading.current_thread().name)
        time.sleep(0.05)
        return None

    monkeypatch.setattr(spline, "_COMPILED_MODULE", [])
    monkeypatch.setattr(spline, "_import_compiled", slow_failing_import)
    with ThreadPoolExecutor(4) as pool:
        found = list(pool.map(lambda _: spline.compiled_path(torch.zeros(3)), range(4)))
    assert len(calls) == 1 and found == [None] * 4


def test_a_minimum_slope_its_exp_cannot_reach_is_refused():
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="minimum slope of at least 1e-4"):
        spline_compiled.rqs_no_grad(x, torch.zeros(3 * BINS - 1, 4), BOUND, False, None, 1e-5)
