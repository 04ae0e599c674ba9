"""The one definition of a result row's metric columns (:func:`metric_columns`) and of how the scores among them
are computed from two event sets (:func:`score_row`): the per-feature distances, the jet-level metrics under a
protocol, and their floors. ``flowvae score`` writes the scores alone (:func:`row_columns`); a run's row
(:func:`flowvae.run.row.result_row`) adds the numbers of the training that made the generator
(:data:`TRAINING_COLUMNS`, filled by the run); a search checks its objective against these columns."""

from __future__ import annotations

import logging

import numpy as np

from flowvae import metrics, progress
from flowvae.data.events import Events
from flowvae.errors import ConfigError
from flowvae.metrics import distances
from flowvae.metrics import protocol as jet_protocol
from flowvae.metrics.efp import JetSet
from flowvae.metrics.latent import LATENT_COLUMNS

__all__ = ["row_columns", "jet_columns", "score_row", "jet_row", "W1P_EVENTS", "TRAINING_COLUMNS", "metric_columns",
           "event_metric_columns"]


log = logging.getLogger(__name__)


# Events per batch of the per-feature W1's uncertainty (jetnet's w1p default).
W1P_EVENTS = 10_000
# A run's row's metric columns after the scores: the numbers of the training that made the generator (its last
# epoch's losses, how many epochs it ran, resumed from, trained in all, and the epoch whose weights were scored).
TRAINING_COLUMNS = ("final_train_loss", "final_test_loss", "final_recon", "final_kl_term", "epochs_run",
                    "resumed_from", "epochs_trained", "best_epoch")


def row_columns(n_features: int, kinematics: bool = False, mask: bool = False, jet_level_only: bool = False,
                protocol: str = "scaled") -> list[str]:
    """The columns of :func:`score_row` (the scores) for events of ``n_features`` features, with kinematics and a
    mask or not, in their order; ``jet_level_only``: the jet-level ones alone (:func:`jet_columns`)."""
    if jet_level_only:
        return jet_columns(kinematics, mask, protocol, n_features)
    return [*metrics.score_columns(n_features), *[f"w1_{i}_err" for i in range(n_features)], "noise_floor",
            "w1_sum_floor", "js_sum_floor", *jet_columns(kinematics, mask, protocol, n_features)]


def jet_columns(kinematics: bool = False, mask: bool = False, protocol: str = "scaled", n_features: int = 0
                ) -> list[str]:
    """The jet-level columns of ``protocol`` (:data:`flowvae.metrics.protocol.PROTOCOLS`): each metric and its
    error, then each metric's floor with the floor's error (``<metric>_floor``, ``<metric>_floor_err``, read like
    the metric: under ``scaled`` between two halves of the reference, under ``jetnet`` between the reference and
    a disjoint real set), and under ``scaled`` FPD's floor before its extrapolation (``fpd_floor_fd``,
    :func:`flowvae.metrics.protocol.fd_of_halves`). ``n_features`` names jetnet's per-feature W1P columns."""
    chosen = jet_protocol.get_protocol(protocol)
    return [*chosen.columns(n_features, kinematics, mask), *chosen.floor_columns(n_features, kinematics, mask)]


def score_row(generated: np.ndarray, gen_mask: np.ndarray | None, reference: np.ndarray,
              ref_mask: np.ndarray | None, kinematics: tuple[int, int, int] | None = None, *, bins: int = 100,
              eps: float = 1e-10, seed: int = 0, jet_level_only: bool = False, protocol: str = "scaled",
              truth: tuple[np.ndarray, np.ndarray | None] | None = None) -> dict[str, float]:
    """Every metric of generated vs reference events (N, F, P), masks (N, P) optional: per-feature KL, W1 (with
    its spread over batches, ``w1_i_err``, as jetnet's w1p), JS and moments with the noise floors of kl_sum,
    w1_sum and js_sum (between two halves of the reference, whatever the protocol), then the jet-level metrics
    of ``protocol`` (:func:`jet_row`, with ``truth``). ``jet_level_only`` leaves the per-feature ones out: they
    pool each feature over the particle slots, so both sides need the same slots; the jet-level ones compare
    whole jets, whatever their slot counts."""
    jet_options = {"seed": seed, "protocol": protocol, "truth": truth}
    scoring = f"scoring {len(generated)} generated against {len(reference)} reference events (protocol {protocol}"
    if jet_level_only:
        with progress.phase(f"{scoring}, jet-level metrics only)", logger=log):
            return jet_row(generated, gen_mask, reference, ref_mask, kinematics, **jet_options)
    kl_options = {"bins": bins, "eps": eps}
    with progress.phase(f"{scoring})", logger=log):
        with progress.phase("per-feature KL, W1, JS and moments", logger=log):
            values = metrics.score(generated, reference, gen_mask, ref_mask, **kl_options)
        _, w1_err = distances.w1p(generated, gen_mask, reference, ref_mask, num_eval_samples=W1P_EVENTS, seed=seed)
        values.update({f"w1_{i}_err": float(err) for i, err in enumerate(w1_err)})
        # the floors of the per-feature metrics: the same metrics between two random halves of the reference
        with progress.phase("noise floors of kl_sum, w1_sum and js_sum: two halves of the reference", logger=log):
            first, second = metrics.split_halves(len(reference), seed)
            masks = (None, None) if ref_mask is None else (np.asarray(ref_mask, dtype=bool)[first],
                                                           np.asarray(ref_mask, dtype=bool)[second])
            halves = metrics.score(reference[first], reference[second], *masks, **kl_options)
        values.update(noise_floor=halves["kl_sum"], w1_sum_floor=halves["w1_sum"], js_sum_floor=halves["js_sum"])
        values.update(jet_row(generated, gen_mask, reference, ref_mask, kinematics, **jet_options))
    return values


def jet_row(generated: np.ndarray, gen_mask: np.ndarray | None, reference: np.ndarray, ref_mask: np.ndarray | None,
            kinematics: tuple[int, int, int] | None = None, *, seed: int = 0, protocol: str = "scaled",
            truth: tuple[np.ndarray, np.ndarray | None] | None = None) -> dict[str, float]:
    """The jet-level and multivariate metrics of ``protocol`` with their uncertainties, and their floors with
    theirs (:func:`jet_columns`).

    The floors: under ``scaled``, the metrics between two halves of the reference; under ``jetnet``, the truth
    row, the metrics between the reference and ``truth`` = (events, mask), a real set of the same kind that
    shares no event with it (a run's training events against its held-out ones), at full size. Without a truth
    set, ``jetnet`` falls back to two halves of the reference (half the events each: W1 floors somewhat above a
    disjoint set's). A truth set that is the reference itself is refused; ``scaled`` takes none.

    Each set is prepared once (:class:`flowvae.metrics.efp.JetSet`): the reference's kinematics and EFPs are
    computed for the metrics and reused by the floors (the truth row, or the halves, rows of the reference's) and
    by ``fpd_floor_fd``, with the numbers of computing them for each comparison anew, to the last bit.
    """
    chosen = jet_protocol.get_protocol(protocol)
    if truth is not None and _same_events(truth, (reference, ref_mask)):
        raise ValueError("the truth set is the reference itself: the truth row needs real events disjoint from "
                         "the reference (e.g. a run's training events against its held-out ones)")
    with progress.phase(f"jet-level metrics ({chosen.name}): generated against the reference", logger=log):
        gen, ref = JetSet(generated, gen_mask, "generated"), JetSet(reference, ref_mask, "reference")
        values = jet_protocol.score_protocol(chosen, gen, None, ref, None, kinematics, seed)
    against = (f"the truth set ({len(truth[0])} events) against the reference" if truth is not None
               else "two halves of the reference")
    with progress.phase(f"jet-level floors ({chosen.name}): {against}", logger=log):
        truth_set = None if truth is None else JetSet(*truth, "truth")
        floors = jet_protocol.protocol_floor(chosen, ref, None, kinematics, seed=seed, truth=truth_set)
    for key, value in floors.items():
        metric, suffix = (key.removesuffix("_err"), "_err") if key.endswith("_err") else (key, "")
        values[f"{metric}_floor{suffix}"] = value
    if chosen.floor_fd:
        with progress.phase("FPD's floor before its extrapolation: the FD of two halves of the reference",
                            logger=log):
            values["fpd_floor_fd"] = jet_protocol.fd_of_halves(ref, None, kinematics, seed=seed,
                                                               include_mass_pt=chosen.include_mass_pt)
    return values


def _same_events(one: tuple, other: tuple) -> bool:
    """Whether two (events, mask) pairs hold the same events (masks compared when both have one)."""
    (a, a_mask), (b, b_mask) = one, other
    if np.shape(a) != np.shape(b) or not np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True):
        return False
    return a_mask is None or b_mask is None or np.array_equal(np.asarray(a_mask), np.asarray(b_mask))


def metric_columns(n_features: int, kinematics: bool = False, mask: bool = False, protocol: str = "scaled"
                   ) -> list[str]:
    """The result row's metric columns for events of ``n_features`` features, with jet kinematics and a
    particle mask or not, under metric ``protocol`` (``eval.protocol``), in their order: the scores
    (:func:`row_columns`), then the training's numbers (:data:`TRAINING_COLUMNS`), then the latent's gap to the
    generating prior (:data:`flowvae.metrics.latent.LATENT_COLUMNS`, added last so older tables only widen). The one
    definition: a run's and an evaluation's rows, their trackers and a search's objective all take these."""
    return [*row_columns(n_features, kinematics, mask, protocol=protocol), *TRAINING_COLUMNS, *LATENT_COLUMNS]


def event_metric_columns(events: Events, protocol: str) -> list[str]:
    """:func:`metric_columns` of a row scored on ``events`` under metric ``protocol`` (``cfg.eval.protocol``; the
    events' features, kinematics and mask decide the rest). A protocol the events cannot be scored by (jetnet's
    needs jet kinematics) is a :class:`ConfigError`."""
    try:
        return metric_columns(events.n_features, events.kinematics is not None, events.train_mask is not None,
                              protocol)
    except ValueError as err:
        raise ConfigError("eval.protocol", protocol, f"{err}; use eval.protocol=scaled for these data") from None
