"""Gaussian events and the per-feature scaler."""

from __future__ import annotations

import numpy as np
from omegaconf import OmegaConf

from flowvae.data import Scaler, load_events


def _gaussian(**overrides):
    base = {"name": "gaussian", "mu": 1.0, "sigma": 0.5, "n_features": 3, "n_particles": 100, "n_train": 2000,
            "n_test": 1000, "seed": 0, "standardize": False, "feature_names": None}
    return OmegaConf.create({**base, **overrides})


def test_gaussian_events_have_the_shape_and_moments_asked_for():
    events = load_events(_gaussian(mu=[1.0, -2.0, 0.0], sigma=[0.5, 1.0, 2.0]))
    assert events.train.shape == (2000, 3, 100) and events.test.shape == (1000, 3, 100)
    assert events.train.dtype == np.float32
    np.testing.assert_allclose(events.train.mean(axis=(0, 2)), [1.0, -2.0, 0.0], atol=0.02)
    np.testing.assert_allclose(events.train.std(axis=(0, 2)), [0.5, 1.0, 2.0], rtol=0.01)
    assert events.feature_names == ["feature 0", "feature 1", "feature 2"]


def test_data_seed_alone_decides_the_events():
    a, b, c = load_events(_gaussian()), load_events(_gaussian()), load_events(_gaussian(seed=1))
    assert np.array_equal(a.train, b.train) and np.array_equal(a.test, b.test)
    assert not np.array_equal(a.train, c.train)
    assert not np.array_equal(a.train[:1000], a.test)  # held-out events are new draws


def test_scaler_round_trips_and_standardizes():
    events = load_events(_gaussian(mu=[5.0, 0.0, -3.0], sigma=[2.0, 0.1, 1.0])).train
    scaler = Scaler.fit(events)
    scaled = scaler.transform(events)
    np.testing.assert_allclose(scaled.mean(axis=(0, 2)), 0, atol=1e-4)
    np.testing.assert_allclose(scaled.std(axis=(0, 2)), 1, atol=1e-4)
    np.testing.assert_allclose(scaler.inverse(scaled), events, atol=1e-5)
    identity = Scaler.identity(3)
    assert np.array_equal(identity.transform(events), events)
