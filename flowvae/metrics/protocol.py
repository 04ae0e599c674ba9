"""The jet-level part of a result row: which columns a row has, every distance with its uncertainty, and the
noise floors (each metric between two halves of the reference, with its error)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from flowvae.metrics.distances import _mean_cov, fpd, frechet_distance, kpd, w1_batched
from flowvae.metrics.efp import _features_of
from flowvae.metrics.jets import _compact, _jets, _kinematics, _kinematics_of, _normalise
from flowvae.metrics.marginal import split_halves

__all__ = ["jet_score_columns", "score_jets", "jet_noise_floor", "fd_of_halves"]

# ---------------------------------------------------------------- results row


def jet_score_columns(has_kinematics: bool, has_mask: bool) -> list[str]:
    """The column names of :func:`score_jets`'s row, in order."""
    columns = ["w1m", "w1m_err"] if has_kinematics else []
    if has_mask:
        columns += ["w1_mult", "w1_mult_err"]
    return columns + ["fpd", "fpd_err", "kpd", "kpd_err"]


def score_jets(
    generated: ArrayLike,
    gen_mask: ArrayLike | None,
    reference: ArrayLike,
    ref_mask: ArrayLike | None,
    kinematics: Sequence[int] | None = None,
    seed: int = 0,
    *,
    num_eval_samples: int = 50_000,
    num_batches: int = 5,
    include_mass_pt: bool = True,
    fpd_options: dict[str, Any] | None = None,
    kpd_options: dict[str, Any] | None = None,
) -> dict[str, float]:
    """The jet metrics of generated vs reference events as one flat results row (:func:`jet_score_columns`).

    ``w1m, w1m_err`` (:func:`w1m`) when ``kinematics`` is given; ``w1_mult, w1_mult_err`` (:func:`w1_mult`) when
    either mask is given (a missing mask means every slot is real); ``fpd, fpd_err`` and ``kpd, kpd_err``
    (:func:`fpd`, :func:`kpd`, the reference as the real set) on :func:`event_features` always. ``seed`` seeds
    every draw; ``num_eval_samples`` and ``num_batches`` set the W1 batches, ``fpd_options`` and ``kpd_options``
    go to :func:`fpd` and :func:`kpd`.
    """
    gen, gen_real = _compact(*_jets(generated, gen_mask, "generated"))
    ref, ref_real = _compact(*_jets(reference, ref_mask, "reference"))
    if gen.shape[1] != ref.shape[1]:
        raise ValueError(
            f"generated and reference must have the same number of features (axis 1), got shapes "
            f"{np.shape(generated)} and {np.shape(reference)}"
        )
    indices = None if kinematics is None else _kinematics(kinematics, gen.shape[1])
    has_mask = gen_mask is not None or ref_mask is not None
    w1_options = {"num_eval_samples": num_eval_samples, "num_batches": num_batches, "seed": seed}
    row: dict[str, float] = {}
    gen_jet = ref_jet = None
    if indices is not None:
        gen_jet, ref_jet = _kinematics_of(gen, indices), _kinematics_of(ref, indices)
        row["w1m"], row["w1m_err"] = w1_batched(ref_jet["mass"], gen_jet["mass"], **w1_options)
    if has_mask:
        row["w1_mult"], row["w1_mult_err"] = w1_batched(ref_real.sum(axis=1), gen_real.sum(axis=1), **w1_options)
    gen_features = _features_of(gen, gen_real, indices, include_mass_pt, False, gen_jet)
    ref_features = _features_of(ref, ref_real, indices, include_mass_pt, False, ref_jet)
    row["fpd"], row["fpd_err"] = fpd(ref_features, gen_features, **{"seed": seed, **(fpd_options or {})})
    row["kpd"], row["kpd_err"] = kpd(ref_features, gen_features, **{"seed": seed, **(kpd_options or {})})
    return {column: row[column] for column in jet_score_columns(kinematics is not None, has_mask)}


def jet_noise_floor(
    reference: ArrayLike,
    ref_mask: ArrayLike | None = None,
    kinematics: Sequence[int] | None = None,
    *,
    seed: int = 0,
    **score_options: Any,
) -> dict[str, float]:
    """:func:`score_jets` between two random halves of one (held-out) set: what a perfect generator would score.

    The events are split by ``numpy.random.default_rng(seed)``'s permutation into two halves of ⌊N/2⌋ (one event
    left out when N is odd); the first half is scored as "generated" against the second as reference, with
    ``seed`` and ``score_options`` passed on. The halves have half the events of a full comparison, which
    matters for batch sizes scaled to the set (FPD, KPD) and for W1, whose floor falls like 1/sqrt(n).
    """
    events, real = _jets(reference, ref_mask, "reference")
    half = events.shape[0] // 2
    if half < 2:
        raise ValueError(f"jet_noise_floor needs at least 4 reference events, got shape {events.shape}")
    first, second = split_halves(events.shape[0], seed)
    masks = (real[first], real[second]) if ref_mask is not None else (None, None)
    return score_jets(events[first], masks[0], events[second], masks[1], kinematics, seed, **score_options)


def fd_of_halves(
    reference: ArrayLike,
    ref_mask: ArrayLike | None = None,
    kinematics: Sequence[int] | None = None,
    *,
    seed: int = 0,
    include_mass_pt: bool = True,
) -> float:
    """The Fréchet distance between the two halves of :func:`jet_noise_floor`, not extrapolated in 1/N.

    FPD's floor is an intercept fitted with FPD ≥ 0, so for two samples of one distribution it is often exactly
    0, which says nothing about how far apart such samples lie. This is the distance it extrapolates from: the FD
    (:func:`frechet_distance`) of Gaussians fitted to the :func:`event_features` of the first half and of the
    second (the halves of :func:`flowvae.metrics.split_halves` with ``seed``, normalised by the second half's
    largest |value| per feature as :func:`fpd` normalises by its real set), i.e. the FD at FPD's largest batch
    size when batches are drawn without replacement (the whole halves, ⌊N/2⌋ events each). It falls like 1/N.
    """
    events, real = _jets(reference, ref_mask, "reference")
    if events.shape[0] // 2 < 2:
        raise ValueError(f"fd_of_halves needs at least 4 reference events, got shape {events.shape}")
    jets, real = _compact(events, real)
    indices = None if kinematics is None else _kinematics(kinematics, jets.shape[1])
    features = _features_of(jets, real, indices, include_mass_pt, False)
    first, second = split_halves(len(features), seed)
    reference_half, other_half = _normalise(features[second], features[first])
    return frechet_distance(*_mean_cov(other_half), *_mean_cov(reference_half))
