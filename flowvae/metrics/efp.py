"""The 36 energy-flow polynomials with d ≤ 4 edges (Komiske, Metodiev & Thaler 2018), as jetnet computes them
with ``energyflow.EFPSet("d<=4", measure="hadr", beta=1, normed=None, coords="ptyphim")``, in numpy, the
event feature vector that FPD and KPD compare, and :class:`JetSet`, a set of jets whose kinematics and features are
computed once however many metrics compare it."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

from flowvae.metrics.jets import checked_jets, compact_particles, kinematics_indices, kinematics_of
from flowvae.progress import phase

__all__ = ["EFP_GRAPHS", "efps", "event_features", "JetSet"]

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


def _efp_block(eta: np.ndarray, phi: np.ndarray, z: np.ndarray, wrap: bool) -> np.ndarray:
    """The 21 connected EFPs (EFP_GRAPHS[0:21]) of a block of jets (B, M), as (B, 21).

    θ_ij = sqrt(Δη² + Δφ²) with Δφ taken into [−π, π) where ``wrap`` says some |Δφ| may exceed π. With u = Θz,
    v_k = Θ^{∘k} z (elementwise power), a = z∘u, w = Θa and W = Θ diag(z) Θ (the two-edge path through a summed
    vertex), every graph with d ≤ 4 is a sum of products of these; the four with a cycle need W, which costs M³
    per jet, the rest M².
    """
    theta = eta[:, :, None] - eta[:, None, :]
    dphi = phi[:, :, None] - phi[:, None, :]
    if wrap:
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
    connected = np.zeros((jets.shape[0], 21))
    _fill_blocks(connected, eta, phi, z, _efp_blocks(real, phi), label)
    return _with_products(connected)


def _efp_blocks(real: np.ndarray, phi: np.ndarray) -> list[tuple[np.ndarray, int, bool]]:
    """The blocks :func:`_efps_of` computes a set's jets in, as (rows, width, wrap): the jets in order of
    multiplicity, as many to a block as keep its (jets × width²) arrays near ``_EFP_BLOCK`` elements; ``width``
    is the block's largest multiplicity (the particles its sums run over, padded ones adding 0) and ``wrap``
    whether some |Δφ| in it may exceed π. A jet's EFPs depend on these two, to the last bit, and on nothing else
    of its block (numpy's sums and BLAS's products run jet by jet; a test checks it). Jets grouped by multiplicity
    cost ~M³ each (the four graphs with a cycle), not P³."""
    counts = real.sum(axis=1)
    order = np.argsort(counts, kind="stable")
    sorted_counts = counts[order]
    blocks, start, n_jets = [], 0, len(counts)
    while start < n_jets:
        size = max(1, _EFP_BLOCK // max(int(sorted_counts[start]), 1) ** 2)
        size = max(1, _EFP_BLOCK // max(int(sorted_counts[min(start + size, n_jets) - 1]), 1) ** 2)
        stop = min(start + size, n_jets)
        rows, width = order[start:stop], int(sorted_counts[stop - 1])
        block_phi = phi[rows, :width]
        blocks.append((rows, width, width > 0 and bool(block_phi.max() - block_phi.min() > math.pi)))
        start = stop
    return blocks


def _block_keys(blocks: list[tuple[np.ndarray, int, bool]], n_jets: int) -> tuple[np.ndarray, np.ndarray]:
    """Each jet's block width and wrap (:func:`_efp_blocks`): what its EFPs' last bits depend on."""
    widths, wraps = np.zeros(n_jets, dtype=np.int64), np.zeros(n_jets, dtype=bool)
    for rows, width, wrap in blocks:
        widths[rows], wraps[rows] = width, wrap
    return widths, wraps


def _regrouped(rows: np.ndarray, widths: np.ndarray, wraps: np.ndarray) -> list[tuple[np.ndarray, int, bool]]:
    """``rows`` as blocks of their own ``widths`` and ``wraps`` (each jet's), sized as :func:`_efp_blocks` sizes
    them: each jet's EFPs come out as in a block of that width and wrap among any other jets."""
    blocks = []
    for width, wrap in sorted(set(zip(widths[rows].tolist(), wraps[rows].tolist(), strict=True))):
        same = rows[(widths[rows] == width) & (wraps[rows] == wrap)]
        size = max(1, _EFP_BLOCK // max(width, 1) ** 2)
        blocks += [(same[start:start + size], width, wrap) for start in range(0, len(same), size)]
    return blocks


def _fill_blocks(connected: np.ndarray, eta: np.ndarray, phi: np.ndarray, z: np.ndarray,
                 blocks: list[tuple[np.ndarray, int, bool]], label: str) -> None:
    """The 21 connected EFPs of the jets of ``blocks`` into their rows of ``connected`` (jets of width 0 stay 0),
    as a progress phase that names the jets ``label``."""
    n_jets = sum(len(rows) for rows, _, _ in blocks)
    most = max((width for _, width, _ in blocks), default=0)
    jets_named = f"{label} jets" if label else "jets"
    with phase(f"EFPs of {n_jets} {jets_named} (up to {most} particles)", n_jets, "jets", logger=log) as step:
        for rows, width, wrap in blocks:
            if width > 0:
                connected[rows] = _efp_block(eta[rows, :width], phi[rows, :width], z[rows, :width], wrap)
            step.advance(len(rows))


def _with_products(connected: np.ndarray) -> np.ndarray:
    """The 36 EFPs from the 21 connected ones: each disconnected graph's is the product of its components'."""
    values = np.empty((connected.shape[0], _N_EFPS))
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


class JetSet:
    """Jets prepared once for the jet-level metrics. A row compares the reference with the generated jets, with
    the truth set or in halves for the floors, and in halves again for ``fpd_floor_fd``: given one JetSet, every
    comparison shares its checked, compacted jets and its kinematics and EFPs, each computed once.

    ``JetSet(events, mask, name)`` checks the events (:func:`checked_jets`; errors name them ``name``) and
    compacts them (:func:`compact_particles`) into ``jets`` and ``real``; ``shape`` is the events' own (N, F, P)
    and ``has_mask`` whether a mask was given. :meth:`kinematics`, :meth:`efps` and :meth:`features` compute on
    first use and keep what they computed, read-only. :meth:`rows` is a subset holding, to the last bit, what
    ``JetSet(events[rows], mask[rows])`` would: its values are rows of the whole's where the whole has computed
    them and a subset computed alone gets the same bits, and are computed afresh where not.
    """

    def __init__(self, events: ArrayLike, mask: ArrayLike | None = None, name: str = "events") -> None:
        jets, real = checked_jets(events, mask, name)
        self._keep(*compact_particles(jets, real), jets.shape, mask is not None, None)

    def _keep(self, jets: np.ndarray, real: np.ndarray, shape: tuple[int, ...], has_mask: bool,
              parent: tuple[JetSet, np.ndarray] | None) -> None:
        self.jets, self.real = _read_only(jets), _read_only(real)
        self.shape, self.has_mask = shape, has_mask
        self._parent = parent  # a subset's whole and its rows there
        self._kinematics: dict[tuple[int, ...], dict[str, np.ndarray]] = {}
        self._efps: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # with block keys
        self._features: dict[tuple, np.ndarray] = {}

    def rows(self, rows: ArrayLike) -> JetSet:
        """The jets at indices ``rows``, as ``JetSet(events[rows], mask[rows])`` would hold them: the whole's
        compacted particles, trimmed to the subset's own largest multiplicity."""
        rows = np.asarray(rows)
        if rows.ndim != 1 or rows.size == 0 or not np.issubdtype(rows.dtype, np.integer):
            raise ValueError(f"rows must be a non-empty 1-D array of jet indices, got {rows!r}")
        width = max(int(self.real[rows].sum(axis=1).max()), 1)
        subset = JetSet.__new__(JetSet)
        subset._keep(np.ascontiguousarray(self.jets[rows, :, :width]), np.ascontiguousarray(self.real[rows, :width]),
                     (len(rows), *self.shape[1:]), self.has_mask, (self, rows))
        return subset

    def _same_slots(self) -> tuple[JetSet, np.ndarray] | tuple[None, None]:
        """The whole and the rows of a subset with the whole's particle slots, whose per-jet sums (over the slots:
        mass, pT, means) see the same values in the same order as the whole's; (None, None) otherwise."""
        if self._parent is not None and self._parent[0].jets.shape[2] == self.jets.shape[2]:
            return self._parent
        return None, None

    def kinematics(self, indices: tuple[int, int, int]) -> dict[str, np.ndarray]:
        """:func:`kinematics_of` the jets, computed once per ``indices``."""
        if indices not in self._kinematics:
            whole, rows = self._same_slots()
            if whole is not None and indices in whole._kinematics:
                values = {key: value[rows] for key, value in whole._kinematics[indices].items()}
            else:
                values = kinematics_of(self.jets, indices)
            self._kinematics[indices] = {key: _read_only(value) for key, value in values.items()}
        return self._kinematics[indices]

    def efps(self, indices: tuple[int, int, int], label: str = "") -> np.ndarray:
        """:func:`efps` of the jets (``normed=False``), computed once per ``indices``; ``label`` names the jets in
        the progress lines. A subset takes its whole's EFPs where the whole has them, and computes those of the
        jets whose block (:func:`_efp_blocks`) has another width or wrap in the subset than in the whole."""
        if indices not in self._efps:
            eta, phi, z = (self.jets[:, i] for i in indices)
            blocks = _efp_blocks(self.real, phi)
            widths, wraps = _block_keys(blocks, len(self.jets))
            connected = np.zeros((len(self.jets), 21))
            whole, rows = self._parent if self._parent is not None else (None, None)
            if whole is not None and indices in whole._efps:
                whole_values, whole_widths, whole_wraps = whole._efps[indices]
                values = whole_values[rows]
                redo = np.flatnonzero((widths != whole_widths[rows]) | (wraps != whole_wraps[rows]))
                if redo.size:
                    _fill_blocks(connected, eta, phi, z, _regrouped(redo, widths, wraps), label)
                    values[redo] = _with_products(connected[redo])
            else:
                _fill_blocks(connected, eta, phi, z, blocks, label)
                values = _with_products(connected)
            self._efps[indices] = (_read_only(values), widths, wraps)
        return self._efps[indices][0]

    def features(self, indices: tuple[int, int, int] | None, include_mass_pt: bool, label: str = "") -> np.ndarray:
        """:func:`event_features` of the jets (``normed=False``, as FPD and KPD take them), computed once per
        setting; ``label`` names the jets in the EFPs' progress lines."""
        key = (indices, include_mass_pt and indices is not None)
        if key not in self._features:
            if indices is None:
                whole, rows = self._same_slots()
                if whole is not None and key in whole._features:
                    values = whole._features[key][rows]
                else:
                    values = features_of(self.jets, self.real, None, False, False)
            elif include_mass_pt:
                jet = self.kinematics(indices)
                values = np.column_stack([jet["mass"], jet["pt"], self.efps(indices, label)])
            else:
                values = self.efps(indices, label)
            self._features[key] = _read_only(values)
        return self._features[key]


def _read_only(values: np.ndarray) -> np.ndarray:
    """``values``, kept by a :class:`JetSet` and handed to every metric, made read-only: none may change them."""
    values.flags.writeable = False
    return values
