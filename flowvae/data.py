"""Events for training and scoring: arrays of shape (N, features, particles), float32.

The Gaussian toy is drawn from its own seeded generator (``data.seed``), independent of the model seed, so the
same data meets every flow type and every model seed of a sweep.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from flowvae.config import per_feature

__all__ = ["Events", "Scaler", "gaussian_events", "load_events"]


@dataclass
class Events:
    """Train and held-out events, each (N, F, P), and the names of the F features."""

    train: np.ndarray
    test: np.ndarray
    feature_names: list[str]

    @property
    def n_features(self) -> int:
        return self.train.shape[1]

    @property
    def n_particles(self) -> int:
        return self.train.shape[2]


@dataclass
class Scaler:
    """Per-feature affine map x -> (x - shift) / scale; the identity when standardization is off.

    Fitted on the training set only, so held-out events never leak into the model.
    """

    shift: np.ndarray  # (F,)
    scale: np.ndarray  # (F,)

    @classmethod
    def identity(cls, n_features: int) -> Scaler:
        return cls(np.zeros(n_features), np.ones(n_features))

    @classmethod
    def fit(cls, events: np.ndarray) -> Scaler:
        """Mean and std of each feature, pooled over events and particles; a constant feature keeps scale 1."""
        shift = events.mean(axis=(0, 2), dtype=np.float64)
        scale = events.std(axis=(0, 2), dtype=np.float64)
        return cls(shift, np.where(scale > 0, scale, 1.0))

    def transform(self, events: np.ndarray) -> np.ndarray:
        return ((events - self.shift[:, None]) / self.scale[:, None]).astype(np.float32)

    def inverse(self, events: np.ndarray) -> np.ndarray:
        return (events * self.scale[:, None] + self.shift[:, None]).astype(np.float32)


def _feature_names(cfg: DictConfig, n_features: int) -> list[str]:
    names = cfg.get("feature_names")
    return list(names) if names else [f"feature {i}" for i in range(n_features)]


def gaussian_events(n: int, mu: list[float], sigma: list[float], n_particles: int,
                    rng: np.random.Generator) -> np.ndarray:
    """n events, each value of feature f i.i.d. N(mu[f], sigma[f]^2): shape (n, len(mu), n_particles)."""
    mu_arr = np.asarray(mu, dtype=np.float64)[None, :, None]
    sigma_arr = np.asarray(sigma, dtype=np.float64)[None, :, None]
    noise = rng.standard_normal((n, len(mu), n_particles))
    return (mu_arr + sigma_arr * noise).astype(np.float32)


def load_events(cfg: DictConfig, launch_dir: Path | None = None) -> Events:
    """Make or load the events that the ``data`` config describes (relative paths from ``launch_dir``)."""
    if cfg.name == "gaussian":
        mu = per_feature(cfg.mu, cfg.n_features, "data.mu")
        sigma = per_feature(cfg.sigma, cfg.n_features, "data.sigma")
        rng = np.random.default_rng(cfg.seed)
        train = gaussian_events(cfg.n_train, mu, sigma, cfg.n_particles, rng)
        test = gaussian_events(cfg.n_test, mu, sigma, cfg.n_particles, rng)
        return Events(train, test, _feature_names(cfg, cfg.n_features))
    raise ValueError(f"unknown data kind {cfg.name!r}")
