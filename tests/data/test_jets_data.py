"""Jet arrays as they come: particles-first layout, the particle mask, feature transforms, and the masked model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from flowvae.config import validate
from flowvae.data.events import file_array, load_events, split_mask
from flowvae.data.transforms import FRACTION_MARGIN, FeatureMap
from flowvae.errors import ConfigError
from flowvae.models import FlowVAE
from tests.conftest import compose_config

DATA = Path(__file__).resolve().parents[1] / "data"
GLUON30 = DATA / "gluon_30p_slice.npz"
GLUON150 = DATA / "gluon_150p_slice.npz"


def _jetnet(path=GLUON150, *overrides):
    cfg = compose_config("data=jetnet", f"data.path={path}", *overrides)
    validate(cfg)
    return cfg


def test_jetnet_files_load_particles_first_with_the_mask_split_off():
    events = load_events(_jetnet().data)
    raw = np.load(GLUON150)["particle_features"]
    assert events.train.shape[1:] == (3, 150) and events.feature_names == ["etarel", "phirel", "ptrel"]
    assert events.kinematics == (0, 1, 2) and events.transforms == ["none", "none", "logit"]
    n_real = raw[..., 3].sum(axis=1)
    assert sorted(np.concatenate([events.train_mask, events.test_mask]).sum(axis=1)) == sorted(n_real)
    assert (events.train[np.broadcast_to(~events.train_mask[:, None], events.train.shape)] == 0).all()
    # the split keeps each jet whole: features and mask of one jet stay together
    jet = np.where(raw[..., 3].sum(1) == events.test_mask[0].sum())[0]
    assert any(np.array_equal(raw[j, :, :3].T, events.test[0]) for j in jet)


def test_file_array_is_the_inverse_of_reading_a_file():
    raw = np.load(GLUON30)["particle_features"][:20]
    features, mask = split_mask(raw.transpose(0, 2, 1), 3)
    back = file_array(features, mask.astype(features.dtype), 3, "particles_first")
    np.testing.assert_array_equal(back, raw)


@pytest.mark.parametrize("change, message", [
    (lambda x: x.__setitem__((0, 0, 3), 0.5), "0/1 mask"),
    (lambda x: x.__setitem__((0, -1, 0), 0.3), "non-zero features"),  # a padded slot with a value
    (lambda x: x.__setitem__((0, 2, 3), 0.0) or x.__setitem__((0, 2, slice(0, 3)), 0.0), "come last"),
])
def test_masks_that_do_not_match_the_data_are_refused(tmp_path, change, message):
    raw = np.load(GLUON150)["particle_features"].copy()
    change(raw)
    path = tmp_path / "bad.npz"
    np.savez(path, particle_features=raw)
    with pytest.raises(ConfigError, match=message) as info:
        load_events(_jetnet(path).data)
    assert info.value.key == "data.mask_feature"


@pytest.mark.parametrize("overrides, key", [
    (["data.mask_feature=7"], "data.mask_feature"),
    (["data.jet_kinematics=[0,1,9]"], "data.jet_kinematics"),
    (["data.transforms=[none,none,logit]"], "data.transforms"),
    (["data.transforms=[none,none,logit,log]"], "data.transforms"),
])
def test_indices_and_lists_are_checked_against_the_file(overrides, key):
    with pytest.raises(ConfigError) as info:
        load_events(_jetnet(GLUON150, *overrides).data)
    assert info.value.key == key


@pytest.mark.parametrize("overrides, key", [
    (["data.layout=sideways"], "data.layout"),
    (["data.jet_kinematics=[0,1]"], "data.jet_kinematics"),
    (["data.jet_kinematics=[0,1,3]"], "data.jet_kinematics"),  # the mask's index
    (["data.transforms=[none,none,sqrt,none]"], "data.transforms"),
])
def test_data_options_are_validated_before_any_file_is_read(overrides, key):
    cfg = compose_config("data=jetnet", "data.path=x.npz", *overrides)
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert info.value.key == key
    with pytest.raises(ConfigError, match="data.mask_feature"):
        validate(compose_config("data.mask_feature=3"))  # a mask belongs to a file


@pytest.mark.parametrize("kind, values", [("log", np.array([1e-6, 0.3, 50.0])),
                                          ("logit", np.array([1e-6, 0.3, 1 - 1e-6])),
                                          ("none", np.array([-2.0, 0.0, 3.0]))])
def test_transforms_round_trip_and_map_any_model_value_into_their_domain(kind, values):
    events = np.tile(values, (4, 1, 2)).reshape(4, 1, 6).astype(np.float32)
    mask = np.ones((4, 6), dtype=bool)
    mask[:, 5] = False
    events[:, :, 5] = 0
    feature_map = FeatureMap.fit(events, mask, [kind], standardize=True)
    model_space = feature_map.forward(events, mask)
    assert model_space[:, :, 5].tolist() == [[0.0]] * 4  # padded: 0, not log(0)
    np.testing.assert_allclose(model_space[mask[:, None, :]].mean(), 0, atol=1e-6)  # standardized on real ones
    np.testing.assert_allclose(feature_map.inverse(model_space, mask)[:, :, :5], events[:, :, :5], rtol=2e-5,
                               atol=1e-7)
    anything = np.linspace(-6, 6, 24, dtype=np.float32).reshape(4, 1, 6)  # ±6 standard deviations
    generated = feature_map.inverse(anything, np.ones((4, 6), dtype=bool))
    if kind == "log":
        assert (generated > 0).all()
    if kind == "logit":
        assert ((generated >= 0) & (generated <= 1)).all() and np.isfinite(generated).all()


def _shares(seed=0, n=50, p=7):
    """Jets (n, 2, p) whose feature 1 is each real particle's share of its jet (sums 0.6 to 1.04), and their mask."""
    rng = np.random.default_rng(seed)
    mask = np.arange(p) < rng.integers(2, p + 1, size=n)[:, None]
    raw = np.where(mask, rng.exponential(size=(n, p)), 0.0)
    shares = raw / raw.sum(axis=1, keepdims=True) * rng.uniform(0.6, 1.04, size=(n, 1))
    events = np.stack([np.where(mask, rng.normal(size=(n, p)), 0.0), shares], axis=1).astype(np.float32)
    return events, mask


def test_fraction_is_the_additive_log_ratio_below_a_ceiling_fitted_on_the_training_jets():
    events, mask = _shares()
    feature_map = FeatureMap.fit(events, mask, ["none", "fraction"], standardize=False)
    sums = np.where(mask, events[:, 1], 0).sum(axis=1, dtype=np.float64)
    ceiling = sums.max() * (1 + FRACTION_MARGIN)
    assert feature_map.ceilings == {1: pytest.approx(ceiling, rel=1e-12)}
    ratios = feature_map.forward(events, mask)[:, 1]
    expected = np.log(events[:, 1].astype(np.float64)) - np.log(ceiling - sums)[:, None]  # written out, per jet
    np.testing.assert_allclose(ratios[mask], expected[mask], rtol=1e-6)
    assert (ratios[~mask] == 0).all()
    np.testing.assert_allclose(feature_map.inverse(feature_map.forward(events, mask), mask), events, rtol=2e-6,
                               atol=1e-7)


def test_fraction_generates_jets_whose_shares_are_positive_and_add_up_below_the_ceiling():
    events, mask = _shares()
    feature_map = FeatureMap.fit(events, mask, ["none", "fraction"], standardize=True)
    wild = np.random.default_rng(1).normal(scale=30.0, size=(200, 2, 7)).astype(np.float32)  # far beyond the data
    generated_mask = np.arange(7) < np.random.default_rng(2).integers(1, 8, size=200)[:, None]
    shares = feature_map.inverse(wild, generated_mask)[:, 1]
    assert np.isfinite(shares).all() and (shares >= 0).all() and (shares[~generated_mask] == 0).all()
    within = feature_map.inverse(np.clip(wild, -6, 6), generated_mask)[:, 1]  # ±6 standard deviations: no underflow
    assert (within[generated_mask] > 0).all()
    sums = shares.sum(axis=1, dtype=np.float64)
    assert sums.max() <= feature_map.ceilings[1] * (1 + 1e-6)
    assert sums.max() > 0.99 * feature_map.ceilings[1]  # the ceiling is reached, not a tighter bound by mistake


def test_fraction_takes_a_held_out_jet_above_the_ceiling_to_just_below_it():
    events, mask = _shares()
    feature_map = FeatureMap.fit(events, mask, ["none", "fraction"], standardize=False)
    above = events[:1].copy()
    above[0, 1] *= 2 * feature_map.ceilings[1] / above[0, 1].sum()
    assert np.isfinite(feature_map.forward(above, mask[:1])).all()


@pytest.mark.parametrize("kind, bad", [("log", 0.0), ("logit", 1.0), ("logit", -0.1), ("fraction", 0.0)])
def test_values_outside_a_transforms_domain_are_refused_with_the_feature_named(kind, bad):
    events = np.full((3, 2, 4), 0.5, dtype=np.float32)
    events[1, 1, 2] = bad
    with pytest.raises(ConfigError, match=f"{kind} needs .* pt has 1 values outside"):
        FeatureMap.fit(events, None, ["none", kind], standardize=False, names=["eta", "pt"])


def _masked_model():
    torch.manual_seed(0)
    return FlowVAE(2 * 5, [16], 3, "planar", 2, n_mask=5)


def _masked_batch():
    g = torch.Generator().manual_seed(3)
    values = torch.randn(8, 2, 5, generator=g)
    mask = (torch.arange(5) < torch.tensor([5, 4, 3, 5, 2, 1, 5, 3])[:, None]).float()
    values = values * mask[:, None, :]
    return torch.cat([values.flatten(1), mask], dim=1), values, mask


def test_padded_particles_change_no_loss():
    model, (x, values, mask) = _masked_model(), _masked_batch()
    moved = values.clone()
    moved[~mask.bool()[:, None, :].expand_as(moved)] = 7.5  # padded slots get any value
    x_moved = torch.cat([moved.flatten(1), mask], dim=1)
    # the encoder sees the values, so compare the decoder's likelihood at one fixed latent
    z = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
    mean, log_var = model.decode(z)
    weight = mask.repeat(1, 2)
    from flowvae.models.vae import _gaussian_log_prob

    assert torch.equal(_gaussian_log_prob(values.flatten(1), mean, log_var, weight),
                       _gaussian_log_prob(moved.flatten(1), mean, log_var, weight))
    g = torch.Generator().manual_seed(5)
    loss = model.loss(x, generator=g)
    assert torch.isfinite(loss.loss) and x_moved.shape == x.shape


def test_masked_reconstruction_is_the_real_particles_log_likelihood_plus_the_multiplicity_term():
    model, (x, values, mask) = _masked_model(), _masked_batch()
    g = torch.Generator().manual_seed(2)
    _, z_k, _ = model.posterior_sample(x, torch.Generator().manual_seed(2))
    h = model.decoder(z_k)
    mean, log_var = model._decode(h)
    normal = torch.distributions.Normal(mean, torch.exp(0.5 * log_var))
    real = mask.repeat(1, 2).bool()
    expected = -(normal.log_prob(values.flatten(1)) * real).sum(-1)
    counts = mask.sum(-1).long()
    expected = expected - torch.log_softmax(model.multiplicity_head(h), -1)[torch.arange(8), counts]
    assert model.loss(x, generator=g).recon.item() == pytest.approx(expected.mean().item(), rel=1e-5)


def test_generated_jets_have_a_multiplicity_and_zeros_in_padded_slots():
    model = _masked_model()
    z = torch.randn(4000, 3, generator=torch.Generator().manual_seed(0))
    out = model.generate(z, "sample", torch.Generator().manual_seed(1))
    values, mask = out[:, :10].reshape(-1, 2, 5), out[:, 10:]
    counts = mask.sum(-1)
    assert set(counts.long().tolist()) <= set(range(1, 6)) and len(set(counts.long().tolist())) > 2
    assert (torch.diff(mask, dim=1) <= 0).all()  # real slots first
    assert (values * (1 - mask[:, None, :]) == 0).all()
    # n ~ the categorical over 1 … P (a jet has at least one particle): the head's softmax without n = 0
    probs = torch.softmax(model.multiplicity_head(model.decoder(z))[:, 1:], -1).mean(0)
    observed = torch.bincount(counts.long(), minlength=6)[1:] / len(counts)
    assert torch.allclose(observed, probs, atol=0.02)
