"""A row prepares each jet set once (:class:`flowvae.metrics.efp.JetSet`): the reference's kinematics and EFPs are
computed for its metrics and reused by its floors (the truth row, or the halves) and by ``fpd_floor_fd``, and the
row's numbers are, to the last bit, those of scoring each comparison apart on arrays, as rows were computed
before the sets were shared."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest

from flowvae.metrics import efp
from flowvae.metrics.efp import JetSet
from flowvae.metrics.marginal import split_halves
from flowvae.metrics.protocol import JETNET, SCALED, fd_of_halves, jet_set, score_protocol
from flowvae.metrics.row import jet_row

DATA = Path(__file__).resolve().parents[1] / "data"
KIN = (0, 1, 2)
# Sizes small enough for seconds.
SMALL_JETNET = dataclasses.replace(
    JETNET, num_eval_samples=300, num_batches=3,
    fpd_options={**JETNET.fpd_options, "min_samples": 400, "max_samples": 1500, "num_points": 4, "num_batches": 3},
    kpd_options={**JETNET.kpd_options, "batch_size": 60, "num_batches": 5},
)  # fmt: skip
SMALL_SCALED = dataclasses.replace(SCALED, num_eval_samples=300, num_batches=3)


def slice_jets(name: str) -> tuple[np.ndarray, np.ndarray]:
    """A test slice's jets as (N, 3, P) etarel, phirel, ptrel and their (N, P) 0/1 mask: gluon_30p_slice's 400
    jets all fill their 30 slots, gluon_150p_slice's 200 hold 10 to 150 particles."""
    raw = np.load(DATA / f"{name}.npz")["particle_features"].astype(np.float64).transpose(0, 2, 1)
    return np.ascontiguousarray(raw[:, :3]), raw[:, 3].copy()


def smeared(events: np.ndarray, mask: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A generator's jets: the angles smeared, pT scaled."""
    rng = np.random.default_rng(seed)
    out = events.copy()
    out[:, :2] += rng.normal(0, 0.01, out[:, :2].shape)
    out[:, 2] *= 1.05
    return out * mask[:, None, :], mask


def sets(name: str) -> tuple[tuple, tuple, tuple]:
    """(generated, reference, truth) of a slice: its first half as the truth set and, smeared, the generated."""
    events, mask = slice_jets(name)
    n = len(events) // 2
    return smeared(events[:n], mask[:n], seed=1), (events[n:], mask[n:]), (events[:n], mask[:n])


def same_bits(a: float, b: float) -> bool:
    return math.copysign(1.0, a) == math.copysign(1.0, b) and (a == b or (math.isnan(a) and math.isnan(b)))


@pytest.mark.parametrize("protocol, with_truth", [(SMALL_JETNET, True), (SMALL_SCALED, False)],
                         ids=["jetnet-truth", "scaled"])
def test_a_row_computes_each_sets_efps_and_kinematics_once(monkeypatch, protocol, with_truth):
    """Before, a jetnet row computed the reference's EFPs twice (its metrics, the truth row) and a scaled row three
    times (its metrics, the halves, fpd_floor_fd); the kinematics alike. On jets that all fill their slots the
    halves' EFP blocks are the whole's, so each set is computed exactly once."""
    efp_jets, kinematics_jets = [], []
    block, kinematics_of = efp._efp_block, efp.kinematics_of
    monkeypatch.setattr(efp, "_efp_block", lambda eta, *rest: efp_jets.append(len(eta)) or block(eta, *rest))
    monkeypatch.setattr(efp, "kinematics_of",
                        lambda jets, indices: kinematics_jets.append(len(jets)) or kinematics_of(jets, indices))
    gen, ref, truth = sets("gluon_30p_slice")
    row = jet_row(*gen, *ref, KIN, seed=3, protocol=protocol, truth=truth if with_truth else None)
    assert "w1m_floor" in row and "kpd_floor" in row
    sizes = [len(gen[0]), len(ref[0]), *([len(truth[0])] if with_truth else [])]
    assert sum(efp_jets) == sum(sizes)  # generated, reference (and truth): once each
    assert sorted(kinematics_jets) == sorted(sizes)


@pytest.mark.parametrize("data", ["gluon_30p_slice", "gluon_150p_slice"])
@pytest.mark.parametrize("protocol, with_truth", [(SMALL_JETNET, True), (SMALL_JETNET, False), (SMALL_SCALED, False)],
                         ids=["jetnet-truth", "jetnet-halves", "scaled"])
@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "no-mask"])
def test_a_row_is_bit_for_bit_its_comparisons_scored_apart(data, protocol, with_truth, with_mask):
    """The row against score_protocol (generated vs reference), score_protocol again for the floor (truth vs
    reference, or the reference's halves, each prepared from its own arrays) and fd_of_halves, all on arrays:
    every column equal to the last bit. gluon_150p_slice's halves put many jets in EFP blocks of other widths
    than the whole does, the case where a half's EFPs cannot all be rows of the whole's."""
    gen, ref, truth = sets(data)
    if not with_mask:
        gen, ref, truth = ((events, None) for events, _ in (gen, ref, truth))
    row = jet_row(*gen, *ref, KIN, seed=3, protocol=protocol, truth=truth if with_truth else None)
    expected = score_protocol(protocol, *gen, *ref, KIN, 3)
    if with_truth:
        floors = score_protocol(protocol, *truth, *ref, KIN, 3)
    else:
        first, second = split_halves(len(ref[0]), 3)
        masks = (None, None) if ref[1] is None else (ref[1][first], ref[1][second])
        floors = score_protocol(protocol, ref[0][first], masks[0], ref[0][second], masks[1], KIN, 3)
    for key, value in floors.items():
        metric, suffix = (key.removesuffix("_err"), "_err") if key.endswith("_err") else (key, "")
        expected[f"{metric}_floor{suffix}"] = value
    if protocol.floor_fd:
        expected["fpd_floor_fd"] = fd_of_halves(*ref, KIN, seed=3, include_mass_pt=protocol.include_mass_pt)
    assert list(row) == list(expected)
    assert [column for column in row if not same_bits(row[column], expected[column])] == []


def wide_jets() -> tuple[np.ndarray, np.ndarray]:
    """gluon_150p_slice with a third of its jets' φ spread beyond π, so that some EFP blocks wrap Δφ."""
    events, mask = slice_jets("gluon_150p_slice")
    wide = np.random.default_rng(5).random((len(events), 1)) < 0.3
    events[:, 1] = np.where(wide, events[:, 1] * 6, events[:, 1])
    return events * mask[:, None, :], mask


@pytest.mark.parametrize("jets", [lambda: slice_jets("gluon_150p_slice"), wide_jets], ids=["150p", "wide-phi"])
def test_a_subset_holds_what_the_subset_prepared_alone_would(monkeypatch, jets):
    events, mask = jets()
    whole = JetSet(events, mask)
    wraps = [wrap for _, _, wrap in efp._efp_blocks(whole.real, whole.jets[:, 1])]
    assert any(wraps) == (jets is wide_jets)
    for include_mass_pt in (True, False):
        whole.features(KIN, include_mass_pt)
    whole.features(None, False)
    efp_jets = []
    block = efp._efp_block
    monkeypatch.setattr(efp, "_efp_block", lambda eta, *rest: efp_jets.append(len(eta)) or block(eta, *rest))
    few = np.flatnonzero(mask.sum(axis=1) <= 60)[::2]  # fewer particle slots than the whole
    for rows in (*split_halves(len(events), 0), few):
        subset, alone = whole.rows(rows), JetSet(events[rows], mask[rows])
        assert subset.shape == alone.shape and subset.has_mask
        assert subset.jets.tobytes() == alone.jets.tobytes() and subset.real.tobytes() == alone.real.tobytes()
        efp_jets.clear()
        for include_mass_pt in (True, False):
            assert subset.features(KIN, include_mass_pt).tobytes() == alone.features(KIN, include_mass_pt).tobytes()
        taken = len(rows) - (sum(efp_jets) - len(rows))  # alone computed every jet; the subset only the rest
        assert 0 < taken <= len(rows)
        assert subset.features(None, False).tobytes() == alone.features(None, False).tobytes()
        for key, values in alone.kinematics(KIN).items():
            assert subset.kinematics(KIN)[key].tobytes() == values.tobytes(), key


def test_a_jet_sets_values_are_read_only_and_its_mask_its_own():
    events, mask = slice_jets("gluon_30p_slice")
    jets = JetSet(events[:20], mask[:20], "reference")
    with pytest.raises(ValueError, match="read-only"):
        jets.features(KIN, True)[0, 0] = 1.0
    with pytest.raises(ValueError, match="read-only"):
        jets.kinematics(KIN)["mass"][0] = 1.0
    assert jet_set(jets, None, "reference") is jets
    with pytest.raises(ValueError, match="reference is a JetSet, which has its own mask"):
        jet_set(jets, mask[:20], "reference")
    with pytest.raises(ValueError, match="rows must be a non-empty 1-D array of jet indices"):
        jets.rows([])
