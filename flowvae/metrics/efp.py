"""The 36 energy-flow polynomials with d ≤ 4 edges (Komiske, Metodiev & Thaler 2018), as jetnet computes them
with ``energyflow.EFPSet("d<=4", measure="hadr", beta=1, normed=None, coords="ptyphim")``, in numpy, and the
event feature vector that FPD and KPD compare."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

from flowvae.metrics.jets import checked_jets, compact_particles, kinematics_indices, kinematics_of
from flowvae.progress import phase

__all__ = ["EFP_GRAPHS", "efps", "event_features"]

log = logging.getLogger(__name__)

_TWO_PI = 2.0 * math.pi

# The multigraphs of the 36 EFPs with d ≤ 4 edges, in energyflow's order for EFPSet("d<=4") (the order jetnet's
# features have): vertices are particle indices summed over, an edge (k, l) is a factor θ_kl. Entries 0–20 are
# connected (entry 0 is the one-vertex graph, Σ z_i); 21–35 are disconnected and equal the product of their
# connected components' EFPs.
EFP_GRAPHS: tuple[tuple[tuple[int, int], ...], ...] = (
    (),
    ((0, 1),),
    ((0, 1), (0, 1)),
    ((0, 1), (0, 1), (0, 1)),
    ((0, 1), (0, 1), (0, 1), (0, 1)),
    ((0, 1), (0, 2)),
    ((0, 1), (0, 2), (0, 2)),
    ((0, 1), (0, 2), (0, 2), (0, 2)),
    ((0, 1), (0, 1), (0, 2), (0, 2)),
    ((0, 1), (0, 2), (1, 2)),
    ((0, 1), (0, 2), (0, 2), (1, 2)),
    ((0, 1), (0, 2), (0, 3)),
    ((0, 1), (0, 2), (0, 2), (0, 3)),
    ((0, 1), (0, 2), (1, 3)),
    ((0, 1), (0, 2), (0, 2), (1, 3)),
    ((0, 1), (0, 1), (0, 2), (1, 3)),
    ((0, 1), (0, 2), (1, 2), (0, 3)),
    ((0, 1), (0, 2), (1, 3), (2, 3)),
    ((0, 1), (0, 2), (0, 3), (0, 4)),
    ((0, 1), (0, 2), (0, 3), (1, 4)),
    ((0, 1), (0, 2), (1, 3), (2, 4)),
    ((0, 1), (2, 3)),
    ((0, 1), (2, 3), (2, 3)),
    ((0, 1), (2, 3), (2, 3), (2, 3)),
    ((0, 1), (0, 1), (2, 3), (2, 3)),
    ((0, 1), (2, 3), (2, 4)),
    ((0, 1), (0, 1), (2, 3), (2, 4)),
    ((0, 1), (2, 3), (2, 4), (2, 4)),
    ((0, 1), (2, 3), (2, 4), (3, 4)),
    ((0, 1), (2, 3), (4, 5)),
    ((0, 1), (2, 3), (2, 4), (2, 5)),
    ((0, 1), (2, 3), (2, 4), (3, 5)),
    ((0, 1), (0, 2), (3, 4), (3, 5)),
    ((0, 1), (2, 3), (4, 5), (4, 5)),
    ((0, 1), (2, 3), (4, 5), (4, 6)),
    ((0, 1), (2, 3), (4, 5), (6, 7)),
)
# Each disconnected EFP (index 21–35) as the indices of its connected factors.
_EFP_FACTORS: tuple[tuple[int, ...], ...] = (
    (1, 1), (1, 2), (1, 3), (2, 2), (1, 5), (2, 5), (1, 6), (1, 9),
    (1, 1, 1), (1, 11), (1, 13), (5, 5), (1, 1, 2), (1, 1, 5), (1, 1, 1, 1),
)  # fmt: skip
_N_EFPS = len(EFP_GRAPHS)
# Elements per (jets × particles × particles) block in the EFP computation: 1 MiB per float64 array, so that a
# block's arrays stay in cache (measured 3x faster than 8 MiB blocks).
_EFP_BLOCK = 1 << 17


def _efp_block(eta: np.ndarray, phi: np.ndarray, z: np.ndarray) -> np.ndarray:
    """The 21 connected EFPs (EFP_GRAPHS[0:21]) of a block of jets (B, M), as (B, 21).

    θ_ij = sqrt(Δη² + Δφ²) with Δφ taken into [−π, π). With u = Θz, v_k = Θ^{∘k} z (elementwise power),
    a = z∘u, w = Θa and W = Θ diag(z) Θ (the two-edge path through a summed vertex), every graph with d ≤ 4 is a
    sum of products of these; the four with a cycle need W, which costs M³ per jet, the rest M².
    """
    theta = eta[:, :, None] - eta[:, None, :]
    dphi = phi[:, :, None] - phi[:, None, :]
    if phi.max() - phi.min() > math.pi:  # some |Δφ| may exceed π
        dphi = np.remainder(dphi + math.pi, _TWO_PI) - math.pi
    theta *= theta
    dphi *= dphi
    theta += dphi
    np.sqrt(theta, out=theta)
    del dphi

    def times_z(matrix: np.ndarray, vector: np.ndarray) -> np.ndarray:
        return np.einsum("bij,bj->bi", matrix, vector)

    u = times_z(theta, z)
    theta2 = theta * theta
    v2 = times_z(theta2, z)
    v3 = times_z(theta2 * theta, z)
    v4 = times_z(theta2 * theta2, z)
    a = z * u
    w = times_z(theta, a)
    w2a = times_z(theta2, a)
    path2 = np.matmul(theta * z[:, None, :], theta)  # W_ij = Σ_k θ_ik z_k θ_kj
    weighted = path2 * z[:, None, :]  # W_ij z_j
    r1 = np.einsum("bij,bij->bi", theta, weighted)
    r2 = np.einsum("bij,bij->bi", theta2, weighted)
    r3 = np.einsum("bij,bij->bi", path2, weighted)
    del theta, theta2, path2, weighted

    def total(*factors: np.ndarray) -> np.ndarray:
        product = factors[0]
        for factor in factors[1:]:
            product = product * factor
        return product.sum(axis=1)

    return np.column_stack(
        [
            z.sum(axis=1),  # 0  one vertex
            total(z, u),  # 1  edge
            total(z, v2),  # 2  double edge
            total(z, v3),  # 3  triple edge
            total(z, v4),  # 4  quadruple edge
            total(z, u, u),  # 5  two-edge path
            total(z, u, v2),  # 6  path, one edge doubled
            total(z, u, v3),  # 7  path, one edge tripled
            total(z, v2, v2),  # 8  path, both edges doubled
            total(z, r1),  # 9  triangle
            total(z, r2),  # 10 triangle, one edge doubled
            total(z, u, u, u),  # 11 three-edge star
            total(z, u, u, v2),  # 12 star, one edge doubled
            total(a, w),  # 13 three-edge path
            total(z, v2, w),  # 14 path, an end edge doubled
            total(a, w2a),  # 15 path, the middle edge doubled
            total(a, r1),  # 16 triangle with a pendant edge
            total(z, r3),  # 17 square
            total(z, u, u, u, u),  # 18 four-edge star
            total(z, u, u, w),  # 19 fork: star of three with one leg extended
            total(z, w, w),  # 20 four-edge path
        ]
    )


def efps(
    events: ArrayLike,
    mask: ArrayLike | None = None,
    kinematics: Sequence[int] = (0, 1, 2),
    *,
    normed: bool = False,
) -> np.ndarray:
    """The 36 energy-flow polynomials with d ≤ 4 edges of each jet, shape (N, 36), in :data:`EFP_GRAPHS` order.

    EFP_G = Σ_{i_1..i_n} z_{i_1}⋯z_{i_n} Π_{(k,l)∈G} θ_{i_k i_l} over all n-tuples of the jet's real particles
    (Komiske, Metodiev, Thaler, JHEP 04 (2018) 013), with the hadronic measure, β = 1: z_i = pT_i and
    θ_ij = sqrt(Δη_ij² + Δφ_ij²), Δφ wrapped into [−π, π). This is what jetnet computes for FPD/KPD
    (``energyflow.EFPSet("d<=4", measure="hadr", beta=1, normed=None, coords="ptyphim")``; normed=None leaves
    the energies unnormalised), particles being massless so that rapidity = η. ``normed=True`` uses
    z_i = pT_i / Σ_j pT_j instead (EFP 0 is then 1). A jet without real particles gives 0 everywhere.

    Computed in numpy by closed matrix forms of the 21 connected graphs (the 15 disconnected ones are products);
    jets are grouped by multiplicity M so that a jet costs ~M³ (the four graphs with a cycle), not P³.
    """
    jets, real = compact_particles(*checked_jets(events, mask, "events"))
    return _efps_of(jets, real, kinematics_indices(kinematics, jets.shape[1]), normed)


def _efps_of(jets: np.ndarray, real: np.ndarray, indices: tuple[int, int, int], normed: bool,
             label: str = "") -> np.ndarray:
    """:func:`efps` of validated, compacted jets (padded entries 0), as a progress phase that names the jets
    ``label`` ("generated": "EFPs of 1000 generated jets")."""
    eta, phi, z = (jets[:, i] for i in indices)
    if normed:
        sums = z.sum(axis=1, keepdims=True)
        z = np.divide(z, sums, out=np.zeros_like(z), where=sums != 0)
    counts = real.sum(axis=1)
    order = np.argsort(counts, kind="stable")
    sorted_counts = counts[order]
    connected = np.zeros((jets.shape[0], 21))
    start, n_jets = 0, jets.shape[0]
    jets_named = f"{label} jets" if label else "jets"
    with phase(f"EFPs of {n_jets} {jets_named} (up to {int(sorted_counts[-1])} particles)", n_jets, "jets",
               logger=log) as step:
        while start < n_jets:
            size = max(1, _EFP_BLOCK // max(int(sorted_counts[start]), 1) ** 2)
            size = max(1, _EFP_BLOCK // max(int(sorted_counts[min(start + size, n_jets) - 1]), 1) ** 2)
            stop = min(start + size, n_jets)
            width = int(sorted_counts[stop - 1])
            if width > 0:
                block = order[start:stop]
                connected[block] = _efp_block(eta[block, :width], phi[block, :width], z[block, :width])
            step.advance(stop - start)
            start = stop
    values = np.empty((jets.shape[0], _N_EFPS))
    values[:, :21] = connected
    for column, factors in enumerate(_EFP_FACTORS, start=21):
        values[:, column] = np.prod(connected[:, list(factors)], axis=1)
    return values


def event_features(
    events: ArrayLike,
    mask: ArrayLike | None = None,
    kinematics: Sequence[int] | None = None,
    *,
    include_mass_pt: bool = True,
    normed: bool = False,
) -> np.ndarray:
    """One feature vector per event for :func:`fpd` and :func:`kpd`, shape (N, D).

    With ``kinematics`` (i_eta, i_phi, i_pt): jet mass and jet pT (:func:`jet_kinematics`) followed by the 36
    EFPs (:func:`efps`), D = 38. jetnet's ``get_fpd_kpd_jet_features`` uses the 36 EFPs alone:
    ``include_mass_pt=False`` gives exactly that. Without kinematics (features with no physical meaning): the
    mean and the standard deviation (ddof = 0) of each feature over the event's real particles, D = 2F, ordered
    mean_0, …, mean_{F−1}, std_0, …, std_{F−1}; an event without real particles has all of them 0.
    """
    jets, real = compact_particles(*checked_jets(events, mask, "events"))
    indices = None if kinematics is None else kinematics_indices(kinematics, jets.shape[1])
    return features_of(jets, real, indices, include_mass_pt, normed)


def features_of(
    jets: np.ndarray,
    real: np.ndarray,
    indices: tuple[int, int, int] | None,
    include_mass_pt: bool,
    normed: bool,
    kinematics: dict[str, np.ndarray] | None = None,
    label: str = "",
) -> np.ndarray:
    """:func:`event_features` of validated, compacted jets; ``kinematics``, if given, saves recomputing them;
    ``label`` names the jets in the EFPs' progress lines."""
    if indices is not None:
        values = _efps_of(jets, real, indices, normed, label)
        if not include_mass_pt:
            return values
        jet = kinematics if kinematics is not None else kinematics_of(jets, indices)
        return np.column_stack([jet["mass"], jet["pt"], values])
    counts = real.sum(axis=1)[:, None]
    safe = np.maximum(counts, 1)
    mean = jets.sum(axis=2) / safe
    spread = np.where(real[:, None, :], jets - mean[:, :, None], 0.0)
    std = np.sqrt((spread**2).sum(axis=2) / safe)
    return np.column_stack([mean, std])
