"""``flowvae score GENERATED REFERENCE``: score any two event files with the metrics of a training row.

Physicists compare GANs, diffusion models and fast simulation against a reference sample this way; the files
may come from flowvae (``generate``, a run's ``generated_sample.npy``) or from anything that writes numpy.
:func:`score_row` is the one definition of a row's metrics: a training run calls it too, so a file scored here
gets the numbers its run got. Numpy only (no torch).

Two files are compared only when their events have the same features (named by ``--features``, else by the names
a .npz stores beside its array) and the same particle slots: the per-feature metrics pool each feature over the
slots, so 30-slot jets against 150-slot jets would compare a truncation, not a generator. ``--jet-level-only``
scores such files on the metrics of whole jets alone. A refusal says what differs and the likely fix (a file in
the other layout, two files in opposite layouts, different slots). A .npz of ``flowvae generate`` (its events
beside a mask and feature names) needs no ``--key``.

Scoring says what it does while it does it (:mod:`flowvae.progress`, ``--progress``): on stderr, each phase when
it starts (the per-feature metrics, their floors, each jet-level metric, the floors' row) and, on a terminal,
bars, elsewhere a line at least every 10 s; stdout holds the row alone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from flowvae import __version__, progress
from flowvae.data.events import LAYOUTS, ZIP_MAGIC, read_array, split_mask
from flowvae.errors import ConfigError
from flowvae.metrics import protocol as jet_protocol
from flowvae.metrics.marginal import check_finite
from flowvae.metrics.row import score_row

__all__ = ["names_entry", "main"]

log = logging.getLogger(__name__)


# How each --layout reads a file's axes.
AXES = {"features_first": "(events, features, particles)", "particles_first": "(events, particles, features)"}
# What --jet-level-only keeps: the metrics of whole jets, defined whatever a jet's number of particle slots.
JET_LEVEL = "W1 of jet mass and multiplicity, FPD, KPD and their floors"


# What each --protocol is, for --help.
PROTOCOL_HELP = {"scaled": "batch sizes scaled to the sets, jet mass and pT beside the EFPs (default)",
                 "jetnet": "jetnet's published defaults (W1M, W1P, W1EFP, FPD, KPD), floors against --truth"}


class ScoreError(ValueError):
    """The two files cannot be compared as given; the message says what differs and the likely fix."""


def _parse_args(args: list[str]):
    parser = argparse.ArgumentParser(
        prog="flowvae score",
        description="Score GENERATED events against REFERENCE events (.npy or .npz files of shape (N, features, "
                    "particles), or (N, particles, features) with --layout particles_first) with the metrics of "
                    "a training row: per-feature KL, W1, JS; W1 of jet mass and multiplicity; FPD and KPD; each "
                    "with its noise floor.")
    parser.add_argument("generated", help="the generated events (.npy, or .npz with --key)")
    parser.add_argument("reference", help="the reference events, e.g. held-out data")
    parser.add_argument("--key", default=None, help="the array's name in a .npz file (e.g. particle_features)")
    parser.add_argument("--layout", default="features_first", choices=LAYOUTS,
                        help="features_first: (N, F, P) (default); particles_first: (N, P, F), JetNet's layout")
    parser.add_argument("--mask-feature", type=int, default=None, metavar="I",
                        help="index of the 0/1 particle mask on the files' feature axis (JetNet: 3)")
    parser.add_argument("--jet-kinematics", default=None, metavar="I,J,K",
                        help="indices of relative eta, phi, pT on the files' feature axis (JetNet: 0,1,2): jet mass")
    parser.add_argument("--features", default=None, metavar="A,B,C",
                        help="names of the files' features (default: the names a .npz stores beside the array, "
                             "e.g. particle_feature_names, else feature 0, 1, ...)")
    parser.add_argument("--jet-level-only", action="store_true",
                        help=f"only the metrics of whole jets ({JET_LEVEL}): for files with different particle "
                             f"slots, e.g. 30 against 150, which the per-feature metrics cannot compare")
    parser.add_argument("--bins", type=int, default=100, help="histogram bins of the KL estimator (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the batches and halves (default 0)")
    parser.add_argument("--protocol", default="scaled", metavar="NAME",
                        help=f"the jet-level metrics: {'; '.join(f'{n}: {d}' for n, d in PROTOCOL_HELP.items())}")
    parser.add_argument("--truth", default=None, metavar="REAL",
                        help="real events of the reference's kind that share none with it (read with the same "
                             "--key, --layout, --mask-feature): --protocol jetnet's floors are the metrics between "
                             "it and the reference (without it, between two halves of the reference)")
    parser.add_argument("--csv", default=None, metavar="OUT", help="append the row to this results CSV (locked)")
    parser.add_argument("--progress", choices=progress.MODES, default="auto",
                        help="what each phase of the scoring is doing, on stderr: auto: progress bars on a terminal, "
                             "else a log line at least every 10 s (default); bar; log; none: nothing")
    return parser.parse_args(args)


def _indices(text: str | None, flag: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(flag, text, "comma-separated feature indices, e.g. 0,1,2") from None


def _read(path: str, key: str | None, layout: str) -> tuple[np.ndarray, list[str] | None]:
    """The file's events (N, F, P) and the feature names it stores (None when it stores none); ``key`` names the
    array in a .npz and is not needed for a .npy."""
    try:
        with open(path, "rb") as handle:
            is_npz = handle.read(4) == ZIP_MAGIC
    except OSError:
        is_npz = False  # read_array says what is wrong with the path
    if is_npz and key is None:
        key = _events_key(path)
    events = read_array(path, key if is_npz else None, layout=layout)
    return events, (_stored_names(path, key) if is_npz and key is not None else None)


# Arrays a .npz may hold beside its events, so that a file of `flowvae generate` needs no --key: the mask (N, P)
# (flowvae.commands.generate.NPZ_MASK) and feature names (names_entry).
_BESIDE_EVENTS = ("mask",)


def _events_key(path: str) -> str | None:
    """The events' name in a .npz that holds them beside a mask and feature names alone (as `flowvae generate`
    writes), else None (one array needs no name; several leave :func:`read_array` to ask for --key)."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            names = list(archive.files)
    except (OSError, ValueError, EOFError):
        return None  # read_array says what is wrong with the file
    events = [name for name in names if name not in _BESIDE_EVENTS and not name.endswith("_names")]
    return events[0] if len(names) > 1 and len(events) == 1 else None


def names_entry(key: str) -> str:
    """Where a .npz stores the feature names of its array ``key``, the first name :func:`_stored_names` looks
    for: JetNet's ``particle_feature_names`` beside ``particle_features`` (``<key>`` ending in "features"), else
    ``feature_names``."""
    return f"{key.removesuffix('s')}_names" if key.endswith("features") else "feature_names"


def _stored_names(path: str, key: str) -> list[str] | None:
    """The names of the features of array ``key`` that a .npz stores beside it, JetNet-style
    (``particle_features`` beside ``particle_feature_names``; also ``<key>_names`` or ``feature_names``): a 1-D
    array of strings. None when there is none."""
    with np.load(path, allow_pickle=False) as archive:
        for name in (f"{key.removesuffix('s')}_names", f"{key}_names", "feature_names"):
            if name in archive.files:
                try:
                    values = archive[name]
                except ValueError:  # an array of objects, which needs pickle
                    continue
                if values.ndim == 1 and values.dtype.kind in "US":
                    return [str(value) for value in values.astype(str)]
    return None


def _check_names_fit(path: str, events: np.ndarray, names: list[str] | None, layout: str) -> None:
    """Refuse a file whose stored feature names count its particle axis: it is in the other layout."""
    if names is None or len(names) == events.shape[1] or len(names) != events.shape[2]:
        return  # no names, names that fit, or names of something else: nothing to say
    other = _other(layout)
    raise ScoreError(f"{path} stores {len(names)} feature names ({', '.join(names)}), which count the particle axis "
                     f"of --layout {layout} {AXES[layout]}: the file is {AXES[other]}; use --layout {other}")


def _check_shapes(options, generated: np.ndarray, reference: np.ndarray) -> None:
    """Refuse files whose features differ, or whose particle slots differ unless ``--jet-level-only``, saying
    what differs and the likely fix."""
    gen, ref = generated.shape, reference.shape  # (N, F, P) as read
    if gen[1:] == ref[1:] or (gen[1] == ref[1] and options.jet_level_only):
        return
    layout, other = options.layout, _other(options.layout)
    files = f"generated {options.generated} and reference {options.reference}"
    shapes = (f"(shapes {_file_shape(generated, layout)} and {_file_shape(reference, layout)} read as "
              f"{AXES[layout]})")
    if gen[1] == ref[1]:
        raise ScoreError(f"{files} have {gen[2]} and {ref[2]} particle slots per event {shapes}. The per-feature "
                         f"metrics pool each feature over the slots and so compare like slots only: score against a "
                         f"reference with the generator's slots, or add --jet-level-only for the metrics of whole "
                         f"jets alone ({JET_LEVEL})")
    if gen[1:] == ref[:0:-1]:
        raise ScoreError(f"{files} hold their axes in opposite orders {shapes}; --layout applies to both files: save "
                         f"one of them transposed (np.save(path, x.transpose(0, 2, 1)))")
    hint = "score events of the same features, in the same order"
    if gen[2] == ref[2] and gen[2] < min(gen[1], ref[1]):  # fewer "particles" than "features": read the wrong way
        hint = (f"read as {AXES[other]} both have {gen[2]}: use --layout {other}, with --jet-level-only since their "
                f"particle slots ({gen[1]} and {ref[1]}) differ")
    raise ScoreError(f"{files} have {gen[1]} and {ref[1]} features {shapes}; {hint}")


def _file_shape(events: np.ndarray, layout: str) -> tuple[int, ...]:
    """The shape of events (N, F, P) as their file holds them."""
    return events.shape if layout == "features_first" else events.transpose(0, 2, 1).shape


def _other(layout: str) -> str:
    return next(other for other in LAYOUTS if other != layout)


def _feature_names(options, generated_names: list[str] | None, reference_names: list[str] | None,
                   n_features: int) -> list[str]:
    """--features, else the names the files store (refused when both store names and they differ; names of
    another count are not the features'), else "feature i"."""
    generated_names, reference_names = (names if names and len(names) == n_features else None
                                        for names in (generated_names, reference_names))
    if options.features:
        names = options.features.split(",")
        if len(names) != n_features:
            raise ConfigError("--features", options.features, f"one name per feature ({n_features})")
        return names
    if generated_names and reference_names and generated_names != reference_names:
        raise ScoreError(f"the files name their features differently: generated {', '.join(generated_names)}; "
                         f"reference {', '.join(reference_names)}. Score events of the same features in the same "
                         f"order; if they are, name them with --features")
    return generated_names or reference_names or [f"feature {i}" for i in range(n_features)]


def _load(options) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray | None, tuple | None, list]:
    kinematics = _indices(options.jet_kinematics, "--jet-kinematics")
    if kinematics is not None and (len(kinematics) != 3 or len(set(kinematics)) != 3):
        raise ConfigError("--jet-kinematics", options.jet_kinematics, "three different indices I,J,K")
    generated, generated_names = _read(options.generated, options.key, options.layout)
    reference, reference_names = _read(options.reference, options.key, options.layout)
    _check_names_fit(options.generated, generated, generated_names, options.layout)
    _check_names_fit(options.reference, reference, reference_names, options.layout)
    _check_shapes(options, generated, reference)
    n_features = reference.shape[1]
    names = _feature_names(options, generated_names, reference_names, n_features)
    if kinematics is not None and (max(kinematics) >= n_features or options.mask_feature in kinematics):
        raise ConfigError("--jet-kinematics", options.jet_kinematics, f"indices in [0, {n_features - 1}], not the "
                                                                      f"mask's")
    mask_feature = options.mask_feature
    generated, gen_mask = split_mask(np.asarray(generated, dtype=np.float64), mask_feature, "--mask-feature")
    reference, ref_mask = split_mask(np.asarray(reference, dtype=np.float64), mask_feature, "--mask-feature")
    if mask_feature is not None:
        names = [n for i, n in enumerate(names) if i != mask_feature]
        if kinematics is not None:
            kinematics = tuple(i - (i > mask_feature) for i in kinematics)
    return generated, gen_mask, reference, ref_mask, kinematics, names


def _load_truth(options, n_features: int) -> tuple[np.ndarray, np.ndarray | None] | None:
    """--truth's events and mask, read as the reference is; None without --truth. Refused under a protocol that
    takes no truth set, and when its features are not the reference's."""
    if options.truth is None:
        return None
    if jet_protocol.PROTOCOLS[options.protocol].floor != "truth":
        truthful = ", ".join(n for n, p in jet_protocol.PROTOCOLS.items() if p.floor == "truth")
        raise ConfigError("--truth", options.truth, f"a truth set is used by --protocol {truthful} only; the "
                                                    f"floors of --protocol {options.protocol} are between halves of "
                                                    f"the reference")
    truth, names = _read(options.truth, options.key, options.layout)
    _check_names_fit(options.truth, truth, names, options.layout)
    truth, truth_mask = split_mask(np.asarray(truth, dtype=np.float64), options.mask_feature, "--mask-feature")
    if truth.shape[1] != n_features:
        raise ScoreError(f"--truth {options.truth} has {truth.shape[1]} features and the reference {n_features} "
                         f"(after the mask); score against real events of the reference's features")
    return truth, truth_mask


def main(args: list[str]) -> int:
    """``flowvae score``: print the metrics; with --csv, append them as one row. Each phase of the scoring says
    what it does on stderr (--progress, :mod:`flowvae.progress`)."""
    options = _parse_args(args)
    with progress.console(), progress.settings(mode=options.progress):
        return _main(options)


def _main(options) -> int:
    from flowvae.results.store import ResultsError, append_row, check_writable

    try:
        if options.bins < 1:
            raise ConfigError("--bins", options.bins, "an integer >= 1")
        if options.protocol not in jet_protocol.PROTOCOLS:
            raise ConfigError("--protocol", options.protocol, f"one of {', '.join(jet_protocol.PROTOCOLS)}")
        if options.csv:
            check_writable(options.csv)
        generated, gen_mask, reference, ref_mask, kinematics, names = _load(options)
        truth = _load_truth(options, reference.shape[1])
        if jet_protocol.PROTOCOLS[options.protocol].needs_kinematics and kinematics is None:
            raise ConfigError("--protocol", options.protocol, "needs --jet-kinematics I,J,K (JetNet: 0,1,2): its "
                                                              "metrics are of jet mass and energy-flow polynomials")
        if not options.jet_level_only:  # what the per-feature metrics refuse, refused before any phase begins
            check_finite(generated, "generated")
            check_finite(reference, "reference")
        row = score_row(generated, gen_mask, reference, ref_mask, kinematics, bins=options.bins, seed=options.seed,
                        jet_level_only=options.jet_level_only, protocol=options.protocol, truth=truth)
    except ConfigError as err:
        about = err.value if err.key.startswith("data.") else f"{err.key} {err.value}"  # a file, or a flag
        print(f"flowvae score: {about}: {err.allowed}", file=sys.stderr)
        return 2
    except (ResultsError, ValueError) as err:
        print(f"flowvae score: {err}", file=sys.stderr)
        return 2
    slots = "" if generated.shape[2] == reference.shape[2] else (f" of {generated.shape[2]} vs {reference.shape[2]} "
                                                                 f"particle slots")
    print(f"{options.generated} against {options.reference}: {len(generated)} vs {len(reference)} events{slots}, "
          f"features {', '.join(names)}")
    if options.protocol != "scaled":
        floors = (f"against --truth {options.truth} ({len(truth[0])} events)" if truth is not None
                  else "between two halves of the reference (no --truth)")
        print(f"  protocol {options.protocol}: the jet-level floors are the metrics {floors}")
    if options.jet_level_only:
        print(f"  jet-level metrics only (--jet-level-only): {JET_LEVEL}; the per-feature KL, W1, JS and moments "
              f"are left out")
    width = max(map(len, row))
    for key, value in row.items():
        print(f"  {key:<{width}}  {value:.6g}")
    if options.csv:
        settings = {"generated": str(Path(options.generated).resolve()), "reference": str(Path(options.reference)
                    .resolve()), "key": options.key, "layout": options.layout, "mask_feature": options.mask_feature,
                    "jet_kinematics": options.jet_kinematics, "bins": options.bins, "seed": options.seed}
        if options.jet_level_only:  # a setting only when used, so the rows of full scores keep their identity
            settings["jet_level_only"] = True
        if options.protocol != "scaled":  # likewise
            settings["protocol"] = options.protocol
        if options.truth is not None:
            settings["truth"] = str(Path(options.truth).resolve())
        identity = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
        append_row(options.csv, {"flow": "", "n_flows": "", "seed": options.seed, **row, "status": "ok",
                                 "error": "", **{f"score.{k}": ("" if v is None else v) for k, v in settings.items()},
                                 "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                 "config_hash": identity, "flowvae_version": __version__, "host": platform.node()})
        print(f"row appended to {options.csv}")
    return 0
