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


def test_the_training_defaults_are_the_neutral_values_the_identity_leaves_out():
    """train.ema and train.select_by default to exactly the values flowvae.identity leaves out of a run's identity,
    so every run of before keeps its hash."""
    from flowvae.identity import NEUTRAL, run_hash

    train = compose_config().train
    assert train.ema == NEUTRAL["train.ema"] == 0.0 and OmegaConf.get_type(train, "ema") is float
    assert train.select_by == NEUTRAL["train.select_by"] == "val_loss"
    cfg = compose_config()
    before = OmegaConf.to_container(cfg)
    del before["train"]["ema"], before["train"]["select_by"]
    assert run_hash(before) == run_hash(cfg)
    assert run_hash(compose_config("train.ema=0.999")) != run_hash(cfg)
    assert run_hash(compose_config("train.val_fraction=0.1", "train.select_by=kl_sum")) != run_hash(
        compose_config("train.val_fraction=0.1"))


@pytest.mark.parametrize("overrides, message", [
    (["train.ema=1.0"], r"train.ema=1.0 is not allowed: a number in \[0, 1\)"),
    (["train.ema=-0.1"], r"train.ema=-0.1 is not allowed: a number in \[0, 1\)"),
    (["train.ema=nan"], "train.ema=nan is not allowed"),
    (["train.val_fraction=0.1", "train.select_by=loss"], "train.select_by=loss is not allowed: val_loss, or a "
                                                         "per-feature distance"),
    (["train.val_fraction=0.1", "train.select_by=fpd"], "train.select_by=fpd is not allowed"),
    (["train.val_fraction=0.1", "train.select_by=kl_sum_0"], "train.select_by=kl_sum_0 is not allowed"),
    (["train.select_by=kl_sum"], "train.select_by=kl_sum is not allowed: val_loss unless train.val_fraction > 0"),
    (["train.val_fraction=0.1", "train.select_by=w1_3"], r"train.select_by=w1_3 is not allowed: a feature of these "
                                                         r"events \(0 to 2\)"),
])
def test_bad_ema_and_select_by_are_refused_with_the_key_named(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        validate(compose_config(*overrides))
    assert info.value.key == overrides[-1].split("=")[0]


@pytest.mark.parametrize("select_by", ["val_loss", "kl_sum", "w1_sum", "js_sum", "kl_0", "w1_2", "js_1"])
def test_every_per_feature_distance_selects(select_by):
    """The names train.select_by takes are those a search's trial can report after each epoch."""
    from flowvae.search.pruning import OBJECTIVES

    validate(compose_config("train.val_fraction=0.1", f"train.select_by={select_by}", "train.ema=0.999"))
    assert select_by == "val_loss" or OBJECTIVES.fullmatch(select_by)


def test_a_bad_select_by_exits_2_in_one_line(tmp_path):
    from tests.conftest import TINY, run_flowvae

    out = run_flowvae(["train", *TINY, "train.select_by=kl_sum", f"results_csv={tmp_path / 'r.csv'}"], cwd=tmp_path)
    text = out.stdout + out.stderr
    assert out.returncode == 2, text
    assert "train.select_by=kl_sum is not allowed" in text and "Traceback" not in text
    assert len([line for line in text.splitlines() if line.strip()]) == 1, text
    assert not (tmp_path / "r.csv").exists()
