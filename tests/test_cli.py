"""End to end through the console script, as a user types it."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from flowvae import __version__
from flowvae.experiment import metric_columns
from tests.conftest import run_flowvae


def _train(tmp_path, tiny, *overrides, run_dir="run"):
    args = ["train", *tiny, f"hydra.run.dir={tmp_path / run_dir}", f"results_csv={tmp_path / 'results.csv'}",
            *overrides]
    return run_flowvae(args, cwd=tmp_path)


def test_version_and_help(tmp_path):
    out = run_flowvae(["--version"], cwd=tmp_path)
    assert out.returncode == 0 and __version__ in out.stdout
    out = run_flowvae(["--help"], cwd=tmp_path)
    assert out.returncode == 0 and "flowvae train" in out.stdout and "flowvae table" in out.stdout
    out = run_flowvae(["frobnicate"], cwd=tmp_path)
    assert out.returncode == 2 and "unknown command" in out.stderr


def test_train_passes_hydra_flags_through(tmp_path):
    out = run_flowvae(["train", "--cfg", "job", "flow=planar", "n_flows=3"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "n_flows: 3" in out.stdout and "name: planar" in out.stdout
    out = run_flowvae(["train", "--help"], cwd=tmp_path)
    assert out.returncode == 0 and "flow: householder, iaf, none, orthogonal, planar, triangular" in out.stdout


def test_train_writes_row_outputs_and_is_deterministic(tmp_path, tiny):
    first = _train(tmp_path, tiny, "flow=planar", "n_flows=2", run_dir="a")
    assert first.returncode == 0, first.stdout + first.stderr
    second = _train(tmp_path, tiny, "flow=planar", "n_flows=2", run_dir="b")
    assert second.returncode == 0, second.stdout + second.stderr

    table = pd.read_csv(tmp_path / "results.csv")
    assert len(table) == 2
    row = table.iloc[0]
    assert row["status"] == "ok" and row["flow"] == "planar" and row["n_flows"] == 2
    kls = [row[f"kl_{i}"] for i in range(3)]
    assert all(math.isfinite(v) and v >= 0 for v in kls)
    assert row["kl_sum"] == pytest.approx(sum(kls), rel=1e-12)
    metric_values = table.loc[0, metric_columns(3)].astype(float)
    assert all(map(math.isfinite, metric_values)), metric_values[~metric_values.map(math.isfinite)]
    # Same config and seed: the same numbers, to the bit.
    metric_cols = [c for c in table.columns if c.startswith(("kl_", "w1_", "js_", "gen_", "final_"))]
    assert (table.loc[0, metric_cols] == table.loc[1, metric_cols]).all()
    assert table.loc[0, "config_hash"] == table.loc[1, "config_hash"]

    run_dir = tmp_path / "a"
    for name in ("result.csv", "training_curves.csv", "checkpoint.pt", "histograms.png", "status.json",
                 ".hydra/config.yaml", "train.log"):
        assert (run_dir / name).exists(), name
    curves = pd.read_csv(run_dir / "training_curves.csv")
    assert list(curves["epoch"]) == [1, 2]
    assert pd.read_csv(run_dir / "result.csv").iloc[0]["kl_sum"] == row["kl_sum"]


def test_zero_flows_is_the_same_plain_vae_for_every_flow_type(tmp_path, tiny):
    sums = []
    for flow in ("none", "iaf", "orthogonal"):
        out = _train(tmp_path, tiny, f"flow={flow}", "n_flows=0", run_dir=flow)
        assert out.returncode == 0, out.stdout + out.stderr
        sums.append(pd.read_csv(tmp_path / flow / "result.csv").iloc[0][["kl_sum", "w1_sum", "final_test_loss"]])
    for other in sums[1:]:
        assert (other == sums[0]).all()


def test_bad_value_exits_2_with_one_line_and_no_row(tmp_path, tiny):
    out = _train(tmp_path, tiny, "n_flows=-1")
    assert out.returncode == 2
    text = out.stdout + out.stderr
    assert "n_flows=-1" in text and "Traceback" not in text
    assert not (tmp_path / "results.csv").exists()


def test_wrong_type_is_refused_by_hydra(tmp_path, tiny):
    out = _train(tmp_path, tiny, "n_flows=abc")
    assert out.returncode == 2
    assert "n_flows" in out.stdout + out.stderr
    assert not (tmp_path / "results.csv").exists()
