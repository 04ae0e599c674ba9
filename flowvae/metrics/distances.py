"""Distances between generated and reference jets with their uncertainties, as jetnet defines them: W1 of jet
mass, multiplicity and particle features over batches, the Fréchet physics distance (FPD, extrapolated in 1/N)
and the kernel physics distance (KPD, an unbiased MMD² with a quartic polynomial kernel)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import curve_fit
from scipy.stats import iqr

from flowvae.metrics.jets import check_count, checked_jets, feature_pair, jet_kinematics, multiplicity, scaled_by_real
from flowvae.metrics.marginal import as_float64, wasserstein_1, wasserstein_1_counted
from flowvae.progress import phase

__all__ = ["w1_batched", "w1_columns", "w1m", "w1_mult", "w1p", "frechet_distance", "FPD_FITS", "fpd_points",
           "fpd_line", "fpd", "mmd2_unbiased", "kpd"]

log = logging.getLogger(__name__)

# Rows per block of a kernel matrix in the MMD: 256 × 5000 float64 is 10 MiB.
_KERNEL_ROWS = 256


# ---------------------------------------------------------------- Wasserstein-1 with an uncertainty


def w1_batched(
    p: ArrayLike, q: ArrayLike, *, num_eval_samples: int = 50_000, num_batches: int = 5,
    seed: int | np.random.Generator = 0,
) -> tuple[float, float]:
    """1-D W1 between samples ``p`` and ``q``, as mean and standard deviation over random batches.

    As jetnet's w1m: each of ``num_batches`` batches draws ``num_eval_samples`` values from each sample with
    replacement (``p``'s draw first), W1 (:func:`flowvae.metrics.wasserstein_1`, exact, no binning) is taken
    between the two, and the result is (mean, std with ddof = 0) over the batches. The draws come from
    ``numpy.random.default_rng(seed)``; a Generator given as ``seed`` is drawn from directly and left where the
    draws end, so that the next metric continues its stream (jetnet's one generator, ``w1_stream``).
    """
    p_values, q_values = _finite_sample(p, "p").ravel(), _finite_sample(q, "q").ravel()
    num_eval_samples = check_count(num_eval_samples, "num_eval_samples")
    num_batches = check_count(num_batches, "num_batches")
    rng = np.random.default_rng(seed)
    w1s = []
    for _ in range(num_batches):
        p_batch = p_values[rng.integers(p_values.size, size=num_eval_samples)]
        q_batch = q_values[rng.integers(q_values.size, size=num_eval_samples)]
        w1s.append(wasserstein_1(p_batch, q_batch))
    return float(np.mean(w1s)), float(np.std(w1s))


def w1_columns(
    p: ArrayLike, q: ArrayLike, *, num_eval_samples: int = 50_000, num_batches: int = 5,
    seed: int | np.random.Generator = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """W1 of each column between samples ``p`` (N, K) and ``q`` (M, K): (means, stds), each shape (K,).

    As :func:`w1_batched` for every column at once, on the same drawn rows: each batch draws ``num_eval_samples``
    rows of ``p``, then of ``q``, with replacement, and takes the W1 of every column between them, as jetnet's
    w1efp draws one batch of jets for all its EFPs. The draws are those of :func:`w1_batched` with the same
    ``seed``, so column k's result is ``w1_batched(p[:, k], q[:, k])``'s.
    """
    p_values, q_values = _finite_sample(p, "p"), _finite_sample(q, "q")
    if p_values.ndim != 2 or q_values.ndim != 2 or p_values.shape[1] != q_values.shape[1]:
        raise ValueError(f"w1_columns needs p (N, K) and q (M, K) with one K, got shapes {p_values.shape} and "
                         f"{q_values.shape}")
    num_eval_samples = check_count(num_eval_samples, "num_eval_samples")
    num_batches = check_count(num_batches, "num_batches")
    rng = np.random.default_rng(seed)
    w1s: list[list[float]] = [[] for _ in range(p_values.shape[1])]  # per column, over batches
    for _ in range(num_batches):
        p_batch = p_values[rng.integers(len(p_values), size=num_eval_samples)]
        q_batch = q_values[rng.integers(len(q_values), size=num_eval_samples)]
        for column, values in enumerate(w1s):
            values.append(wasserstein_1(p_batch[:, column], q_batch[:, column]))
    return np.array([np.mean(values) for values in w1s]), np.array([np.std(values) for values in w1s])


def _finite_sample(values: ArrayLike, name: str) -> np.ndarray:
    """``values`` as float64, refused (ValueError naming ``name``) when empty or not finite."""
    array = as_float64(values)
    if array.size == 0:
        raise ValueError(f"{name} is empty: a sample needs at least one value")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} has {int((~np.isfinite(array)).sum())} non-finite value(s) (NaN or inf)")
    return array


def w1m(
    generated: ArrayLike,
    gen_mask: ArrayLike | None,
    reference: ArrayLike,
    ref_mask: ArrayLike | None,
    kinematics: Sequence[int] = (0, 1, 2),
    *,
    num_eval_samples: int = 50_000,
    num_batches: int = 5,
    seed: int = 0,
) -> tuple[float, float]:
    """W1 between the jet-mass distributions of generated and reference jets: (mean, std) over batches.

    Masses from :func:`jet_kinematics`, batches as :func:`w1_batched` (jetnet's w1m: 5 batches of 50,000 jets
    drawn with replacement). The reference's masses are drawn first in each batch (jetnet's jets1, the real).
    """
    gen_mass = jet_kinematics(generated, gen_mask, kinematics)["mass"]
    ref_mass = jet_kinematics(reference, ref_mask, kinematics)["mass"]
    return w1_batched(ref_mass, gen_mass, num_eval_samples=num_eval_samples, num_batches=num_batches, seed=seed)


def w1_mult(
    gen_mask: ArrayLike,
    ref_mask: ArrayLike,
    *,
    num_eval_samples: int = 50_000,
    num_batches: int = 5,
    seed: int = 0,
) -> tuple[float, float]:
    """W1 between the particle multiplicities (:func:`multiplicity`) of generated and reference jets.

    (mean, std) over batches drawn as in :func:`w1_batched`, the reference first; in particles per jet. jetnet
    has no such function; this is its w1m applied to the multiplicity.
    """
    return w1_batched(
        multiplicity(ref_mask), multiplicity(gen_mask),
        num_eval_samples=num_eval_samples, num_batches=num_batches, seed=seed,
    )  # fmt: skip


def w1p(
    generated: ArrayLike,
    gen_mask: ArrayLike | None,
    reference: ArrayLike,
    ref_mask: ArrayLike | None,
    *,
    num_eval_samples: int = 50_000,
    num_batches: int = 5,
    seed: int | np.random.Generator = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """W1 per particle feature over real particles: (means, stds), each shape (F,), over batches.

    As jetnet's w1p: each batch draws ``num_eval_samples`` jets from each set with replacement (the reference
    first), pools the real particles of the drawn jets, and takes W1 of each feature between the two pools.
    Differs from jetnet in that only the masks say which particles are real (jetnet also drops particles whose
    features are all exactly 0). Each set's particle values are sorted once (:func:`_shared_values`) and a batch
    is how often it drew each jet (:func:`wasserstein_1_counted`): the same W1s to the last bit as pooling and
    sorting each batch's N·P values, without doing so. The draws come from ``numpy.random.default_rng(seed)`` (a
    Generator: drawn from directly, as in :func:`w1_batched`).
    """
    gen, gen_real = checked_jets(generated, gen_mask, "generated")
    ref, ref_real = checked_jets(reference, ref_mask, "reference")
    if gen.shape[1] != ref.shape[1]:
        raise ValueError(
            f"generated and reference must have the same number of features (axis 1), got shapes {gen.shape} "
            f"and {ref.shape}"
        )
    num_eval_samples = check_count(num_eval_samples, "num_eval_samples")
    num_batches = check_count(num_batches, "num_batches")
    for real, name in ((gen_real, "generated"), (ref_real, "reference")):
        if not real.any():
            raise ValueError(f"{name} has no real particle (its mask is 0 everywhere)")
    rng = np.random.default_rng(seed)
    w1s = np.empty((num_batches, gen.shape[1]))
    shared = _shared_values(ref, ref_real, gen, gen_real)
    ref_jet, gen_jet = np.nonzero(ref_real)[0], np.nonzero(gen_real)[0]  # each real particle's jet
    with phase(f"W1 per particle feature: {num_batches} batches of {num_eval_samples} jets", num_batches,
               "batches", logger=log) as step:
        for batch in range(num_batches):
            ref_draw = rng.integers(ref.shape[0], size=num_eval_samples)
            gen_draw = rng.integers(gen.shape[0], size=num_eval_samples)
            # how often each real particle is in the batch: its jet's count among the drawn
            ref_times = np.bincount(ref_draw, minlength=ref.shape[0])[ref_jet].astype(np.float64)
            gen_times = np.bincount(gen_draw, minlength=gen.shape[0])[gen_jet].astype(np.float64)
            for feature, (values, ref_at, gen_at) in enumerate(shared):
                if not ref_times.any() or not gen_times.any():  # every drawn jet empty: as jetnet, infinite
                    w1s[batch, feature] = math.inf
                else:
                    w1s[batch, feature] = wasserstein_1_counted(
                        values, _counts(ref_at, ref_times, values.size), _counts(gen_at, gen_times, values.size))
            step.advance()
    return w1s.mean(axis=0), w1s.std(axis=0)


def _shared_values(
    ref: np.ndarray, ref_real: np.ndarray, gen: np.ndarray, gen_real: np.ndarray
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per feature, the sorted distinct values of both sets' real particles, and where each reference and each
    generated particle's value is among them: sorted once for all of w1p's batches."""
    shared = []
    for feature in range(ref.shape[1]):
        ref_values, gen_values = ref[:, feature][ref_real], gen[:, feature][gen_real]
        values, where = np.unique(np.concatenate([ref_values, gen_values]), return_inverse=True)
        shared.append((values, where[:ref_values.size], where[ref_values.size:]))
    return shared


def _counts(where: np.ndarray, times: np.ndarray, size: int) -> np.ndarray:
    """How often a batch holds each of ``size`` distinct values: its particles' ``times`` summed at ``where``
    (sums of integers, exact in float64 below 2⁵³)."""
    return np.bincount(where, weights=times, minlength=size).astype(np.int64)


# ---------------------------------------------------------------- Fréchet physics distance


def frechet_distance(mu1: ArrayLike, cov1: ArrayLike, mu2: ArrayLike, cov2: ArrayLike) -> float:
    """Fréchet (2-Wasserstein²) distance between N(mu1, cov1) and N(mu2, cov2).

    FD = ‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^{1/2}) (Dowson & Landau 1982; the FID of Heusel et al. 2017).
    Tr (Σ1Σ2)^{1/2} is computed as Σ sqrt(λ) over the eigenvalues λ of the symmetric Σ1^{1/2} Σ2 Σ1^{1/2}, which
    has those of Σ1Σ2: the same number as jetnet's ``scipy.linalg.sqrtm`` trace, without complex round-off.
    Negative eigenvalues (round-off of singular covariances) count as 0, and FD as max(FD, 0).
    """
    m1, m2 = np.atleast_1d(as_float64(mu1)), np.atleast_1d(as_float64(mu2))
    c1, c2 = np.atleast_2d(as_float64(cov1)), np.atleast_2d(as_float64(cov2))
    dim = m1.shape[0]
    if m1.shape != (dim,) or m2.shape != (dim,) or c1.shape != (dim, dim) or c2.shape != (dim, dim):
        raise ValueError(
            f"frechet_distance needs means of shape (D,) and covariances of shape (D, D) with one D, got "
            f"{m1.shape}, {c1.shape}, {m2.shape}, {c2.shape}"
        )
    values, vectors = np.linalg.eigh(0.5 * (c1 + c1.T))
    root1 = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
    middle = root1 @ c2 @ root1
    trace_root = float(np.sqrt(np.clip(np.linalg.eigvalsh(0.5 * (middle + middle.T)), 0.0, None)).sum())
    diff = m1 - m2
    return max(float(diff @ diff + np.trace(c1) + np.trace(c2) - 2.0 * trace_root), 0.0)


def mean_cov(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (ddof = 1, as ``np.cov``) of a batch of row vectors; ``batch`` is overwritten."""
    mean = batch.mean(axis=0)
    batch -= mean
    return mean, (batch.T @ batch) / (len(batch) - 1)


def _sample_sizes(min_samples: int, max_samples: int, available: int, replace: bool) -> tuple[int, int]:
    """The batch-size range, scaled down (ratio kept) when drawing without replacement from fewer events."""
    if not replace and max_samples > available:
        scale = available / max_samples
        return max(2, int(min_samples * scale)), available
    return min_samples, max_samples


# How FPD's line FD = FPD + k/N is fitted (:func:`fpd_line`).
FPD_FITS = ("exact", "jetnet")


def fpd_points(
    real_features: ArrayLike,
    gen_features: ArrayLike,
    *,
    min_samples: int = 20_000,
    max_samples: int = 50_000,
    num_batches: int = 20,
    num_points: int = 10,
    normalise: bool = True,
    replace: bool = False,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """The points FPD extrapolates from: (1/N, mean FD at N), each shape (num_points,), for :func:`fpd_line`.

    Features are divided by the real set's largest |value| per feature (``normalise``); for ``num_points`` batch
    sizes N spaced evenly in 1/N between ``min_samples`` and ``max_samples`` (scaled down as :func:`fpd` says),
    the FD (:func:`frechet_distance`) of Gaussians fitted to a batch of N real and N generated vectors (means and
    ddof-1 covariances) is averaged over ``num_batches`` batches, each drawing the real batch, then the
    generated, from one ``numpy.random.default_rng(seed)``.
    """
    x, y = feature_pair(real_features, gen_features)
    min_samples = check_count(min_samples, "min_samples", 2)
    max_samples = check_count(max_samples, "max_samples", 2)
    num_batches = check_count(num_batches, "num_batches")
    num_points = check_count(num_points, "num_points", 3)
    if min_samples >= max_samples:
        raise ValueError(f"min_samples must be < max_samples, got {min_samples} and {max_samples}")
    if normalise:
        x, y = scaled_by_real(x, y)
    low, high = _sample_sizes(min_samples, max_samples, min(len(x), len(y)), replace)
    sizes = (1.0 / np.linspace(1.0 / low, 1.0 / high, num_points)).astype(np.int64)
    if np.unique(sizes).size < 2:
        raise ValueError(
            f"fpd needs at least two different batch sizes to extrapolate, got {sorted(set(sizes.tolist()))} "
            f"from sets of {len(x)} and {len(y)} vectors; use more events or replace=True"
        )
    rng = np.random.default_rng(seed)
    means = []
    drawn = " with replacement" if replace else ""
    with phase(f"FPD: {num_points} batch sizes from {sizes[0]} to {sizes[-1]}, {num_batches} batches each{drawn}",
               num_points * num_batches, "batches", logger=log) as step:
        for size in sizes:
            values = []
            for _ in range(num_batches):
                mean_x, cov_x = mean_cov(x[rng.choice(len(x), size=size, replace=replace)])
                mean_y, cov_y = mean_cov(y[rng.choice(len(y), size=size, replace=replace)])
                values.append(frechet_distance(mean_x, cov_x, mean_y, cov_y))
                step.advance()
            means.append(np.mean(values))
    return 1.0 / sizes, np.asarray(means)


def fpd_line(inverse_sizes: ArrayLike, fds: ArrayLike, fit: str = "exact") -> tuple[float, float]:
    """FPD (value, error) from the points of :func:`fpd_points`: the intercept of the line FD = FPD + k/N with
    FPD, k ≥ 0, fitted by unweighted least squares, and the intercept's standard error from the fit.

    ``fit="exact"``: the least-squares optimum itself (:func:`_nonnegative_line_intercept`). ``fit="jetnet"``:
    jetnet's own call, ``scipy.optimize.curve_fit(linear, 1/N, FD, bounds=([0, 0], [inf, inf]))`` with
    ``linear(x, intercept, slope) = intercept + slope * x`` (jetnet.evaluation.fpd, jetnet 0.2.5), whose value and
    error (``sqrt(pcov[0, 0])``) the published FPDs are. With bounds, curve_fit starts at (1, 1) and runs
    least_squares' trust-region reflective method with a finite-difference Jacobian to its default tolerances
    (1e-8); on 1/N of order 1e-5 the slope's direction is barely felt, and when FPD is small the fit stops far from
    the optimum, the slope near 0 and the intercept near the mean FD (10,000 gluon jets against 10,000 others of
    one Pythia run at jetnet's published sizes: 3.86e-4 ± 0.68e-4 where the optimum is 2.24e-4 ± 0.35e-4); at
    FPD 1.2e-2 the two agree to 5e-6 relative. Compare an FPD only with FPDs of the same fit.
    """
    if fit not in FPD_FITS:
        raise ValueError(f"unknown FPD fit {fit!r}: one of {', '.join(FPD_FITS)}")
    x, y = as_float64(inverse_sizes), as_float64(fds)
    if fit == "exact":
        return _nonnegative_line_intercept(x, y)
    params, covariance = curve_fit(_linear, x, y, bounds=([0, 0], [np.inf, np.inf]))
    return float(params[0]), float(np.sqrt(np.diag(covariance)[0]))


def _linear(x: np.ndarray, intercept: float, slope: float) -> np.ndarray:
    """jetnet's ``_linear``, term for term: curve_fit's finite differences see the same rounding."""
    return intercept + slope * x


def fpd(
    real_features: ArrayLike,
    gen_features: ArrayLike,
    *,
    min_samples: int = 20_000,
    max_samples: int = 50_000,
    num_batches: int = 20,
    num_points: int = 10,
    normalise: bool = True,
    replace: bool = False,
    seed: int = 0,
    fit: str = "exact",
) -> tuple[float, float]:
    """Fréchet physics distance (value, error) between real and generated feature vectors (N, D) and (M, D).

    As jetnet's fpd (after Chong & Forsyth's FID∞, CVPR 2020): features are divided by the real set's largest
    |value| per feature (``normalise``); for ``num_points`` batch sizes N spaced evenly in 1/N between
    ``min_samples`` and ``max_samples``, the FD (:func:`frechet_distance`) of Gaussians fitted to a batch of N
    real and N generated vectors (means and ddof-1 covariances) is averaged over ``num_batches`` batches
    (:func:`fpd_points`); a straight line FD = FPD + k/N with FPD, k ≥ 0 is fitted to the means by least squares
    and its intercept is the value, the intercept's standard error from the fit the error (:func:`fpd_line`:
    ``fit="exact"``, the optimum, by default; ``fit="jetnet"``, jetnet's ``scipy.optimize.curve_fit`` call, which
    stops early when FPD is small). That error measures how well the points lie on the line, not how much FPD
    would vary between independent sets of this size, which can be several times larger: compare a value with
    :func:`jet_noise_floor` as well.

    Differences from jetnet: batches are drawn without replacement (``replace=False``), since a batch drawn with
    replacement from a set of comparable size is no i.i.d. sample and the extrapolation then aims at the FD of
    the finite sets; when the smaller set has fewer than ``max_samples`` vectors, both batch-size bounds are
    scaled by the same factor so that the largest batch is the whole smaller set (10,000 events: N from 4,000 to
    10,000); and the line is fitted exactly. ``replace=True`` keeps jetnet's sizes and sampling, ``fit="jetnet"``
    its fit. ``seed`` seeds one numpy Generator.
    """
    points = fpd_points(real_features, gen_features, min_samples=min_samples, max_samples=max_samples,
                        num_batches=num_batches, num_points=num_points, normalise=normalise, replace=replace,
                        seed=seed)
    return fpd_line(*points, fit=fit)


def _nonnegative_line_intercept(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares line y = c + k x with c, k ≥ 0: (c, standard error of c).

    The fit jetnet asks for with ``curve_fit(linear, x, y, bounds=([0, 0], [inf, inf]))``, solved exactly (where
    curve_fit stops at its tolerance, far from the optimum when c is small: :func:`fpd_line`): the
    unconstrained fit if both parameters are ≥ 0, else the best fit with one or both at 0 (a convex problem, so
    the feasible candidate with the least squared residual is the optimum). The error is curve_fit's: the
    covariance (JᵀJ)⁻¹ s² of the design J = [1, x] with s² = Σ residual² / (points − 2).
    """
    design = np.column_stack([np.ones_like(x), x])
    candidates = [np.linalg.lstsq(design, y, rcond=None)[0]]
    candidates.append(np.array([0.0, max(float(x @ y) / float(x @ x), 0.0)]))  # c = 0
    candidates.append(np.array([max(float(y.mean()), 0.0), 0.0]))  # k = 0
    feasible = [c for c in candidates if (c >= 0).all()]
    params = min(feasible, key=lambda c: float(np.sum((y - design @ c) ** 2)))
    residual = float(np.sum((y - design @ params) ** 2))
    covariance = np.linalg.inv(design.T @ design) * residual / (len(x) - 2)
    return float(params[0]), float(np.sqrt(covariance[0, 0]))


# ---------------------------------------------------------------- kernel physics distance


def _power_sum(gram: np.ndarray, degree: int) -> float:
    """Σ gram^degree over a C-contiguous block, overwriting ``gram``; degrees 1–4 in at most two passes."""
    flat = gram.reshape(-1)
    if degree == 1:
        return float(flat.sum())
    if degree == 2:
        return float(flat @ flat)
    if degree == 3:
        return float((flat * flat) @ flat)
    if degree == 4:
        np.multiply(flat, flat, out=flat)
        return float(flat @ flat)
    np.power(flat, degree, out=flat)
    return float(flat.sum())


def _kernel_sum(x: np.ndarray, y: np.ndarray | None, degree: int) -> float:
    """Σ_ij (x_i·y_j)^degree over all pairs; y=None means y = x, and then each off-diagonal block is done once."""
    total = 0.0
    for start in range(0, len(x), _KERNEL_ROWS):
        stop = start + _KERNEL_ROWS
        rows = x[start:stop]
        if y is None:  # symmetric: the diagonal block once, the blocks right of it twice
            total += _power_sum(rows @ rows.T, degree)
            if stop < len(x):
                total += 2.0 * _power_sum(rows @ x[stop:].T, degree)
        else:
            total += _power_sum(rows @ y.T, degree)
    return total


def mmd2_unbiased(x: ArrayLike, y: ArrayLike, *, degree: int = 4) -> float:
    """Unbiased MMD² between samples x (m, D) and y (n, D) with the polynomial kernel k(a, b) = (a·b/D + 1)^degree.

    MMD²_u = Σ_{i≠j} k(x_i, x_j)/(m(m−1)) + Σ_{i≠j} k(y_i, y_j)/(n(n−1)) − 2 Σ_ij k(x_i, y_j)/(mn) (Gretton et
    al., JMLR 13 (2012) 723, eq. 3); its expectation is the population MMD², so it can be negative. jetnet's KPD
    uses degree 4; Bińkowski et al.'s KID (ICLR 2018), which KPD adapts, uses 3.
    """
    a, b = feature_pair(x, y)
    degree = check_count(degree, "degree")
    m, n = len(a), len(b)
    # x·y/D + 1 as one dot product: scaled vectors with a constant 1 appended
    scale = 1.0 / math.sqrt(a.shape[1])
    a = np.column_stack([a * scale, np.ones(m)])
    b = np.column_stack([b * scale, np.ones(n)])
    diagonal_a = float((np.einsum("ij,ij->i", a, a) ** degree).sum())
    diagonal_b = float((np.einsum("ij,ij->i", b, b) ** degree).sum())
    within_a = (_kernel_sum(a, None, degree) - diagonal_a) / (m * (m - 1))
    within_b = (_kernel_sum(b, None, degree) - diagonal_b) / (n * (n - 1))
    return within_a + within_b - 2.0 * _kernel_sum(a, b, degree) / (m * n)


def kpd(
    real_features: ArrayLike,
    gen_features: ArrayLike,
    *,
    num_batches: int = 10,
    batch_size: int = 5_000,
    degree: int = 4,
    normalise: bool = True,
    replace: bool = False,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel physics distance (value, error) between real and generated feature vectors (N, D) and (M, D).

    As jetnet's kpd: features divided by the real set's largest |value| per feature (``normalise``); in each of
    ``num_batches`` batches, ``batch_size`` real and ``batch_size`` generated vectors are drawn (batch i from
    ``numpy.random.default_rng(seed + 1000 i)``, the real first) and :func:`mmd2_unbiased` is taken between them
    with the polynomial kernel (a·b/D + 1)^degree; the value is the median over batches and the error half the
    spread between the 16.275th and 83.725th percentiles (``scipy.stats.iqr(rng=(16.275, 83.725)) / 2``, ±1σ for
    a Gaussian).

    jetnet's kernel has degree 4 (``_mmd_poly_quadratic_unbiased(..., degree=4)``), kept as the default; KID's
    cubic kernel is ``degree=3``. Differences from jetnet: batches are drawn without replacement
    (``replace=False``; with replacement, repeated vectors bias the unbiased estimator upwards by O(1/N)), and
    ``batch_size`` is capped at half the smaller set so that batches still differ (``replace=True`` keeps
    jetnet's size and sampling).
    """
    x, y = feature_pair(real_features, gen_features)
    num_batches = check_count(num_batches, "num_batches")
    batch_size = check_count(batch_size, "batch_size", 2)
    degree = check_count(degree, "degree")
    if normalise:
        x, y = scaled_by_real(x, y)
    if not replace:
        batch_size = min(batch_size, min(len(x), len(y)) // 2)
        if batch_size < 2:
            raise ValueError(f"kpd without replacement needs at least 4 vectors in each set, got {len(x)} and {len(y)}")
    values = []
    drawn = " with replacement" if replace else ""
    with phase(f"KPD: {num_batches} batches of {batch_size}{drawn}", num_batches, "batches", logger=log) as step:
        for batch in range(num_batches):
            rng = np.random.default_rng(seed + 1000 * batch)
            batch_x = x[rng.choice(len(x), size=batch_size, replace=replace)]
            batch_y = y[rng.choice(len(y), size=batch_size, replace=replace)]
            values.append(mmd2_unbiased(batch_x, batch_y, degree=degree))
            step.advance()
    return float(np.median(values)), float(iqr(values, rng=(16.275, 83.725)) / 2.0)
