"""Sweeps: the preset grid, a multirun on the basic and joblib launchers, failures that do not sink a sweep,
and `flowvae table` on what they wrote."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml
from hydra import compose, initialize_config_module

from flowvae.callbacks import count_jobs
from flowvae.config import register_configs
from flowvae.report import load_results, seed_table
from tests.conftest import run_flowvae


def _sweep(tmp_path, tiny, *overrides, name="sweep"):
    args = ["train", "-m", *tiny, f"hydra.sweep.dir={tmp_path / name}", f"results_csv={tmp_path / 'results.csv'}",
            *overrides]
    return run_flowvae(args, cwd=tmp_path, timeout=600)


def test_seed_table_preset_expands_to_the_full_grid(tmp_path):
    out = run_flowvae(["train", "+experiment=seed_table", "--cfg", "hydra"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    params = yaml.safe_load(out.stdout)["hydra"]["sweeper"]["params"]
    assert params["flow"].split(",") == ["planar", "iaf", "householder", "triangular", "orthogonal"]
    assert [int(k) for k in params["n_flows"].split(",")] == [0, 1, 2, 5, 10, 15, 20, 30, 40, 60, 80]
    register_configs()
    with initialize_config_module(config_module="flowvae.conf", version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=seed_table"], return_hydra_config=True)
        assert count_jobs(cfg) == 5 * 11 * 3
        cfg = compose("config", overrides=["+experiment=seed_table"], return_hydra_config=True)
        cfg.hydra.overrides.task = ["+experiment=seed_table", "seed=0,1,2,3,4"]  # the command line wins
        assert count_jobs(cfg) == 5 * 11 * 5


@pytest.mark.parametrize("launcher", ["basic", "joblib"])
def test_multirun_writes_a_row_per_job_and_table_gives_the_means(tmp_path, tiny, launcher):
    extra = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"] if launcher == "joblib" else []
    out = _sweep(tmp_path, tiny, "flow=planar,householder", "n_flows=1,2", *extra)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "sweep finished: 4 ok" in out.stdout + out.stderr
    results = pd.read_csv(tmp_path / "results.csv")
    assert len(results) == 4 and set(results["status"]) == {"ok"}

    table_out = run_flowvae(["table", str(tmp_path / "results.csv")], cwd=tmp_path)
    assert table_out.returncode == 0, table_out.stderr
    printed = pd.read_csv(tmp_path / "results_kl_sum.csv", index_col="n_flows")
    assert list(printed.columns) == ["planar", "householder"] and list(printed.index) == [1, 2]
    for flow in ("planar", "householder"):
        for k in (1, 2):
            value = results[(results.flow == flow) & (results.n_flows == k)]["kl_sum"].iloc[0]
            assert printed.loc[k, flow] == f"{value:.4f} (n=1)"
    assert (tmp_path / "results_kl_sum.png").stat().st_size > 0
    assert "| n_flows | planar | householder |" in (tmp_path / "results_kl_sum.md").read_text()


def test_a_failing_job_does_not_sink_the_sweep(tmp_path, tiny):
    out = _sweep(tmp_path, tiny, "flow=planar", "n_flows=1,-1,2")
    text = out.stdout + out.stderr
    assert out.returncode == 2, text
    assert "2 ok" in text and "1 invalid" in text and "n_flows=-1" in text
    results = pd.read_csv(tmp_path / "results.csv")
    assert sorted(results["n_flows"]) == [1, 2]


def test_table_mean_std_over_seeds_and_zero_flows_in_every_column(tmp_path):
    rows = []
    for seed, (p1, i1, plain) in enumerate([(0.10, 0.30, 0.24), (0.14, 0.34, 0.26), (0.12, 0.32, 0.25)]):
        common = {"seed": seed, "status": "ok", "data_mu": "1.0"}
        rows += [{**common, "flow": "planar", "n_flows": 1, "kl_sum": p1, "config_hash": f"p{seed}"},
                 {**common, "flow": "iaf", "n_flows": 1, "kl_sum": i1, "config_hash": f"i{seed}"},
                 {**common, "flow": "planar", "n_flows": 0, "kl_sum": plain, "config_hash": f"z{seed}"}]
    rows.append({"seed": 9, "status": "failed", "flow": "iaf", "n_flows": 1, "kl_sum": None, "config_hash": "f"})
    path = tmp_path / "r.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    table, not_ok = load_results(path)
    assert not_ok == 1 and len(table) == 9
    cells, flows = seed_table(table, "kl_sum")
    assert flows == ["planar", "iaf"]
    assert cells.loc[(1, "planar"), "mean"] == pytest.approx(0.12)
    assert cells.loc[(1, "planar"), "std"] == pytest.approx(0.02)
    assert cells.loc[(0, "iaf"), "mean"] == pytest.approx(0.25) and cells.loc[(0, "iaf"), "count"] == 3
    out = run_flowvae(["table", str(path), "--no-plot"], cwd=tmp_path)
    assert out.returncode == 0 and "1 failed or unfinished rows left out" in out.stdout
    assert "0.1200 ± 0.0200 (n=3)" in out.stdout


def test_table_refuses_mixed_settings_and_unknown_metrics(tmp_path):
    path = tmp_path / "r.csv"
    pd.DataFrame([{"flow": "planar", "n_flows": 1, "seed": 0, "status": "ok", "kl_sum": 0.1, "data_mu": "1.0"},
                  {"flow": "planar", "n_flows": 1, "seed": 0, "status": "ok", "kl_sum": 0.2, "data_mu": "2.0"}]
                 ).to_csv(path, index=False)
    out = run_flowvae(["table", str(path)], cwd=tmp_path)
    assert out.returncode == 2 and "--filter data_mu=1.0" in out.stderr
    out = run_flowvae(["table", str(path), "--filter", "data_mu=2.0", "--no-plot"], cwd=tmp_path)
    assert out.returncode == 0 and "0.2000 (n=1)" in out.stdout
    out = run_flowvae(["table", str(path), "--metric", "nope", "--filter", "data_mu=1.0"], cwd=tmp_path)
    assert out.returncode == 2 and "--metric nope" in out.stderr
    out = run_flowvae(["table", str(tmp_path / "missing.csv")], cwd=tmp_path)
    assert out.returncode == 2 and "does not exist" in out.stderr


@pytest.mark.slow
def test_submitit_local_runs_a_real_job(tmp_path, tiny):
    out = _sweep(tmp_path, tiny, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "n_flows=1",
                 "flow=planar")
    assert out.returncode == 0, out.stdout + out.stderr
    results = pd.read_csv(tmp_path / "results.csv")
    assert len(results) == 1 and results["status"].iloc[0] == "ok"
    assert list((tmp_path / "sweep" / ".submitit").iterdir())
