"""The jet-level part of a result row, by protocol: which metrics a row has, with which batches and features, and
their floors. :data:`PROTOCOLS` is the one list of protocols; every column name and option below comes from it.

- ``scaled`` (the default): W1 of jet mass and multiplicity, FPD and KPD on jet mass, pT and the 36 EFPs, their
  batches drawn without replacement and scaled down to the sets' sizes; floors between two halves of the
  reference, and FPD's floor before its extrapolation (:func:`fd_of_halves`).
- ``jetnet``: jetnet.evaluation's published defaults (Kansal et al., PRD 107 (2023) 076017), see
  :data:`JETNET`, computed as the published numbers were: FPD with jetnet's own ``curve_fit`` (``fpd``) and the
  exact fit beside it (``fpd_exact``), the W1s drawn from one random stream; floors between the reference and a
  disjoint real set of the same kind (the truth row).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from flowvae.metrics.distances import (
    FPD_FITS,
    fpd_line,
    fpd_points,
    frechet_distance,
    kpd,
    mean_cov,
    w1_batched,
    w1_columns,
    w1p,
)
from flowvae.metrics.efp import JetSet
from flowvae.metrics.jets import kinematics_indices, scaled_by_real
from flowvae.metrics.marginal import split_halves
from flowvae.progress import phase

__all__ = ["Protocol", "PROTOCOLS", "JETNET", "SCALED", "get_protocol", "score_protocol", "protocol_floor",
           "jet_score_columns", "score_jets", "jet_noise_floor", "fd_of_halves", "jet_set"]

log = logging.getLogger(__name__)

# What each metric needs besides the particles: the kinematic feature indices, or a mask.
_NEEDS = {"w1m": "kinematics", "w1efp": "kinematics", "w1_mult": "mask"}
# Where a protocol's floors come from.
FLOORS = ("halves", "truth")


@dataclass(frozen=True)
class Protocol:
    """How a row's jet-level metrics are computed: which metrics in which column order, with which batches and
    features, and where their floors come from.

    ``metrics`` from w1m (jet mass), w1_mult (multiplicity), w1p (per particle feature, then their mean), w1efp
    (the EFPs of ``w1efp_efps``, mean over them), fpd, kpd; a metric whose input the events lack (kinematics, a
    mask) is left out, unless ``needs_kinematics``, when events without kinematics are refused. The W1s draw
    ``num_batches`` batches of ``num_eval_samples`` jets with replacement from the row's seed: each W1 metric
    from a fresh ``Generator(seed)`` (the same jets for each), or, with ``w1_stream``, all from one
    ``Generator(seed)`` continued from metric to metric in column order (jetnet's one module-level generator).
    ``fpd_options`` and ``kpd_options`` go to :func:`fpd` and :func:`kpd` (their defaults where empty), seeded by
    ``seed``, or by the row's seed when it is None. ``fpd_fits``: the fits of FPD's line (:func:`fpd_line`) on
    one set of points, the first in ``fpd``/``fpd_err``, each other in ``fpd_<fit>``/``fpd_<fit>_err``.
    ``include_mass_pt``: FPD/KPD's features are jet mass and pT before the 36 EFPs (:func:`event_features`).
    ``floor``: ``halves`` of the reference, or ``truth``, a disjoint real set (halves when there is none);
    ``floor_fd``: the row has ``fpd_floor_fd`` (:func:`fd_of_halves`).
    """

    name: str
    metrics: tuple[str, ...]
    num_eval_samples: int = 50_000
    num_batches: int = 5
    include_mass_pt: bool = True
    fpd_options: Mapping[str, Any] = field(default_factory=dict)
    kpd_options: Mapping[str, Any] = field(default_factory=dict)
    seed: int | None = None
    w1efp_efps: tuple[int, ...] = ()
    needs_kinematics: bool = False
    floor: str = "halves"
    floor_fd: bool = True
    fpd_fits: tuple[str, ...] = ("exact",)
    w1_stream: bool = False

    def __post_init__(self) -> None:
        if not self.fpd_fits or len(set(self.fpd_fits)) < len(self.fpd_fits) or set(self.fpd_fits) - set(FPD_FITS):
            raise ValueError(f"protocol {self.name}: fpd_fits must name distinct fits from {', '.join(FPD_FITS)}, "
                             f"got {self.fpd_fits}")

    def check(self, kinematics: bool) -> None:
        """Refuse events without kinematics when the protocol needs them (ValueError saying what to give)."""
        if self.needs_kinematics and not kinematics:
            raise ValueError(f"protocol {self.name} needs the jets' kinematics (the indices of relative eta, phi, "
                             f"pT; JetNet: 0,1,2): its metrics are of jet mass and energy-flow polynomials")

    def columns(self, n_features: int, kinematics: bool, mask: bool) -> list[str]:
        """The metric columns, each followed by its error: ``w1p`` (the mean over features) comes before its
        per-feature ``w1p_<i>``, ``fpd`` (the first of ``fpd_fits``) before the other fits' ``fpd_<fit>``."""
        self.check(kinematics)
        has = {"kinematics": kinematics, "mask": mask}
        columns: list[str] = []
        for metric in self.metrics:
            if metric in _NEEDS and not has[_NEEDS[metric]]:
                continue
            names = [metric]
            if metric == "w1p":
                names += [f"{metric}_{i}" for i in range(n_features)]
            elif metric == "fpd":
                names += [f"{metric}_{fit}" for fit in self.fpd_fits[1:]]
            columns += [f"{name}{suffix}" for name in names for suffix in ("", "_err")]
        return columns

    def floor_columns(self, n_features: int, kinematics: bool, mask: bool) -> list[str]:
        """Each metric's floor and the floor's error (``<metric>_floor``, ``<metric>_floor_err``), then
        ``fpd_floor_fd`` where the protocol has it."""
        metrics = [c for c in self.columns(n_features, kinematics, mask) if not c.endswith("_err")]
        floors = [f"{metric}_floor{suffix}" for metric in metrics for suffix in ("", "_err")]
        return [*floors, "fpd_floor_fd"] if self.floor_fd else floors


SCALED = Protocol(name="scaled", metrics=("w1m", "w1_mult", "fpd", "kpd"))

JETNET = Protocol(
    name="jetnet",
    metrics=("w1m", "w1p", "w1efp", "fpd", "kpd"),
    num_eval_samples=50_000,
    num_batches=5,
    include_mass_pt=False,
    fpd_options={"min_samples": 20_000, "max_samples": 50_000, "num_points": 10, "num_batches": 20,
                 "replace": True},
    kpd_options={"batch_size": 5_000, "num_batches": 10, "degree": 4, "replace": True},
    seed=42,
    w1efp_efps=(12, 14, 15, 16, 17),
    needs_kinematics=True,
    floor="truth",
    floor_fd=False,
    fpd_fits=("jetnet", "exact"),
    w1_stream=True,
)
"""jetnet.evaluation's published defaults (jetnet 0.2.5; Kansal et al., "Evaluating generative models in high energy
physics", PRD 107 (2023) 076017): W1M of jet mass; W1P per particle feature (all of the events' features, over real
particles) and their mean, with jetnet's error of that mean, the root sum of squares of the per-feature errors (its
former ``average_over_features``); W1EFP over the five EFPs with n = 4 vertices, d = 4 edges, connected (jetnet's
``EFPSet(("n==", 4), ("d==", 4), ("p==", 1))``, entries 12, 14, 15, 16, 17 of the 36), their mean and the root sum
of squares of their errors; each W1 over 5 batches of 50,000 jets drawn with replacement (mean, std over batches),
all from one random stream as jetnet draws them: its w1m, w1p and w1efp each call ``rng.choice`` on one
module-level ``numpy.random.default_rng()``, so each continues where the one before left off; here that stream is
``default_rng(row's seed)``, drawn through W1M, W1P and W1EFP in that order (the row's column order: jetnet fixes
none, its caller does), each batch the reference's jets, then the generated, W1EFP one draw per batch for its
five EFPs. FPD and KPD on the 36 EFPs with d ≤ 4 alone (``get_fpd_kpd_jet_features``), divided by the
reference's largest |value| per feature; FPD: 10 batch sizes evenly in 1/N from 20,000 to 50,000, 20 batches each,
drawn with replacement from ``default_rng(42)``, the 1/N line fitted with intercept and slope ≥ 0 twice on those
points: by jetnet's own call, ``curve_fit(linear, 1/N, FD, bounds=([0, 0], [inf, inf]))``, in ``fpd``/``fpd_err``
(the fit the published FPDs come from, which stops early when FPD is small: :func:`fpd_line`), and exactly, the
least-squares optimum, in ``fpd_exact``/``fpd_exact_err`` (what ``fpd`` held before; the truth row has both,
``fpd_floor`` and ``fpd_exact_floor``); KPD: 10 batches of 5,000 drawn with replacement, batch i from
``default_rng(42 + 1000 i)``, kernel (x·y/d + 1)^4, median and half the 16.275–83.725 percentile spread.

Where this differs from jetnet's code (jetnet 0.2.5 run beside it on 10,000 JetNet gluon jets against 10,000 others
with their angles smeared by 0.01 and pT scaled by 1.05):
- FPD and KPD draw what jetnet draws (the same generator, seed and calls). KPD agrees to 4e-12 relative (its error
  to 2e-9). The FD's matrix square root comes from a symmetric eigendecomposition, not ``sqrtm``. Measured
  beside jetnet when FPD was the exact fit: 8.05250e-3 vs jetnet's 8.05244e-3 (7e-6 relative), its error 4e-6.
  ``fpd`` now makes jetnet's fit itself, and agrees with a transcription of jetnet's fpd (``sqrtm`` and its
  ``curve_fit`` call, in the tests) to 1e-7. Between the fits, on the first 10,000 jets of flowvae's
  ``gluon_30p.npz`` as the reference: against its other 10,000 smeared as above (FPD 1.16e-2) they differ by 5e-6
  relative; against those 10,000 unsmeared (a truth row, a small FPD) jetnet's fit gives 3.86e-4 ± 0.68e-4 and
  the exact one 2.24e-4 ± 0.35e-4 (1.7×);
- jetnet's W1 generator is unseeded, so its W1M, W1P and W1EFP change from call to call (W1M 5.70e-3 to 6.32e-3
  in three calls on these sets); here the stream starts from the row's seed. Each batch's W1s agreed with
  jetnet's to 1e-14 relative on the same draws (measured with jetnet's generator re-seeded before each call, as
  the W1s were drawn before they shared one stream); the stream's draws are checked against a transcription of
  jetnet's calls (the tests), not beside jetnet;
- W1P: only the mask decides which particles are real; jetnet also drops real particles whose features are all
  exactly 0 (none in JetNet's data);
- the 36 EFPs and jet masses are computed in numpy (jetnet: energyflow, awkward/coffea): EFPs equal to 8e-15
  relative; jetnet's EFPs of 20,000 jets took 47 s with one job, this whole row 18 s on one thread.
"""

PROTOCOLS: dict[str, Protocol] = {protocol.name: protocol for protocol in (SCALED, JETNET)}


def get_protocol(protocol: str | Protocol) -> Protocol:
    """A protocol by name (from :data:`PROTOCOLS`), or the protocol given; ValueError naming the allowed ones."""
    if isinstance(protocol, Protocol):
        return protocol
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown metric protocol {protocol!r}: one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[protocol]


# ---------------------------------------------------------------- results row


def jet_score_columns(has_kinematics: bool, has_mask: bool, protocol: str | Protocol = "scaled",
                      n_features: int = 0) -> list[str]:
    """The column names of :func:`score_protocol`'s row, in order (``n_features`` names W1P's columns)."""
    return get_protocol(protocol).columns(n_features, has_kinematics, has_mask)


def score_protocol(
    protocol: str | Protocol,
    generated: ArrayLike | JetSet,
    gen_mask: ArrayLike | None,
    reference: ArrayLike | JetSet,
    ref_mask: ArrayLike | None,
    kinematics: Sequence[int] | None = None,
    seed: int = 0,
    *,
    sides: tuple[str, str] = ("generated", "reference"),
) -> dict[str, float]:
    """The jet metrics of generated vs reference events under ``protocol``, one flat row (:meth:`Protocol.columns`).

    The reference is the real set (jetnet's jets1): it is drawn first in every batch and normalises FPD's and
    KPD's features. A missing mask means every slot is a particle. The W1s' batches come from ``seed``; FPD and
    KPD from the protocol's seed where it has one (jetnet: 42), else from ``seed``. With ``w1_stream`` (jetnet) the
    W1s continue one ``Generator(seed)`` in column order: W1M's batches (reference, then generated, per batch),
    then W1P's, then W1EFP's, one draw per batch for all five EFPs; else each starts from ``Generator(seed)``.
    FPD's points are drawn once and fitted by each of ``fpd_fits``. ``sides`` names the two sets in the progress
    lines (:mod:`flowvae.progress`). Either set may be a :class:`JetSet` (its mask None: the set has its own),
    whose kinematics and features are then computed once for every call that is given it.
    """
    p = get_protocol(protocol)
    gen, ref = jet_set(generated, gen_mask, "generated"), jet_set(reference, ref_mask, "reference")
    if gen.shape[1] != ref.shape[1]:
        raise ValueError(
            f"generated and reference must have the same number of features (axis 1), got shapes "
            f"{gen.shape} and {ref.shape}"
        )
    p.check(kinematics is not None)
    indices = None if kinematics is None else kinematics_indices(kinematics, gen.shape[1])
    columns = p.columns(gen.shape[1], indices is not None, gen.has_mask or ref.has_mask)
    w1_seed = np.random.default_rng(seed) if p.w1_stream else seed  # a Generator: each W1 continues its stream
    w1_options = {"num_eval_samples": p.num_eval_samples, "num_batches": p.num_batches, "seed": w1_seed}
    batches = f"{p.num_batches} batches of {p.num_eval_samples} jets"
    row: dict[str, float] = {}
    gen_jet = ref_jet = None
    if indices is not None:
        gen_jet, ref_jet = gen.kinematics(indices), ref.kinematics(indices)
    whole = [name for metric, name in (("w1m", "jet mass"), ("w1_mult", "multiplicity")) if metric in columns]
    if whole:
        with phase(f"W1 of {' and '.join(whole)}: {batches}", logger=log):
            if "w1m" in columns:
                row["w1m"], row["w1m_err"] = w1_batched(ref_jet["mass"], gen_jet["mass"], **w1_options)
            if "w1_mult" in columns:
                row["w1_mult"], row["w1_mult_err"] = w1_batched(ref.real.sum(axis=1), gen.real.sum(axis=1),
                                                                **w1_options)
    if "w1p" in columns:
        means, stds = w1p(gen.jets, gen.real, ref.jets, ref.real, **w1_options)
        row.update(_mean_of("w1p", means, stds))
    gen_features = gen.features(indices, p.include_mass_pt, sides[0])
    ref_features = ref.features(indices, p.include_mass_pt, sides[1])
    if "w1efp" in columns:  # the EFPs are the features' last 36 columns; one draw of jets per batch for them all
        efps = [k - 36 for k in p.w1efp_efps]
        with phase(f"W1 of EFPs {', '.join(map(str, p.w1efp_efps))}: {batches}", logger=log):
            row.update(_mean_of("w1efp", *w1_columns(ref_features[:, efps], gen_features[:, efps], **w1_options)))
    fixed = {"seed": seed if p.seed is None else p.seed}
    points = fpd_points(ref_features, gen_features, **{**fixed, **p.fpd_options})  # fpd(): the first fit of these
    for i, fit in enumerate(p.fpd_fits):
        name = "fpd" if i == 0 else f"fpd_{fit}"
        row[name], row[f"{name}_err"] = fpd_line(*points, fit=fit)
    row["kpd"], row["kpd_err"] = kpd(ref_features, gen_features, **{**fixed, **p.kpd_options})
    return {column: row[column] for column in columns}


def jet_set(events: ArrayLike | JetSet, mask: ArrayLike | None, name: str) -> JetSet:
    """``events`` (with ``mask``) as a :class:`JetSet`, checked and compacted, or the set given, which has its
    own mask (ValueError when a mask comes with it)."""
    if not isinstance(events, JetSet):
        return JetSet(events, mask, name)
    if mask is not None:
        raise ValueError(f"{name} is a JetSet, which has its own mask: give None as its mask")
    return events


def _mean_of(metric: str, means: np.ndarray, stds: np.ndarray) -> dict[str, float]:
    """``metric`` as the mean of its parts, with jetnet's error of it (the root sum of squares of the parts'
    errors), then each part ``<metric>_<i>`` with its error."""
    row = {metric: float(np.mean(means)), f"{metric}_err": float(np.linalg.norm(stds))}
    for i, (mean, std) in enumerate(zip(means, stds, strict=True)):
        row[f"{metric}_{i}"], row[f"{metric}_{i}_err"] = float(mean), float(std)
    return row


def protocol_floor(
    protocol: str | Protocol,
    reference: ArrayLike | JetSet,
    ref_mask: ArrayLike | None = None,
    kinematics: Sequence[int] | None = None,
    *,
    seed: int = 0,
    truth: tuple[ArrayLike, ArrayLike | None] | JetSet | None = None,
) -> dict[str, float]:
    """What a perfect generator would score under ``protocol``: its metrics of real events against the reference.

    With ``truth`` = (events, mask), a real set of the same kind disjoint from the reference (a run's training
    events against its held-out ones), the truth set is scored as "generated", at the full sample sizes: the
    truth row of the ``truth`` protocols. Without it, or for a ``halves`` protocol, the reference is split by
    :func:`flowvae.metrics.split_halves` with ``seed`` and its first half scored against its second: half the
    events, so for a ``truth`` protocol a fallback whose W1 floors are somewhat higher than a disjoint set's.
    The reference and the truth set may each be a :class:`JetSet`: the halves are then rows of the reference's
    (:meth:`JetSet.rows`), which take its kinematics and EFPs where it has computed them.
    """
    p = get_protocol(protocol)
    if truth is not None:
        if p.floor != "truth":
            truthful = ", ".join(name for name, other in PROTOCOLS.items() if other.floor == "truth")
            raise ValueError(f"protocol {p.name} takes its floors from two halves of the reference and no truth set; "
                             f"a truth set is for protocol(s) {truthful}")
        truth_set = truth if isinstance(truth, JetSet) else JetSet(truth[0], truth[1], "truth")
        return score_protocol(p, truth_set, None, reference, ref_mask, kinematics, seed, sides=("truth", "reference"))
    ref = jet_set(reference, ref_mask, "reference")
    if ref.shape[0] // 2 < 2:
        raise ValueError(f"a floor from halves needs at least 4 reference events, got shape {ref.shape}")
    first, second = split_halves(ref.shape[0], seed)
    return score_protocol(p, ref.rows(first), None, ref.rows(second), None, kinematics, seed,
                          sides=("first-half", "second-half"))


def _with_options(protocol: str | Protocol, num_eval_samples: int | None, num_batches: int | None,
                  include_mass_pt: bool | None, fpd_options: Mapping | None, kpd_options: Mapping | None
                  ) -> Protocol:
    """``protocol`` with the options given (not None) in place of its own; FPD's and KPD's are merged over its."""
    p = get_protocol(protocol)
    changes: dict[str, Any] = {"fpd_options": {**p.fpd_options, **(fpd_options or {})},
                               "kpd_options": {**p.kpd_options, **(kpd_options or {})}}
    for name, value in (("num_eval_samples", num_eval_samples), ("num_batches", num_batches),
                        ("include_mass_pt", include_mass_pt)):
        if value is not None:
            changes[name] = value
    return dataclasses.replace(p, **changes)


def score_jets(
    generated: ArrayLike,
    gen_mask: ArrayLike | None,
    reference: ArrayLike,
    ref_mask: ArrayLike | None,
    kinematics: Sequence[int] | None = None,
    seed: int = 0,
    *,
    protocol: str | Protocol = "scaled",
    num_eval_samples: int | None = None,
    num_batches: int | None = None,
    include_mass_pt: bool | None = None,
    fpd_options: dict[str, Any] | None = None,
    kpd_options: dict[str, Any] | None = None,
) -> dict[str, float]:
    """:func:`score_protocol` with some of the protocol's options replaced (None keeps the protocol's).

    Under ``scaled``: ``w1m, w1m_err`` (:func:`w1m`) when ``kinematics`` is given; ``w1_mult, w1_mult_err``
    (:func:`w1_mult`) when either mask is given; ``fpd, fpd_err`` and ``kpd, kpd_err`` (:func:`fpd`, :func:`kpd`,
    the reference as the real set) on :func:`event_features` always. ``seed`` seeds every draw;
    ``num_eval_samples`` and ``num_batches`` set the W1 batches, ``fpd_options`` and ``kpd_options`` go to
    :func:`fpd` and :func:`kpd`, over the protocol's own.
    """
    chosen = _with_options(protocol, num_eval_samples, num_batches, include_mass_pt, fpd_options, kpd_options)
    return score_protocol(chosen, generated, gen_mask, reference, ref_mask, kinematics, seed)


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
    ``seed`` and ``score_options`` (those of :func:`score_jets`, ``protocol`` among them) passed on. The halves
    have half the events of a full comparison, which matters for batch sizes scaled to the set (FPD, KPD) and
    for W1, whose floor falls like 1/sqrt(n).
    """
    options = {key: score_options.pop(key, None) for key in ("num_eval_samples", "num_batches", "include_mass_pt",
                                                             "fpd_options", "kpd_options")}
    protocol = score_options.pop("protocol", "scaled")
    if score_options:
        raise TypeError(f"jet_noise_floor got unexpected option(s) {', '.join(score_options)}")
    return protocol_floor(_with_options(protocol, **options), reference, ref_mask, kinematics, seed=seed)


def fd_of_halves(
    reference: ArrayLike | JetSet,
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
    The reference may be a :class:`JetSet`, whose features are then those the row's metrics computed.
    """
    ref = jet_set(reference, ref_mask, "reference")
    if ref.shape[0] // 2 < 2:
        raise ValueError(f"fd_of_halves needs at least 4 reference events, got shape {ref.shape}")
    indices = None if kinematics is None else kinematics_indices(kinematics, ref.shape[1])
    features = ref.features(indices, include_mass_pt, "reference")
    first, second = split_halves(len(features), seed)
    reference_half, other_half = scaled_by_real(features[second], features[first])
    return frechet_distance(*mean_cov(other_half), *mean_cov(reference_half))
