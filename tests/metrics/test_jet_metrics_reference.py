"""score_jets, fpd and kpd against jetnet's published procedure, recomputed here from its definitions.

The references below follow jetnet.evaluation.gen_metrics (Kansal et al. 2023) and use numpy and scipy only,
none of flowvae's helpers:

- both feature sets are divided, per feature, by the *real* (reference) set's largest |value|;
- FPD: the Fréchet distance of Gaussians fitted to batches of N real and N generated vectors (``np.cov``, ddof 1;
  ``scipy.linalg.sqrtm``), averaged per N, and a least-squares line c + k/N; FPD is c and its error the standard
  error of c;
- KPD: the unbiased MMD² with the kernel (x·y/D + 1)^4, summed pair by pair, per batch; the median over batches
  and half the 16.275–83.725 percentile spread.

Where flowvae draws random batches, the references make the draws its docstrings document (one Generator(seed)
for FPD and the W1s, the real set first; Generator(seed + 1000 i) for KPD's batch i), so that they are exact
comparisons. The first test needs no draws at all: every batch of a set of identical jets is the same.
"""

import numpy as np
import pytest
from scipy.linalg import sqrtm
from scipy.stats import linregress, wasserstein_distance

from flowvae.metrics.distances import fpd, kpd, mmd2_unbiased
from flowvae.metrics.protocol import score_jets

# ---------------------------------------------------------------- the references


def mean_std_features(events: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per event, the mean and the std (ddof 0) of each feature over its real particles: (N, 2F)."""
    rows = []
    for jet, real in zip(events, mask, strict=True):
        particles = jet[:, real == 1]
        rows.append(np.concatenate([particles.mean(axis=1), particles.std(axis=1)]))
    return np.array(rows)


def normalised_by_real(real: np.ndarray, gen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """jetnet's _normalise_features: both sets divided by the real set's largest |value| per feature."""
    peak = np.abs(real).max(axis=0)
    return real / peak, gen / peak


def frechet_of_batches(a: np.ndarray, b: np.ndarray) -> float:
    """jetnet's _calculate_frechet_distance of the Gaussians fitted to two batches of row vectors."""
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    diff = a.mean(axis=0) - b.mean(axis=0)
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(sqrtm(cov_a @ cov_b).real))


def reference_fpd(real, gen, *, min_samples, max_samples, num_batches, num_points, seed):
    """(FPD, error, slope k) of already normalised sets; batches without replacement, sizes as jetnet's.

    jetnet fits c + k/N with curve_fit bounded to c, k ≥ 0; when the least-squares line has both positive (the
    tests assert it) that is the same line, computed here exactly by linregress, with the same error of c.
    """
    sizes = (1 / np.linspace(1 / min_samples, 1 / max_samples, num_points)).astype(int)
    draws = np.random.default_rng(seed)
    means = []
    for size in sizes:
        values = []
        for _ in range(num_batches):
            a = real[draws.choice(len(real), size=size, replace=False)]
            b = gen[draws.choice(len(gen), size=size, replace=False)]
            values.append(frechet_of_batches(a, b))
        means.append(np.mean(values))
    line = linregress(1 / sizes, means)
    return line.intercept, line.intercept_stderr, line.slope


def kernel(a: np.ndarray, b: np.ndarray, degree: int = 4) -> float:
    """jetnet's polynomial kernel (a·b/D + 1)^degree of two D-vectors (gamma = 1/D, coef0 = 1)."""
    return float((a @ b / len(a) + 1) ** degree)


def mmd2_by_pairs(x: np.ndarray, y: np.ndarray, degree: int = 4) -> float:
    """Unbiased MMD² (Gretton et al. 2012, eq. 3), one kernel evaluation per pair."""
    m, n = len(x), len(y)
    within_x = sum(kernel(x[i], x[j], degree) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    within_y = sum(kernel(y[i], y[j], degree) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    across = sum(kernel(x[i], y[j], degree) for i in range(m) for j in range(n)) / (m * n)
    return within_x + within_y - 2 * across


def reference_kpd(real, gen, *, batch_size, num_batches, seed):
    """(KPD, error) of already normalised sets; batch i from Generator(seed + 1000 i), without replacement."""
    values = []
    for i in range(num_batches):
        draws = np.random.default_rng(seed + 1000 * i)
        a = real[draws.choice(len(real), size=batch_size, replace=False)]
        b = gen[draws.choice(len(gen), size=batch_size, replace=False)]
        values.append(mmd2_by_pairs(a, b))
    low, high = np.percentile(values, [16.275, 83.725])
    return float(np.median(values)), float((high - low) / 2)


def reference_w1(ref_values, gen_values, *, num_eval_samples, num_batches, seed):
    """(mean, std) of W1 over batches drawn with replacement from one Generator(seed), the reference first."""
    draws = np.random.default_rng(seed)
    w1s = []
    for _ in range(num_batches):
        ref_batch = ref_values[draws.integers(len(ref_values), size=num_eval_samples)]
        gen_batch = gen_values[draws.integers(len(gen_values), size=num_eval_samples)]
        w1s.append(wasserstein_distance(ref_batch, gen_batch))
    return float(np.mean(w1s)), float(np.std(w1s))


def random_jets(n: int, seed: int, shift: float, most: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2, 5) events whose two features differ in scale by 10, and masks of 1 to ``most`` real particles."""
    rng = np.random.default_rng(seed)
    events = np.stack([rng.normal(3 + shift, 1, (n, 5)), rng.normal(0, 10 + 5 * shift, (n, 5))], axis=1)
    mask = np.zeros((n, 5))
    for i, count in enumerate(rng.integers(1, most + 1, n)):
        mask[i, rng.choice(5, count, replace=False)] = 1  # padded slots scattered, not last
    return events, mask


# ---------------------------------------------------------------- score_jets


def test_score_jets_of_two_sets_of_identical_jets_is_known_by_hand():
    # Reference: 6 copies of a jet whose one feature has particles (1, 3) in 4 slots: mean 2, std 1, 2 real.
    # Generated: 6 copies of (2, 2, 8, 8): mean 5, std 3, 4 real. Every batch is the same, whatever the draws.
    ref = np.tile([[[1.0, 3.0, 0.0, 0.0]]], (6, 1, 1))
    ref_mask = np.tile([1.0, 1.0, 0.0, 0.0], (6, 1))
    gen = np.tile([[[2.0, 2.0, 8.0, 8.0]]], (6, 1, 1))
    gen_mask = np.ones((6, 4))
    row = score_jets(gen, gen_mask, ref, ref_mask, num_eval_samples=100)
    # multiplicities 4 vs 2
    assert row["w1_mult"] == 2.0 and row["w1_mult_err"] == 0.0
    # features (mean, std) divided by the reference's (2, 1): reference (1, 1), generated (2.5, 3); no spread
    assert row["fpd"] == pytest.approx((2.5 - 1) ** 2 + (3 - 1) ** 2, rel=1e-12)
    assert row["fpd_err"] == pytest.approx(0.0, abs=1e-12)
    # kernel (a·b/2 + 1)^4: k(ref, ref) = 2^4, k(gen, gen) = ((2.5² + 3²)/2 + 1)^4, k(ref, gen) = ((2.5 + 3)/2 + 1)^4
    assert row["kpd"] == pytest.approx(2.0**4 + 8.625**4 - 2 * 3.75**4, rel=1e-12)
    assert row["kpd_err"] == 0.0
    # the same multiplicity on both sides: no distance
    assert score_jets(gen, gen_mask, gen, gen_mask, num_eval_samples=100)["w1_mult"] == 0.0


def test_score_jets_matches_jetnets_procedure_recomputed_from_its_definitions():
    gen, gen_mask = random_jets(30, seed=1, shift=2.0, most=3)
    ref, ref_mask = random_jets(36, seed=2, shift=0.0, most=5)
    fpd_options = {"min_samples": 6, "max_samples": 15, "num_batches": 4, "num_points": 4}
    kpd_options = {"batch_size": 6, "num_batches": 5}
    row = score_jets(gen, gen_mask, ref, ref_mask, seed=3, num_eval_samples=50, num_batches=3,
                     fpd_options=fpd_options, kpd_options=kpd_options)  # fmt: skip

    w1_mult = reference_w1(ref_mask.sum(axis=1), gen_mask.sum(axis=1), num_eval_samples=50, num_batches=3, seed=3)
    assert (row["w1_mult"], row["w1_mult_err"]) == pytest.approx(w1_mult, rel=1e-12)
    real, generated = normalised_by_real(mean_std_features(ref, ref_mask), mean_std_features(gen, gen_mask))
    value, error, slope = reference_fpd(real, generated, seed=3, **fpd_options)
    assert slope > 1 and value > 3 * error  # both of the line's parameters inside jetnet's bounds
    assert (row["fpd"], row["fpd_err"]) == pytest.approx((value, error), rel=1e-9)
    value, error = reference_kpd(real, generated, seed=3, **kpd_options)
    assert row["kpd"] == pytest.approx(value, rel=1e-9)
    assert row["kpd_err"] == pytest.approx(error, rel=1e-9)


# ---------------------------------------------------------------- fpd and kpd alone


def test_fpd_is_jetnets_extrapolation_of_unbiased_covariances():
    # Small batches (8 to 20 vectors in 3-D) make the 1/N term large and ddof 1 vs 0 visible in the intercept.
    rng = np.random.default_rng(4)
    real = rng.normal([5.0, 0.0, -2.0], [1.0, 20.0, 0.5], (40, 3))
    gen = rng.normal([5.5, 3.0, -2.0], [1.5, 15.0, 0.5], (50, 3))
    options = {"min_samples": 8, "max_samples": 20, "num_batches": 6, "num_points": 5, "seed": 7}
    value, error = fpd(real, gen, **options)
    expected, expected_error, slope = reference_fpd(*normalised_by_real(real, gen), **options)
    assert slope > 0.5 and expected > 3 * expected_error  # both of the line's parameters inside jetnet's bounds
    assert (value, error) == pytest.approx((expected, expected_error), rel=1e-9)


def test_kpd_defaults_are_jetnets_quartic_kernel_on_features_normalised_by_the_real_set():
    rng = np.random.default_rng(5)
    real = rng.normal([4.0, 0.0], [1.0, 10.0], (24, 2))
    gen = rng.normal([4.5, 1.0], [1.0, 20.0], (20, 2))
    value, error = kpd(real, gen, batch_size=8, num_batches=5, seed=9)
    expected = reference_kpd(*normalised_by_real(real, gen), batch_size=8, num_batches=5, seed=9)
    assert (value, error) == pytest.approx(expected, rel=1e-9)


def test_mmd2_unbiased_default_kernel_is_quartic():
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(7, 3)), rng.normal(0.5, 1.0, (9, 3))
    assert mmd2_unbiased(x, y) == pytest.approx(mmd2_by_pairs(x, y, degree=4), rel=1e-12)
