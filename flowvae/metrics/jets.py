"""Jets as the jet-level metrics read them: the inputs checked once (events (N, F, P) with a 0/1 mask (N, P),
the kinematic features by their indices), the multiplicity, and jet kinematics (mass, pT, η, φ, energy) from the
particles' relative η, φ, pT."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from flowvae.metrics.marginal import as_float64

__all__ = ["multiplicity", "jet_kinematics"]

# ---------------------------------------------------------------- inputs


def _mask(mask: Any, shape: tuple[int, int], name: str) -> np.ndarray:
    """A boolean (N, P) mask from 0/1 or bool values; None means every particle is real."""
    if mask is None:
        return np.ones(shape, dtype=bool)
    if hasattr(mask, "detach"):
        mask = mask.detach().cpu().numpy()
    values = np.asarray(mask)
    if values.shape != shape:
        raise ValueError(f"{name} must have shape (events, particles) = {shape}, got {values.shape}")
    if values.dtype == bool:
        return values
    if not np.issubdtype(values.dtype, np.number):
        raise ValueError(f"{name} must hold 0/1 or booleans, got dtype {values.dtype}")
    bad = (values != 0) & (values != 1)
    if bad.any():
        event, particle = np.argwhere(bad)[0]
        raise ValueError(
            f"{name} must hold only 0 (padded) and 1 (real), got {values[event, particle].item()!r} at event {event}, "
            f"particle {particle}"
        )
    return values == 1


def checked_jets(events: ArrayLike, mask: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Validated (N, F, P) float64 events with every padded entry set to 0, and the boolean (N, P) mask.

    Real particles (mask 1) must be finite; padded ones may hold anything, it is overwritten here.
    """
    values = as_float64(events)
    if values.ndim != 3:
        raise ValueError(f"{name} must be 3-D (events, features, particles), got {values.ndim}-D shape {values.shape}")
    if min(values.shape) == 0:
        raise ValueError(f"{name} has shape {values.shape}: it needs at least one event, feature and particle")
    real = _mask(mask, (values.shape[0], values.shape[2]), f"{name}'s mask")
    bad = real & ~np.isfinite(values).all(axis=1)
    if bad.any():
        event, particle = np.argwhere(bad)[0]
        raise ValueError(
            f"{name} has {int(bad.sum())} real particle(s) with a non-finite feature (NaN or inf), the first at "
            f"event {event}, particle {particle}; only padded particles (mask 0) may hold such values"
        )
    return np.where(real[:, None, :], values, 0.0), real


def compact_particles(events: np.ndarray, real: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Real particles first in each jet (their order kept), trimmed to the largest multiplicity.

    After this no result depends on where the padded particles were, to the last bit: sums see the same
    values in the same order.
    """
    order = np.argsort(~real, axis=1, kind="stable")
    counts = real.sum(axis=1)
    width = max(int(counts.max()), 1)
    order = order[:, :width]
    return np.take_along_axis(events, order[:, None, :], axis=2), np.take_along_axis(real, order, axis=1)


def kinematics_indices(kinematics: Sequence[int], n_features: int) -> tuple[int, int, int]:
    try:
        indices = tuple(int(i) for i in kinematics)
        exact = all(int(i) == i and not isinstance(i, bool) for i in kinematics)
    except (TypeError, ValueError):
        raise ValueError(f"kinematics must be three feature indices (i_eta, i_phi, i_pt), got {kinematics!r}") from None
    if len(indices) != 3 or not exact:
        raise ValueError(f"kinematics must be three feature indices (i_eta, i_phi, i_pt), got {kinematics!r}")
    if len(set(indices)) != 3 or not all(0 <= i < n_features for i in indices):
        raise ValueError(
            f"kinematics must be three different feature indices in [0, {n_features - 1}] (i_eta, i_phi, i_pt), "
            f"got {kinematics!r}"
        )
    return indices  # type: ignore[return-value]


def check_count(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer ≥ {minimum}, got {value!r}")
    return int(value)


def _features(x: ArrayLike, name: str) -> np.ndarray:
    values = as_float64(x)
    if values.ndim != 2:
        raise ValueError(f"{name} must be 2-D (samples, features), got {values.ndim}-D shape {values.shape}")
    if values.shape[0] < 2 or values.shape[1] == 0:
        raise ValueError(f"{name} has shape {values.shape}: it needs at least 2 samples and 1 feature")
    finite = np.isfinite(values)
    if not finite.all():
        row, column = np.argwhere(~finite)[0]
        raise ValueError(
            f"{name} has {values.size - int(finite.sum())} non-finite value(s) (NaN or inf), the first at sample "
            f"{row}, feature {column}"
        )
    return values


def feature_pair(real: ArrayLike, gen: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    x, y = _features(real, "real_features"), _features(gen, "gen_features")
    if x.shape[1] != y.shape[1]:
        raise ValueError(
            f"real_features and gen_features must have the same number of features (axis 1), got shapes "
            f"{x.shape} and {y.shape}"
        )
    return x, y


def scaled_by_real(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both sets divided, per feature, by the real set's largest |value| (1 where that is 0), as jetnet does."""
    scale = np.abs(x).max(axis=0)
    scale[scale == 0] = 1.0
    return x / scale, y / scale


# ---------------------------------------------------------------- jets


def multiplicity(mask: ArrayLike) -> np.ndarray:
    """Number of real particles (mask 1) in each jet, shape (N,), from a 0/1 mask of shape (N, P)."""
    values = np.asarray(mask.detach().cpu().numpy() if hasattr(mask, "detach") else mask)
    if values.ndim != 2:
        raise ValueError(f"mask must be 2-D (events, particles), got {values.ndim}-D shape {values.shape}")
    return _mask(values, values.shape, "mask").sum(axis=1)


def jet_kinematics(
    events: ArrayLike, mask: ArrayLike | None = None, kinematics: Sequence[int] = (0, 1, 2)
) -> dict[str, np.ndarray]:
    """Jet four-momentum from its real particles taken as massless: mass, pT, eta, phi and energy, each (N,).

    Each particle is px = pT cos φ, py = pT sin φ, pz = pT sinh η, E = pT cosh η; the jet is their sum, with
    m = sqrt(max(E² − |p|², 0)), pT = sqrt(px² + py²), η = asinh(pz / pT) (0 where pT = 0) and φ = atan2(py, px).
    A jet without real particles has every entry 0. As jetnet's ``jet_features``, which sums massless
    PtEtaPhiM vectors; with relative coordinates (etarel, phirel, ptrel) mass and pT are in units of the jet's
    pT. m is computed as E² − |p|² in float64, so a near-massless jet's mass is exact to ~1e-8·E.
    """
    jets, _ = compact_particles(*checked_jets(events, mask, "events"))
    return kinematics_of(jets, kinematics_indices(kinematics, jets.shape[1]))


def kinematics_of(jets: np.ndarray, indices: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """:func:`jet_kinematics` of validated, compacted jets (padded entries 0)."""
    eta, phi, pt = (jets[:, i] for i in indices)
    px = (pt * np.cos(phi)).sum(axis=1)
    py = (pt * np.sin(phi)).sum(axis=1)
    pz = (pt * np.sinh(eta)).sum(axis=1)
    energy = (pt * np.cosh(eta)).sum(axis=1)
    jet_pt = np.hypot(px, py)
    mass = np.sqrt(np.maximum(energy**2 - px**2 - py**2 - pz**2, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        jet_eta = np.where(jet_pt > 0, np.arcsinh(pz / jet_pt), 0.0)
    return {"mass": mass, "pt": jet_pt, "eta": jet_eta, "phi": np.arctan2(py, px), "energy": energy}
