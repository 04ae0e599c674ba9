"""``flowvae score GENERATED REFERENCE``: score any two event files with the metrics of a training row.

Physicists compare GANs, diffusion models and fast simulation against a reference sample this way; the files
may come from flowvae (``generate``, a run's ``generated_sample.npy``) or from anything that writes numpy.
:func:`score_row` is the one definition of a row's metrics: a training run calls it too, so a file scored here
gets the numbers its run got. Numpy only (no torch).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from flowvae import __version__, jet_metrics, metrics
from flowvae.config import LAYOUTS, ConfigError
from flowvae.data import ZIP_MAGIC, read_array, split_mask

__all__ = ["score_row", "row_columns", "main"]


# Events per batch of the per-feature W1's uncertainty (jetnet's w1p default).
W1P_EVENTS = 10_000


def row_columns(n_features: int, kinematics: bool = False, mask: bool = False) -> list[str]:
    """The columns of :func:`score_row` for events of ``n_features`` features, with kinematics and a mask or
    not, in their order."""
    jet_columns = jet_metrics.jet_score_columns(kinematics, mask)
    return [*metrics.score_columns(n_features), *[f"w1_{i}_err" for i in range(n_features)], "noise_floor",
            "w1_sum_floor", "js_sum_floor", *jet_columns,
            *[f"{c}_floor" for c in jet_columns if not c.endswith("_err")]]


def score_row(generated: np.ndarray, gen_mask: np.ndarray | None, reference: np.ndarray,
              ref_mask: np.ndarray | None, kinematics: tuple[int, int, int] | None = None, *, bins: int = 100,
              eps: float = 1e-10, seed: int = 0) -> dict[str, float]:
    """Every metric of generated vs reference events (N, F, P), masks (N, P) optional: per-feature KL, W1 (with
    its spread over batches, ``w1_i_err``, as jetnet's w1p), JS and moments with the noise floors of kl_sum,
    w1_sum and js_sum, then the jet-level and multivariate metrics (W1 of jet mass with
    ``kinematics``, of the multiplicity with masks, FPD and KPD always) with their uncertainties and their noise
    floors (``<metric>_floor``: the metric between two random halves of the reference)."""
    kl_options = {"bins": bins, "eps": eps}
    values = metrics.score(generated, reference, gen_mask, ref_mask, **kl_options)
    _, w1_err = jet_metrics.w1p(generated, gen_mask, reference, ref_mask, num_eval_samples=W1P_EVENTS, seed=seed)
    values.update({f"w1_{i}_err": float(err) for i, err in enumerate(w1_err)})
    # the floors of the per-feature metrics: the same metrics between two random halves of the reference
    first, second = metrics.split_halves(len(reference), seed)
    masks = (None, None) if ref_mask is None else (np.asarray(ref_mask, dtype=bool)[first],
                                                   np.asarray(ref_mask, dtype=bool)[second])
    halves = metrics.score(reference[first], reference[second], *masks, **kl_options)
    values.update(noise_floor=halves["kl_sum"], w1_sum_floor=halves["w1_sum"], js_sum_floor=halves["js_sum"])
    values.update(jet_metrics.score_jets(generated, gen_mask, reference, ref_mask, kinematics, seed=seed))
    floors = jet_metrics.jet_noise_floor(reference, ref_mask, kinematics, seed=seed)
    values.update({f"{key}_floor": value for key, value in floors.items() if not key.endswith("_err")})
    return values


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
    parser.add_argument("--features", default=None, metavar="A,B,C", help="names of the files' features")
    parser.add_argument("--bins", type=int, default=100, help="histogram bins of the KL estimator (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the batches and halves (default 0)")
    parser.add_argument("--csv", default=None, metavar="OUT", help="append the row to this results CSV (locked)")
    return parser.parse_args(args)


def _indices(text: str | None, flag: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(flag, text, "comma-separated feature indices, e.g. 0,1,2") from None


def _read(path: str, key: str | None, layout: str) -> np.ndarray:
    """The file's events (N, F, P); ``key`` names the array in a .npz and is not needed for a .npy."""
    try:
        with open(path, "rb") as handle:
            is_npz = handle.read(4) == ZIP_MAGIC
    except OSError:
        is_npz = False  # read_array says what is wrong with the path
    return read_array(path, key if is_npz else None, layout=layout)


def _load(options) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray | None, tuple | None, list]:
    kinematics = _indices(options.jet_kinematics, "--jet-kinematics")
    if kinematics is not None and (len(kinematics) != 3 or len(set(kinematics)) != 3):
        raise ConfigError("--jet-kinematics", options.jet_kinematics, "three different indices I,J,K")
    generated = _read(options.generated, options.key, options.layout)
    reference = _read(options.reference, options.key, options.layout)
    if generated.shape[1] != reference.shape[1]:
        raise ConfigError("generated", options.generated, f"the reference's number of features "
                                                          f"({reference.shape[1]}); it has {generated.shape[1]}")
    n_features = reference.shape[1]
    names = options.features.split(",") if options.features else [f"feature {i}" for i in range(n_features)]
    if len(names) != n_features:
        raise ConfigError("--features", options.features, f"one name per feature ({n_features})")
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


def main(args: list[str]) -> int:
    """``flowvae score``: print the metrics; with --csv, append them as one row."""
    options = _parse_args(args)
    from flowvae.results import ResultsError, append_row, check_writable

    try:
        if options.bins < 1:
            raise ConfigError("--bins", options.bins, "an integer >= 1")
        if options.csv:
            check_writable(options.csv)
        generated, gen_mask, reference, ref_mask, kinematics, names = _load(options)
        row = score_row(generated, gen_mask, reference, ref_mask, kinematics, bins=options.bins, seed=options.seed)
    except ConfigError as err:
        about = err.value if err.key.startswith("data.") else f"{err.key} {err.value}"  # a file, or a flag
        print(f"flowvae score: {about}: {err.allowed}", file=sys.stderr)
        return 2
    except (ResultsError, ValueError) as err:
        print(f"flowvae score: {err}", file=sys.stderr)
        return 2
    print(f"{options.generated} against {options.reference}: {len(generated)} vs {len(reference)} events, "
          f"features {', '.join(names)}")
    width = max(map(len, row))
    for key, value in row.items():
        print(f"  {key:<{width}}  {value:.6g}")
    if options.csv:
        settings = {"generated": str(Path(options.generated).resolve()), "reference": str(Path(options.reference)
                    .resolve()), "key": options.key, "layout": options.layout, "mask_feature": options.mask_feature,
                    "jet_kinematics": options.jet_kinematics, "bins": options.bins, "seed": options.seed}
        identity = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
        append_row(options.csv, {"flow": "", "n_flows": "", "seed": options.seed, **row, "status": "ok",
                                 "error": "", **{f"score.{k}": ("" if v is None else v) for k, v in settings.items()},
                                 "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                 "config_hash": identity, "flowvae_version": __version__, "host": platform.node()})
        print(f"row appended to {options.csv}")
    return 0
