"""The spline without gradients as one compiled pass over the values (numba): what generation runs on a CPU.

:func:`flowvae.models.spline.rqs` takes this path for float32 values on a CPU when no gradient is wanted (generating
jets, the validation and test passes) and numba is installed; everything else — gradients, float64, a GPU — stays
on its torch path. The arithmetic is :func:`flowvae.models.spline._forward`'s, step for step (its exp aside), so
the two agree to float32 rounding (tests/models/test_spline_compiled.py); what differs is the work. The torch path
makes ~60 passes over a layer's values, each a dispatch and a round trip through memory (and, split among
threads, a wake-up); here each value's 3K − 1 logits are read once and everything else lives in registers and a
small scratch block, in vector instructions — for one layer of 512 jets, ~3× less time on one core, and the
call releases Python's GIL, so parts of a batch on several threads run at once.

Two choices keep LLVM vectorizing: ``error_model="numpy"`` (no zero-division check on every division), and an exp
written out (Cody–Waite reduction and Cephes' ``expf`` polynomial, within ~1 ulp of torch's, scaled by 2ⁿ through
an integer shift): a call to libm's exp would keep every loop scalar. The exponents are soft-clamped logits,
within ±|log MIN_SLOPE| ≈ ±6.9, so n is within ±10 and the shift cannot overflow.

Values are independent of where a batch is cut: each value's arithmetic is the same in the vector loops and their
scalar remainders (no fast-math, so no reassociation), so blocks and parts reproduce one pass bit for bit.
The kernel is compiled at its first call and cached on disk (numba's ``cache=True``, beside this module or in
``NUMBA_CACHE_DIR``): ≈ 2.5 s once, then ≈ 0.5 s a process to import numba and load it.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
from torch import Tensor

__all__ = ["rqs_columns", "rqs_no_grad"]

if numba.config.DISABLE_JIT:  # the kernel would run as Python loops, thousands of times slower than torch's path
    raise ImportError("NUMBA_DISABLE_JIT is set")

_OPTIONS = {"nogil": True, "error_model": "numpy", "boundscheck": False, "cache": True}
_BLOCK = 256  # values per pass through the scratch arrays: (2K + 2) × 256 floats stay in the L1 cache


@numba.njit(inline="always", **_OPTIONS)
def _soft_exp(a, alpha):  # pragma: no cover - compiled
    """exp(a / (1 + |a| alpha)): zuko's soft clamp, then exp (alpha = 1 or 2 / |log min slope|, so |exponent| ≤
    |log min slope|: within ±6.91 for flowvae's 10⁻³)."""
    v = a / (np.float32(1.0) + abs(a) * alpha)
    n = np.floor(v * np.float32(1.4426950408889634) + np.float32(0.5))
    r = v - n * np.float32(0.693359375) + n * np.float32(2.12194440e-4)  # v − n ln 2 in two parts
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * r * r + r + np.float32(1.0)
    return p * (np.float32(np.int32(1) << (np.int32(n) + np.int32(16))) * np.float32(1.52587890625e-05))


@numba.njit(inline="always", **_OPTIONS)
def _cumulative(params, first, k, column, cumulative, start, m, alpha):  # pragma: no cover - compiled
    """cumulative[j, l] = Σ_{i<j} e_i for the K logits from row ``first`` of column ``column``'s logits
    (3K − 1, n, B), rows start … start + m."""
    for lane in range(m):
        cumulative[0, lane] = np.float32(0.0)
    for i in range(k):
        row = params[first + i, column, start:start + m]
        before, after = cumulative[i], cumulative[i + 1]
        for lane in range(m):
            after[lane] = before[lane] + _soft_exp(row[lane], alpha)


@numba.njit(inline="always", **_OPTIONS)
def _find_bins(cumulative, x, half_over_bound, bins, m):  # pragma: no cover - compiled
    """Each value's bin: the number of interior knots c_j < (x + B) c_K / 2B (a value on a knot: the left bin)."""
    k = cumulative.shape[0] - 1
    total = cumulative[k]
    threshold = np.empty(m, np.float32)
    for lane in range(m):
        threshold[lane] = total[lane] * np.float32(0.5) + x[lane] * total[lane] * half_over_bound
        bins[lane] = 0
    for j in range(1, k):
        knot = cumulative[j]
        for lane in range(m):
            bins[lane] += np.int32(knot[lane] < threshold[lane])


@numba.njit(inline="always", **_OPTIONS)
def _knots(left, right, total, bound):  # pragma: no cover - compiled
    """The bin's left knot and width from the cumulative sums at its ends: B (2 c / c_K − 1)."""
    scale = np.float32(2.0) * bound / total
    start = left * scale - bound
    return start, (right * scale - bound) - start


@numba.njit(inline="always", **_OPTIONS)
def _bin(gathered, total_w, total_h, bound, alpha, lane):  # pragma: no cover - compiled
    """A value's bin: (x₀, w, y₀, h, d₀, d₁, s = h / w, d₀ + d₁ − 2s) from what ``_spline`` gathered for it, one
    row each (a tuple of arrays: a row of a 2-d array would cost a stride in every vector loop)."""
    d0_logit, d1_logit, left_w, right_w, left_h, right_h = gathered
    x0, w = _knots(left_w[lane], right_w[lane], total_w[lane], bound)
    y0, h = _knots(left_h[lane], right_h[lane], total_h[lane], bound)
    d0, d1 = _soft_exp(d0_logit[lane], alpha), _soft_exp(d1_logit[lane], alpha)
    s = h / w
    return x0, w, y0, h, d0, d1, s, d0 + d1 - np.float32(2.0) * s


@numba.njit(inline="always", **_OPTIONS)
def _slope(z, s, spread, d0, d1):  # pragma: no cover - compiled
    """The forward map's denominator and slope at z in the bin: s² (2 s t + d₀ (1 − z)² + d₁ z²) / den²."""
    u = np.float32(1.0) - z
    t = z * u
    den = s + spread * t
    slope = s / den
    return den, slope * slope * (d0 * u * u + np.float32(2.0) * s * t + d1 * z * z)


@numba.njit(inline="always", **_OPTIONS)
def _forward(x, inside, gathered, total_w, total_h, bound, alpha, out, dy_dx, m):  # pragma: no cover - compiled
    """The map in each value's bin, and its slope there (1 where left alone)."""
    one, zero = np.float32(1.0), np.float32(0.0)
    for lane in range(m):
        value, real = x[lane], inside[lane]
        x0, w, y0, h, d0, d1, s, spread = _bin(gathered, total_w, total_h, bound, alpha, lane)
        z = min(max((value - x0) / w, zero), one) if real else zero
        den, slope = _slope(z, s, spread, d0, d1)
        out[lane] = y0 + h * ((s * z + d0 * (one - z)) * z) / den if real else value
        dy_dx[lane] = slope if real else one


@numba.njit(inline="always", **_OPTIONS)
def _inverse(x, inside, gathered, total_w, total_h, bound, alpha, out, dy_dx, m):  # pragma: no cover - compiled
    """The inverse in each value's bin — the root of a z² + b z − c = 0 in [0, 1] in the form that does not cancel
    (see :mod:`flowvae.models.spline`) — and the forward map's slope there (1 where left alone)."""
    one, zero, two = np.float32(1.0), np.float32(0.0), np.float32(2.0)
    for lane in range(m):
        value, real = x[lane], inside[lane]
        x0, w, y0, h, d0, d1, s, spread = _bin(gathered, total_w, total_h, bound, alpha, lane)
        y_ = min(max(value - y0, zero), h) if real else zero
        a = h * (s - d0) + y_ * spread
        b = h * d0 - y_ * spread
        c = s * y_
        root = math.sqrt(max(b * b + np.float32(4.0) * a * c, zero))
        z = min(max((root - b) / a * np.float32(0.5) if b < zero else c * two / (root + b), zero), one)
        _, slope = _slope(z, s, spread, d0, d1)
        out[lane] = x0 + z * w if real else value
        dy_dx[lane] = slope if real else one


@numba.njit(**_OPTIONS)
def _spline(x, columns, params, real, has_real, bound, log_slope, inverse, out, dy_dx):  # pragma: no cover - compiled
    """The spline on columns ``columns`` (n,) of x (B, D) with logits (3K − 1, n, B): moved values into those
    columns of ``out`` (B, D), the forward map's slopes into dy_dx (n, B); block after block of :data:`_BLOCK`
    rows. ``real`` (B, D), read where ``has_real``: 0 where a value is left alone."""
    n_params, n_columns, n_rows = params.shape
    k = (n_params + 1) // 3
    bound = np.float32(bound)
    alpha, alpha_d = np.float32(2.0 / log_slope), np.float32(1.0 / log_slope)
    widths, heights = np.empty((k + 1, _BLOCK), np.float32), np.empty((k + 1, _BLOCK), np.float32)
    bins = np.empty(_BLOCK, np.int32)
    inside = np.empty(_BLOCK, np.bool_)
    values, moved = np.empty(_BLOCK, np.float32), np.empty(_BLOCK, np.float32)
    gathered = np.empty((6, _BLOCK), np.float32)  # d₀, d₁ logits; the bin's left and right c for widths, heights
    for i in range(n_columns):
        column = columns[i]
        for start in range(0, n_rows, _BLOCK):
            m = min(_BLOCK, n_rows - start)
            for lane in range(m):
                values[lane] = x[start + lane, column]
            _cumulative(params, 0, k, i, widths, start, m, alpha)
            _cumulative(params, k, k, i, heights, start, m, alpha)
            _find_bins(heights if inverse else widths, values, np.float32(0.5) / bound, bins, m)
            for lane in range(m):
                b = bins[lane]
                value = values[lane]
                inside[lane] = value > -bound and value <= bound and (not has_real or real[start + lane, column] > 0)
                # the bin's two knot-derivative logits; at ±B the derivative is fixed at 1 (logit 0)
                gathered[0, lane] = params[2 * k + b - 1, i, start + lane] if b > 0 else np.float32(0.0)
                gathered[1, lane] = params[2 * k + b, i, start + lane] if b < k - 1 else np.float32(0.0)
                gathered[2, lane], gathered[3, lane] = widths[b, lane], widths[b + 1, lane]
                gathered[4, lane], gathered[5, lane] = heights[b, lane], heights[b + 1, lane]
            slopes = dy_dx[i, start:start + m]
            rows = (gathered[0], gathered[1], gathered[2], gathered[3], gathered[4], gathered[5])
            if inverse:
                _inverse(values, inside, rows, widths[k], heights[k], bound, alpha_d, moved, slopes, m)
            else:
                _forward(values, inside, rows, widths[k], heights[k], bound, alpha_d, moved, slopes, m)
            for lane in range(m):
                out[start + lane, column] = moved[lane]


_ONE_COLUMN = torch.zeros(1, dtype=torch.int64)


def rqs_no_grad(x: Tensor, params: Tensor, bound: float, inverse: bool, real: Tensor | None, min_slope: float
                ) -> tuple[Tensor, Tensor]:
    """(y, log|dy/dx|) for float32 values x (M,) on the CPU with logits (3K − 1, M); ``real`` (M,) or None;
    ``min_slope`` as :data:`flowvae.models.spline.MIN_SLOPE`: :func:`rqs_columns` on the values as one column."""
    out, ladj = rqs_columns(x.view(-1, 1), _ONE_COLUMN, params.view(params.shape[0], 1, -1), bound, inverse,
                            None if real is None else real.view(-1, 1), min_slope)
    return out.view(-1), ladj


def rqs_columns(x: Tensor, columns: Tensor, params: Tensor, bound: float, inverse: bool, real: Tensor | None,
                min_slope: float) -> tuple[Tensor, Tensor]:
    """A coupling layer's spline without gradients: x (B, D) with its columns ``columns`` (n,) moved, and the
    log|det| summed over them per row (B,), for float32 x and logits (3K − 1, n, B) on the CPU, contiguous;
    ``real`` (B, D) or None. No gradient flows through it."""
    log_slope = abs(math.log(min_slope))
    if not log_slope < 9.5:  # 2ⁿ by a shift in int32: exponents up to ±|log min slope| must keep n + 16 < 31
        raise ValueError(f"the compiled spline takes a minimum slope of at least 1e-4, got {min_slope}")
    out, dy_dx = x.clone(), x.new_empty(len(columns), len(x))
    has_real = real is not None
    arrays = [tensor.detach().numpy() for tensor in (x, columns, params, real if has_real else x, out, dy_dx)]
    _spline(*arrays[:4], has_real, float(bound), log_slope, bool(inverse), *arrays[4:])
    ladj = dy_dx.log_().sum(0)
    return out, ladj.neg_() if inverse else ladj
