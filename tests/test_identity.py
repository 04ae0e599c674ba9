"""A run's identity: every config key but where/how it writes changes the hash and has a setting column."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from flowvae.identity import NOT_IDENTITY, is_setting_column, run_hash, run_settings, same_value, train_hash
from tests.conftest import compose_config


def _leaves(node, prefix=""):
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _leaves(value, f"{name}.")
        else:
            yield name, value


def _changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, list):
        return [*value, 1]
    return f"{value}x" if value is not None else 7


@pytest.mark.parametrize("data", ["gaussian", "jets", "npy"])
def test_every_key_but_the_excluded_ones_changes_the_hash_and_its_column(data):
    """The guard for new config keys: none can be left out of a run's identity by accident."""
    cfg = compose_config("flow=iaf", "n_flows=2", f"data={data}")
    base = OmegaConf.to_container(cfg)
    base_hash, base_row = run_hash(base), run_settings(base)
    for key, value in _leaves(base):
        changed = OmegaConf.create(base)
        OmegaConf.update(changed, key, _changed(value))
        column = "flow" if key == "flow.name" else key
        if any(key == k or key.startswith(f"{k}.") for k in NOT_IDENTITY) or _standard_prior_option(base, key):
            assert run_hash(changed) == base_hash, key
            assert column not in base_row
        else:
            assert run_hash(changed) != base_hash, key
            assert run_settings(changed)[column] != base_row.get(column), key
            assert is_setting_column(column)


def _standard_prior_option(base: dict, key: str) -> bool:
    """A standard prior's unset family options are no part of the identity (its name is)."""
    return base["prior"]["name"] == "standard" and key.startswith("prior.") and key != "prior.name"


@pytest.mark.parametrize("prior", ["flow", "two_stage"])
def test_every_key_of_a_chosen_prior_changes_the_hash_and_its_column(prior):
    base = OmegaConf.to_container(compose_config(f"prior={prior}"))
    base_hash, base_row = run_hash(base), run_settings(base)
    for key, value in _leaves(base["prior"], "prior."):
        changed = OmegaConf.create(base)
        OmegaConf.update(changed, key, _changed(value))
        assert run_hash(changed) != base_hash, key
        assert run_settings(changed)[key] != base_row.get(key), key


def test_a_standard_prior_leaves_every_hash_as_it_was():
    """N(0, I) is what every run had before priors could be chosen: its config hashes as it always did."""
    cfg = OmegaConf.to_container(compose_config())
    without = {key: value for key, value in cfg.items() if key != "prior"}
    assert run_hash(cfg) == run_hash(without) and train_hash(cfg) == train_hash(without)
    assert not [column for column in run_settings(cfg) if column.startswith("prior")]


def test_zero_flows_of_any_type_is_one_run_with_no_flow_options():
    plain, iaf = compose_config("flow=none"), compose_config("flow=iaf", "flow.hidden=32")
    assert run_hash(plain) == run_hash(iaf)
    row = run_settings(iaf)
    assert row["flow"] == "none" and row["n_flows"] == 0
    assert not [c for c in row if c.startswith("flow.")]
    deep_plain, deep_iaf = (compose_config(*o, "n_flows=1") for o in (["flow=none"], ["flow=iaf"]))
    assert run_hash(deep_plain) != run_hash(deep_iaf)
    assert run_settings(deep_iaf)["flow.hidden"] == 64


def test_settings_are_flat_cells_named_as_on_the_command_line():
    row = run_settings(compose_config("flow=householder", "n_flows=3", "seed=2", "data.mu=[1.0,0.0,2.0]"))
    assert list(row)[:3] == ["flow", "n_flows", "seed"]
    assert (row["flow"], row["n_flows"], row["seed"]) == ("householder", 3, 2)
    assert row["flow.num_householder"] == 8
    assert row["data.mu"] == "[1.0, 0.0, 2.0]" and row["model.hidden"] == "[256, 256]"
    assert row["model.sigma_x"] == "" and row["train.lr"] == 0.001
    assert "results_csv" not in row and "train.threads" not in row


@pytest.mark.parametrize("cell, typed, equal", [
    ("1000", "1000.0", True), ("0.001", "1e-3", True), ("True", "true", True), ("planar", "planar", True),
    ("", "", True), ("1000", "100", False), ("planar", "Planar", False), ("", "0", False), ("nan", "nan", True),
])
def test_filter_values_compare_by_type(cell, typed, equal):
    assert same_value(cell, typed) is equal
