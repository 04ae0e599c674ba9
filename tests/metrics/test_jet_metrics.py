"""The jet metrics against closed forms, brute-force definitions, scipy and energyflow's published values.

Tolerances on the estimators (FPD, KPD) were set from their spread over 20 seeds, so they hold for any seed, not
only the fixed ones used here.
"""

import math
import string

import numpy as np
import pytest
from scipy.linalg import sqrtm
from scipy.stats import wasserstein_distance

from flowvae.metrics.distances import (
    fpd,
    fpd_line,
    fpd_points,
    frechet_distance,
    kpd,
    mmd2_unbiased,
    w1_batched,
    w1_columns,
    w1_mult,
    w1m,
    w1p,
)
from flowvae.metrics.efp import EFP_GRAPHS, efps, event_features
from flowvae.metrics.jets import jet_kinematics, multiplicity
from flowvae.metrics.marginal import wasserstein_1
from flowvae.metrics.protocol import Protocol, jet_noise_floor, jet_score_columns, score_jets

KIN = (0, 1, 2)  # (eta, phi, pt) as JetNet's etarel, phirel, ptrel


def jets_from(particles) -> np.ndarray:
    """(N, P, 3) lists of (eta, phi, pt) → flowvae's (N, 3, P)."""
    return np.transpose(np.asarray(particles, dtype=np.float64), (0, 2, 1))


def toy_jets(n: int, n_slots: int, seed: int, width: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Random jets (N, 3, P) with a 0/1 mask: 1 to P real particles each, padded slots scattered, not last."""
    rng = np.random.default_rng(seed)
    events = np.stack(
        [rng.normal(0, width, (n, n_slots)), rng.normal(0, width, (n, n_slots)), rng.exponential(0.05, (n, n_slots))],
        axis=1,
    )
    counts = rng.integers(1, n_slots + 1, n)
    mask = np.zeros((n, n_slots))
    for i, count in enumerate(counts):
        mask[i, rng.choice(n_slots, count, replace=False)] = 1
    return events, mask


def closed_form_fd(mu1, cov1, mu2, cov2) -> float:
    """‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^{1/2}) with scipy's matrix square root."""
    root = sqrtm(cov1 @ cov2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(cov1 + cov2 - 2 * root))


# ---------------------------------------------------------------- jet kinematics


def test_back_to_back_pair_has_mass_sum_of_energies_and_no_pt():
    # two massless particles of pT 50 at φ = 0 and π, η = 0: E = 100, p = 0
    jet = jet_kinematics(jets_from([[(0.0, 0.0, 50.0), (0.0, math.pi, 50.0)]]), kinematics=KIN)
    assert jet["mass"][0] == pytest.approx(100.0, rel=1e-12)
    assert jet["pt"][0] == pytest.approx(0.0, abs=1e-12)
    assert jet["energy"][0] == pytest.approx(100.0, rel=1e-12)


def test_pair_mass_matches_the_invariant_mass_formula():
    # m² = 2 pT1 pT2 (cosh Δη − cos Δφ) for two massless particles
    p1, p2 = (0.7, -0.4, 30.0), (-0.5, 1.9, 12.0)
    expected = math.sqrt(2 * p1[2] * p2[2] * (math.cosh(p1[0] - p2[0]) - math.cos(p1[1] - p2[1])))
    jet = jet_kinematics(jets_from([[p1, p2]]), kinematics=KIN)
    assert jet["mass"][0] == pytest.approx(expected, rel=1e-12)


def test_single_particle_is_massless_and_carries_its_pt():
    jet = jet_kinematics(jets_from([[(1.3, -2.0, 42.0)]]), kinematics=KIN)
    assert jet["mass"][0] == pytest.approx(0.0, abs=1e-6)
    assert jet["pt"][0] == pytest.approx(42.0, rel=1e-12)
    assert jet["eta"][0] == pytest.approx(1.3, rel=1e-12)
    assert jet["phi"][0] == pytest.approx(-2.0, rel=1e-12)


def test_jet_pt_is_the_vector_sum():
    # pT 3 along x and 4 along y: the jet's pT is 5, at φ = atan2(4, 3)
    jet = jet_kinematics(jets_from([[(0.0, 0.0, 3.0), (0.0, math.pi / 2, 4.0)]]), kinematics=KIN)
    assert jet["pt"][0] == pytest.approx(5.0, rel=1e-12)
    assert jet["phi"][0] == pytest.approx(math.atan2(4, 3), rel=1e-12)


def test_kinematics_indices_pick_the_features():
    # features stored as (pt, junk, phi, eta): kinematics = (i_eta, i_phi, i_pt) = (3, 2, 0)
    pair = [[(0.7, -0.4, 30.0), (-0.5, 1.9, 12.0)]]
    reordered = np.stack([jets_from(pair)[:, 2], np.full((1, 2), 9.9), jets_from(pair)[:, 1], jets_from(pair)[:, 0]], 1)
    assert jet_kinematics(reordered, kinematics=(3, 2, 0))["mass"] == pytest.approx(
        jet_kinematics(jets_from(pair), kinematics=KIN)["mass"], rel=1e-14
    )


def test_masked_particles_are_left_out_of_the_jet_and_the_multiplicity():
    events = jets_from([[(0.0, 0.0, 50.0), (0.0, math.pi, 50.0), (np.nan, np.inf, 1e9)]])
    mask = np.array([[1, 1, 0]])
    assert jet_kinematics(events, mask, KIN)["mass"][0] == pytest.approx(100.0, rel=1e-12)
    assert multiplicity(mask).tolist() == [2]
    assert multiplicity(np.array([[0, 0, 0], [1, 0, 1]])).tolist() == [0, 2]


def test_a_jet_without_real_particles_is_all_zero():
    jet = jet_kinematics(jets_from([[(0.3, 0.1, 5.0)]]), np.array([[0]]), KIN)
    assert all(values[0] == 0.0 for values in jet.values())
    assert np.all(efps(jets_from([[(0.3, 0.1, 5.0)]]), np.array([[0]]), KIN) == 0.0)


# ---------------------------------------------------------------- energy-flow polynomials


# energyflow 1.4.0, EFPSet("d<=4", measure="hadr", beta=1, normed=None, coords="ptyphim").compute(jet) for the jet
# of test_efps_match_energyflow (particles as (pt, y, phi)).
ENERGYFLOW_VALUES = [
    1.0, 1.0726364630304872, 2.826810581700105, 8.205490744193314, 24.21824617393594, 1.578371284537407,
    4.3798332700988745, 12.830536275946944, 12.238360699107194, 0.7704209312874377, 1.6309080905255176,
    3.0234880206385943, 8.657390370332271, 1.7757403098906606, 4.720336593603273, 4.993389055416792,
    1.0563103758612247, 4.013686833309029, 6.6384860242377925, 2.743907384615505, 2.5109033023103646,
    1.1505489818225538, 3.0321401040119547, 8.801508569280918, 7.990858064811686, 1.6930185919950909,
    4.461756648981929, 4.69796886750211, 0.8263815827808112, 1.2341207904054725, 3.2431034964728305,
    1.9047238052617794, 2.491255911852264, 3.2523840365802767, 1.81599347436247, 1.3237629595729152,
]  # fmt: skip


def test_efps_match_energyflow():
    # four particles (eta, phi, pt), the last two on either side of the φ = ±π seam
    jet = jets_from([[(0.1, 0.2, 0.5), (-0.2, -0.1, 0.3), (0.05, 3.0, 0.15), (0.3, -3.1, 0.05)]])
    # recorded elsewhere: sums of at most 4^4 float64 products, which another BLAS or summation order moves by
    # ~1e-15 relative; a wrong graph, measure or angle moves them by 1e-3 and more
    np.testing.assert_allclose(efps(jet, None, KIN)[0], ENERGYFLOW_VALUES, rtol=1e-12)


def brute_force_efp(graph, eta, phi, z) -> float:
    """EFP_G = Σ over all vertex assignments of Π z Π θ, as one einsum written from the graph's edge list."""
    dphi = np.remainder(phi[:, None] - phi[None, :] + math.pi, 2 * math.pi) - math.pi
    theta = np.sqrt((eta[:, None] - eta[None, :]) ** 2 + dphi**2)
    n_vertices = 1 + max((max(edge) for edge in graph), default=0)
    letters = string.ascii_lowercase[:n_vertices]
    terms = list(letters) + [letters[start] + letters[end] for start, end in graph]
    return float(np.einsum(",".join(terms) + "->", *([z] * n_vertices), *([theta] * len(graph))))


@pytest.mark.parametrize("normed", [False, True])
def test_every_efp_matches_its_graph_summed_by_brute_force(normed):
    events, mask = toy_jets(4, 5, seed=3, width=1.5)  # wide: some pairs cross the φ seam
    values = efps(events, mask, KIN, normed=normed)
    for jet in range(len(events)):
        real = mask[jet] == 1
        eta, phi, pt = events[jet, 0, real], events[jet, 1, real], events[jet, 2, real]
        z = pt / pt.sum() if normed else pt
        expected = [brute_force_efp(graph, eta, phi, z) for graph in EFP_GRAPHS]
        np.testing.assert_allclose(values[jet], expected, rtol=1e-11, atol=1e-15)


def test_efps_group_jets_of_many_multiplicities_correctly():
    # jets of 0–40 real particles in one call must agree with each jet computed alone
    events, mask = toy_jets(60, 40, seed=4)
    mask[0] = 0
    together = efps(events, mask, KIN)
    alone = np.concatenate([efps(events[i : i + 1], mask[i : i + 1], KIN) for i in range(0, 60, 7)])
    np.testing.assert_allclose(together[::7], alone, rtol=1e-12, atol=1e-300)


# ---------------------------------------------------------------- event features


def test_event_features_with_kinematics_are_mass_pt_and_the_efps():
    events, mask = toy_jets(5, 6, seed=5)
    features = event_features(events, mask, KIN)
    jet = jet_kinematics(events, mask, KIN)
    assert features.shape == (5, 2 + len(EFP_GRAPHS))
    np.testing.assert_array_equal(features[:, 0], jet["mass"])
    np.testing.assert_array_equal(features[:, 1], jet["pt"])
    np.testing.assert_array_equal(features[:, 2:], efps(events, mask, KIN))
    np.testing.assert_array_equal(event_features(events, mask, KIN, include_mass_pt=False), features[:, 2:])


def test_event_features_without_kinematics_are_mean_and_std_over_real_particles():
    events, mask = toy_jets(5, 6, seed=6)
    features = event_features(events, mask)
    for i in range(5):
        real = events[i][:, mask[i] == 1]
        np.testing.assert_allclose(features[i], np.concatenate([real.mean(axis=1), real.std(axis=1)]), rtol=1e-12)


# ---------------------------------------------------------------- W1 with an uncertainty


def test_w1_of_multiplicities_matches_scipy_on_the_same_draws():
    rng = np.random.default_rng(7)
    gen_mask = (rng.random((300, 20)) < 0.4).astype(float)
    ref_mask = (rng.random((200, 20)) < 0.5).astype(float)
    mean, std = w1_mult(gen_mask, ref_mask, num_eval_samples=500, num_batches=4, seed=11)
    # the documented draws: one Generator(seed), per batch the reference's indices first, then the generated's
    draws = np.random.default_rng(11)
    gen_counts, ref_counts = gen_mask.sum(axis=1), ref_mask.sum(axis=1)
    expected = []
    for _ in range(4):
        ref_batch = ref_counts[draws.integers(200, size=500)]
        gen_batch = gen_counts[draws.integers(300, size=500)]
        expected.append(wasserstein_distance(ref_batch, gen_batch))
    assert mean == pytest.approx(np.mean(expected), rel=1e-12)
    assert std == pytest.approx(np.std(expected), rel=1e-9)
    assert mean == pytest.approx(wasserstein_distance(gen_counts, ref_counts), rel=0.3)  # ≈ the full sets' W1


def test_w1m_matches_scipy_on_the_masses():
    events, mask = toy_jets(400, 8, seed=8)
    other, other_mask = toy_jets(300, 8, seed=9, width=0.4)
    mean, std = w1m(other, other_mask, events, mask, KIN, num_eval_samples=300, num_batches=1, seed=2)
    draws = np.random.default_rng(2)
    ref_mass = jet_kinematics(events, mask, KIN)["mass"][draws.integers(400, size=300)]
    gen_mass = jet_kinematics(other, other_mask, KIN)["mass"][draws.integers(300, size=300)]
    assert mean == pytest.approx(wasserstein_distance(ref_mass, gen_mass), rel=1e-12)
    assert std == 0.0


def test_w1_batched_is_deterministic_in_its_seed():
    p, q = np.random.default_rng(0).normal(size=1000), np.random.default_rng(1).normal(0.5, 1, 800)
    assert w1_batched(p, q, seed=3) == w1_batched(p, q, seed=3)
    assert w1_batched(p, q, seed=3) != w1_batched(p, q, seed=4)
    assert w1_batched(p, q, num_eval_samples=20_000)[0] == pytest.approx(0.5, abs=0.05)


def test_w1p_pools_real_particles_per_feature():
    events, mask = toy_jets(200, 10, seed=10)
    other, other_mask = toy_jets(150, 10, seed=11, width=0.5)
    means, stds = w1p(other, other_mask, events, mask, num_eval_samples=200, num_batches=2, seed=5)
    draws = np.random.default_rng(5)
    expected = []
    for _ in range(2):
        ref_jets, gen_jets = draws.integers(200, size=200), draws.integers(150, size=200)
        ref_real, gen_real = mask[ref_jets] == 1, other_mask[gen_jets] == 1
        expected.append(
            [wasserstein_distance(events[ref_jets, f][ref_real], other[gen_jets, f][gen_real]) for f in range(3)]
        )
    np.testing.assert_allclose(means, np.mean(expected, axis=0), rtol=1e-12)
    np.testing.assert_allclose(stds, np.std(expected, axis=0), rtol=1e-9, atol=1e-15)


def sorted_per_batch_w1p(generated, gen_mask, reference, ref_mask, *, num_eval_samples, num_batches, seed):
    """w1p as it was first written: each batch's drawn jets gathered, their real particles pooled and sorted."""
    rng, w1s = np.random.default_rng(seed), []
    for _ in range(num_batches):
        ref_draw = rng.integers(len(reference), size=num_eval_samples)
        gen_draw = rng.integers(len(generated), size=num_eval_samples)
        ref_pool = np.moveaxis(reference[ref_draw], 1, 0)[:, ref_mask[ref_draw] == 1]
        gen_pool = np.moveaxis(generated[gen_draw], 1, 0)[:, gen_mask[gen_draw] == 1]
        w1s.append([wasserstein_1(r, g) for r, g in zip(ref_pool, gen_pool, strict=True)])
    return np.mean(w1s, axis=0), np.std(w1s, axis=0)


@pytest.mark.parametrize("sizes", [(60, 45, 300), (30, 30, 7), (1, 12, 40)])
def test_w1p_from_counts_equals_gathering_and_sorting_each_batch(sizes):
    """w1p's batches as counts on values sorted once give, to the last bit, the W1s of the pooled and sorted
    batches, on values with ties within and across the sets (and ±0) and padded slots with junk values in them."""
    n_ref, n_gen, num_eval_samples = sizes
    reference, ref_mask = toy_jets(n_ref, 8, seed=n_ref)
    generated, gen_mask = toy_jets(n_gen, 8, seed=n_gen + 1)
    reference, generated = np.round(reference, 1), -np.round(generated, 1)  # few values, many ties; -0.0
    reference = np.where(ref_mask[:, None] == 0, 7.0, reference)  # padded slots: never a value of W1P
    generated = np.where(gen_mask[:, None] == 0, 7.0, generated)
    options = {"num_eval_samples": num_eval_samples, "num_batches": 4, "seed": n_ref}
    got = w1p(generated, gen_mask, reference, ref_mask, **options)
    expected = sorted_per_batch_w1p(generated, gen_mask, reference, ref_mask, **options)
    for got_part, expected_part in zip(got, expected, strict=True):
        assert got_part.tolist() == expected_part.tolist()
        np.testing.assert_allclose(got_part, expected_part, rtol=1e-12, atol=0)


# ---------------------------------------------------------------- FPD


def test_frechet_distance_matches_the_closed_form():
    rng = np.random.default_rng(12)
    a, b = rng.normal(size=(4, 4)), rng.normal(size=(4, 4))
    cov1, cov2 = a @ a.T + 0.1 * np.eye(4), b @ b.T + 0.1 * np.eye(4)
    mu1, mu2 = rng.normal(size=4), rng.normal(size=4)
    assert frechet_distance(mu1, cov1, mu2, cov2) == pytest.approx(closed_form_fd(mu1, cov1, mu2, cov2), rel=1e-10)
    assert frechet_distance(mu1, cov1, mu1, cov1) == pytest.approx(0.0, abs=1e-12)
    # commuting covariances: Σ (Δμ)² + Σ (σ1 − σ2)²
    expected = 0.3**2 + (1 - 2) ** 2 + (2 - 0.5) ** 2
    assert frechet_distance([0.3, 0], np.diag([1.0, 4.0]), [0, 0], np.diag([4.0, 0.25])) == pytest.approx(expected)


def exact_moments(rng, mu, cov, n) -> np.ndarray:
    """n Gaussian vectors transformed so that their mean and (ddof-1) covariance are exactly mu and cov."""
    x = rng.normal(size=(n, len(mu)))
    x -= x.mean(axis=0)
    x = x @ np.linalg.inv(np.linalg.cholesky(np.cov(x, rowvar=False))).T
    return x @ np.linalg.cholesky(cov).T + mu


MU1, COV1 = np.zeros(3), np.eye(3)
MU2, COV2 = np.array([0.3, 0.0, -0.2]), np.array([[1.5, 0.4, 0.0], [0.4, 1.0, 0.2], [0.0, 0.2, 0.6]])


def test_fpd_extrapolates_to_the_closed_form_distance():
    # Two sets whose moments are exactly the Gaussians': batches drawn with replacement fluctuate around them
    # with an FD bias ∝ 1/N, and the extrapolation must land on the closed form (0.3243) within its own error
    # (over 20 seeds: |deviation| ≤ 1.6 errors, errors ≈ 0.002).
    rng = np.random.default_rng(13)
    real, gen = exact_moments(rng, MU1, COV1, 20_000), exact_moments(rng, MU2, COV2, 20_000)
    value, error = fpd(real, gen, normalise=False, replace=True, seed=1)
    assert 0 < error < 0.005
    assert value == pytest.approx(closed_form_fd(MU1, COV1, MU2, COV2), abs=3 * error)


def test_fpd_of_independent_gaussian_samples_converges_to_the_closed_form():
    # Default sampling (without replacement) on i.i.d. samples: the value scatters around the closed form by
    # the samples' own fluctuation, std 0.009 over 20 seeds at 20,000 per side (larger than the fit's error).
    rng = np.random.default_rng(14)
    real, gen = rng.multivariate_normal(MU1, COV1, 20_000), rng.multivariate_normal(MU2, COV2, 20_000)
    value, _ = fpd(real, gen, normalise=False, seed=1)
    assert value == pytest.approx(closed_form_fd(MU1, COV1, MU2, COV2), abs=0.04)


def test_fpd_of_one_distribution_is_zero_within_its_error():
    # over 20 seeds: values ≤ 2e-5, at most 4.2 errors
    rng = np.random.default_rng(15)
    cov = np.array([[1.0, 0.5], [0.5, 2.0]])
    value, error = fpd(rng.multivariate_normal([1, 2], cov, 20_000), rng.multivariate_normal([1, 2], cov, 20_000))
    assert value < 1e-4
    assert value <= 6 * error


def test_fpd_normalises_by_the_real_sets_largest_value():
    rng = np.random.default_rng(16)
    real, gen = rng.normal(size=(4000, 2)), rng.normal(0.2, 1.0, (4000, 2))
    scale, quick = np.array([10.0, 0.001]), {"num_batches": 4, "seed": 3}
    assert fpd(real * scale, gen * scale, **quick) == pytest.approx(fpd(real, gen, **quick), rel=1e-9)
    peak = np.abs(real).max(axis=0)
    assert fpd(real, gen, **quick) == pytest.approx(fpd(real / peak, gen / peak, normalise=False, **quick), rel=1e-9)


def test_fpd_refuses_sets_too_small_to_extrapolate():
    rng = np.random.default_rng(17)
    with pytest.raises(ValueError, match="two different batch sizes"):
        fpd(rng.normal(size=(2, 2)), rng.normal(size=(2, 2)))
    assert fpd(rng.normal(size=(50, 2)), rng.normal(size=(50, 2)), replace=True, min_samples=20, max_samples=80)


# ---------------------------------------------------------------- KPD


def brute_force_mmd2(x, y, degree):
    def kernel(a, b):
        return (a @ b.T / a.shape[1] + 1) ** degree

    kxx, kyy = kernel(x, x), kernel(y, y)
    np.fill_diagonal(kxx, 0)
    np.fill_diagonal(kyy, 0)
    m, n = len(x), len(y)
    return kxx.sum() / (m * (m - 1)) + kyy.sum() / (n * (n - 1)) - 2 * kernel(x, y).mean()


@pytest.mark.parametrize("degree", [1, 2, 3, 4, 5])
def test_mmd2_unbiased_matches_its_definition(degree):
    rng = np.random.default_rng(17)
    x, y = rng.normal(size=(700, 5)), rng.normal(0.1, 1.2, (600, 5))  # more than one block of rows
    assert mmd2_unbiased(x, y, degree=degree) == pytest.approx(brute_force_mmd2(x, y, degree), rel=1e-9)


def test_kpd_is_zero_within_its_error_for_one_distribution_and_positive_for_two():
    # over 20 seeds: |value| ≤ 2.3 errors for one distribution; ≥ 6.5 errors (median 10) for a shift of half a std
    rng = np.random.default_rng(18)
    real = rng.normal(size=(2000, 4))
    same = rng.normal(size=(2000, 4))
    shifted = rng.normal(0.5, 1.0, (2000, 4))
    value, error = kpd(real, same, batch_size=500, seed=2)
    assert abs(value) <= 4 * error
    value, error = kpd(real, shifted, batch_size=500, seed=2)
    assert value > 5 * error > 0


def test_kpd_median_and_error_are_over_the_documented_batches():
    rng = np.random.default_rng(19)
    real, gen = rng.normal(size=(300, 3)), rng.normal(0.2, 1, (300, 3))
    value, error = kpd(real, gen, num_batches=6, batch_size=100, degree=3, normalise=False, seed=4)
    vals = []
    for i in range(6):
        draws = np.random.default_rng(4 + 1000 * i)
        x = real[draws.choice(300, size=100, replace=False)]
        vals.append(brute_force_mmd2(x, gen[draws.choice(300, size=100, replace=False)], 3))
    assert value == pytest.approx(np.median(vals), rel=1e-9)
    low, high = np.percentile(vals, [16.275, 83.725])
    assert error == pytest.approx((high - low) / 2, rel=1e-9)


# ---------------------------------------------------------------- the results row and masks


def test_score_jets_columns_follow_what_is_given():
    events, mask = toy_jets(60, 6, seed=20)
    small = {"fpd_options": {"min_samples": 10, "max_samples": 20, "num_batches": 5}, "kpd_options": {"batch_size": 10}}
    cases = [(KIN, mask, mask), (None, mask, None), (KIN, None, None), (None, None, None)]
    for kinematics, gen_mask, ref_mask in cases:
        gen_half = None if gen_mask is None else gen_mask[:30]
        ref_half = None if ref_mask is None else ref_mask[30:]
        row = score_jets(events[:30], gen_half, events[30:], ref_half, kinematics, **small)
        has_mask = gen_mask is not None or ref_mask is not None
        assert list(row) == jet_score_columns(kinematics is not None, has_mask)
        assert all(isinstance(value, float) and math.isfinite(value) for value in row.values())
    assert jet_score_columns(True, True) == [
        "w1m", "w1m_err", "w1_mult", "w1_mult_err", "fpd", "fpd_err", "kpd", "kpd_err"
    ]  # fmt: skip
    assert jet_score_columns(False, False) == ["fpd", "fpd_err", "kpd", "kpd_err"]


def test_padded_particles_change_no_metric():
    events, mask = toy_jets(80, 8, seed=21)
    other, other_mask = toy_jets(80, 8, seed=22, width=0.4)
    small = {"num_eval_samples": 200, "fpd_options": {"min_samples": 20, "max_samples": 60, "num_batches": 5}}
    baseline = score_jets(other, other_mask, events, mask, KIN, **small)
    baseline_w1p = w1p(other, other_mask, events, mask, num_eval_samples=100, num_batches=2)
    baseline_plain = score_jets(other, other_mask, events, mask, None, **small)
    # overwrite every padded value with junk (NaN, inf, huge pT) ...
    junk, junk_other = events.copy(), other.copy()
    junk[np.broadcast_to(mask[:, None, :] == 0, junk.shape)] = np.nan
    junk_other[:, 2][other_mask == 0] = 1e12
    junk_other[:, 0][other_mask == 0] = -np.inf
    # ... and move the padded slots to the front of each jet (the real particles keep their order)
    order = np.array([np.concatenate([np.flatnonzero(m == 0), np.flatnonzero(m == 1)]) for m in mask])
    moved = np.take_along_axis(junk, order[:, None, :], axis=2)
    moved_mask = np.take_along_axis(mask, order, axis=1)
    assert score_jets(junk_other, other_mask, moved, moved_mask, KIN, **small) == baseline
    assert score_jets(junk_other, other_mask, moved, moved_mask, None, **small) == baseline_plain
    for got, expected in zip(w1p(junk_other, other_mask, moved, moved_mask, num_eval_samples=100, num_batches=2),
                             baseline_w1p, strict=True):  # fmt: skip
        np.testing.assert_array_equal(got, expected)


def test_noise_floor_scores_two_seeded_halves_and_is_small():
    events, mask = toy_jets(400, 8, seed=23)
    small = {"num_eval_samples": 500, "fpd_options": {"min_samples": 80, "max_samples": 200, "num_batches": 5}}
    floor = jet_noise_floor(events, mask, KIN, seed=5, **small)
    order = np.random.default_rng(5).permutation(400)
    first, second = order[:200], order[200:]
    assert floor == score_jets(events[first], mask[first], events[second], mask[second], KIN, 5, **small)
    # a generator whose particles are spread twice as wide in η and φ scores well above the floor
    wider = events[first] * np.array([2.0, 2.0, 1.0])[None, :, None]
    against_wider = score_jets(wider, mask[first], events[second], mask[second], KIN, 5, **small)
    assert floor["w1m"] < against_wider["w1m"] / 3
    plain_floor = jet_noise_floor(events, mask, seed=5, **small)
    plain_wider = score_jets(wider, mask[first], events[second], mask[second], None, 5, **small)
    assert plain_floor["fpd"] < plain_wider["fpd"] / 3 and plain_floor["kpd"] < plain_wider["kpd"] / 3


# ---------------------------------------------------------------- errors say what was wrong


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda e, m: score_jets(e, m[:, :3], e, m), r"mask must have shape \(events, particles\) = \(10, 4\)"),
        (lambda e, m: score_jets(e, m * 2, e, m), "only 0 \\(padded\\) and 1 \\(real\\), got 2.0 at event 0"),
        (lambda e, m: score_jets(e[0], m, e, m), "must be 3-D"),
        (lambda e, m: jet_kinematics(e, m, (0, 1)), "three feature indices"),
        (lambda e, m: jet_kinematics(e, m, (0, 1, 1)), "three different feature indices in \\[0, 2\\]"),
        (lambda e, m: jet_kinematics(e, m, (0, 1, 3)), "three different feature indices"),
        (lambda e, m: fpd(np.ones((5, 2)), np.ones((5, 3))), "same number of features"),
        (lambda e, m: kpd(np.ones((5, 2)), np.ones((5, 2)), degree=0), "degree must be an integer ≥ 1"),
        (lambda e, m: w1_batched([], [1.0]), "p is empty"),
    ],
)
def test_bad_inputs_are_refused_with_what_was_wrong(call, message):
    events, mask = toy_jets(10, 4, seed=24)
    with pytest.raises(ValueError, match=message):
        call(events, mask)


def test_a_non_finite_real_particle_is_refused_but_a_padded_one_is_not():
    events, mask = toy_jets(10, 4, seed=25)
    events[3, 1, np.flatnonzero(mask[3])[0]] = np.nan
    with pytest.raises(ValueError, match="non-finite feature .* at event 3"):
        jet_kinematics(events, mask, KIN)
    mask[3, np.flatnonzero(mask[3])[0]] = 0
    assert np.isfinite(jet_kinematics(events, mask, KIN)["mass"]).all()


def test_torch_tensors_are_accepted():
    torch = pytest.importorskip("torch")
    events, mask = toy_jets(6, 5, seed=26)
    expected = efps(events, mask, KIN)
    np.testing.assert_array_equal(efps(torch.tensor(events, dtype=torch.float64), torch.tensor(mask), KIN), expected)


# ---------------------------------------------------------------- W1 streams and FPD's fits


def test_w1_columns_draws_one_batch_for_every_column_as_w1_batched_does():
    rng = np.random.default_rng(27)
    p, q = rng.normal(size=(500, 3)), rng.normal(0.3, 1.2, (400, 3))
    means, stds = w1_columns(p, q, num_eval_samples=300, num_batches=4, seed=6)
    for k in range(3):  # the same draws as w1_batched's, so column by column the same numbers
        assert (means[k], stds[k]) == w1_batched(p[:, k], q[:, k], num_eval_samples=300, num_batches=4, seed=6)
    draws = np.random.default_rng(6)
    expected = []
    for _ in range(4):
        rows_p, rows_q = draws.integers(500, size=300), draws.integers(400, size=300)
        expected.append([wasserstein_distance(p[rows_p, k], q[rows_q, k]) for k in range(3)])
    np.testing.assert_allclose(means, np.mean(expected, axis=0), rtol=1e-12)
    with pytest.raises(ValueError, match="p \\(N, K\\) and q \\(M, K\\) with one K"):
        w1_columns(p, q[:, :2])
    q[7, 1] = np.nan
    with pytest.raises(ValueError, match="q has 1 non-finite value"):
        w1_columns(p, q)
    with pytest.raises(ValueError, match="p is empty"):
        w1_columns(p[:0], q)


def test_w1_metrics_given_a_generator_continue_its_stream():
    rng = np.random.default_rng(28)
    p, q = rng.normal(size=600), rng.normal(0.5, 1.0, 700)
    events, mask = toy_jets(120, 6, seed=29)
    other, other_mask = toy_jets(90, 6, seed=30, width=0.5)
    stream = np.random.default_rng(4)
    first = w1_batched(p, q, num_eval_samples=200, num_batches=3, seed=stream)
    second = w1p(other, other_mask, events, mask, num_eval_samples=50, num_batches=2, seed=stream)
    third = w1_batched(p, q, num_eval_samples=200, num_batches=3, seed=stream)
    assert first == w1_batched(p, q, num_eval_samples=200, num_batches=3, seed=4)  # a fresh stream begins alike
    draws = np.random.default_rng(4)
    draws.integers(600, size=(3, 2, 200))  # advanced past the first call's 3 × 2 draws of 200
    expected = []
    for _ in range(2):
        ref_jets, gen_jets = draws.integers(120, size=50), draws.integers(90, size=50)
        ref_real, gen_real = mask[ref_jets] == 1, other_mask[gen_jets] == 1
        expected.append([wasserstein_distance(events[ref_jets, f][ref_real], other[gen_jets, f][gen_real])
                         for f in range(3)])
    np.testing.assert_allclose(second[0], np.mean(expected, axis=0), rtol=1e-12)
    w1s = [wasserstein_distance(p[draws.integers(600, size=200)], q[draws.integers(700, size=200)]) for _ in range(3)]
    assert third == pytest.approx((np.mean(w1s), np.std(w1s)), rel=1e-12)
    assert third != first


def test_fpd_fit_choices_fit_one_set_of_points():
    rng = np.random.default_rng(31)
    real, gen = rng.normal(size=(3000, 2)), rng.normal(0.05, 1.0, (3000, 2))
    options = {"min_samples": 500, "max_samples": 1500, "num_batches": 3, "replace": True, "seed": 2}
    points = fpd_points(real, gen, **options)
    assert fpd(real, gen, **options) == fpd_line(*points) == fpd_line(*points, fit="exact")
    assert fpd(real, gen, fit="jetnet", **options) == fpd_line(*points, fit="jetnet")
    with pytest.raises(ValueError, match="unknown FPD fit 'curve_fit': one of exact, jetnet"):
        fpd(real, gen, fit="curve_fit", **options)


def test_a_protocol_names_known_distinct_fpd_fits_and_columns_follow_them():
    assert Protocol("p", ("fpd",), fpd_fits=("exact", "jetnet")).columns(0, False, False) == [
        "fpd", "fpd_err", "fpd_jetnet", "fpd_jetnet_err"]
    assert Protocol("p", ("fpd", "kpd"), fpd_fits=("jetnet",)).floor_columns(0, False, False) == [
        "fpd_floor", "fpd_floor_err", "kpd_floor", "kpd_floor_err", "fpd_floor_fd"]
    for fits in ((), ("exact", "exact"), ("nnls",)):
        with pytest.raises(ValueError, match="fpd_fits must name distinct fits from exact, jetnet"):
            Protocol("p", ("fpd",), fpd_fits=fits)
