"""The metrics against closed forms, exact identities and their own definitions.

Tolerances are set from the estimator's measured spread over many seeds (README, "Accuracy against closed
forms"), so they hold for any seed, not only the fixed ones used here. The estimators clamp KL to ≥ 0 and JS to
[0, ln 2], so those bounds are never asserted: values are checked against closed forms or scipy instead.
"""

import math

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon
from scipy.stats import entropy, norm, wasserstein_distance

from flowvae.metrics import (
    feature_js,
    feature_kl,
    feature_moments,
    feature_w1,
    js_divergence,
    kl_divergence,
    noise_floor,
    score,
    score_columns,
    wasserstein_1,
)
from flowvae.metrics.marginal import wasserstein_1_counted

LN2 = math.log(2.0)


def gaussian_kl(mean_p: float, std_p: float, mean_q: float, std_q: float) -> float:
    """D_KL(N(mean_p, std_p²) || N(mean_q, std_q²)) in nats."""
    return math.log(std_q / std_p) + (std_p**2 + (mean_p - mean_q) ** 2) / (2 * std_q**2) - 0.5


def gaussian_w1(mean_p: float, std_p: float, mean_q: float, std_q: float) -> float:
    """W1 between 1-D Gaussians: the monotone coupling gives E|Δμ + Δσ·Z|, a folded normal's mean."""
    shift, spread = mean_q - mean_p, abs(std_q - std_p)
    if spread == 0:
        return abs(shift)
    return spread * math.sqrt(2 / math.pi) * math.exp(-(shift**2) / (2 * spread**2)) + shift * (
        1 - 2 * norm.cdf(-shift / spread)
    )


def scipy_histogram_kl(p, q, bins: int, eps: float) -> float:
    """The estimator's KL computed independently: numpy's histogram on the pooled range, scipy's entropy.

    scipy normalises p + eps and q + eps itself, which is the estimator's (p_i + eps)/(1 + bins·eps).
    """
    edges = np.linspace(min(np.min(p), np.min(q)), max(np.max(p), np.max(q)), bins + 1)
    p_prob, q_prob = np.histogram(p, edges)[0] / np.size(p), np.histogram(q, edges)[0] / np.size(q)
    return float(entropy(p_prob + eps, q_prob + eps))


def scipy_histogram_js(p, q, bins: int) -> float:
    """JS in nats on the same binning, from scipy's Jensen–Shannon distance (its square root)."""
    edges = np.linspace(min(np.min(p), np.min(q)), max(np.max(p), np.max(q)), bins + 1)
    return float(jensenshannon(np.histogram(p, edges)[0], np.histogram(q, edges)[0]) ** 2)


def gaussian_events(n_events: int, seed: int, n_features: int = 3, n_particles: int = 100) -> np.ndarray:
    """Events (n_events, n_features, n_particles) of i.i.d. N(1, 0.5²), the experiment's default data."""
    return np.random.default_rng(seed).normal(1.0, 0.5, (n_events, n_features, n_particles))


# ---------------------------------------------------------------- KL


GAUSSIAN_PAIRS = [(0.0, 1.0, 0.5, 1.0), (0.0, 1.0, 0.0, 1.5), (1.0, 0.5, 1.2, 0.6)]


@pytest.mark.parametrize("pair", GAUSSIAN_PAIRS)
def test_kl_matches_gaussian_closed_form(pair):
    # 10^6 values, as one feature pools in the default experiment; relative error over 60 seeds:
    # mean within ±0.3 %, sd ≤ 0.7 %, worst 1.6 %, so 3 % is > 4 sd.
    rng = np.random.default_rng(0)
    p = rng.normal(pair[0], pair[1], 10**6)
    q = rng.normal(pair[2], pair[3], 10**6)
    assert kl_divergence(p, q) == pytest.approx(gaussian_kl(*pair), rel=0.03)


def test_kl_overestimates_a_generator_wider_than_the_reference():
    # Generated tails land in empty reference bins, whose cost eps sets. N(0,2²)‖N(0,1) = 0.807 at 10^6 values,
    # relative error over 20 seeds: mean +10 %, sd 2.6 %, range +5.5 … +15 %: biased upwards, never below.
    rng = np.random.default_rng(18)
    generated, reference = rng.normal(0, 2, 10**6), rng.normal(0, 1, 10**6)
    error = kl_divergence(generated, reference) / gaussian_kl(0, 2, 0, 1) - 1
    assert 0.0 < error < 0.25


def test_kl_of_two_samples_of_one_distribution_is_near_zero():
    rng = np.random.default_rng(1)
    # 10^5 each: 0.0014 on average over 200 seeds, at most 0.0027
    assert kl_divergence(rng.normal(0, 1, 10**5), rng.normal(0, 1, 10**5)) < 0.01


def test_kl_of_a_sample_with_itself_is_exactly_zero():
    x = np.random.default_rng(2).normal(size=10**4)
    assert kl_divergence(x, x) == 0.0
    assert kl_divergence(x, x[::-1]) == 0.0


def test_kl_is_asymmetric():
    rng = np.random.default_rng(3)
    narrow, wide = rng.normal(0, 1, 10**5), rng.normal(0, 2, 10**5)
    forward, backward = kl_divergence(narrow, wide), kl_divergence(wide, narrow)
    assert forward == pytest.approx(gaussian_kl(0, 1, 0, 2), rel=0.05)
    assert backward > forward + 0.3  # closed forms 0.807 vs 0.318


def test_kl_matches_scipy_entropy_on_small_samples_and_large_eps():
    # small samples, few bins and a large eps: empty bins on both sides and a renormalisation factor far from 1
    for seed in range(20):
        rng = np.random.default_rng(seed)
        p, q = rng.normal(0, 1, 50), rng.normal(rng.uniform(-1, 1), rng.uniform(0.5, 2), 30)
        bins, eps = int(rng.integers(1, 40)), float(10 ** rng.uniform(-10, -2))
        expected = scipy_histogram_kl(p, q, bins, eps)
        assert kl_divergence(p, q, bins=bins, eps=eps) == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_kl_renormalises_after_adding_eps():
    # p = (1, 0), q = (½, ½) on 2 bins: p̃ = (1 + eps, eps)/(1 + 2 eps) and q̃ = (½, ½); without the
    # renormalisation the terms would sum to (1 + 2 eps) times this, 20 % more at eps = 0.1
    eps = 0.1
    norm_ = 1 + 2 * eps
    expected = ((1 + eps) * math.log(2 * (1 + eps) / norm_) + eps * math.log(2 * eps / norm_)) / norm_
    assert kl_divergence([0.0, 0.0], [0.0, 1.0], bins=2, eps=eps) == pytest.approx(expected, rel=1e-12)


def test_kl_follows_its_definition():
    # the exact estimator, written out with numpy's own histogram
    rng = np.random.default_rng(4)
    p, q = rng.normal(0, 1, 1000), rng.normal(0.3, 1.2, 700)
    bins, eps = 20, 1e-6
    edges = np.linspace(min(p.min(), q.min()), max(p.max(), q.max()), bins + 1)
    p_prob = (np.histogram(p, edges)[0] / p.size + eps) / (1 + bins * eps)
    q_prob = (np.histogram(q, edges)[0] / q.size + eps) / (1 + bins * eps)
    expected = np.sum(p_prob * np.log(p_prob / q_prob))
    assert kl_divergence(p, q, bins=bins, eps=eps) == pytest.approx(expected, rel=1e-12)


def test_kl_counts_values_outside_a_given_range_in_the_edge_bins():
    assert kl_divergence([-5.0, 0.5, 7.0], [0.05, 0.5, 0.95], bins=10, range=(0, 1)) == 0.0
    assert kl_divergence([-5.0, 0.5], [0.5, 0.5], bins=10, range=(0, 1)) > 1.0


def test_kl_empty_reference_bins_are_large_but_finite():
    kl = kl_divergence([0.0, 0.0], [1.0, 1.0], bins=10)
    assert math.isfinite(kl)
    assert kl == pytest.approx(math.log(1 / 1e-10), rel=1e-6)


def test_kl_of_identical_constant_values_is_zero():
    assert kl_divergence([2.0, 2.0, 2.0], [2.0, 2.0]) == 0.0
    assert js_divergence([2.0, 2.0, 2.0], [2.0, 2.0]) == 0.0


def test_kl_accepts_torch_tensors():
    torch = pytest.importorskip("torch")
    p = torch.randn(1000, requires_grad=True)
    q = torch.randn(800, dtype=torch.float64) + 0.5
    expected = kl_divergence(p.detach().numpy().astype(np.float64), q.numpy())
    assert kl_divergence(p, q) == expected


@pytest.mark.parametrize(
    "p, q, options, message",
    [
        ([], [1.0], {}, "p is empty"),
        ([1.0], np.empty(0), {}, "q is empty"),
        ([1.0, np.nan], [1.0], {}, "p has 1 non-finite"),
        ([1.0], [np.inf, 2.0, -np.inf], {}, "q has 2 non-finite"),
        ([1.0], [1.0], {"bins": 0}, "bins must be an integer ≥ 1, got 0"),
        ([1.0], [1.0], {"bins": 2.5}, "bins must be an integer"),
        ([1.0], [1.0], {"range": (1.0, 1.0)}, "low < high"),
        ([1.0], [1.0], {"range": (0.0, np.nan)}, "finite"),
        ([1.0], [1.0], {"range": 3.0}, "pair"),
        ([1.0], [1.0], {"eps": 0.0}, "eps must be > 0"),
    ],
)
def test_kl_rejects_bad_input(p, q, options, message):
    with pytest.raises(ValueError, match=message):
        kl_divergence(p, q, **options)


# ---------------------------------------------------------------- JS and W1


def test_js_is_symmetric_and_matches_scipy():
    for seed in range(20):
        rng = np.random.default_rng(seed)
        p, q = rng.normal(0, 1, 200), rng.normal(rng.uniform(-3, 3), rng.uniform(0.2, 3), 150)
        js = js_divergence(p, q, bins=30)
        assert js == js_divergence(q, p, bins=30)
        assert js == pytest.approx(scipy_histogram_js(p, q, 30), rel=1e-9, abs=1e-15)
    x = np.random.default_rng(5).normal(size=1000)
    assert js_divergence(x, x) == 0.0


def test_js_of_gaussians_matches_numerical_integration():
    # JS(N(0,1), N(1,1)) by quadrature on a fine grid; 10^6 values in 100 bins, error over 30 seeds:
    # mean −0.2 %, sd 0.3 %, worst −0.8 %
    grid = np.linspace(-12, 13, 200_001)
    p, q = norm.pdf(grid, 0, 1), norm.pdf(grid, 1, 1)
    m = 0.5 * (p + q)
    closed = float(np.sum(0.5 * p * np.log(p / m) + 0.5 * q * np.log(q / m)) * (grid[1] - grid[0]))
    rng = np.random.default_rng(17)
    js = js_divergence(rng.normal(0, 1, 10**6), rng.normal(1, 1, 10**6))
    assert closed == pytest.approx(0.1115, abs=1e-3)
    assert js == pytest.approx(closed, rel=0.015)


def test_js_of_disjoint_samples_is_ln2():
    # every bin holds one sample only: each side contributes ½ ln 2 exactly
    assert js_divergence([0.0, 0.1], [5.0, 5.1]) == pytest.approx(LN2, abs=1e-12)
    assert js_divergence([0.0, 0.1, 0.2], [0.8, 1.0], bins=10) == pytest.approx(LN2, abs=1e-12)
    # half the mass of p shared with q: p = (½, ½, 0), q = (0, 1, 0) on 3 bins
    expected = 0.5 * (0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75)) + 0.5 * math.log(1 / 0.75)
    assert js_divergence([0.0, 1.5], [1.5, 1.5], bins=3, range=(0, 3)) == pytest.approx(expected)


def test_js_rejects_bad_input():
    with pytest.raises(ValueError, match="non-finite"):
        js_divergence([np.nan], [1.0])
    with pytest.raises(ValueError, match="bins"):
        js_divergence([1.0], [1.0], bins=0)


def test_w1_of_a_shift_is_the_shift():
    x = np.random.default_rng(6).normal(size=10**5)
    assert wasserstein_1(x, x + 0.7) == pytest.approx(0.7, abs=1e-12)
    assert wasserstein_1(x, x - 0.7) == pytest.approx(0.7, abs=1e-12)
    rng = np.random.default_rng(7)
    # independent samples, 10^6 each: sd of the error ≈ 0.0016, so 1e-2 is > 6 sd
    assert wasserstein_1(rng.normal(0, 1, 10**6), rng.normal(0.5, 1, 10**6)) == pytest.approx(0.5, abs=1e-2)


@pytest.mark.parametrize("factor", [0.5, 1.0, 2.0])
def test_w1_of_a_scaled_sample(factor):
    # a > 0 keeps the order of the values, so the optimal coupling pairs x_i with a·x_i
    x = np.random.default_rng(8).normal(size=10**4)
    assert wasserstein_1(x, factor * x) == pytest.approx(abs(factor - 1) * np.mean(np.abs(x)), abs=1e-12)


@pytest.mark.parametrize("pair", [(0.0, 1.0, 0.0, 2.0), (1.0, 0.5, 1.2, 0.6)])
def test_w1_matches_gaussian_closed_form(pair):
    rng = np.random.default_rng(9)
    p, q = rng.normal(pair[0], pair[1], 10**6), rng.normal(pair[2], pair[3], 10**6)
    # error sd over 30 seeds ≤ 0.0015, worst 0.0037
    assert wasserstein_1(p, q) == pytest.approx(gaussian_w1(*pair), abs=1e-2)


@pytest.mark.parametrize("sizes", [(1000, 1000), (1000, 700), (1, 5), (3, 1), (1, 1)])
@pytest.mark.parametrize("ties", [False, True])
def test_w1_matches_scipy(sizes, ties):
    rng = np.random.default_rng(10)
    p, q = rng.normal(0.0, 1.0, sizes[0]), rng.normal(0.3, 1.5, sizes[1])
    if ties:  # repeated values, within and across the samples
        p, q = np.round(p, 1), np.round(q, 1)
    assert wasserstein_1(p, q) == pytest.approx(wasserstein_distance(p, q), rel=1e-12, abs=1e-15)


def test_w1_of_identical_constant_samples_is_zero():
    assert wasserstein_1(np.full(4, 2.5), np.full(7, 2.5)) == 0.0
    assert wasserstein_1(np.full(4, 2.5), np.full(4, 2.5)) == 0.0


@pytest.mark.parametrize("sizes", [(40, 40), (40, 57), (1, 9)])
def test_w1_counted_is_w1_of_the_samples_written_out_to_the_bit(sizes):
    """Counts on sorted distinct values (ties within and across the samples, ±0, values neither sample holds) give
    wasserstein_1's float on the expanded samples, in both its branches (equal sizes, pooled CDFs)."""
    rng = np.random.default_rng(sizes[1])
    for _ in range(20):
        values = np.unique(np.round(rng.normal(0.0, 1.0, 30), 1))
        p_counts, q_counts = (rng.multinomial(size, rng.dirichlet(np.full(values.size, 0.3))) for size in sizes)
        p, q = np.repeat(values, p_counts), np.repeat(values, q_counts)
        expected = wasserstein_1(np.where(p == 0, -0.0, p), q)
        got = wasserstein_1_counted(values, p_counts, q_counts)
        assert got == expected
        assert got == pytest.approx(wasserstein_distance(p, q), rel=1e-12, abs=1e-15)


def test_w1_counted_refuses_an_empty_sample():
    with pytest.raises(ValueError, match="non-empty"):
        wasserstein_1_counted(np.array([0.0, 1.0]), np.array([0, 0]), np.array([1, 2]))


def test_w1_rejects_bad_input():
    with pytest.raises(ValueError, match="empty"):
        wasserstein_1([], [1.0])
    with pytest.raises(ValueError, match="non-finite"):
        wasserstein_1([1.0], [np.inf])


# ---------------------------------------------------------------- per feature


def test_feature_metrics_pool_each_feature_over_events_and_particles():
    rng = np.random.default_rng(10)
    generated = rng.normal([[0.0], [1.0], [2.0]], 1.0, (40, 3, 7))
    reference = rng.normal([[0.1], [1.0], [1.5]], 1.2, (25, 3, 11))  # other N and P
    options = {"bins": 17, "eps": 1e-8}
    kl, js, w1 = (
        feature_kl(generated, reference, **options),
        feature_js(generated, reference, bins=17),
        feature_w1(generated, reference),
    )
    assert kl.shape == js.shape == w1.shape == (3,)
    for i in range(3):
        gen_pool, ref_pool = generated[:, i, :].ravel(), reference[:, i, :].ravel()
        assert kl[i] == kl_divergence(gen_pool, ref_pool, **options)
        assert js[i] == js_divergence(gen_pool, ref_pool, bins=17)
        assert w1[i] == wasserstein_1(gen_pool, ref_pool)


@pytest.mark.parametrize("metric", [feature_kl, feature_js, feature_w1])
def test_feature_metrics_reject_mismatched_features_and_ranks(metric):
    with pytest.raises(ValueError, match=r"\(5, 3, 4\) and \(5, 2, 4\)"):
        metric(np.zeros((5, 3, 4)), np.zeros((5, 2, 4)))
    with pytest.raises(ValueError, match=r"reference .* 2-D shape \(5, 3\)"):
        metric(np.zeros((5, 3, 4)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match=r"generated .* 4-D"):
        metric(np.zeros((5, 3, 4, 1)), np.zeros((5, 3, 4)))
    with pytest.raises(ValueError, match="at least one event"):
        metric(np.zeros((0, 3, 4)), np.zeros((5, 3, 4)))
    with pytest.raises(ValueError, match="generated has 1 non-finite"):
        metric(np.full((1, 3, 1), [[0.0], [np.nan], [1.0]]), np.zeros((5, 3, 4)))


def test_feature_moments_match_numpy():
    x = np.random.default_rng(11).normal([[0.0], [1.0]], [[1.0], [0.3]], (50, 2, 9))
    mean, std = feature_moments(x)
    assert mean.shape == std.shape == (2,)
    for i in range(2):
        assert mean[i] == pytest.approx(np.mean(x[:, i, :]), rel=1e-12)
        assert std[i] == pytest.approx(np.std(x[:, i, :]), rel=1e-12)
    with pytest.raises(ValueError, match="3-D|shape"):
        feature_moments(np.zeros((4, 2)))


# ---------------------------------------------------------------- noise floor


def test_noise_floor_is_small_for_the_default_sample_size():
    # 10^4 events: 0.0009 (half vs half, 5,000 events each); 10^3 events: 0.010; 10^2 events: 0.12
    reference = gaussian_events(10_000, seed=12)
    assert noise_floor(reference) < 0.005
    assert noise_floor(reference[:100]) > 10 * noise_floor(reference)


def test_noise_floor_is_deterministic_given_the_seed():
    reference = gaussian_events(200, seed=13)
    assert noise_floor(reference, seed=4) == noise_floor(reference, seed=4)
    assert noise_floor(reference, seed=4) != noise_floor(reference, seed=5)


def test_noise_floor_rises_with_bins():
    reference = gaussian_events(1000, seed=14)
    assert noise_floor(reference, bins=1000) > 3 * noise_floor(reference, bins=100)


def test_noise_floor_needs_two_events():
    with pytest.raises(ValueError, match="at least 2 reference events"):
        noise_floor(np.zeros((1, 3, 100)))


# ---------------------------------------------------------------- results row


def test_score_row_is_consistent_with_the_feature_metrics():
    generated = gaussian_events(30, seed=15, n_particles=20) * 1.1
    reference = gaussian_events(40, seed=16, n_particles=20)
    row = score(generated, reference, bins=40)
    assert list(row) == score_columns(3)
    assert all(isinstance(value, float) for value in row.values())
    kl = feature_kl(generated, reference, bins=40)
    js = feature_js(generated, reference, bins=40)
    w1 = feature_w1(generated, reference)
    (gen_mean, gen_std), (input_mean, input_std) = feature_moments(generated), feature_moments(reference)
    for i in range(3):
        assert (row[f"kl_{i}"], row[f"js_{i}"], row[f"w1_{i}"]) == (kl[i], js[i], w1[i])
        assert (row[f"gen_mean_{i}"], row[f"gen_std_{i}"]) == (gen_mean[i], gen_std[i])
        assert (row[f"input_mean_{i}"], row[f"input_std_{i}"]) == (input_mean[i], input_std[i])
    for metric in ("kl", "js", "w1"):
        assert row[f"{metric}_sum"] == sum(row[f"{metric}_{i}"] for i in range(3))
    assert row["kl_sum"] != score(generated, reference)["kl_sum"]  # the options reach the estimator


def test_score_columns():
    assert score_columns(1) == [
        "kl_0", "kl_sum", "w1_0", "w1_sum", "js_0", "js_sum",
        "gen_mean_0", "gen_std_0", "input_mean_0", "input_std_0",
    ]  # fmt: skip
