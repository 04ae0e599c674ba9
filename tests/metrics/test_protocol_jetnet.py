"""Metric protocol ``jetnet``: jetnet.evaluation's published defaults, recomputed here from their definitions with
numpy and scipy (none of flowvae's metric helpers but the 36 EFPs, whose values test_jet_metrics checks), its
truth row against a disjoint real set, and ``scaled`` left as it was.

The recomputations make the draws the protocol documents: the W1s' batches from one Generator(seed) continued
through W1M, W1P and W1EFP in that order (jetnet's one module-level generator), each batch the reference's jets
first, one draw per batch for every EFP and feature; FPD from Generator(42), reference then generated per batch,
its line fitted by jetnet's own curve_fit call (``fpd``) and exactly (``fpd_exact``); KPD's batch i from
Generator(42 + 1000 i); all with replacement.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.linalg import sqrtm
from scipy.optimize import curve_fit, nnls
from scipy.stats import wasserstein_distance

from flowvae.commands.score import main
from flowvae.config import validate
from flowvae.errors import ConfigError
from flowvae.metrics import distances
from flowvae.metrics import protocol as jet_protocol
from flowvae.metrics.distances import fpd, fpd_line, fpd_points
from flowvae.metrics.efp import EFP_GRAPHS, efps, event_features
from flowvae.metrics.protocol import JETNET, PROTOCOLS, SCALED, score_protocol
from flowvae.metrics.row import jet_columns, jet_row, score_row
from tests.conftest import compose_config

DATA = Path(__file__).resolve().parents[1] / "data"
KIN = (0, 1, 2)
# Sizes small enough for seconds; every option the protocol has is exercised.
SMALL = dataclasses.replace(
    JETNET, num_eval_samples=300, num_batches=3,
    fpd_options={**JETNET.fpd_options, "min_samples": 400, "max_samples": 1500, "num_points": 4, "num_batches": 3},
    kpd_options={**JETNET.kpd_options, "batch_size": 60, "num_batches": 5},
)  # fmt: skip


def slice_jets() -> tuple[np.ndarray, np.ndarray]:
    """The 400 gluon jets of the test slice as (N, 3, 30) etarel, phirel, ptrel and their (N, 30) 0/1 mask."""
    raw = np.load(DATA / "gluon_30p_slice.npz")["particle_features"].astype(np.float64).transpose(0, 2, 1)
    return raw[:, :3], raw[:, 3]


def generated_like(events: np.ndarray, mask: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A poor generator: the jets with their angles smeared and pT scaled."""
    rng = np.random.default_rng(seed)
    out = events.copy()
    out[:, :2] += rng.normal(0, 0.02, out[:, :2].shape)
    out[:, 2] *= 1.3
    return out * mask[:, None, :], mask


# ---------------------------------------------------------------- jetnet's definitions, recomputed


def jet_mass(events: np.ndarray, mask: np.ndarray) -> np.ndarray:
    eta, phi, pt = (events[:, i] * mask for i in range(3))
    energy, px = (pt * np.cosh(eta)).sum(1), (pt * np.cos(phi)).sum(1)
    py, pz = (pt * np.sin(phi)).sum(1), (pt * np.sinh(eta)).sum(1)
    return np.sqrt(np.maximum(energy**2 - px**2 - py**2 - pz**2, 0))


def w1_draws(n_ref: int, n_gen: int, size: int, batches: int, seed: int, metrics: int = 3):
    """jetnet's W1 draws, as its code makes them: one generator (its module-level ``rng``, here Generator(seed))
    from which w1m, then w1p, then w1efp each draw, per batch, ``rng.choice(len(jets1), size)`` (the reference)
    then ``rng.choice(len(jets2), size)``: a list per metric of (reference, generated) index pairs."""
    rng = np.random.default_rng(seed)
    return [[(rng.choice(n_ref, size=size), rng.choice(n_gen, size=size)) for _ in range(batches)]
            for _ in range(metrics)]


def reference_w1(ref_values, gen_values, draws) -> tuple[np.ndarray, np.ndarray]:
    """Per column of (N, K) values: mean and std (ddof 0) of scipy's W1 over the drawn batches."""
    w1s = [[wasserstein_distance(ref_values[r, k], gen_values[g, k]) for k in range(ref_values.shape[1])]
           for r, g in draws]
    return np.mean(w1s, axis=0), np.std(w1s, axis=0)


def reference_w1p(ref, ref_mask, gen, gen_mask, draws):
    w1s = []
    for r, g in draws:
        ref_parts = ref[r].transpose(0, 2, 1)[ref_mask[r] == 1]  # (particles, features)
        gen_parts = gen[g].transpose(0, 2, 1)[gen_mask[g] == 1]
        w1s.append([wasserstein_distance(ref_parts[:, f], gen_parts[:, f]) for f in range(ref.shape[1])])
    return np.mean(w1s, axis=0), np.std(w1s, axis=0)


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    diff = a.mean(0) - b.mean(0)
    return float(diff @ diff + np.trace(ca) + np.trace(cb) - 2 * np.trace(sqrtm(ca @ cb).real))


def jetnet_linear(x, intercept, slope):
    return intercept + slope * x


def jetnet_fit(inverse_sizes, fds):
    """jetnet.evaluation.fpd's fit, as jetnet 0.2.5 writes it."""
    params, covs = curve_fit(jetnet_linear, inverse_sizes, fds, bounds=([0, 0], [np.inf, np.inf]))
    return params[0], np.sqrt(np.diag(covs)[0])  # y-intercept, err on y-intercept


def exact_fit(inverse_sizes, fds):
    """The line c + k/N with c, k ≥ 0 at the least-squares optimum (scipy's nnls), c's standard error from the
    residuals, as curve_fit's covariance takes it."""
    design = np.column_stack([np.ones(len(fds)), inverse_sizes])
    params, _ = nnls(design, np.asarray(fds))
    residual = np.sum((fds - design @ params) ** 2)
    return params[0], np.sqrt(np.linalg.inv(design.T @ design)[0, 0] * residual / (len(fds) - 2))


def reference_fpd_points(real, gen, *, min_samples, max_samples, num_points, num_batches, seed):
    """jetnet's fpd up to its fit: batches with replacement from one Generator(seed); (1/N, mean FD at N)."""
    sizes = (1 / np.linspace(1 / min_samples, 1 / max_samples, num_points)).astype("int32")
    rng = np.random.default_rng(seed)
    means = []
    for size in sizes:
        values = []
        for _ in range(num_batches):
            a = real[rng.choice(len(real), size=size)]
            b = gen[rng.choice(len(gen), size=size)]
            values.append(frechet(a, b))
        means.append(np.mean(values))
    return 1 / sizes, means


def reference_kpd(real, gen, *, batch_size, num_batches, seed):
    values = []
    for i in range(num_batches):
        rng = np.random.default_rng(seed + 1000 * i)
        x, y = real[rng.choice(len(real), size=batch_size)], gen[rng.choice(len(gen), size=batch_size)]
        d = x.shape[1]
        kxx, kyy, kxy = ((p @ q.T / d + 1) ** 4 for p, q in ((x, x), (y, y), (x, y)))
        m = batch_size
        values.append((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                      - 2 * kxy.mean())
    low, high = np.percentile(values, [16.275, 83.725])
    return np.median(values), (high - low) / 2


def reference_row(protocol, gen, gen_mask, ref, ref_mask, seed):
    """Every jetnet metric of ``protocol``'s sizes, recomputed."""
    n, b = protocol.num_eval_samples, protocol.num_batches
    mass_draws, particle_draws, efp_draws = w1_draws(len(ref), len(gen), n, b, seed)
    row = {}
    mass = reference_w1(jet_mass(ref, ref_mask)[:, None], jet_mass(gen, gen_mask)[:, None], mass_draws)
    row["w1m"], row["w1m_err"] = mass[0][0], mass[1][0]
    means, stds = reference_w1p(ref, ref_mask, gen, gen_mask, particle_draws)
    row["w1p"], row["w1p_err"] = means.mean(), np.sqrt((stds**2).sum())
    for f in range(len(means)):
        row[f"w1p_{f}"], row[f"w1p_{f}_err"] = means[f], stds[f]
    ref_efps, gen_efps = efps(ref, ref_mask), efps(gen, gen_mask)  # (N, 36): no jet mass or pT
    means, stds = reference_w1(ref_efps[:, [12, 14, 15, 16, 17]], gen_efps[:, [12, 14, 15, 16, 17]], efp_draws)
    row["w1efp"], row["w1efp_err"] = means.mean(), np.sqrt((stds**2).sum())
    for k in range(5):
        row[f"w1efp_{k}"], row[f"w1efp_{k}_err"] = means[k], stds[k]
    peak = np.abs(ref_efps).max(axis=0)
    real, fake = ref_efps / peak, gen_efps / peak
    options = {k: v for k, v in protocol.fpd_options.items() if k != "replace"}
    points = reference_fpd_points(real, fake, seed=42, **options)
    row["fpd"], row["fpd_err"] = jetnet_fit(*points)
    row["fpd_exact"], row["fpd_exact_err"] = exact_fit(*points)
    options = {k: v for k, v in protocol.kpd_options.items() if k not in ("replace", "degree")}
    row["kpd"], row["kpd_err"] = reference_kpd(real, fake, seed=42, **options)
    return row


# ---------------------------------------------------------------- the protocol's values


def test_the_registry_holds_jetnets_published_defaults():
    assert (JETNET.num_eval_samples, JETNET.num_batches, JETNET.seed, JETNET.include_mass_pt) == (50_000, 5, 42, False)
    assert dict(JETNET.fpd_options) == {"min_samples": 20_000, "max_samples": 50_000, "num_points": 10,
                                        "num_batches": 20, "replace": True}
    assert dict(JETNET.kpd_options) == {"batch_size": 5_000, "num_batches": 10, "degree": 4, "replace": True}
    # W1EFP's EFPs are jetnet's EFPSet(("n==", 4), ("d==", 4), ("p==", 1)): every connected multigraph with 4
    # vertices and 4 edges, and no other
    def vertices(graph):
        return {v for edge in graph for v in edge}

    def connected(graph):
        seen, todo = set(), [graph[0][0]]
        while todo:
            v = todo.pop()
            seen.add(v)
            todo += [w for edge in graph if v in edge for w in edge if w not in seen]
        return seen == vertices(graph)

    n4d4 = [k for k, g in enumerate(EFP_GRAPHS) if len(g) == 4 and len(vertices(g)) == 4 and connected(g)]
    assert JETNET.w1efp_efps == tuple(n4d4) and len(n4d4) == 5


def test_jetnet_row_equals_jetnets_definitions_recomputed():
    events, mask = slice_jets()
    ref, ref_mask = events[200:], mask[200:]
    gen, gen_mask = generated_like(events[:200], mask[:200], seed=1)
    row = score_protocol(SMALL, gen, gen_mask, ref, ref_mask, KIN, seed=7)
    expected = reference_row(SMALL, gen, gen_mask, ref, ref_mask, seed=7)
    assert list(row) == JETNET.columns(3, True, True)
    assert row["fpd"] > 3 * row["fpd_err"] > 0  # a distance the fit resolves, inside jetnet's bounds
    for column in row:
        assert row[column] == pytest.approx(expected[column], rel=1e-7, abs=1e-15), column


@pytest.mark.slow  # ~4 s for the row, ~70 s for its recomputation with scipy's sqrtm and W1
def test_jetnet_row_at_the_published_defaults():
    # 50,000 jets per W1 batch, FPD's 200 batches of 20,000 to 50,000, KPD's 10 of 5,000, all drawn from 200 jets
    events, mask = slice_jets()
    ref, ref_mask = events[200:], mask[200:]
    gen, gen_mask = generated_like(events[:200], mask[:200], seed=2)
    row = score_protocol("jetnet", gen, gen_mask, ref, ref_mask, KIN, seed=0)
    expected = reference_row(JETNET, gen, gen_mask, ref, ref_mask, seed=0)
    for column in row:
        assert row[column] == pytest.approx(expected[column], rel=1e-6), column


def test_fpd_and_kpd_use_seed_42_whatever_the_rows_seed_and_the_w1s_the_rows():
    events, mask = slice_jets()
    gen, gen_mask = generated_like(events[:200], mask[:200], seed=1)
    one = score_protocol(SMALL, gen, gen_mask, events[200:], mask[200:], KIN, seed=1)
    two = score_protocol(SMALL, gen, gen_mask, events[200:], mask[200:], KIN, seed=2)
    assert (one["fpd"], one["kpd"], one["kpd_err"]) == (two["fpd"], two["kpd"], two["kpd_err"])
    assert one["w1m"] != two["w1m"]
    other_seed = score_protocol(dataclasses.replace(SMALL, seed=43), gen, gen_mask, events[200:], mask[200:], KIN)
    assert other_seed["kpd"] != one["kpd"]


def test_jetnet_needs_jet_kinematics():
    events, mask = slice_jets()
    with pytest.raises(ValueError, match="protocol jetnet needs the jets' kinematics"):
        score_protocol(SMALL, events[:50], mask[:50], events[50:100], mask[50:100])
    with pytest.raises(ValueError, match="unknown metric protocol 'bogus': one of scaled, jetnet"):
        score_protocol("bogus", events[:50], mask[:50], events[50:100], mask[50:100], KIN)


# ---------------------------------------------------------------- FPD's two fits and jetnet's W1 stream


# FPD's batch sizes at the published defaults, as jetnet.evaluation.fpd makes them, and the mean FDs at them
# measured for the first 10,000 gluon jets of gluon_30p.npz (the file tests/data's slice opens) against its other
# 10,000, one Pythia run (a truth row at 10k: the 36 EFPs normalised by the reference, 20 batches drawn with
# replacement from Generator(42) per size).
PUBLISHED_INVERSE_SIZES = 1 / (1 / np.linspace(1 / 20_000, 1 / 50_000, 10)).astype("int32")
TRUTH_10K_FDS = [
    0.00042572237001196336, 0.0004958844328201012, 0.00041550525784311566, 0.00039803020705762306,
    0.00038422991268573237, 0.0003556308693654697, 0.00038256329288901826, 0.00034729978768977264,
    0.00030302180476756145, 0.000341607251429063,
]
# The same against those 10,000 jets with their angles smeared by 0.01 and pT scaled by 1.05.
SMEARED_10K_FDS = [
    0.01116716721157687, 0.010870064931742418, 0.011701440068297753, 0.01155543127842874, 0.011453661933186,
    0.012183626070791587, 0.01171049003522546, 0.011983791246945577, 0.011521716830389894, 0.011591460614669952,
]


def squared_residual(fds, intercept, slope):
    return float(np.sum((np.asarray(fds) - (intercept + slope * PUBLISHED_INVERSE_SIZES)) ** 2))


def test_jetnet_fit_is_jetnets_curve_fit_call_and_the_exact_fit_its_optimum():
    for fds in (TRUTH_10K_FDS, SMEARED_10K_FDS):
        # jetnet's fit: the very call jetnet makes, so the very numbers
        assert fpd_line(PUBLISHED_INVERSE_SIZES, fds, "jetnet") == jetnet_fit(PUBLISHED_INVERSE_SIZES, fds)
        # the exact fit: the one flowvae has always made (scaled's, and fpd()'s default), the nnls optimum
        exact = fpd_line(PUBLISHED_INVERSE_SIZES, fds, "exact")
        assert exact == distances._nonnegative_line_intercept(PUBLISHED_INVERSE_SIZES, np.asarray(fds))
        assert exact == pytest.approx(exact_fit(PUBLISHED_INVERSE_SIZES, fds), rel=1e-9)
    # A large FPD: the two fits agree to 1e-5 (what the published models' rows and the study's models see)
    assert fpd_line(PUBLISHED_INVERSE_SIZES, SMEARED_10K_FDS, "jetnet")[0] == pytest.approx(
        fpd_line(PUBLISHED_INVERSE_SIZES, SMEARED_10K_FDS, "exact")[0], rel=1e-5)
    # A small FPD (a truth row): curve_fit stops far from the optimum, its slope near 0 and its intercept near
    # the mean FD: 3.86e-4 ± 0.68e-4 where the least-squares optimum is 2.24e-4 ± 0.35e-4 (1.7×)
    jetnet, exact = (fpd_line(PUBLISHED_INVERSE_SIZES, TRUTH_10K_FDS, fit) for fit in ("jetnet", "exact"))
    assert jetnet[0] > 1.5 * exact[0] and jetnet[0] > exact[0] + 4 * exact[1]
    assert jetnet[0] == pytest.approx(np.mean(TRUTH_10K_FDS), rel=0.05)
    assert exact[0] == pytest.approx(2.2438766e-4, rel=1e-6) and exact[1] == pytest.approx(3.4570020e-5, rel=1e-6)
    design = np.column_stack([np.ones(10), PUBLISHED_INVERSE_SIZES])
    exact_slope = nnls(design, np.asarray(TRUTH_10K_FDS))[0][1]
    _, (_, jetnet_slope) = None, curve_fit(jetnet_linear, PUBLISHED_INVERSE_SIZES, TRUTH_10K_FDS,
                                           bounds=([0, 0], [np.inf, np.inf]))[0]
    assert squared_residual(TRUTH_10K_FDS, jetnet[0], jetnet_slope) > 1.5 * squared_residual(
        TRUTH_10K_FDS, exact[0], exact_slope)
    with pytest.raises(ValueError, match="unknown FPD fit 'nnls': one of exact, jetnet"):
        fpd_line(PUBLISHED_INVERSE_SIZES, TRUTH_10K_FDS, "nnls")


def test_jetnet_rows_fpd_is_jetnets_fit_and_fpd_exact_the_exact_fit_of_the_same_points(monkeypatch):
    seen = []

    def spy(*args, **kwargs):
        seen.append(fpd_points(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(jet_protocol, "fpd_points", spy)
    monkeypatch.setitem(PROTOCOLS, "jetnet", SMALL)
    events, mask = slice_jets()
    truth, ref = (events[:200], mask[:200]), (events[200:], mask[200:])
    gen = generated_like(events[:200], mask[:200], seed=3)
    row = jet_row(*gen, *ref, KIN, seed=5, protocol="jetnet", truth=truth)
    assert list(row) == [
        "w1m", "w1m_err", "w1p", "w1p_err", *(f"w1p_{i}{e}" for i in range(3) for e in ("", "_err")), "w1efp",
        "w1efp_err", "fpd", "fpd_err", "fpd_exact", "fpd_exact_err", "kpd", "kpd_err",
        *(f"{c}_floor{e}" for c in ["w1m", "w1p", "w1p_0", "w1p_1", "w1p_2", "w1efp", "fpd", "fpd_exact", "kpd"]
          for e in ("", "_err")),
    ]  # fmt: skip
    assert list(row) == jet_columns(True, True, "jetnet", 3)
    (gen_x, gen_fds), (truth_x, truth_fds) = seen  # the generated jets', then the truth row's
    for prefix, (x, fds) in (("fpd", (gen_x, gen_fds)), ("fpd_floor", (truth_x, truth_fds))):
        exact = prefix.replace("fpd", "fpd_exact")
        assert (row[prefix], row[f"{prefix}_err"]) == jetnet_fit(x, fds)
        assert (row[exact], row[f"{exact}_err"]) == distances._nonnegative_line_intercept(x, fds)
    # fpd_exact is what FPD was before (fpd() with its default fit on the same draws): the study's numbers
    features = event_features(*gen, KIN, include_mass_pt=False)
    ref_features = event_features(*ref, KIN, include_mass_pt=False)
    assert (row["fpd_exact"], row["fpd_exact_err"]) == fpd(ref_features, features, seed=42, **SMALL.fpd_options)
    assert row["fpd"] != row["fpd_exact"]


def test_jetnet_w1_batches_are_drawn_as_jetnets_stream(monkeypatch):
    """Every batch W1M, W1P and W1EFP compare is the batch jetnet's code draws with its generator seeded by the
    row's seed: one stream through w1m, w1p, w1efp, the reference's jets first in each batch."""
    batches = []
    real_w1, real_counted = distances.wasserstein_1, distances.wasserstein_1_counted

    def spy(p, q):
        batches.append((np.sort(p), np.sort(q)))
        return real_w1(p, q)

    def counted_spy(values, p_counts, q_counts):  # W1P's batches, as counts on sorted values: written out
        batches.append((np.repeat(values, p_counts), np.repeat(values, q_counts)))
        return real_counted(values, p_counts, q_counts)

    monkeypatch.setattr(distances, "wasserstein_1", spy)
    monkeypatch.setattr(distances, "wasserstein_1_counted", counted_spy)
    events, mask = slice_jets()
    ref, ref_mask = events[200:], mask[200:]
    gen, gen_mask = generated_like(events[:200], mask[:200], seed=1)
    score_protocol(SMALL, gen, gen_mask, ref, ref_mask, KIN, seed=7)
    n, b = SMALL.num_eval_samples, SMALL.num_batches
    mass_draws, particle_draws, efp_draws = w1_draws(len(ref), len(gen), n, b, seed=7)
    expected = []  # jetnet's order of W1 calls: w1m's batches, w1p's (each feature), w1efp's (each EFP)
    ref_mass, gen_mass = jet_mass(ref, ref_mask), jet_mass(gen, gen_mask)
    expected += [(ref_mass[r], gen_mass[g]) for r, g in mass_draws]
    for r, g in particle_draws:
        ref_parts, gen_parts = ref[r].transpose(0, 2, 1)[ref_mask[r] == 1], gen[g].transpose(0, 2, 1)[gen_mask[g] == 1]
        expected += [(ref_parts[:, f], gen_parts[:, f]) for f in range(3)]
    ref_efps, gen_efps = efps(ref, ref_mask), efps(gen, gen_mask)
    expected += [(ref_efps[r, k], gen_efps[g, k]) for r, g in efp_draws for k in JETNET.w1efp_efps]
    assert len(batches) == len(expected) == b * (1 + 3 + 5)
    for (p, q), (want_p, want_q) in zip(batches, expected, strict=True):
        np.testing.assert_allclose(p, np.sort(want_p), rtol=1e-12)
        np.testing.assert_allclose(q, np.sort(want_q), rtol=1e-12)
    # scaled keeps its draws: W1M and W1 of the multiplicity each start from Generator(seed) afresh (on jets cut
    # to 1-30 particles: the slice's gluon jets nearly all fill their 30 slots)
    cut = np.random.default_rng(8)
    ref_mask, gen_mask = (m * (np.arange(30) < cut.integers(1, 31, (len(m), 1))) for m in (ref_mask, gen_mask))
    batches.clear()
    score_protocol(dataclasses.replace(SCALED, num_eval_samples=n, num_batches=b), gen, gen_mask, ref, ref_mask,
                   KIN, seed=7)
    fresh = w1_draws(len(ref), len(gen), n, b, seed=7, metrics=1)[0]
    ref_mass, gen_mass = jet_mass(ref, ref_mask), jet_mass(gen, gen_mask)
    mult = ref_mask.sum(axis=1), gen_mask.sum(axis=1)
    want = [(ref_mass[r], gen_mass[g]) for r, g in fresh] + [(mult[0][r], mult[1][g]) for r, g in fresh]
    assert len(batches) == len(want)
    for (p, q), (want_p, want_q) in zip(batches, want, strict=True):
        np.testing.assert_allclose(p, np.sort(want_p), rtol=1e-12)
        np.testing.assert_allclose(q, np.sort(want_q), rtol=1e-12)


# ---------------------------------------------------------------- the truth row


def test_truth_row_is_the_metrics_of_a_disjoint_real_set_against_the_reference(monkeypatch):
    monkeypatch.setitem(PROTOCOLS, "jetnet", SMALL)
    events, mask = slice_jets()
    truth, ref = (events[:200], mask[:200]), (events[200:], mask[200:])
    gen = generated_like(events[:200], mask[:200], seed=3)
    row = jet_row(*gen, *ref, KIN, seed=5, protocol="jetnet", truth=truth)
    assert list(row) == jet_columns(True, True, "jetnet", 3)
    truth_as_generated = reference_row(SMALL, *truth, *ref, seed=5)
    for metric, value in truth_as_generated.items():
        name = metric.removesuffix("_err")
        floor = f"{name}_floor{'_err' if metric.endswith('_err') else ''}"
        if floor in row:
            assert row[floor] == pytest.approx(value, rel=1e-6, abs=1e-15), floor  # FD of near-equal sets: 1e-7
    assert row["w1m"] > 2 * row["w1m_floor"]  # the smeared generator is far from the truth row
    # without a truth set: two halves of the reference, as documented
    halves = jet_row(*gen, *ref, KIN, seed=5, protocol="jetnet")
    first, second = np.random.default_rng(5).permutation(200)[:100], np.random.default_rng(5).permutation(200)[100:]
    expected = reference_row(SMALL, ref[0][first], ref[1][first], ref[0][second], ref[1][second], seed=5)
    assert halves["w1m_floor"] == pytest.approx(expected["w1m"], rel=1e-9)
    assert halves["kpd_floor"] == pytest.approx(expected["kpd"], rel=1e-7)


def test_a_truth_set_must_be_disjoint_and_is_for_jetnet_only():
    events, mask = slice_jets()
    ref = (events[200:], mask[200:])
    with pytest.raises(ValueError, match="the truth set is the reference itself"):
        jet_row(*ref, *ref, KIN, protocol=SMALL, truth=ref)
    with pytest.raises(ValueError, match="protocol scaled takes its floors from two halves"):
        jet_row(*ref, *ref, KIN, protocol="scaled", truth=(events[:200], mask[:200]))


# ---------------------------------------------------------------- scaled is unchanged


# The jet-level part of score_row(jets 0-59, jets 60-119, kinematics, seed 3) as flowvae computed it before the
# protocols existed, recorded on one machine.
SCALED_BEFORE = {
    "w1m": 0.02585305542748247, "fpd": 0.0, "fpd_err": 0.049721494355337986, "kpd": -0.012380710726711985,
    "w1m_floor": 0.03573534597959484, "kpd_floor": -0.005801503299530442, "fpd_floor_fd": 0.45304958926584216,
}


def test_scaled_is_the_default_and_unchanged():
    events, mask = slice_jets()
    args = (events[:60], mask[:60], events[60:120], mask[60:120], KIN)
    row = score_row(*args, bins=20, seed=3, jet_level_only=True)
    assert row == score_row(*args, bins=20, seed=3, jet_level_only=True, protocol="scaled")
    assert list(row) == ["w1m", "w1m_err", "w1_mult", "w1_mult_err", "fpd", "fpd_err", "kpd", "kpd_err",
                         "w1m_floor", "w1m_floor_err", "w1_mult_floor", "w1_mult_floor_err", "fpd_floor",
                         "fpd_floor_err", "kpd_floor", "kpd_floor_err", "fpd_floor_fd"]
    # Bit for bit where both sides are computed here: a rerun, and the default against protocol="scaled" above.
    assert row == score_row(*args, bins=20, seed=3, jet_level_only=True)
    # The recorded values were computed on another machine: FPD's matrix square root and KPD's kernel sums go
    # through BLAS/LAPACK, whose summation order differs with the numpy build and the CPU (measured: fpd_floor_fd
    # 6.5e-9 relative, fpd_err 1.9e-9, kpd_floor 4e-14). rel=1e-6 is 150 times that, and far below what a change
    # in the computation itself moves (a different draw, scaling or estimator: 1e-3 and more). abs covers fpd = 0.
    assert {key: row[key] for key in SCALED_BEFORE} == pytest.approx(SCALED_BEFORE, rel=1e-6, abs=1e-12)


# ---------------------------------------------------------------- the CLI and the config


@pytest.fixture
def jet_files(tmp_path):
    events, mask = slice_jets()
    stacked = np.concatenate([events, mask[:, None]], axis=1).transpose(0, 2, 1)  # JetNet's (N, P, 4)
    gen = generated_like(events[:200], mask[:200], seed=4)
    paths = {name: tmp_path / f"{name}.npz" for name in ("gen", "ref", "truth")}
    np.savez(paths["gen"], particle_features=np.concatenate([gen[0], mask[:200, None]], axis=1).transpose(0, 2, 1))
    np.savez(paths["ref"], particle_features=stacked[200:])
    np.savez(paths["truth"], particle_features=stacked[:200])
    return paths, gen


JETNET_FILES = ["--key", "particle_features", "--layout", "particles_first", "--mask-feature", "3",
                "--jet-kinematics", "0,1,2"]


def test_cli_protocol_jetnet_with_truth(jet_files, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(PROTOCOLS, "jetnet", SMALL)
    paths, gen = jet_files
    code = main([str(paths["gen"]), str(paths["ref"]), *JETNET_FILES, "--protocol", "jetnet", "--truth",
                 str(paths["truth"]), "--jet-level-only", "--seed", "6", "--csv", str(tmp_path / "scores.csv")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "protocol jetnet: the jet-level floors are the metrics against --truth" in out
    row = pd.read_csv(tmp_path / "scores.csv").iloc[0]
    events, mask = slice_jets()
    expected = jet_row(*gen, events[200:], mask[200:], KIN, seed=6, protocol=SMALL, truth=(events[:200], mask[:200]))
    for column, value in expected.items():
        assert row[column] == pytest.approx(value, rel=1e-9), column
    assert row["score.protocol"] == "jetnet" and row["score.truth"].endswith("truth.npz")


def test_cli_refuses_a_bad_protocol_and_a_truth_set_under_scaled(jet_files, capsys):
    paths, _ = jet_files
    code = main([str(paths["gen"]), str(paths["ref"]), *JETNET_FILES, "--protocol", "jetnett"])
    assert code == 2
    assert "--protocol jetnett: one of scaled, jetnet" in capsys.readouterr().err
    code = main([str(paths["gen"]), str(paths["ref"]), *JETNET_FILES, "--truth", str(paths["truth"])])
    assert code == 2
    assert "a truth set is used by --protocol jetnet only" in capsys.readouterr().err
    code = main([str(paths["gen"]), str(paths["ref"]), "--key", "particle_features", "--layout", "particles_first",
                 "--mask-feature", "3", "--protocol", "jetnet"])
    assert code == 2
    assert "--protocol jetnet: needs --jet-kinematics" in capsys.readouterr().err


def test_eval_protocol_is_checked_against_the_registry():
    validate(compose_config("eval.protocol=jetnet"))
    with pytest.raises(ConfigError, match="eval.protocol=bogus .*one of scaled, jetnet"):
        validate(compose_config("eval.protocol=bogus"))


def test_a_run_scores_jetnet_with_its_training_events_as_the_truth_set(monkeypatch):
    from flowvae.data.events import load_events
    from flowvae.metrics.row import event_metric_columns
    from flowvae.run.experiment import score_events

    monkeypatch.setitem(PROTOCOLS, "jetnet", SMALL)
    cfg = compose_config("data=jetnet", f"data.path={DATA / 'gluon_30p_slice.npz'}", "eval.protocol=jetnet",
                         "eval.bins=20", "seed=2")
    events = load_events(cfg.data)
    gen = generated_like(events.test, events.test_mask, seed=5)
    row = score_events(cfg, events, *gen)
    assert list(row) == event_metric_columns(events, "jetnet")[:len(row)]  # then the training columns
    truth_row = jet_protocol.score_protocol(SMALL, events.train, events.train_mask, events.test, events.test_mask,
                                            events.kinematics, seed=2)
    for key, value in truth_row.items():
        floor = f"{key.removesuffix('_err')}_floor{'_err' if key.endswith('_err') else ''}"
        assert row[floor] == value, floor
    gaussian = compose_config("data=gaussian", "eval.protocol=jetnet")
    with pytest.raises(ConfigError, match="eval.protocol=jetnet .*needs the jets' kinematics"):
        score_events(gaussian, load_events(gaussian.data), np.zeros((4, 2, 3)), None)


def test_a_jetnet_scoring_says_each_phase_as_it_comes(jet_files, monkeypatch, capsys):
    """`flowvae score --protocol jetnet` (minutes at the published sizes) says on stderr, in order, what it
    computes: the per-feature metrics and their floors, then each jet-level metric of the generated jets and of
    the truth row, each within its part (the reference's EFPs once, with the generated jets'); stdout keeps the
    row alone."""
    monkeypatch.setitem(PROTOCOLS, "jetnet", SMALL)
    paths, _ = jet_files
    code = main([str(paths["gen"]), str(paths["ref"]), *JETNET_FILES, "--protocol", "jetnet", "--truth",
                 str(paths["truth"]), "--bins", "20", "--progress", "log"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.startswith(f"{paths['gen']} against {paths['ref']}") and "[" not in out
    lines = [line.split("] ", 1)[1] for line in err.splitlines()]
    jet_metrics = ["    W1 of jet mass: 3 batches of 300 jets",
                   "    W1 per particle feature: 3 batches of 300 jets",
                   "    EFPs of 200 {} jets (up to 30 particles)",
                   "    EFPs of 200 reference jets (up to 30 particles)",
                   "    W1 of EFPs 12, 14, 15, 16, 17: 3 batches of 300 jets",
                   "    FPD: 4 batch sizes from 400 to 1500, 3 batches each with replacement",
                   "    KPD: 5 batches of 60 with replacement"]
    scoring = "scoring 200 generated against 200 reference events (protocol jetnet)"
    assert lines[:-1] == [
        scoring,
        "  per-feature KL, W1, JS and moments",
        "  W1 per particle feature: 5 batches of 10000 jets",
        "  noise floors of kl_sum, w1_sum and js_sum: two halves of the reference",
        "  jet-level metrics (jetnet): generated against the reference",
        *(line.format("generated") for line in jet_metrics),
        "  jet-level floors (jetnet): the truth set (200 events) against the reference",
        *(line.format("truth") for line in jet_metrics if "reference jets" not in line),
    ]
    assert re.fullmatch(rf"{re.escape(scoring)}: done in \d+\.\d s", lines[-1])
