"""The configs compose for every flow and data group, and every wrong value is named before any work."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from flowvae.config import validate
from flowvae.data.events import per_feature
from flowvae.errors import ConfigError
from flowvae.flows import FLOWS
from tests.conftest import compose_config

DATA = ["gaussian", "jets"]


@pytest.mark.parametrize("data", DATA)
@pytest.mark.parametrize("flow", FLOWS)
def test_every_flow_composes_with_every_data_group(flow, data):
    cfg = compose_config(f"flow={flow}", f"data={data}", "n_flows=3")
    validate(cfg)
    assert cfg.flow.name == flow and cfg.data.name == data and cfg.n_flows == 3


def test_defaults_are_valid_and_typed():
    cfg = compose_config()
    validate(cfg)
    assert OmegaConf.get_type(cfg.train.epochs) is int
    assert cfg.model.likelihood == "gaussian" and cfg.eval.decode == "sample"


@pytest.mark.parametrize(
    "override, key",
    [
        ("n_flows=-1", "n_flows"),
        ("data.sigma=0", "data.sigma"),
        ("data.sigma=[0.5,-1,0.5]", "data.sigma"),
        ("data.mu=[1,2]", "data.mu"),
        ("data.n_train=0", "data.n_train"),
        ("data.n_particles=0", "data.n_particles"),
        ("train.epochs=0", "train.epochs"),
        ("train.batch_size=0", "train.batch_size"),
        ("train.lr=0", "train.lr"),
        ("train.lr=-1e-3", "train.lr"),
        ("train.grad_clip=0", "train.grad_clip"),
        ("train.device=tpu", "train.device"),
        ("model.latent_dim=0", "model.latent_dim"),
        ("model.likelihood=poisson", "model.likelihood"),
        ("model.sigma_x=0", "model.sigma_x"),
        ("eval.n_samples=0", "eval.n_samples"),
        ("eval.decode=mode", "eval.decode"),
        ("eval.source=data", "eval.source"),
        ("eval.bins=0", "eval.bins"),
    ],
)
def test_each_bad_value_names_its_key(override, key):
    cfg = compose_config(override)
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert info.value.key == key
    assert str(info.value).startswith(f"{key}=")


def test_sylvester_bottleneck_larger_than_latent_is_refused():
    cfg = compose_config("flow=orthogonal", "flow.num_ortho_vecs=9", "model.latent_dim=8")
    with pytest.raises(ConfigError, match="flow.num_ortho_vecs=9.*dim=8.*model.latent_dim"):
        validate(cfg)


@pytest.mark.parametrize("overrides, key, message", [
    (["flow=iaf", "+flow.hiden=3"], "flow.hiden", "an option of flow iaf: hidden, context"),
    (["flow=planar", "+flow.hidden=3"], "flow.hidden", "flow planar takes no options"),
    (["flow=iaf", "flow.hidden=abc"], "flow.hidden", "integer"),
    (["flow=householder", "flow.num_householder=0"], "flow.num_householder", "integer >= 1"),
    (["flow=none", "flow.name=bogus"], "flow", "one of none, planar"),
])
def test_flow_options_are_checked_against_the_registry(overrides, key, message):
    with pytest.raises(ConfigError, match=message) as info:
        validate(compose_config(*overrides))
    assert info.value.key == key


def test_sigma_x_with_mse_is_refused():
    cfg = compose_config("model.likelihood=mse", "model.sigma_x=0.5")
    with pytest.raises(ConfigError, match="model.sigma_x"):
        validate(cfg)


def test_per_feature_accepts_a_number_or_one_per_feature():
    assert per_feature(0.5, 3, "data.sigma") == [0.5, 0.5, 0.5]
    assert per_feature([1, 2, 3], 3, "data.mu") == [1.0, 2.0, 3.0]
    with pytest.raises(ConfigError, match="data.mu"):
        per_feature([1, 2], 3, "data.mu")
    with pytest.raises(ConfigError, match="data.mu"):
        per_feature("abc", 3, "data.mu")


@pytest.mark.parametrize(("overrides", "shape"), [
    (["data=jetnet"], "a .npz file whose array particle_features is (N, particles, features)"),
    (["data=npy"], "a .npy or .npz array (N, features, particles)"),
    (["data=npy", "data.layout=particles_first"], "a .npy or .npz array (N, particles, features)"),
])
def test_a_missing_data_path_names_the_shape_data_layout_reads(overrides, shape):
    """JetNet's files are (N, particles, features), and data=jetnet reads them so: the message says the shape of
    the file as data.layout reads it, not the events' shape inside flowvae."""
    with pytest.raises(ConfigError) as info:
        validate(compose_config(*overrides))
    assert info.value.key == "data.path" and str(info.value).endswith(f"the path of {shape}")
