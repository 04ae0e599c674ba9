"""Is the latent what the prior says? ``latent_gap``: the aggregate posterior against the prior that generates.

    latent_gap = Σ_d W1(codes_d, prior_d)

over the D latent dimensions, where ``codes`` are one posterior draw z_K ~ q_K(z|x) per held-out event (the
aggregate posterior) and ``prior`` as many draws of the generating prior: the per-dimension Wasserstein-1 distance
in latent units, summed — the histograms a user draws by hand, as one number. It is 0 only when every marginal
matches; it is blind to a joint shape that the marginals do not show (FPD on the generated events sees that).
One definition for every prior, so "is the latent Gaussian?" (``prior=standard``) and "did the prior fix it?"
(``prior=two_stage``, ``prior=flow``) are read off the same column.

``latent_gap_floor`` is the same sum between two random halves of the codes (:func:`split_halves`): what a
perfect prior would score at half the sample size, the estimator's own noise.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from flowvae.metrics.marginal import split_halves, wasserstein_1

__all__ = ["latent_gap", "latent_gap_floor", "LATENT_COLUMNS"]

LATENT_COLUMNS = ("latent_gap", "latent_gap_floor")


def _codes(values: ArrayLike, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2 or len(array) < 2:
        raise ValueError(f"{name} must be (N, D) latent vectors with N >= 2, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds non-finite values")
    return array


def latent_gap(codes: ArrayLike, prior_samples: ArrayLike) -> float:
    """Σ_d W1 between the codes' and the prior samples' d-th coordinates: (N, D) and (M, D)."""
    x, y = _codes(codes, "codes"), _codes(prior_samples, "prior_samples")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"codes have {x.shape[1]} dimensions and the prior's samples {y.shape[1]}")
    return float(sum(wasserstein_1(x[:, d], y[:, d]) for d in range(x.shape[1])))


def latent_gap_floor(codes: ArrayLike, seed: int = 0) -> float:
    """:func:`latent_gap` between two random halves of ``codes``."""
    x = _codes(codes, "codes")
    first, second = split_halves(len(x), seed)
    return latent_gap(x[first], x[second])
