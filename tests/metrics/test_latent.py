"""latent_gap against closed forms: W1 of two Gaussians' marginals, and ~0 (its floor) for one distribution."""

from __future__ import annotations

import numpy as np
import pytest

from flowvae.metrics.latent import latent_gap, latent_gap_floor


def test_the_gap_is_the_sum_of_the_marginals_w1():
    """Shifted marginals: W1(N(μ, 1), N(0, 1)) = |μ|; a scaled one: W1(N(0, s²), N(0, 1)) = |s − 1|·√(2/π)."""
    rng = np.random.default_rng(0)
    n = 200_000
    prior = rng.standard_normal((n, 3))
    codes = np.column_stack([rng.standard_normal(n) + 0.5, rng.standard_normal(n) * 2.0, rng.standard_normal(n)])
    expected = 0.5 + 1.0 * np.sqrt(2 / np.pi) + 0.0
    assert latent_gap(codes, prior) == pytest.approx(expected, abs=0.01)


def test_one_distribution_gives_its_floor():
    rng = np.random.default_rng(1)
    codes, prior = rng.standard_normal((20_000, 4)), rng.standard_normal((20_000, 4))
    gap, floor = latent_gap(codes, prior), latent_gap_floor(codes)
    assert 0 < gap < 0.1 and 0 < floor < 0.1
    assert gap == pytest.approx(floor, rel=1.0)  # same order: both are the estimator's noise


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="dimensions"):
        latent_gap(np.zeros((5, 2)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        latent_gap(np.zeros(5), np.zeros((5, 1)))
    with pytest.raises(ValueError, match="non-finite"):
        latent_gap_floor(np.array([[0.0], [np.nan]]))
