"""Gaussian and jet events, users' arrays (.npy / .npz) and their checks, and the per-feature scaler."""

from __future__ import annotations

import re

import numpy as np
import pytest
from omegaconf import OmegaConf

from flowvae.config import validate
from flowvae.data.events import load_events, read_array, split_events
from flowvae.data.transforms import Scaler
from flowvae.errors import ConfigError
from tests.conftest import compose_config


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


def test_scaler_round_trips_to_float32_precision_for_any_number_of_features():
    rng = np.random.default_rng(1)
    for n_features, mu, sd in ((1, 100.0, 10.0), (5, -3e4, 0.5), (7, 0.0, 1.0)):
        events = (mu + sd * rng.standard_normal((300, n_features, 20))).astype(np.float32)
        scaler = Scaler.fit(events)
        back = scaler.inverse(scaler.transform(events))
        assert back.dtype == np.float32 and back.shape == events.shape
        # One rounding to float32 each way: at most one ulp of the larger of |x| and |x - shift|.
        ulp = np.spacing(np.maximum(np.abs(events), np.abs(events - scaler.shift[:, None])).astype(np.float32))
        assert np.all(np.abs(back - events) <= ulp)


def test_scaler_maps_generated_values_back_to_the_original_units():
    rng = np.random.default_rng(2)
    events = (100.0 + 10.0 * rng.standard_normal((2000, 2, 50))).astype(np.float32)
    scaler = Scaler.fit(events)
    np.testing.assert_allclose(scaler.shift, 100.0, atol=0.1)
    np.testing.assert_allclose(scaler.scale, 10.0, rtol=0.01)
    # A perfect generator in standardized units (N(0, 1)) is N(100, 10^2) once mapped back.
    generated = scaler.inverse(rng.standard_normal((2000, 2, 50)).astype(np.float32))
    np.testing.assert_allclose(generated.mean(axis=(0, 2)), 100.0, atol=0.1)
    np.testing.assert_allclose(generated.std(axis=(0, 2)), 10.0, rtol=0.01)


def test_scaler_keeps_a_constant_feature_finite():
    events = np.stack([np.full((10, 4), 3.0), np.arange(40.0).reshape(10, 4)], axis=1).astype(np.float32)
    scaler = Scaler.fit(events)
    assert scaler.scale[0] == 1.0
    assert np.all(scaler.transform(events)[:, 0] == 0)
    assert np.array_equal(scaler.inverse(scaler.transform(events))[:, 0], events[:, 0])


# --- jets ---------------------------------------------------------------------------------------------------


def _jets(**overrides):
    base = {"name": "jets", "mu": 1.0, "sigma": 0.5, "offset_sigma": 0.5, "scale_sigma": 0.3, "n_features": 3,
            "n_particles": 100, "n_train": 2000, "n_test": 500, "seed": 0, "standardize": False,
            "feature_names": None}
    return OmegaConf.create({**base, **overrides})


def test_jet_events_carry_per_event_offsets_and_scales():
    events = load_events(_jets(offset_sigma=[0.5, 1.0, 0.0]))
    assert events.train.shape == (2000, 3, 100) and events.test.shape == (500, 3, 100)
    assert events.train.dtype == np.float32
    x = events.train.astype(np.float64)
    # Per-event means vary by the offsets (plus the particles' own noise / P), far beyond the i.i.d. sigma^2 / P.
    noise_var = 0.5**2 * np.exp(2 * 0.3**2) / 100
    np.testing.assert_allclose(x.mean(axis=2).var(axis=0), [0.25 + noise_var, 1.0 + noise_var, noise_var],
                               rtol=0.1)
    assert x[:, 0].mean(axis=1).var() > 50 * 0.5**2 / 100
    # One log-scale per event, shared by its features: log of the per-event spread varies by scale_sigma.
    log_spread = np.log(x.std(axis=2))
    np.testing.assert_allclose(log_spread.std(axis=0), 0.3, rtol=0.15)
    assert np.corrcoef(log_spread[:, 0], log_spread[:, 2])[0, 1] > 0.8
    np.testing.assert_allclose(x.mean(axis=(0, 2)), 1.0, atol=0.05)


def test_jets_without_offsets_or_scales_are_the_iid_toy():
    x = load_events(_jets(offset_sigma=0.0, scale_sigma=0.0)).train.astype(np.float64)
    np.testing.assert_allclose(x.mean(axis=2).var(axis=0), 0.5**2 / 100, rtol=0.1)
    np.testing.assert_allclose(x.std(axis=(0, 2)), 0.5, rtol=0.01)


def test_jets_data_seed_alone_decides_the_events():
    a, b, c = load_events(_jets()), load_events(_jets()), load_events(_jets(seed=1))
    assert np.array_equal(a.train, b.train) and np.array_equal(a.test, b.test)
    assert not np.array_equal(a.train, c.train)


# --- the users' own arrays ----------------------------------------------------------------------------------


def _npy(path, **overrides):
    base = {"name": "npy", "path": str(path), "key": None, "feature_names": None, "test_fraction": 0.2,
            "min_events": 10, "seed": 0, "standardize": True}
    return OmegaConf.create({**base, **overrides})


def _numbered(n_events=50, n_features=2, n_particles=4):
    """float64 events whose every value is its event's index, so a split can be traced back."""
    return np.broadcast_to(np.arange(n_events, dtype=np.float64)[:, None, None],
                           (n_events, n_features, n_particles)).copy()


def test_npy_events_are_split_by_the_data_seed_into_float32(tmp_path):
    np.save(tmp_path / "events.npy", _numbered())
    events = load_events(_npy("events.npy", feature_names=["pt", "eta"]), launch_dir=tmp_path)
    assert events.train.dtype == np.float32 and events.train.shape == (40, 2, 4) and events.test.shape == (10, 2, 4)
    assert events.feature_names == ["pt", "eta"]
    train_ids, test_ids = events.train[:, 0, 0].astype(int), events.test[:, 0, 0].astype(int)
    assert sorted([*train_ids, *test_ids]) == list(range(50))  # every event once, on one side
    again = load_events(_npy(tmp_path / "events.npy", feature_names=["pt", "eta"]))
    assert np.array_equal(again.test, events.test)
    other = load_events(_npy(tmp_path / "events.npy", seed=1))
    assert not np.array_equal(other.test, events.test)
    assert other.feature_names == ["feature 0", "feature 1"]


def test_npy_path_expands_the_home_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    np.save(tmp_path / "events.npy", _numbered())
    assert load_events(_npy("~/events.npy"), launch_dir=tmp_path / "elsewhere").train.shape == (40, 2, 4)


def test_npy_file_is_memory_mapped(tmp_path):
    np.save(tmp_path / "events.npy", _numbered())
    assert isinstance(read_array(str(tmp_path / "events.npy")), np.memmap)


def test_npz_reads_its_only_array_or_the_one_named_by_key(tmp_path):
    np.savez(tmp_path / "one.npz", events=_numbered())
    assert read_array(str(tmp_path / "one.npz")).shape == (50, 2, 4)
    np.savez(tmp_path / "two.npz", jets=_numbered(20, 3, 5), labels=np.zeros(20))
    assert read_array(str(tmp_path / "two.npz"), key="jets").shape == (20, 3, 5)
    events = load_events(_npy(tmp_path / "two.npz", key="jets"))
    assert events.train.shape == (16, 3, 5) and events.train.dtype == np.float32
    with pytest.raises(ConfigError, match=r"^data.key=None .*several: jets, labels"):
        read_array(str(tmp_path / "two.npz"))
    with pytest.raises(ConfigError, match=r"^data.key=muons .*one of the arrays in .*: jets, labels"):
        read_array(str(tmp_path / "two.npz"), key="muons")
    with pytest.raises(ConfigError, match=r"^data.key=jets .*null for a .npy"):
        np.save(tmp_path / "events.npy", _numbered())
        read_array(str(tmp_path / "events.npy"), key="jets")


def _with_nan(x):
    x[3, 1, 2], x[7, 0, 0], x[8, 0, 1] = np.nan, np.inf, -np.inf
    return x


@pytest.mark.parametrize(
    "array, overrides, key, message",
    [
        (None, {}, "data.path", r"an existing .npy or .npz file; .*missing.npy does not exist"),
        (_numbered()[:, 0], {}, "data.path", r"rank 3, .* has shape \(50, 4\)"),
        (_numbered()[None], {}, "data.path", r"rank 3, .* has shape \(1, 50, 2, 4\)"),
        (_with_nan(_numbered()), {}, "data.path", r"finite values only; it has 1 NaN and 2 infinite .* of 400"),
        (np.full((10, 2, 2), 1e300), {}, "data.path", r"0 NaN and 40 infinite \(or beyond float32"),
        (_numbered(9), {}, "data.path", r"at least data.min_events=10 events; it has 9"),
        (_numbered(10), {"test_fraction": 0.1}, "data.test_fraction", r"leaves 9 for training and 1 held out"),
        (_numbered(), {"feature_names": ["pt", "eta", "phi"]}, "data.feature_names", r"one name per feature: 2"),
        (np.zeros((20, 0, 4)), {}, "data.path", r"at least one feature and one particle"),
        (np.array(["a", "b"] * 20).reshape(10, 2, 2), {}, "data.path", r"real numbers; .* has dtype <U1"),
    ],
    ids=["missing", "rank 2", "rank 4", "nan and inf", "float32 overflow", "too few events", "split too small",
         "feature names", "no features", "strings"],
)
def test_bad_arrays_are_refused_with_the_key_and_what_is_allowed(tmp_path, array, overrides, key, message):
    path = tmp_path / "missing.npy"
    if array is not None:
        np.save(path, array)
    with pytest.raises(ConfigError) as info:
        load_events(_npy("missing.npy", **overrides), launch_dir=tmp_path)
    assert info.value.key == key
    assert re.search(message, str(info.value)), str(info.value)


def test_files_numpy_cannot_read_are_refused(tmp_path):
    (tmp_path / "events.csv").write_text("1,2,3\n")
    with pytest.raises(ConfigError, match=r"^data.path=events.csv .*as np.save / np.savez write them"):
        read_array("events.csv", launch_dir=tmp_path)
    np.save(tmp_path / "objects.npy", np.array([{}, 1], dtype=object))
    with pytest.raises(ConfigError, match=r"^data.path=.*numpy can read without pickle"):
        read_array(str(tmp_path / "objects.npy"))
    with pytest.raises(ConfigError, match=r"is not a file"):
        read_array(str(tmp_path))


def test_split_events_copies_and_needs_two_events_per_side():
    train, test = split_events(_numbered(10), 0.3, seed=0)
    assert len(train) == 7 and len(test) == 3 and train.dtype == np.float32
    order = np.random.default_rng(0).permutation(10)  # both sides in random order: a prefix is a fair sample
    assert list(test[:, 0, 0]) == list(order[:3]) and list(train[:, 0, 0]) == list(order[3:])
    with pytest.raises(ConfigError, match="data.test_fraction=0.9"):
        split_events(_numbered(10), 0.9, seed=0)


# --- the data groups' own keys ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["data=jets", "data.offset_sigma=-1"], "data.offset_sigma"),
        (["data=jets", "data.offset_sigma=[0.5,0.5]"], "data.offset_sigma"),
        (["data=jets", "data.scale_sigma=-0.1"], "data.scale_sigma"),
        (["data=jets", "data.scale_sigma=inf"], "data.scale_sigma"),
        (["data=jets", "data.mu=nan"], "data.mu"),
        (["data=jets", "data.n_train=1"], "data.n_train"),
        (["data=jets", "data.feature_names=[a,b]"], "data.feature_names"),
        (["data=npy"], "data.path"),
        (["data=npy", "data.path=x.npy", "data.test_fraction=1"], "data.test_fraction"),
        (["data=npy", "data.path=x.npy", "data.min_events=3"], "data.min_events"),
        (["data=npy", "data.path=x.npy", "data.key=''"], "data.key"),
    ],
)
def test_data_group_keys_are_validated(overrides, key):
    with pytest.raises(ConfigError) as info:
        validate(compose_config(*overrides))
    assert info.value.key == key


def test_jets_and_npy_groups_compose_with_their_defaults():
    jets = compose_config("data=jets")
    validate(jets)
    assert (jets.data.offset_sigma, jets.data.scale_sigma, jets.data.n_particles) == (0.5, 0.3, 100)
    npy = compose_config("data=npy", "data.path=events.npy", "data.feature_names=[pt,eta,phi]")
    validate(npy)
    assert npy.data.test_fraction == 0.2 and npy.data.min_events == 10 and list(npy.data.feature_names) == [
        "pt", "eta", "phi"]


def test_an_array_of_the_wrong_rank_is_told_the_shape_its_layout_reads(tmp_path):
    np.save(tmp_path / "flat.npy", np.zeros((10, 8), dtype=np.float32))
    with pytest.raises(ConfigError, match=r"shape \(events, features, particles\); .*x.reshape\(len\(x\), features, "
                                          r"particles\)"):
        read_array("flat.npy", launch_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"shape \(events, particles, features\); .*x.reshape\(len\(x\), particles, "
                                          r"features\)"):
        read_array("flat.npy", launch_dir=tmp_path, layout="particles_first")
