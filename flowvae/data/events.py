"""Events for training and scoring: arrays of shape (N, features, particles), float32.

Three kinds, chosen by ``data.name``:

* ``gaussian``, the seed's toy: every value i.i.d. N(mu_f, sigma_f^2); nothing for the latent to encode.
* ``jets``, a toy with an event-level latent: each event draws its own per-feature offsets and one scale, and its
  particles scatter around them (:func:`jet_events`).
* ``npy``, the users' own array in a ``.npy`` or ``.npz`` file, split into train and held-out events
  (:func:`read_array`, :func:`split_events`).

Drawn and split data use their own seeded generator (``data.seed``), independent of the model seed, so the same
events meet every flow type and every model seed of a sweep.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any  # noqa: UP035 - OmegaConf reads typing.Dict, not dict[...]

import numpy as np
from omegaconf import DictConfig, ListConfig

from flowvae.errors import ConfigError
from flowvae.files import resolve_path

__all__ = ["Events", "gaussian_events", "jet_events", "read_array", "split_events", "split_mask", "file_array",
           "order_particles", "npy_events", "load_events", "per_feature", "LAYOUTS", "event_axes"]

NPY_MAGIC, ZIP_MAGIC = b"\x93NUMPY", b"PK\x03\x04"
# Values per chunk when counting non-finite values, so a large array needs no full-size boolean mask.
_CHUNK_VALUES = 1 << 22


@dataclass
class Events:
    """Train and held-out events, each (N, F, P), and the names of the F features.

    With a particle mask (``data.mask_feature``) the masks are (N, P) booleans, True for a real particle; the
    mask is not one of the F features, and padded particles hold 0. ``kinematics`` are the indices among the F
    features of the particles' relative (eta, phi, pT), when known.
    """

    train: np.ndarray
    test: np.ndarray
    feature_names: list[str]
    train_mask: np.ndarray | None = None
    test_mask: np.ndarray | None = None
    kinematics: tuple[int, int, int] | None = None
    transforms: list[str] | None = None  # one per feature (none, log, logit, fraction); None: all none

    @property
    def n_features(self) -> int:
        return self.train.shape[1]

    @property
    def n_particles(self) -> int:
        return self.train.shape[2]


def _feature_names(cfg: DictConfig, n_features: int) -> list[str]:
    names = cfg.get("feature_names")
    return list(names) if names else [f"feature {i}" for i in range(n_features)]


# --- drawn on the fly ---------------------------------------------------------------------------------------


def gaussian_events(n: int, mu: list[float], sigma: list[float], n_particles: int,
                    rng: np.random.Generator) -> np.ndarray:
    """n events, each value of feature f i.i.d. N(mu[f], sigma[f]^2): shape (n, len(mu), n_particles)."""
    mu_arr = np.asarray(mu, dtype=np.float64)[None, :, None]
    sigma_arr = np.asarray(sigma, dtype=np.float64)[None, :, None]
    noise = rng.standard_normal((n, len(mu), n_particles))
    return (mu_arr + sigma_arr * noise).astype(np.float32)


def jet_events(n: int, mu: list[float], sigma: list[float], offset_sigma: list[float], scale_sigma: float,
               n_particles: int, rng: np.random.Generator) -> np.ndarray:
    """n events whose particles share their event's offsets and scale: shape (n, len(mu), n_particles).

        x[e, f, p] = mu[f] + delta[e, f] + s[e] * sigma[f] * eps[e, f, p]
        delta[e, f] ~ N(0, offset_sigma[f]^2),  log s[e] ~ N(0, scale_sigma^2),  eps ~ N(0, 1)

    One scale per event, shared by all its features (as a jet's energy scale moves all its particles alike), so
    an event carries F + 1 latent numbers; with offset_sigma = scale_sigma = 0 this is :func:`gaussian_events`
    in distribution. Each feature's marginal has mean mu[f] and variance
    offset_sigma[f]^2 + sigma[f]^2 exp(2 scale_sigma^2), with heavier tails than a Gaussian when scale_sigma > 0.
    """
    n_features = len(mu)
    mu_arr = np.asarray(mu, dtype=np.float64)[None, :, None]
    sigma_arr = np.asarray(sigma, dtype=np.float64)[None, :, None]
    offsets = rng.standard_normal((n, n_features)) * np.asarray(offset_sigma, dtype=np.float64)
    scales = np.exp(scale_sigma * rng.standard_normal(n))
    noise = rng.standard_normal((n, n_features, n_particles))
    return (mu_arr + offsets[:, :, None] + scales[:, None, None] * sigma_arr * noise).astype(np.float32)


# --- the users' own array -----------------------------------------------------------------------------------


def read_array(path: str, key: str | None = None, launch_dir: Path | None = None,
               layout: str = "features_first") -> np.ndarray:
    """The array of shape (N, features, particles) in a ``.npy`` (memory-mapped) or ``.npz`` file (array ``key``).

    ``layout="particles_first"`` reads a file of shape (N, particles, features), JetNet's ``particle_features``,
    and returns it transposed (a view, no copy).

    ``path`` may start with ``~``; a relative one is taken from ``launch_dir`` (default: the working directory).
    A ``.npz`` holding one array needs no ``key``. Raises :class:`ConfigError` (key ``data.path`` or
    ``data.key``) for a missing or unreadable file, a missing array, a non-numeric dtype, or a shape that is not
    (events, features, particles) with at least one feature and one particle.
    """
    file = resolve_path(path, launch_dir)
    if not file.exists():
        raise ConfigError("data.path", path, f"an existing .npy or .npz file; {file} does not exist")
    if not file.is_file():
        raise ConfigError("data.path", path, f"a .npy or .npz file; {file} is not a file")
    try:
        with open(file, "rb") as handle:
            magic = handle.read(6)
        if not (magic.startswith(NPY_MAGIC) or magic.startswith(ZIP_MAGIC)):
            raise ConfigError("data.path", path, f"a .npy or .npz file as np.save / np.savez write them; {file} "
                                                 "is neither")
        loaded = np.load(file, mmap_mode="r", allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                name = _npz_key(loaded, key, file)
                where, array = f"{file}[{name}]", loaded[name]
        else:
            if key is not None:
                raise ConfigError("data.key", key, f"null for a .npy file (data.key names an array in a .npz); "
                                                   f"{file} is a .npy")
            where, array = str(file), loaded
    except ConfigError:
        raise
    except (OSError, ValueError, EOFError) as err:
        raise ConfigError("data.path", path, f"a .npy or .npz file numpy can read without pickle; reading {file} "
                                             f"failed: {err}") from None
    if array.dtype.kind not in "biuf":
        raise ConfigError("data.path", path, f"an array of real numbers; {where} has dtype {array.dtype}")
    if array.ndim != 3:
        axes = event_axes(layout)
        hint = f" (reshape it, e.g. x.reshape(len(x), {axes}))" if array.ndim == 2 else ""
        raise ConfigError("data.path", path, f"an array of rank 3, shape (events, {axes}); {where} has shape "
                                             f"{array.shape}{hint}")
    if 0 in array.shape[1:]:
        raise ConfigError("data.path", path, f"at least one feature and one particle per event; {where} has shape "
                                             f"{array.shape}")
    return array.transpose(0, 2, 1) if layout == "particles_first" else array


def _npz_key(archive: np.lib.npyio.NpzFile, key: str | None, file: Path) -> str:
    """The name of the array to read from ``archive``: ``key``, or its only array when ``key`` is None."""
    names = list(archive.files)
    if not names:
        raise ConfigError("data.path", str(file), f"a .npz holding an array; {file} holds none")
    if key is None and len(names) == 1:
        return names[0]
    if key is None:
        raise ConfigError("data.key", key, f"the name of one array in {file}, which holds several: "
                                           f"{', '.join(names)} (e.g. data.key={names[0]})")
    if key not in names:
        raise ConfigError("data.key", key, f"one of the arrays in {file}: {', '.join(names)}")
    return key


def split_events(array: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) float32 copies of ``array`` (N, F, P): round(test_fraction * N) events, drawn by a permutation
    seeded with ``seed``, are held out.

    Both sides come in the permutation's (random) order, so any prefix of them is a fair sample even when the
    file is sorted (e.g. by pT): posterior generation encodes the first ``eval.n_samples`` held-out events.
    Raises :class:`ConfigError` (``data.test_fraction``) when a side would get fewer than 2 events.
    """
    n = len(array)
    n_test = round(test_fraction * n)
    n_train = n - n_test
    if min(n_train, n_test) < 2:
        raise ConfigError("data.test_fraction", test_fraction,
                          f"a fraction that leaves at least 2 events on each side; with {n} events it leaves "
                          f"{n_train} for training and {n_test} held out")
    order = np.random.default_rng(seed).permutation(n)
    return _float32(array, order[n_test:]), _float32(array, order[:n_test])


def _float32(array: np.ndarray, index: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # values beyond float32's range become inf and are reported by the caller
        return np.asarray(array[index]).astype(np.float32, copy=False)


def _count_nonfinite(events: np.ndarray) -> tuple[int, int]:
    """How many values of ``events`` are NaN, and how many are infinite, chunk by chunk over events."""
    step = max(1, _CHUNK_VALUES // max(1, events[0].size))
    n_nan = n_inf = 0
    for start in range(0, len(events), step):
        chunk = events[start : start + step]
        n_nan += int(np.count_nonzero(np.isnan(chunk)))
        n_inf += int(np.count_nonzero(np.isinf(chunk)))
    return n_nan, n_inf


def split_mask(events: np.ndarray, mask_feature: int | None, source: str = "data.mask_feature"
               ) -> tuple[np.ndarray, np.ndarray | None]:
    """(features without the mask (N, F-1, P), mask (N, P) bool), or (events, None) without a mask feature.

    Refuses (ConfigError on ``source``) a mask that is not 0/1, padded particles (mask 0) with values other than
    0, and real particles after a padded one: padded slots must come last, as in JetNet (sort each event's
    particles, e.g. by pT, so that they do).
    """
    if mask_feature is None:
        return events, None
    n_features = events.shape[1]
    if not 0 <= mask_feature < n_features:
        raise ConfigError(source, mask_feature, f"a feature index in [0, {n_features - 1}] (the file has "
                                                f"{n_features} features)")
    mask_values = np.asarray(events[:, mask_feature])
    bad = ~np.isin(mask_values, (0, 1))
    if bad.any():
        raise ConfigError(source, mask_feature, f"the index of a 0/1 mask; feature {mask_feature} has "
                                                f"{int(bad.sum())} values that are neither 0 nor 1 (e.g. "
                                                f"{mask_values[bad][0]:g})")
    mask = mask_values == 1
    features = np.delete(np.asarray(events), mask_feature, axis=1)
    padded_values = np.abs(features).max(axis=1)[~mask] if (~mask).any() else np.zeros(0)
    if (padded_values != 0).any():
        raise ConfigError(source, mask_feature, f"a mask that matches the data: {int((padded_values != 0).sum())} "
                                                f"padded particles (mask 0) have non-zero features")
    if (np.diff(mask.astype(np.int8), axis=1) > 0).any():
        raise ConfigError(source, mask_feature, "a mask whose padded particles come last in each event (as in "
                                                "JetNet); sort each event's particles, e.g. by pT, first")
    return features, mask


def file_array(events: np.ndarray, mask: np.ndarray | None, mask_feature: int | None, layout: str) -> np.ndarray:
    """Events (N, F, P) and their mask as a file of the data holds them: the mask back at ``mask_feature`` on the
    feature axis, and (N, P, F) for ``particles_first``. The inverse of reading a file and :func:`split_mask`."""
    if mask is not None:
        events = np.insert(events, mask_feature if mask_feature is not None else events.shape[1], mask, axis=1)
    return np.ascontiguousarray(events.transpose(0, 2, 1) if layout == "particles_first" else events)


def order_particles(events: np.ndarray, mask: np.ndarray | None, by: int) -> np.ndarray:
    """``events`` (N, F, P) with each event's real particles sorted by feature ``by``, largest first, padded
    particles after them: the order of JetNet's files (by pT). The mask, a prefix, is unchanged; the set of
    particles of each event is the same, so no jet-level or pooled per-feature metric changes."""
    key = np.asarray(events[:, by], dtype=np.float64)
    if mask is not None:
        key = np.where(mask, key, -np.inf)
    order = np.argsort(-key, axis=1, kind="stable")
    return np.take_along_axis(events, order[:, None, :], axis=2)


def _modelled(indices, mask_feature: int | None):
    """File feature indices as indices among the modelled features (the mask's slot removed)."""
    if indices is None:
        return None
    return tuple(i - (mask_feature is not None and i > mask_feature) for i in indices)


def npy_events(cfg: DictConfig, launch_dir: Path | None = None) -> Events:
    """The events of ``data=npy``: the array at ``data.path``, checked and split by ``data.test_fraction``; the
    mask feature, when named, split off."""
    array = read_array(cfg.path, cfg.get("key"), launch_dir, cfg.get("layout") or "features_first")
    n_events, n_features = array.shape[:2]
    names = cfg.get("feature_names")
    if names is not None and len(names) != n_features:
        raise ConfigError("data.feature_names", names, f"one name per feature: {n_features} names for {cfg.path}, "
                                                       f"whose shape is {array.shape}")
    if n_events < cfg.min_events:
        raise ConfigError("data.path", cfg.path, f"an array of at least data.min_events={cfg.min_events} events; "
                                                 f"it has {n_events} (shape {array.shape})")
    train, test = split_events(array, cfg.test_fraction, cfg.seed)
    n_nan, n_inf = (a + b for a, b in zip(_count_nonfinite(train), _count_nonfinite(test), strict=True))
    if n_nan or n_inf:
        raise ConfigError("data.path", cfg.path, f"finite values only; it has {n_nan} NaN and {n_inf} infinite "
                                                 f"(or beyond float32's range) of {array.size} values")
    mask_feature = cfg.get("mask_feature")
    _check_indices(cfg, n_features)
    names = _feature_names(cfg, n_features)
    train, train_mask = split_mask(train, mask_feature)
    test, test_mask = split_mask(test, mask_feature)
    if mask_feature is not None:
        names = [n for i, n in enumerate(names) if i != mask_feature]
    transforms = cfg.get("transforms")
    if transforms is not None:
        transforms = [t for i, t in enumerate(transforms) if i != mask_feature]
    return Events(train, test, names, train_mask, test_mask, _modelled(cfg.get("jet_kinematics"), mask_feature),
                  transforms)


def _check_indices(cfg: DictConfig, n_features: int) -> None:
    """Feature indices and per-feature lists in the config against the file's feature count."""
    kinematics = cfg.get("jet_kinematics")
    if kinematics is not None and max(kinematics) >= n_features:
        raise ConfigError("data.jet_kinematics", list(kinematics), f"feature indices in [0, {n_features - 1}] (the "
                                                                   f"file has {n_features} features)")
    transforms = cfg.get("transforms")
    if transforms is not None:
        if len(transforms) != n_features:
            raise ConfigError("data.transforms", list(transforms), f"one per feature of the file ({n_features})")
        mask = cfg.get("mask_feature")
        if mask is not None and mask < n_features and transforms[mask] != "none":
            raise ConfigError("data.transforms", list(transforms), f"none for the mask (feature {mask})")


def load_events(cfg: DictConfig, launch_dir: Path | None = None) -> Events:
    """Make or load the events that the ``data`` config describes (relative paths from ``launch_dir``)."""
    if cfg.name == "npy":
        return npy_events(cfg, launch_dir)
    if cfg.name not in ("gaussian", "jets"):
        raise ValueError(f"unknown data kind {cfg.name!r}")
    mu = per_feature(cfg.mu, cfg.n_features, "data.mu")
    sigma = per_feature(cfg.sigma, cfg.n_features, "data.sigma")
    rng = np.random.default_rng(cfg.seed)
    if cfg.name == "gaussian":
        train = gaussian_events(cfg.n_train, mu, sigma, cfg.n_particles, rng)
        test = gaussian_events(cfg.n_test, mu, sigma, cfg.n_particles, rng)
    else:
        offset_sigma = per_feature(cfg.offset_sigma, cfg.n_features, "data.offset_sigma")
        draw = (mu, sigma, offset_sigma, float(cfg.scale_sigma), cfg.n_particles, rng)
        train, test = jet_events(cfg.n_train, *draw), jet_events(cfg.n_test, *draw)
    kinematics = cfg.get("jet_kinematics")
    if kinematics is not None:
        _check_indices(cfg, cfg.n_features)
    transforms = cfg.get("transforms")
    return Events(train, test, _feature_names(cfg, cfg.n_features),
                  kinematics=tuple(kinematics) if kinematics is not None else None,
                  transforms=list(transforms) if transforms is not None else None)


LAYOUTS = ("features_first", "particles_first")


def per_feature(value: Any, n_features: int, key: str) -> list[float]:
    """A number, or a list of one number per feature, as a list of ``n_features`` floats."""
    if isinstance(value, (list, tuple, ListConfig)):
        values = list(value)
        if len(values) != n_features:
            raise ConfigError(key, value, f"one number, or a list of {n_features} (one per feature)")
    else:
        values = [value] * n_features
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        raise ConfigError(key, value, "a number, or a list of numbers (one per feature)") from None


def event_axes(layout: str) -> str:
    """An event's axes in a data file as ``data.layout`` reads it, for messages: JetNet's files are
    (N, particles, features)."""
    return "particles, features" if layout == "particles_first" else "features, particles"
